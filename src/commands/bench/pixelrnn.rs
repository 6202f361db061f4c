//! `pipeline bench --model pixelrnn`: the fast kernels of each architecture against the f64
//! reference, the machine's SGEMM and a PyTorch implementation of the same network
//! (`scripts/pixelrnn_torch.py`) on the same threads, all measured in this run.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use rayon::prelude::*;

use super::{Baseline, Rates, Rival, load_images, median_rate, report_with, write_json};
use crate::cli::BenchArgs;
use crate::error::{Error, Result};
use crate::kernels::pixelrnn::{Architecture, Shape, reference, unflatten};
use crate::models::Family;
use crate::models::pixelrnn::{ArchitectureName, PixelRnn, PixelRnnParams};
use crate::pipeline::Context;

/// Images the f64 reference's gradient is timed on (its tape holds every operation of an
/// image, gigabytes for the paper's network on 28 × 28).
const REFERENCE_TRAIN_IMAGES: usize = 2;

/// Runs the benchmark for each architecture asked for.
pub fn bench(a: &BenchArgs, ctx: &Context) -> Result<()> {
    let architectures = match a.architecture.as_deref() {
        Some("row_lstm") => vec![ArchitectureName::RowLstm],
        Some(_) => vec![ArchitectureName::DiagonalBiLstm],
        None => vec![ArchitectureName::RowLstm, ArchitectureName::DiagonalBiLstm],
    };
    let (shape, pixels) = load_images(a, ctx, !a.eight_bit)?;
    let levels = if a.eight_bit { 256 } else { 2 };
    if !a.eight_bit && shape.channels != 1 {
        return Err(Error::Usage(format!(
            "--model pixelrnn measures binary pixels of one-channel images, and {} has {} \
             channels: add --eight-bit",
            a.data, shape.channels
        )));
    }
    let mut reports = Vec::new();
    for architecture in architectures {
        let params = PixelRnnParams {
            architecture,
            layers: a.layers,
            hidden: a.hidden.unwrap_or(PixelRnnParams::default().hidden),
            ..PixelRnnParams::default()
        };
        <PixelRnn as Family>::check(&params).map_err(|problems| {
            let list: Vec<String> = problems
                .iter()
                .map(|p| format!("--{} {}", p.key, p.message))
                .collect();
            Error::Usage(list.join("; "))
        })?;
        let net = params.shape(shape.channels, levels);
        let model = PixelRnn::init(shape, net, 0, pixels.view())
            .map_err(|e| Error::Usage(e.to_string()))?;
        let reference = unflatten(net, model.flat());
        let (height, width) = (shape.height, shape.width);
        let d = shape.dims();
        let subset: Vec<u8> = pixels
            .rows()
            .into_iter()
            .take(a.reference_images)
            .flat_map(|r| {
                r.iter()
                    .map(|&v| if a.eight_bit { v } else { u8::from(v != 0) })
                    .collect::<Vec<_>>()
            })
            .collect();
        let score_images = subset.len() / d;
        let train_images = score_images.min(REFERENCE_TRAIN_IMAGES);
        let repeats = a.repeats.min(3);
        let naive = Rates {
            score: median_rate(repeats, score_images, || {
                let total: f64 = subset
                    .par_chunks(d)
                    .map(|x| reference::log_likelihood(&reference, x, height, width))
                    .sum();
                std::hint::black_box(total);
            }),
            train: median_rate(1, train_images, || {
                let total: f64 = subset[..train_images * d]
                    .par_chunks(d)
                    .map(|x| reference::gradient(&reference, x, height, width).0)
                    .sum();
                std::hint::black_box(total);
            }),
        };
        let baseline = Baseline {
            naive,
            naive_images: score_images,
            flops: flops(net, d),
        };
        let name = match architecture {
            ArchitectureName::RowLstm => "Row LSTM",
            ArchitectureName::DiagonalBiLstm => "Diagonal BiLSTM",
        };
        let pixels_are = if a.eight_bit { "8-bit" } else { "binary" };
        let label = format!(
            "PixelRNN {name} ({} layers, h = {}, {pixels_are})",
            net.layers, net.hidden
        );
        let torch = (!a.eight_bit)
            .then(|| PyTorch::start(a, net, height, width).map(|t| Box::new(t) as Box<dyn Rival>));
        reports.push(report_with(
            a,
            &label,
            shape,
            &model,
            pixels.view(),
            &baseline,
            false,
            torch,
        )?);
    }
    write_json(a, &serde_json::Value::Array(reports))
}

