//! Shared helpers for the integration tests: run the real binary in a temp dir, write Parquet
//! fixtures in each image layout, and read written tables back with the parquet crate.
#![allow(dead_code)]

pub mod delta;
pub mod fault_proxy;
pub mod gcs_shim;
pub mod stores;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, FixedSizeListArray, Float32Array, Float64Array,
    ListArray, StringArray, StructArray, UInt8Array, UInt16Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The repository root (where `pipelines/` and `data/` are).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What a run of the binary did.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Asserts the exit code, showing the output when it differs, and that nothing panicked.
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        for leak in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            assert!(
                !self.stderr.contains(leak),
                "panic text in stderr:\n{}",
                self.stderr
            );
        }
        self
    }

    /// Asserts that stderr mentions every needle.
    pub fn mentions(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr does not mention {n:?}:\n{}",
                self.stderr
            );
        }
        self
    }
}

/// Runs `pipeline ARGS` in `dir` with extra environment variables.
pub fn pipeline(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.args(args).current_dir(dir).env_remove("PIPELINE_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the binary runs");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Says why a test is skipped, or fails it where `required_by` (an environment variable that
/// CI sets: `PIPELINE_REQUIRE_S3`, …) is set: required in CI means it cannot skip there.
pub fn skip_unless_required(required_by: &str, why: &str) {
    assert!(
        std::env::var_os(required_by).is_none(),
        "{required_by} is set, so this test may not skip, but: {why}"
    );
    eprintln!("skipped: {why}");
}

/// Runs `args` with the process set to abort at crash point `point` (see
/// `src/pipeline/crash_point.rs`) and checks it died there.
pub fn crash_at(dir: &Path, args: &[&str], point: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(dir)
        .env_remove("PIPELINE_LOG")
        .env("PIPELINE_CRASH_AT", point)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&format!("PIPELINE_CRASH_AT={point}: aborting")),
        "{point}: did not die there: {stderr}"
    );
}

/// Runs `pipeline fit CONFIG` in `dir` and returns the model directory it printed.
pub fn fit_model(dir: &Path, config: &str) -> String {
    fitted_model(&pipeline(dir, &["fit", config], &[]))
}

/// Writes a pipeline file with the given source and sink and extra TOML.
pub fn write_config(dir: &Path, name: &str, source: &str, sink: &str, extra: &str) -> PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[pipeline]\nname = \"test\"\n\n[source]\nuri = \"{source}\"\n\n[sink]\nuri = \"{sink}\"\n\n{extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Synthetic grayscale images: pixel d is bright with probability p_d, where p varies
/// smoothly across the image, so a model has something to learn.
pub fn images(n: usize, height: usize, width: usize, seed: u64) -> Vec<Vec<u8>> {
    shifted_images(n, height, width, seed, 0.0)
}

/// [`images`] with every pixel's chance of being bright raised by `shift`: another
/// distribution, for drift.
pub fn shifted_images(
    n: usize,
    height: usize,
    width: usize,
    seed: u64,
    shift: f64,
) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dims = height * width;
    (0..n)
        .map(|_| {
            (0..dims)
                .map(|d| {
                    let p = 0.1 + 0.8 * (d as f64 / dims as f64) + shift;
                    if rng.random::<f64>() < p {
                        rng.random_range(140..=255)
                    } else {
                        rng.random_range(0..100)
                    }
                })
                .collect()
        })
        .collect()
}

/// Images whose pixels share one hidden brightness: each image is bright or dark as a whole (a
/// fair coin), and each pixel follows it with probability 0.9 (bright: 190..=210, dark:
/// 30..=50, narrow enough that an 8-bit model's mixture can fit them). Pixels depend on each
/// other, so a model with a context beats an independent one.
pub fn latent_images(n: usize, dims: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let bright = rng.random_bool(0.5);
            (0..dims)
                .map(|_| {
                    if rng.random_bool(0.9) == bright {
                        rng.random_range(190..=210)
                    } else {
                        rng.random_range(30..=50)
                    }
                })
                .collect()
        })
        .collect()
}

/// Ids `img-00000`, … for `n` images starting at `start`.
pub fn ids(start: usize, n: usize) -> Vec<String> {
    (start..start + n).map(|i| format!("img-{i:05}")).collect()
}

