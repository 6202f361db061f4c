//! Fuzzing entry points: each takes arbitrary bytes and must return — never panic, hang, or
//! allocate without bound — whatever the bytes are. Errors are the expected outcome.
//!
//! The cargo-fuzz targets in `fuzz/` (libFuzzer, nightly) call these for long coverage-guided
//! runs; the test suite runs a short, seeded mutation loop over each on stable, so a regression
//! on a known-bad input fails CI without a nightly toolchain.

use std::sync::Arc;

use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::config::SourceConfig;
use crate::config::load::{LoadOptions, load_str};
use crate::data::ImageShape;
use crate::io::decode::{Decoder, decode_png};
use crate::io::pages::check_file;
use crate::io::source::check_footer;
use crate::models::tensors::from_safetensors;
use crate::pipeline::artifact::ModelMeta;

/// Rows decoded per input at most, so one input stays fast.
const MAX_ROWS: usize = 4096;

/// The pipeline TOML loader with `${VAR}` interpolation: variables whose name starts with `A`
/// are set, others unset.
pub fn pipeline_toml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let vars = |name: &str| name.starts_with('A').then(|| format!("value-of-{name}"));
    let _ = load_str("fuzz.toml", &text, &LoadOptions::default(), &vars);
}

/// A Parquet file's bytes through the reader and the image decoders (every layout the
/// schema selects: tensor, list with shape, PNG struct).
pub fn parquet_images(data: &[u8]) {
    let Ok(builder) = ParquetRecordBatchReaderBuilder::try_new(Bytes::copy_from_slice(data)) else {
        return;
    };
    // As `Source` does before reading any file.
    if check_footer(builder.metadata(), data.len() as u64).is_err() {
        return;
    }
    // As `StoreReader` does with every column chunk it fetches; the page walk can meet the
    // reader's own panics on corrupt pages.
    let file = Bytes::copy_from_slice(data);
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_file(builder.metadata(), &file)
    }));
    if !matches!(checked, Ok(Ok(()))) {
        return;
    }
    let config = SourceConfig {
        image_column: "image".into(),
        id_column: "id".into(),
        ..SourceConfig::default()
    };
    let uri: Arc<str> = Arc::from("fuzz.parquet");
    let Ok(decoder) = Decoder::new(builder.schema(), &config, &uri) else {
        return;
    };
    let Ok(reader) = builder.with_batch_size(256).build() else {
        return;
    };
    // The reader's own panics on corrupt pages are caught, as `Source::stream` catches them
    // (and turns them into a data error); a panic in our decoders is not.
    let mut batches = Vec::new();
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut rows = 0;
        for batch in reader {
            let Ok(batch) = batch else { return };
            rows += batch.num_rows();
            batches.push(batch);
            if rows >= MAX_ROWS {
                return;
            }
        }
    }));
    if read.is_err() {
        return;
    }
    let mut shape = None;
    let mut first = 0;
    for batch in &batches {
        if decoder.decode(batch, first, &mut shape).is_err() {
            return;
        }
        first += batch.num_rows() as u64;
    }
}

/// The PNG decoder (with its size and allocation limits).
pub fn png(data: &[u8]) {
    let _ = decode_png(data);
}

