//! Bad inputs: each a clear message naming the file (and row or key), the DESIGN.md exit
//! code, and no panic text.

use crate::common::*;

fn good_file(dir: &std::path::Path, name: &str) {
    write_tensor_u8(
        &dir.join(name),
        &ids(0, 200),
        &images(200, 4, 4, 5),
        &[4, 4],
    );
}

#[test]
fn a_truncated_parquet_file_is_a_data_error() {
    let dir = tempfile::tempdir().unwrap();
    good_file(dir.path(), "good.parquet");
    let bytes = std::fs::read(dir.path().join("good.parquet")).unwrap();
    std::fs::write(dir.path().join("cut.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    write_config(dir.path(), "p.toml", "cut.parquet", "out", "");
    pipeline(dir.path(), &["run", "p.toml"], &[])
        .expect(65)
        .mentions(&["cut.parquet", "not a readable Parquet file"]);
    assert!(
        !dir.path().join("out/scores").exists(),
        "nothing is published"
    );
}

#[test]
fn a_file_that_is_not_parquet_is_a_data_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("notes.parquet"),
        b"just some text, not parquet\n",
    )
    .unwrap();
    write_config(dir.path(), "p.toml", "notes.parquet", "out", "");
    pipeline(dir.path(), &["run", "p.toml"], &[])
        .expect(65)
        .mentions(&["notes.parquet"]);
}

#[test]
fn missing_image_and_id_columns_name_the_column_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    good_file(dir.path(), "d.parquet");
    write_config(dir.path(), "p.toml", "d.parquet", "out", "");
    pipeline(
        dir.path(),
        &["run", "p.toml", "--set", "source.image_column=pixels"],
        &[],
    )
    .expect(65)
    .mentions(&["d.parquet", "no column `pixels`", "source.image_column"]);
    pipeline(
        dir.path(),
        &["run", "p.toml", "--set", "source.id_column=key"],
        &[],
    )
    .expect(65)
    .mentions(&["d.parquet", "no column `key`", "source.id_column"]);
}

#[test]
fn unknown_keys_and_unset_variables_are_config_errors_with_lines() {
    let dir = tempfile::tempdir().unwrap();
    good_file(dir.path(), "d.parquet");
    write_config(
        dir.path(),
        "p.toml",
        "${DATA_DIR}/d.parquet",
        "out",
        "[model]\nknd = \"bernoulli\"\n",
    );
    // Both problems at once, each with its line.
    pipeline(dir.path(), &["validate", "p.toml"], &[])
        .expect(78)
        .mentions(&[
            "p.toml:5: `source.uri`: environment variable DATA_DIR is not set",
            "p.toml:11: unknown key `model.knd`",
        ]);
    pipeline(dir.path(), &["run", "p.toml"], &[("DATA_DIR", ".")])
        .expect(78)
        .mentions(&["unknown key `model.knd`"]);
}

/// A key the chosen kind does not take (here NADE's `hidden` under `bernoulli`, as set on the
/// command line) is a configuration error that names the key, its line, and the keys the kind
/// takes; so is a forced instruction set the CPU lacks.
#[test]
fn a_key_of_another_kind_and_an_impossible_isa_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    good_file(dir.path(), "d.parquet");
    write_config(
        dir.path(),
        "p.toml",
        "d.parquet",
        "out",
        "[model]\nkind = \"bernoulli\"\nhidden = 5\n",
    );
    pipeline(dir.path(), &["validate", "p.toml"], &[])
        .expect(78)
        .mentions(&[
            "p.toml:12: `model.hidden` is not a key of `kind = \"bernoulli\"`",
            "`bernoulli` takes `alpha`",
        ]);
    pipeline(
        dir.path(),
        &[
            "run",
            "p.toml",
            "--set",
            "model.kind=nade",
            "--set",
            "model.hidden=0",
        ],
        &[],
    )
    .expect(78)
    .mentions(&["`model.hidden` must be between 1 and 65536, got 0"]);
    for isa in ["avx9000", "sse1"] {
        pipeline(
            dir.path(),
            &["validate", "p.toml"],
            &[("PIPELINE_ISA", isa)],
        )
        .expect(78)
        .mentions(&["PIPELINE_ISA", isa, "portable"]);
    }
}

#[test]
fn a_source_with_no_files_is_input_missing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    write_config(dir.path(), "p.toml", "empty/", "out", "");
    pipeline(dir.path(), &["run", "p.toml"], &[])
        .expect(66)
        .mentions(&["no input files at empty/"]);
    write_config(dir.path(), "q.toml", "nowhere/*.parquet", "out", "");
    pipeline(dir.path(), &["run", "q.toml"], &[]).expect(66);
}