/// Writes one record batch of the given columns.
fn write_columns(path: &Path, columns: Vec<(Field, ArrayRef)>) {
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = columns.into_iter().unzip();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap();
    let file = File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A tensor column's field, with the extension metadata pyarrow writes.
fn tensor_field(name: &str, value: DataType, shape: &[usize]) -> Field {
    let size = shape.iter().product::<usize>() as i32;
    let storage = DataType::FixedSizeList(Arc::new(Field::new("item", value, false)), size);
    let metadata = HashMap::from([
        (
            "ARROW:extension:name".to_string(),
            "arrow.fixed_shape_tensor".to_string(),
        ),
        (
            "ARROW:extension:metadata".to_string(),
            serde_json::json!({ "shape": shape }).to_string(),
        ),
    ]);
    Field::new(name, storage, true).with_metadata(metadata)
}

/// Camera frames as the nightly pipeline expects them: frame_id, camera_id, captured_at, and
/// a 28x28 uint8 tensor.
pub fn write_camera_frames(path: &Path, n: usize) {
    let imgs = images(n, 28, 28, 21);
    let values = UInt8Array::from_iter_values(imgs.iter().flatten().copied());
    let list = FixedSizeListArray::new(
        Arc::new(Field::new("item", DataType::UInt8, false)),
        784,
        Arc::new(values),
        None,
    );
    write_columns(
        path,
        vec![
            (
                Field::new("frame_id", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(ids(0, n))),
            ),
            (
                Field::new("camera_id", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("cam-{}", i % 3)),
                )),
            ),
            (
                Field::new("captured_at", DataType::Int64, false),
                Arc::new(arrow::array::Int64Array::from_iter_values(
                    (0..n as i64).map(|i| 1_764_300_000 + i),
                )),
            ),
            (
                tensor_field("image", DataType::UInt8, &[28, 28]),
                Arc::new(list),
            ),
        ],
    );
}

/// Layout (a): `arrow.fixed_shape_tensor<uint8>` of `shape`, with `id` and `label` columns
/// (`label` is the row index mod 10).
pub fn write_tensor_u8(path: &Path, ids: &[String], images: &[Vec<u8>], shape: &[usize]) {
    let labels: Vec<u16> = (0..ids.len()).map(|i| (i % 10) as u16).collect();
    write_tensor_u8_labelled(path, ids, images, shape, &labels);
}

/// [`write_tensor_u8`] with the given labels.
pub fn write_tensor_u8_labelled(
    path: &Path,
    ids: &[String],
    images: &[Vec<u8>],
    shape: &[usize],
    labels: &[u16],
) {
    let size = shape.iter().product::<usize>();
    let values = UInt8Array::from_iter_values(images.iter().flatten().copied());
    let list = FixedSizeListArray::new(
        Arc::new(Field::new("item", DataType::UInt8, false)),
        size as i32,
        Arc::new(values),
        None,
    );
    let labels = UInt16Array::from_iter_values(labels.iter().copied());
    write_columns(
        path,
        vec![
            (
                Field::new("id", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(ids)),
            ),
            (
                Field::new("label", DataType::UInt16, false),
                Arc::new(labels),
            ),
            (
                tensor_field("image", DataType::UInt8, shape),
                Arc::new(list),
            ),
        ],
    );
}

/// Layout (a) with float32 values on [0, 1].
pub fn write_tensor_f32(path: &Path, ids: &[String], images: &[Vec<u8>], shape: &[usize]) {
    let size = shape.iter().product::<usize>();
    let values =
        Float32Array::from_iter_values(images.iter().flatten().map(|&v| f32::from(v) / 255.0));
    let list = FixedSizeListArray::new(
        Arc::new(Field::new("item", DataType::Float32, false)),
        size as i32,
        Arc::new(values),
        None,
    );
    write_columns(
        path,
        vec![
            (
                Field::new("id", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(ids)),
            ),
            (
                tensor_field("image", DataType::Float32, shape),
                Arc::new(list),
            ),
        ],
    );
}

/// Layout (b): `list<uint8>` with `Option` rows (None = null image), shape from the config.
pub fn write_list_u8(path: &Path, ids: &[Option<String>], images: &[Option<Vec<u8>>]) {
    let lengths = images.iter().map(|i| i.as_ref().map_or(0, Vec::len));
    let values = UInt8Array::from_iter_values(images.iter().flatten().flatten().copied());
    let nulls =
        arrow::buffer::NullBuffer::from(images.iter().map(Option::is_some).collect::<Vec<_>>());
    let list = ListArray::new(
        Arc::new(Field::new("item", DataType::UInt8, true)),
        OffsetBuffer::from_lengths(lengths),
        Arc::new(values),
        Some(nulls),
    );
    write_columns(
        path,
        vec![
            (
                Field::new("id", DataType::Utf8, true),
                Arc::new(StringArray::from_iter(ids.iter().map(|s| s.as_deref()))),
            ),
            (
                Field::new("image", list.data_type().clone(), true),
                Arc::new(list),
            ),
        ],
    );
}

/// Layout (b'): float32 tensor rows written as `list<float32>`, for NaN and range tests.
pub fn write_list_f32(path: &Path, ids: &[String], images: &[Vec<f32>]) {
    let values = Float32Array::from_iter_values(images.iter().flatten().copied());
    let list = ListArray::new(
        Arc::new(Field::new("item", DataType::Float32, true)),
        OffsetBuffer::from_lengths(images.iter().map(Vec::len)),
        Arc::new(values),
        None,
    );
    write_columns(
        path,
        vec![
            (
                Field::new("id", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(ids)),
            ),
            (
                Field::new("image", list.data_type().clone(), true),
                Arc::new(list),
            ),
        ],
    );
}

