//! `pipeline query "SQL" --sink URI [--out FILE]`: SQL (polars) over a sink's tables.
//!
//! The tables are `scores`, `anomalies` and `rejects`, each every committed part file of its
//! directory (staged parts of unfinished runs are not part of a table). Local files are scanned
//! in place, so a query reads only the columns and row groups it needs; files in object storage
//! are fetched whole, several at once, through the same store clients and retries as the runs
//! that wrote them.

use std::io::Write;

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use polars::prelude::{
    CsvWriter, DataFrame, HiveOptions, LazyFrame, ParquetWriter, PlRefPath, ScanArgsParquet,
    ScanSources, SerWriter,
};
use polars::sql::SQLContext;

use crate::cli::QueryArgs;
use crate::error::{Error, Result, from_store};
use crate::io::source::Source;
use crate::io::storage::Storage;
use crate::io::tables::Table;
use crate::pipeline::Context;

/// How many files of a table in object storage are fetched at once.
const FETCH_CONCURRENCY: usize = 16;

/// The format of `--out`, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutFormat {
    Parquet,
    Csv,
}

/// Runs the query and prints its result, or writes it to `--out`.
pub fn query(a: &QueryArgs, ctx: &Context) -> Result<()> {
    // Checked first, so that a typo in the file name costs no reading.
    let format = a.out.as_deref().map(out_format).transpose()?;
    let sink = Storage::open(&a.sink, &ctx.io)?;
    let mut sql = SQLContext::new();
    let mut described = Vec::new();
    for table in Table::ALL {
        if let Some(frame) = scan(&sink, table, ctx)? {
            let mut schema_probe = frame.clone();
            let schema = schema_probe.collect_schema().map_err(|e| {
                Error::data_because(
                    sink.display(table.dir()),
                    "cannot read the table's schema",
                    e,
                )
            })?;
            let columns: Vec<&str> = schema.iter_names().map(|n| n.as_str()).collect();
            described.push(format!("{}({})", table.dir(), columns.join(", ")));
            sql.register(table.dir(), frame);
        }
    }
    if described.is_empty() {
        return Err(Error::InputMissing {
            uri: a.sink.clone(),
            hint: "no scores, anomalies or rejects table there: pass the sink.uri of a pipeline that has finished a run".into(),
        });
    }
    let tables = described.join("; ");
    // Planning errors (bad SQL, unknown table or column) are the user's to fix: 64.
    let mut plan = sql
        .execute(&a.sql)
        .map_err(|e| Error::Usage(format!("{e}\n  tables in {}: {tables}", a.sink)))?;
    plan.collect_schema()
        .map_err(|e| Error::Usage(format!("{e}\n  tables in {}: {tables}", a.sink)))?;
    let mut result = plan
        .collect()
        .map_err(|e| Error::data_because(&a.sink, "the query failed while reading", e))?;
    match (&a.out, format) {
        (Some(out), Some(format)) => write(&mut result, out, format, ctx),
        _ => {
            print(&result);
            Ok(())
        }
    }
}

/// A lazy scan of every committed part file of `table`, or `None` when the sink has none.
fn scan(sink: &Storage, table: Table, ctx: &Context) -> Result<Option<LazyFrame>> {
    let uri = sink.display(&format!("{}/", table.dir()));
    let files = match Source::open(&uri, &ctx.io) {
        Ok(source) => source.files().to_vec(),
        Err(Error::InputMissing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let local: Option<Vec<PlRefPath>> = files
        .iter()
        .map(|f| {
            sink.local_path(&sink.relative(&f.path))
                .map(|p| PlRefPath::new(p.to_string_lossy().into_owned()))
        })
        .collect();
    let sources = match local {
        Some(paths) => ScanSources::Paths(paths.into_iter().collect()),
        None => {
            let store = sink.store();
            let fetched: Vec<Vec<u8>> = ctx
                .io
                .rt
                .block_on(
                    futures::stream::iter(&files)
                        .map(|f| async move {
                            let got = store.get(&f.path).await?.bytes().await?;
                            Ok::<_, object_store::Error>(got.to_vec())
                        })
                        .buffered(FETCH_CONCURRENCY)
                        .try_collect(),
                )
                .map_err(|e| from_store(&uri, e))?;
            ScanSources::Buffers(fetched.into_iter().map(Into::into).collect())
        }
    };
    let args = ScanArgsParquet {
        // Runs with different passthrough columns share a table: a column one run lacks is null
        // in its rows rather than an error.
        allow_missing_columns: true,
        // The part files are flat and named exactly: no `key=value` directories, and a `[` in
        // a path is a character, not a pattern.
        hive_options: HiveOptions::new_disabled(),
        glob: false,
        ..Default::default()
    };
    LazyFrame::scan_parquet_sources(sources, args)
        .map(Some)
        .map_err(|e| Error::data_because(uri, "cannot scan the table", e))
}

/// The format named by `out`'s extension.
fn out_format(out: &str) -> Result<OutFormat> {
    let lower = out.to_ascii_lowercase();
    if lower.ends_with(".parquet") {
        Ok(OutFormat::Parquet)
    } else if lower.ends_with(".csv") {
        Ok(OutFormat::Csv)
    } else {
        Err(Error::Usage(format!(
            "--out {out}: name a .parquet or .csv file (the extension chooses the format)"
        )))
    }
}

/// Writes the result to `out` (a path or URI) in one atomic put: a reader never sees half a file.
fn write(result: &mut DataFrame, out: &str, format: OutFormat, ctx: &Context) -> Result<()> {
    let mut bytes = Vec::new();
    let written = match format {
        OutFormat::Parquet => ParquetWriter::new(&mut bytes).finish(result).map(|_| ()),
        OutFormat::Csv => CsvWriter::new(&mut bytes).finish(result),
    };
    written.map_err(|e| Error::internal(e, "encoding the query result"))?;
    let (dir, name) = match out.rsplit_once('/') {
        Some((dir, name)) => (if dir.is_empty() { "/" } else { dir }, name),
        None => (".", out),
    };
    let target = Storage::open(dir, &ctx.io)?;
    target.put(name, bytes.into())?;
    let _ = writeln!(
        std::io::stdout().lock(),
        "wrote {} rows × {} columns to {out}",
        result.height(),
        result.width()
    );
    Ok(())
}

/// Prints the result as a table; polars elides the middle of long results and says so.
fn print(result: &DataFrame) {
    let _ = writeln!(std::io::stdout().lock(), "{result}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_format_follows_the_extension_and_refuses_others() {
        assert_eq!(out_format("a/b.parquet").unwrap(), OutFormat::Parquet);
        assert_eq!(out_format("s3://b/x.CSV").unwrap(), OutFormat::Csv);
        let err = out_format("result.json").unwrap_err();
        assert_eq!(err.exit_code(), 64);
        assert!(err.to_string().contains(".parquet or .csv"), "{err}");
    }
}