#[test]
fn an_empty_table_is_a_data_error() {
    let dir = tempfile::tempdir().unwrap();
    write_tensor_u8(&dir.path().join("e.parquet"), &[], &[], &[4, 4]);
    write_config(dir.path(), "p.toml", "e.parquet", "out", "");
    pipeline(dir.path(), &["run", "p.toml"], &[])
        .expect(65)
        .mentions(&["e.parquet", "no rows"]);
}

/// 200 good rows plus a null image, a null id, a short image and a NaN pixel.
fn with_bad_rows(dir: &std::path::Path) {
    let mut id: Vec<Option<String>> = ids(0, 200).into_iter().map(Some).collect();
    let mut imgs: Vec<Option<Vec<u8>>> = images(200, 4, 4, 6).into_iter().map(Some).collect();
    id.extend([Some("null-image".into()), None, Some("short".into())]);
    imgs.extend([None, Some(vec![0; 16]), Some(vec![0; 9])]);
    write_list_u8(&dir.join("a.parquet"), &id, &imgs);
    let mut nan = vec![0.5f32; 16];
    nan[3] = f32::NAN;
    write_list_f32(
        &dir.join("b.parquet"),
        &["nan".into(), "fine".into()],
        &[nan, vec![0.2; 16]],
    );
}

#[test]
fn bad_rows_go_to_rejects_and_too_many_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    with_bad_rows(dir.path());
    let extra = "max_reject_fraction = 0.05\nshape = [4, 4]\n";
    let cfg = format!(
        "[pipeline]\nname = \"t\"\n\n[source]\nuri = \"*.parquet\"\n{extra}\n[sink]\nuri = \"out\"\n"
    );
    std::fs::write(dir.path().join("p.toml"), cfg).unwrap();
    pipeline(dir.path(), &["run", "p.toml", "--run-id", "r"], &[]).expect(0);
    let rejects = read_table(&dir.path().join("out/rejects"));
    let mut reasons: Vec<(Option<String>, String)> = strings(&rejects, "id")
        .into_iter()
        .zip(strings(&rejects, "reason").into_iter().map(Option::unwrap))
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert_eq!(reasons[0].0, None);
    assert_eq!(reasons[0].1, "id is null");
    assert_eq!(reasons[1], (Some("nan".into()), "pixel 3 is NaN".into()));
    assert_eq!(
        reasons[2],
        (Some("null-image".into()), "image is null".into())
    );
    assert_eq!(reasons[3].0.as_deref(), Some("short"));
    assert!(
        reasons[3].1.contains("has 9 values but shape 4x4 needs 16"),
        "{:?}",
        reasons[3]
    );
    let sources = strings(&rejects, "source");
    assert!(
        sources.iter().any(|s| s.as_deref() == Some("b.parquet")),
        "{sources:?}"
    );
    assert_eq!(
        rows(&read_table(&dir.path().join("out/scores"))),
        201,
        "200 + `fine`"
    );

    // Over the limit: exit 65, the reasons quoted, and no scores published for the run.
    pipeline(
        dir.path(),
        &[
            "run",
            "p.toml",
            "--run-id",
            "strict",
            "--set",
            "source.max_reject_fraction=0.01",
        ],
        &[],
    )
    .expect(65)
    .mentions(&["4 of 205 rows", "max_reject_fraction", "pixel 3 is NaN"]);
    assert!(!dir.path().join("out/runs/strict").exists());
    let runs = strings(&read_table(&dir.path().join("out/scores")), "run_id");
    assert!(
        runs.iter().all(|r| r.as_deref() == Some("r")),
        "no rows of the failed run"
    );
    assert!(!dir.path().join("out/_staging/strict").exists());
}

#[test]
fn bad_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    pipeline(dir.path(), &["run"], &[]).expect(64);
    pipeline(dir.path(), &["frobnicate"], &[]).expect(64);
    pipeline(dir.path(), &["--help"], &[]).expect(0);
    let v = pipeline(dir.path(), &["--version"], &[]);
    v.expect(0);
    assert!(v.stdout.starts_with("pipeline "));
}

#[test]
fn a_missing_pipeline_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    pipeline(dir.path(), &["validate", "nope.toml"], &[])
        .expect(78)
        .mentions(&["nope.toml", "cannot read the pipeline file"]);
}