/// Layout (b''): raw pixels as binary, with `height` and `width` columns.
pub fn write_binary_with_shape_columns(
    path: &Path,
    ids: &[String],
    images: &[Vec<u8>],
    height: usize,
    width: usize,
) {
    let n = ids.len();
    write_columns(
        path,
        vec![
            (
                Field::new("id", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(ids)),
            ),
            (
                Field::new("image", DataType::Binary, true),
                Arc::new(BinaryArray::from_iter_values(images.iter())),
            ),
            (
                Field::new("height", DataType::Int32, false),
                Arc::new(arrow::array::Int32Array::from(vec![height as i32; n])),
            ),
            (
                Field::new("width", DataType::Int32, false),
                Arc::new(arrow::array::Int32Array::from(vec![width as i32; n])),
            ),
        ],
    );
}

/// Encodes a grayscale image as PNG.
pub fn png(image: &[u8], height: usize, width: usize) -> Vec<u8> {
    let img = image::GrayImage::from_raw(width as u32, height as u32, image.to_vec()).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Layout (c): a struct `{bytes, path}` of PNG images (the Hugging Face convention).
pub fn write_png_struct(path: &Path, ids: &[String], pngs: &[Vec<u8>]) {
    let bytes: ArrayRef = Arc::new(BinaryArray::from_iter_values(pngs.iter()));
    let paths: ArrayRef = Arc::new(StringArray::from_iter_values(
        ids.iter().map(|i| format!("{i}.png")),
    ));
    let image = StructArray::from(vec![
        (Arc::new(Field::new("bytes", DataType::Binary, true)), bytes),
        (Arc::new(Field::new("path", DataType::Utf8, true)), paths),
    ]);
    write_columns(
        path,
        vec![
            (
                Field::new("id", DataType::Utf8, false),
                Arc::new(StringArray::from_iter_values(ids)),
            ),
            (
                Field::new("image", image.data_type().clone(), true),
                Arc::new(image),
            ),
        ],
    );
}

/// Every row of every Parquet file in `dir` (not recursive), read with the parquet crate.
pub fn read_table(dir: &Path) -> Vec<RecordBatch> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            ParquetRecordBatchReaderBuilder::try_new(File::open(f).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Number of rows over batches.
pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// A string column over batches.
pub fn strings(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"));
            let c = c.as_string::<i32>();
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A float64 column over batches.
pub fn floats(batches: &[RecordBatch], name: &str) -> Vec<f64> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"))
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .collect()
}

/// A list<float32> (or fixed-size list) column over batches, one Vec per row.
pub fn float_lists(batches: &[RecordBatch], name: &str) -> Vec<Vec<f32>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"));
            let value = |i: usize| match c.as_list_opt::<i32>() {
                Some(list) => list.value(i),
                None => c.as_fixed_size_list().value(i),
            };
            (0..c.len())
                .map(|i| {
                    value(i)
                        .as_any()
                        .downcast_ref::<Float32Array>()
                        .unwrap()
                        .values()
                        .to_vec()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A list<string> column over batches, one Vec per row (nulls as empty lists).
pub fn string_lists(batches: &[RecordBatch], name: &str) -> Vec<Vec<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"))
                .as_list::<i32>();
            (0..c.len())
                .map(|i| {
                    c.value(i)
                        .as_string::<i32>()
                        .iter()
                        .map(|s| s.unwrap().to_string())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// An int32 column over batches, nulls as `None`.
pub fn optional_ints(batches: &[RecordBatch], name: &str) -> Vec<Option<i32>> {
    batches
        .iter()
        .flat_map(|b| {
            b.column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"))
                .as_primitive::<arrow::datatypes::Int32Type>()
                .iter()
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A boolean column over batches.
pub fn bools(batches: &[RecordBatch], name: &str) -> Vec<bool> {
    batches
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name(name).unwrap().as_boolean();
            c.iter().map(|v| v.unwrap()).collect::<Vec<_>>()
        })
        .collect()
}

/// id → log-likelihood from a scores table.
pub fn likelihoods(dir: &Path) -> HashMap<String, f64> {
    let t = read_table(dir);
    strings(&t, "id")
        .into_iter()
        .map(Option::unwrap)
        .zip(floats(&t, "log_likelihood"))
        .collect()
}

/// A headless-capable Chromium: `$CHROMIUM`, or `chromium` / `chromium-browser` on the PATH.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Renders `html` in headless Chromium to a PNG screenshot of `width`×`height` CSS pixels.
pub fn screenshot(browser: &Path, html: &Path, png: &Path, width: u32, height: u32) {
    let profile = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("chromium starts");
    assert!(
        status.success() && png.exists(),
        "chromium rendered {}",
        html.display()
    );
}

/// A float64 column of every batch, nulls as `None`.
pub fn optional_floats(batches: &[RecordBatch], name: &str) -> Vec<Option<f64>> {
    use arrow::array::{Array, Float64Array};
    batches
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name(name).expect("column");
            let c = c.as_any().downcast_ref::<Float64Array>().expect("float64");
            (0..c.len())
                .map(|i| (!c.is_null(i)).then(|| c.value(i)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The model directory a successful `pipeline fit` printed (its line `model: DIR`).
pub fn fitted_model(fit: &Output) -> String {
    fit.expect(0);
    fit.stdout
        .lines()
        .find_map(|l| l.strip_prefix("model: "))
        .expect("fit prints the model's directory")
        .to_string()
}
