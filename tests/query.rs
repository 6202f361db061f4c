//! `pipeline query`: SQL over a sink's tables, checked against the tables read back directly.

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type};

use crate::common::*;

/// Runs the demo into `out` as run `run_id`, with extra arguments.
fn demo_run(out: &std::path::Path, run_id: &str, extra: &[&str]) {
    let mut args = vec!["run", "pipelines/demo.toml", "--run-id", run_id];
    args.extend(extra);
    pipeline(&repo(), &args, &[("DEMO_OUT", out.to_str().unwrap())]).expect(0);
}

/// `pipeline query --sink SINK SQL [more args]`.
fn query(sink: &std::path::Path, sql: &str, more: &[&str]) -> Output {
    let mut args = vec!["query", "--sink", sink.to_str().unwrap(), sql];
    args.extend(more);
    pipeline(&repo(), &args, &[])
}

/// A column of a query result as text, whatever string layout the writer chose.
fn texts(batches: &[arrow::record_batch::RecordBatch], name: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
            let c = c.as_string::<i32>();
            (0..c.len())
                .map(|i| c.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn query_answers_what_the_written_tables_hold() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    demo_run(&out, "one", &[]);
    // A second run without the `condition` column: the table spans both, nulls where absent.
    demo_run(&out, "two", &["--set", "source.passthrough=[\"label\"]"]);

    let scores = read_table(&out.join("scores"));
    let runs = strings(&scores, "run_id");
    let flags = bools(&scores, "is_anomaly");
    let count = |run: &str, flagged: bool| {
        (0..runs.len())
            .filter(|&i| runs[i].as_deref() == Some(run) && (!flagged || flags[i]))
            .count()
    };

    // Counts per run, as CSV.
    let csv = dir.path().join("res/counts.csv");
    let wrote = query(
        &out,
        "SELECT run_id, count(*) AS images, sum(CAST(is_anomaly AS INT)) AS flagged, \
         count(condition) AS with_condition FROM scores GROUP BY run_id ORDER BY run_id",
        &["--out", csv.to_str().unwrap()],
    );
    wrote.expect(0);
    assert!(wrote.stdout.contains("wrote 2 rows"), "{}", wrote.stdout);
    let text = std::fs::read_to_string(&csv).unwrap();
    let expected = format!(
        "run_id,images,flagged,with_condition\none,{},{},{}\ntwo,{},{},0\n",
        count("one", false),
        count("one", true),
        count("one", false),
        count("two", false),
        count("two", true),
    );
    assert_eq!(text, expected);
    assert!(count("one", true) > 0, "the demo flags some images");

    // The five highest scores of a run, as Parquet, against a sort of the rows read directly.
    let top = dir.path().join("res/top.parquet");
    query(
        &out,
        "SELECT id, score FROM scores WHERE run_id = 'one' ORDER BY score DESC, id LIMIT 5",
        &["--out", top.to_str().unwrap()],
    )
    .expect(0);
    let written: Vec<_> = read_table(&dir.path().join("res"));
    let ids = texts(&written, "id");
    let got_scores: Vec<f64> = written
        .iter()
        .flat_map(|b| {
            b.column_by_name("score")
                .unwrap()
                .as_primitive::<Float64Type>()
                .values()
                .to_vec()
        })
        .collect();
    let all_ids = strings(&scores, "id");
    let all_scores = floats(&scores, "score");
    let mut mine: Vec<(f64, String)> = (0..runs.len())
        .filter(|&i| runs[i].as_deref() == Some("one"))
        .map(|i| (all_scores[i], all_ids[i].clone().unwrap()))
        .collect();
    mine.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    mine.truncate(5);
    assert_eq!(ids, mine.iter().map(|m| m.1.clone()).collect::<Vec<_>>());
    assert_eq!(got_scores, mine.iter().map(|m| m.0).collect::<Vec<_>>());

    // Printed: the anomalies table has one row per flag, with its per-pixel map.
    let printed = query(
        &out,
        "SELECT count(*) AS flagged, min(array_length(pixel_nll)) AS map_len FROM anomalies WHERE run_id = 'one'",
        &[],
    );
    printed.expect(0);
    let line = printed
        .stdout
        .lines()
        .find(|l| l.contains(&format!(" {} ", count("one", true))))
        .unwrap_or_else(|| panic!("no row with the flag count:\n{}", printed.stdout));
    assert!(line.contains(" 784 "), "28×28 maps: {line}");
}

#[test]
fn query_mistakes_say_what_is_there_and_exit_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    demo_run(&out, "one", &[]);
    // Bad SQL, an unknown column, an unknown table: usage errors that list the tables.
    for sql in [
        "SELEC 1",
        "SELECT no_such_column FROM scores",
        "SELECT * FROM no_such_table",
    ] {
        query(&out, sql, &[]).expect(64).mentions(&[
            "scores(run_id, id, label, condition",
            "anomalies(",
            "rejects(",
        ]);
    }
    query(&out, "SELECT 1", &["--out", "result.json"])
        .expect(64)
        .mentions(&[".parquet or .csv"]);
    query(&dir.path().join("nothing-here"), "SELECT 1", &[])
        .expect(66)
        .mentions(&["no scores, anomalies or rejects table", "sink.uri"]);
    // Nothing is written when the query fails.
    let target = dir.path().join("never.csv");
    query(
        &out,
        "SELECT nope FROM scores",
        &["--out", target.to_str().unwrap()],
    )
    .expect(64);
    assert!(!target.exists());
}
