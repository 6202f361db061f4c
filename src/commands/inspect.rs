//! `pipeline inspect URI`: what is in a Parquet source, and a look at its images.

use std::io::Write;

use crate::cli::InspectArgs;
use crate::config::SourceConfig;
use crate::data::ImageShape;
use crate::error::{Result, from_io};
use crate::io::decode::Decoder;
use crate::io::png::grid_png;
use crate::io::source::Source;
use crate::pipeline::Context;

/// Running pixel statistics.
#[derive(Debug, Default)]
struct PixelStats {
    count: u64,
    sum: f64,
    sum_sq: f64,
    zeros: u64,
    min: u8,
    max: u8,
}

impl PixelStats {
    fn add(&mut self, pixels: &[u8]) {
        if self.count == 0 {
            self.min = u8::MAX;
        }
        for &p in pixels {
            let v = f64::from(p);
            self.sum += v;
            self.sum_sq += v * v;
            self.zeros += u64::from(p == 0);
            self.min = self.min.min(p);
            self.max = self.max.max(p);
        }
        self.count += pixels.len() as u64;
    }
}

/// Prints the schema, row counts, image shape and pixel statistics, and draws images.
pub fn inspect(a: &InspectArgs, ctx: &Context) -> Result<()> {
    let source = Source::open(&a.uri, &ctx.io)?;
    let first = &source.files()[0];
    let id_column = a.id_column.clone().unwrap_or_else(|| {
        if first.schema().field_with_name("id").is_ok() {
            "id".into()
        } else {
            String::new()
        }
    });
    let config = SourceConfig {
        uri: a.uri.clone(),
        image_column: a.image_column.clone(),
        id_column,
        shape: a.shape.clone(),
        ..SourceConfig::default()
    };
    let mut text = String::new();
    text.push_str(&format!(
        "source {}: {} file(s), {} rows\n",
        a.uri,
        source.files().len(),
        source.total_rows()
    ));
    for f in source.files() {
        let md = f.metadata.metadata();
        text.push_str(&format!(
            "  {}: {} rows, {} row group(s), {} bytes\n",
            f.uri,
            f.rows(),
            md.num_row_groups(),
            f.size
        ));
    }
    text.push_str("schema (first file):\n");
    for field in first.schema().fields() {
        let ext = match (field.extension_type_name(), field.extension_type_metadata()) {
            (Some(n), Some(m)) => format!("  [{n} {m}]"),
            (Some(n), None) => format!("  [{n}]"),
            _ => String::new(),
        };
        text.push_str(&format!("  {}: {}{ext}\n", field.name(), field.data_type()));
    }

    let decoders: Vec<Decoder> = source
        .files()
        .iter()
        .map(|f| Decoder::new(f.schema(), &config, &f.uri))
        .collect::<Result<_>>()?;
    let mut columns: Vec<String> = decoders.iter().flat_map(Decoder::columns).collect();
    columns.sort();
    columns.dedup();
    let mut shape: Option<ImageShape> = None;
    let (mut rows, mut rejected) = (0u64, 0u64);
    let mut first_reject = None;
    let mut stats = PixelStats::default();
    let mut drawn: Vec<Vec<u8>> = Vec::new();
    for item in source.stream(&columns, config.batch_size) {
        let item = item?;
        let (batch, rejects) =
            decoders[item.file].decode(&item.batch, item.first_row, &mut shape)?;
        rows += item.batch.num_rows() as u64;
        rejected += rejects.len() as u64;
        if first_reject.is_none() {
            first_reject = rejects.into_iter().next();
        }
        for image in batch.pixels.outer_iter() {
            let px = image.as_slice().expect("contiguous");
            stats.add(px);
            if drawn.len() < a.count {
                drawn.push(px.to_vec());
            }
        }
        if rows >= a.rows {
            break; // dropping the stream stops the reader
        }
    }
    match shape {
        Some(s) => {
            let n = stats.count.max(1) as f64;
            let mean = stats.sum / n;
            let sd = (stats.sum_sq / n - mean * mean).max(0.0).sqrt();
            text.push_str(&format!(
                "images: {s} ({}), D = {} values per image\n\
                 pixels over the first {rows} rows ({rejected} rejected): mean {mean:.2}, sd {sd:.2}, min {}, max {}, zero {:.1}%\n",
                if s.channels == 3 { "RGB" } else { "grayscale" },
                s.dims(),
                stats.min,
                stats.max,
                100.0 * stats.zeros as f64 / n,
            ));
        }
        None => text.push_str(&format!(
            "images: none decoded from the first {rows} rows ({rejected} rejected)\n"
        )),
    }
    if let Some(r) = first_reject {
        text.push_str(&format!(
            "first rejected row: {} row {}: {}\n",
            r.source, r.row, r.reason
        ));
    }
    if let (Some(path), Some(s)) = (&a.out, shape)
        && !drawn.is_empty()
    {
        let png = grid_png(&drawn, s, 256, 2)?;
        std::fs::write(path, png).map_err(|e| from_io(path, e))?;
        text.push_str(&format!("drew {} image(s) into {path}\n", drawn.len()));
    }
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}