/// Dense-equivalent FLOPs of one image of `d` pixels: (train, score), a training step taken as
/// three forward passes. Mask A counts its 24 live taps per channel; σ, tanh and the
/// softmax are not counted.
fn flops(net: Shape, d: usize) -> (f64, f64) {
    let (h, f) = (net.hidden, 2 * net.hidden);
    let per_layer = match net.architecture {
        Architecture::RowLstm => 4 * h * f * 2 + 4 * h * h * 3,
        Architecture::DiagonalBiLstm => 2 * (4 * h * f + 4 * h * h * 2),
    } + f * h;
    let macs = f * 24 * net.channels + net.layers * per_layer + f * f + f * net.outputs();
    let score = 2.0 * (macs * d) as f64;
    (3.0 * score, score)
}

/// The PyTorch implementation the bench compares with, built into the binary (run as
/// `python -c`), so a binary installed or moved away from its checkout still compares.
const TORCH_SCRIPT: &str = include_str!("../../../scripts/pixelrnn_torch.py");

/// `scripts/pixelrnn_torch.py --serve`, running on the same threads and sizes: one timed pass
/// per request, so the bench can alternate them with its own.
struct PyTorch {
    child: Child,
    requests: Option<ChildStdin>,
    answers: BufReader<ChildStdout>,
    /// Everything the script writes to stderr, read as it comes (so that a script warning at
    /// length cannot fill the pipe and stall), for the message when it fails.
    errors: Option<std::thread::JoinHandle<String>>,
    version: String,
    /// How the script was started, for messages.
    command: String,
}

impl PyTorch {
    /// Starts the script and waits until it is warm (its first line), or says why it did not.
    fn start(
        a: &BenchArgs,
        net: Shape,
        height: usize,
        width: usize,
    ) -> std::result::Result<Self, String> {
        let architecture = match net.architecture {
            Architecture::RowLstm => "row_lstm",
            Architecture::DiagonalBiLstm => "diagonal_bilstm",
        };
        let mut child = Command::new(&a.python)
            .args(["-c", TORCH_SCRIPT])
            .args(["--architecture", architecture])
            .args(["--layers", &net.layers.to_string()])
            .args(["--hidden", &net.hidden.to_string()])
            .args(["--height", &height.to_string()])
            .args(["--width", &width.to_string()])
            .args(["--batch", &a.batch.to_string()])
            .args(["--threads", &rayon::current_num_threads().to_string()])
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{} did not start: {e}", a.python))?;
        let requests = child.stdin.take();
        let answers = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let errors = std::thread::spawn(move || {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            err
        });
        let mut torch = Self {
            child,
            requests,
            answers,
            errors: Some(errors),
            version: String::new(),
            command: format!("{} -c <scripts/pixelrnn_torch.py, built in>", a.python),
        };
        let first = torch.answer()?;
        torch.version = first["torch"].as_str().unwrap_or("?").to_string();
        Ok(torch)
    }

    /// The next line of output as JSON; when there is none, why (the last line the script
    /// wrote to stderr).
    fn answer(&mut self) -> std::result::Result<serde_json::Value, String> {
        let mut line = String::new();
        let read = self.answers.read_line(&mut line);
        if matches!(read, Ok(0) | Err(_)) {
            self.requests = None;
            let _ = self.child.wait();
            let err = self
                .errors
                .take()
                .and_then(|e| e.join().ok())
                .unwrap_or_default();
            let last = err.lines().last().unwrap_or("no message");
            return Err(format!("{}: {last}", self.command));
        }
        serde_json::from_str(&line).map_err(|e| {
            format!(
                "unreadable output of {}: {e}: {}",
                self.command,
                line.trim_end()
            )
        })
    }

    /// Asks for one pass of `what` ("train" or "score") and returns its rate.
    fn rate(&mut self, what: &str) -> std::result::Result<f64, String> {
        if let Some(requests) = self.requests.as_mut() {
            // A failed write shows as the missing answer below.
            let _ = writeln!(requests, "{what}").and_then(|()| requests.flush());
        }
        let answer = self.answer()?;
        answer["images_per_s"]
            .as_f64()
            .ok_or_else(|| format!("no `images_per_s` in {answer} from {}", self.command))
    }
}

impl Rival for PyTorch {
    fn name(&self) -> String {
        format!("PyTorch {}", self.version)
    }

    fn train_rate(&mut self) -> std::result::Result<f64, String> {
        self.rate("train")
    }

    fn score_rate(&mut self) -> std::result::Result<f64, String> {
        self.rate("score")
    }
}

impl Drop for PyTorch {
    /// Closes the script's input (it ends at EOF) and waits for it a few seconds, then ends
    /// it, so that a script which stopped reading cannot hold the bench.
    fn drop(&mut self) {
        self.requests = None;
        for _ in 0..50 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
