//! Run history and drift: each committed run adds one `history/` row (counts, score quantiles,
//! p-value shares, the drift test); a night like the training data does not drift, a shifted
//! one does, says so in the log, the manifest and the row, and the report draws the nights.

use std::path::Path;

use crate::common::*;

fn manifest(out: &Path, run: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join(format!("runs/{run}/manifest.json"))).unwrap())
        .unwrap()
}

#[test]
fn a_night_like_the_training_data_does_not_drift_and_a_shifted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let side = 8;
    write_tensor_u8(
        &d.join("train.parquet"),
        &ids(0, 3000),
        &images(3000, side, side, 1),
        &[side, side],
    );
    write_tensor_u8(
        &d.join("same.parquet"),
        &ids(0, 2000),
        &images(2000, side, side, 2),
        &[side, side],
    );
    write_tensor_u8(
        &d.join("shifted.parquet"),
        &ids(0, 2000),
        &shifted_images(2000, side, side, 3, 0.2),
        &[side, side],
    );
    write_config(
        d,
        "p.toml",
        "train.parquet",
        "out",
        "[model]\nkind = \"ar\"\nk = 3\n",
    );
    let model = fit_model(d, "p.toml");
    let score = |source: &str, run: &str| {
        let set = format!("source.uri=\"{source}\"");
        pipeline(
            d,
            &[
                "score", "p.toml", "--model", &model, "--run-id", run, "--set", &set,
            ],
            &[],
        )
    };
    let same = score("same.parquet", "same");
    same.expect(0);
    assert!(!same.stderr.contains("Drift:"), "{}", same.stderr);
    let shifted = score("shifted.parquet", "shifted");
    shifted.expect(0).mentions(&["Drift:", "refit"]);

    let out = d.join("out");
    let calm = &manifest(&out, "same")["scores_summary"];
    assert_eq!(calm["drift"]["drifted"], false, "{calm}");
    assert!(calm["drift"]["p_value"].as_f64().unwrap() >= 0.01);
    let p001 = calm["p_below_001"].as_f64().unwrap();
    assert!(
        p001 < 0.03,
        "about 1% of a normal night's p-values fall below 0.01: {p001}"
    );
    let moved = &manifest(&out, "shifted")["scores_summary"];
    assert_eq!(moved["drift"]["drifted"], true, "{moved}");

    // One history row per run, with what the manifests say.
    let history = read_table(&out.join("history"));
    let runs = strings(&history, "run_id");
    assert_eq!(rows(&history), 2, "{runs:?}");
    let drifted = bools(&history, "drifted");
    let scored = history
        .iter()
        .flat_map(|b| {
            let c = b.column_by_name("scored").unwrap();
            arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(c)
                .values()
                .to_vec()
        })
        .collect::<Vec<_>>();
    for ((run, drifted), scored) in runs.iter().zip(drifted).zip(scored) {
        let run = run.as_deref().unwrap();
        assert_eq!(drifted, run == "shifted", "{run}");
        assert_eq!(scored, 2000);
    }
    let p99 = floats(&history, "score_p99");
    let p50 = floats(&history, "score_p50");
    assert!(p99.iter().zip(&p50).all(|(hi, lo)| hi > lo));

    // A rerun replaces its history row rather than adding one.
    score("same.parquet", "same").expect(0);
    assert_eq!(rows(&read_table(&out.join("history"))), 2);

    // The report shows the nights and which drifted.
    pipeline(d, &["report", "out", "--out", "report.html"], &[]).expect(0);
    let html = std::fs::read_to_string(d.join("report.html")).unwrap();
    assert!(html.contains("Runs and drift"), "no history section");
    assert!(html.contains("shifted") && html.contains("drifted"));
}
