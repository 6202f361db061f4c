//! `pipeline bench --model pixelrnn`: the fast kernels of each architecture against the f64
//! reference, the machine's SGEMM and a PyTorch implementation of the same network
//! (`scripts/pixelrnn_torch.py`) on the same threads, all measured in this run.

use std::process::Command;

use rayon::prelude::*;

use super::{Baseline, Rates, load_images, median_rate, report_with, write_json};
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
        let torch = || pytorch(a, net, height, width);
        let torch: Option<&dyn Fn() -> _> = (!a.eight_bit).then_some(&torch);
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

/// Runs `scripts/pixelrnn_torch.py` on the same threads and sizes; its rates, or why not.
fn pytorch(
    a: &BenchArgs,
    net: Shape,
    height: usize,
    width: usize,
) -> std::result::Result<(String, Rates), String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pixelrnn_torch.py");
    if !script.exists() {
        return Err(format!("{} is not here", script.display()));
    }
    let architecture = match net.architecture {
        Architecture::RowLstm => "row_lstm",
        Architecture::DiagonalBiLstm => "diagonal_bilstm",
    };
    let output = Command::new(&a.python)
        .arg(&script)
        .args(["--architecture", architecture])
        .args(["--layers", &net.layers.to_string()])
        .args(["--hidden", &net.hidden.to_string()])
        .args([
            "--height",
            &height.to_string(),
            "--width",
            &width.to_string(),
        ])
        .args(["--batch", &a.batch.to_string()])
        .args(["--threads", &rayon::current_num_threads().to_string()])
        .args(["--repeats", &a.repeats.min(3).to_string()])
        .output()
        .map_err(|e| format!("{} did not start: {e}", a.python))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let last = err.lines().last().unwrap_or("no message");
        return Err(format!("{} {}: {last}", a.python, script.display()));
    }
    let v: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("unreadable output of {}: {e}", script.display()))?;
    let rate = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("no `{k}` in its output"))
    };
    Ok((
        format!("PyTorch {}", v["torch"].as_str().unwrap_or("?")),
        Rates {
            train: rate("train_images_per_s")?,
            score: rate("score_images_per_s")?,
        },
    ))
}