/// The model loader: model.json parsing, and model.safetensors rebuilt as each kind. The
/// first byte picks the kind and a small shape; the rest is the safetensors file.
pub fn model_artifact(data: &[u8]) {
    let _ = serde_json::from_slice::<ModelMeta>(data);
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let kinds = crate::models::families::names();
    let kind = kinds[usize::from(selector) % kinds.len()];
    let shape = ImageShape::new(
        1 + usize::from(selector >> 4) % 4,
        3,
        1 + 2 * usize::from(selector & 1),
    );
    let levels = if selector & 2 == 0 { 2 } else { 256 };
    let Ok(tensors) = from_safetensors(rest) else {
        return;
    };
    let hyperparameters = serde_json::json!({
        "hidden": 3, "components": 2, "k": 2, "order": "raster", "context": "previous",
        "l2": 1.0, "seed": 0, "alpha": 1.0,
    });
    let stored = crate::models::Stored {
        shape,
        levels,
        hyperparameters: &hyperparameters,
        tensors: &tensors,
    };
    if let Ok(model) = crate::models::families::load(kind, &stored) {
        let image = vec![1u8; shape.dims()];
        let _ = model.log_likelihood(&image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Mutations per target per test run: a few seconds in a debug build.
    const ROUNDS: usize = 20_000;

    /// Applies one to four random byte-level mutations: flips, overwrites with boundary
    /// values, insertions, deletions, truncation, and splicing a copied range elsewhere.
    fn mutate(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..rng.random_range(1..=4) {
            if v.is_empty() {
                v.push(rng.random());
                continue;
            }
            let at = rng.random_range(0..v.len());
            match rng.random_range(0..6) {
                0 => v[at] ^= 1 << rng.random_range(0..8),
                1 => v[at] = [0, 0xff, 0x7f, 0x80, b'"', b'[', b'{'][rng.random_range(0..7)],
                2 => v.insert(at, rng.random()),
                3 => {
                    v.remove(at);
                }
                4 => v.truncate(at),
                _ => {
                    let len = rng.random_range(1..=16.min(v.len() - at));
                    let chunk = v[at..at + len].to_vec();
                    let to = rng.random_range(0..v.len());
                    v.splice(to..to, chunk);
                }
            }
        }
        v
    }

    fn run(target: fn(&[u8]), seeds: &[Vec<u8>], salt: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(salt);
        for seed in seeds {
            target(seed);
        }
        for _ in 0..ROUNDS {
            let seed = &seeds[rng.random_range(0..seeds.len())];
            target(&mutate(seed, &mut rng));
        }
    }

    fn parquet_seed() -> Vec<u8> {
        use arrow::array::{FixedSizeListArray, StringArray, UInt8Array};
        use arrow::datatypes::{DataType, Field, Schema};
        let item = Arc::new(Field::new("item", DataType::UInt8, false));
        let values = UInt8Array::from_iter_values((0..8 * 12).map(|i| (i * 37 % 256) as u8));
        let list = FixedSizeListArray::new(item.clone(), 12, Arc::new(values), None);
        let metadata = std::collections::HashMap::from([
            (
                "ARROW:extension:name".to_string(),
                "arrow.fixed_shape_tensor".to_string(),
            ),
            (
                "ARROW:extension:metadata".to_string(),
                r#"{"shape":[3,4]}"#.to_string(),
            ),
        ]);
        let field =
            Field::new("image", DataType::FixedSizeList(item, 12), true).with_metadata(metadata);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            field,
        ]));
        let ids = StringArray::from_iter_values((0..8).map(|i| format!("i{i}")));
        let batch = arrow::record_batch::RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(ids), Arc::new(list)],
        )
        .unwrap();
        let mut out = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        out
    }

    #[test]
    fn the_toml_loader_survives_mutations() {
        let seeds = vec![
            include_bytes!("../pipelines/demo.toml").to_vec(),
            b"[pipeline]\nname = \"${A:-x}\"\nrun_id = \"${B:?need B}$$\"\n[source]\nuri = \"${AB}\"\n[sink]\nuri = \"o\"\n".to_vec(),
        ];
        run(pipeline_toml, &seeds, 1);
    }

    #[test]
    fn the_parquet_decoders_survive_mutations() {
        let found = include_bytes!("../tests/data/fuzz-dict-page-without-dictionary.parquet");
        let oversized = include_bytes!("../tests/data/fuzz-oversized-dictionary.parquet");
        let seeds = [parquet_seed(), found.to_vec(), oversized.to_vec()];
        run(parquet_images, &seeds, 2);
    }

    #[test]
    fn the_png_decoder_survives_mutations() {
        let seed =
            crate::io::png::grid_png(&[vec![3u8; 12]], ImageShape::new(3, 4, 1), 256, 1).unwrap();
        run(png, &[seed], 3);
    }

    #[test]
    fn the_model_loader_survives_mutations() {
        use crate::models::tensors::to_safetensors;
        let tensors = vec![
            crate::models::NamedTensor {
                name: "log_prob".into(),
                shape: vec![12, 2],
                data: vec![(0.5f64).ln(); 24],
            },
            crate::models::NamedTensor {
                name: "order".into(),
                shape: vec![12],
                data: (0..12).map(f64::from).collect(),
            },
        ];
        let weights = to_safetensors(&tensors).unwrap();
        let seeds: Vec<Vec<u8>> = (0..4u8)
            .map(|s| [vec![s * 17], weights.clone()].concat())
            .collect();
        run(model_artifact, &seeds, 4);
    }
}
