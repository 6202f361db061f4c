//! Hostile inputs: files that lie about their sizes, bombs, tampered model artifacts, absurd
//! TOML and paths that try to leave the sink. Each must end in a clear error with the right
//! exit code, in bounded time and memory (the child's peak RSS, read with wait4, under 1 GiB).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Peak memory any hostile input may make the process reach.
const MAX_RSS_KIB: i64 = 1024 * 1024;
/// Time any hostile input may take.
const MAX_SECONDS: u64 = 60;

/// Runs the binary like [`pipeline`], also measuring its peak RSS and wall time, and checks
/// both bounds and the exit code; returns stderr.
fn bounded(dir: &Path, args: &[&str], code: i32) -> String {
    let started = Instant::now();
    // Reaped by wait4 below, which also reports the peak RSS that `Child::wait` does not.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args)
        .current_dir(dir)
        .env_remove("PIPELINE_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let stderr_pipe = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut { stderr_pipe }, &mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    let stderr = reader.join().unwrap();
    let elapsed = started.elapsed();
    assert!(libc::WIFEXITED(status), "killed by a signal: {stderr}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        code,
        "{args:?}: exit code\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "{args:?}: panic text\n{stderr}"
    );
    assert!(
        usage.ru_maxrss < MAX_RSS_KIB,
        "{args:?}: peak RSS {} KiB",
        usage.ru_maxrss
    );
    assert!(
        elapsed < Duration::from_secs(MAX_SECONDS),
        "{args:?}: took {elapsed:?}"
    );
    stderr
}

/// A varint (LEB128) as Thrift's compact protocol writes it.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Rewrites every i64 field that follows its predecessor (field-header byte 0x16) and holds
/// `from` in the Parquet footer so that it holds `to`, and fixes the footer length: the file's
/// metadata then claims `to` rows (file and row group).
fn claim_rows(path: &Path, from: u64, to: u64) {
    let bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    let footer_len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    let footer_start = n - 8 - footer_len;
    let footer = &bytes[footer_start..n - 8];
    let zigzag = |v: u64| v << 1;
    let needle: Vec<u8> = [vec![0x16], varint(zigzag(from))].concat();
    let replacement: Vec<u8> = [vec![0x16], varint(zigzag(to))].concat();
    let mut patched = Vec::new();
    let mut i = 0;
    let mut hits = 0;
    while i < footer.len() {
        if footer[i..].starts_with(&needle) {
            patched.extend_from_slice(&replacement);
            i += needle.len();
            hits += 1;
        } else {
            patched.push(footer[i]);
            i += 1;
        }
    }
    assert!(hits >= 1, "the row count was not found in the footer");
    let mut out = bytes[..footer_start].to_vec();
    out.extend_from_slice(&patched);
    out.extend_from_slice(&(patched.len() as u32).to_le_bytes());
    out.extend_from_slice(b"PAR1");
    std::fs::write(path, out).unwrap();
}

#[test]
fn parquet_metadata_that_claims_enormous_row_counts_is_a_data_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("f.parquet"),
        &ids(0, 300),
        &images(300, 6, 6, 1),
        &[6, 6],
    );
    claim_rows(&d.join("f.parquet"), 300, 1 << 50);
    write_config(d, "p.toml", "f.parquet", "out", "");
    let stderr = bounded(d, &["run", "p.toml"], 65);
    assert!(stderr.contains("f.parquet"), "{stderr}");
}

#[test]
fn a_tensor_shape_that_disagrees_with_its_storage_is_a_data_error() {
    use arrow::array::{FixedSizeListArray, StringArray, UInt8Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 36 values per row under metadata that claims 100000 x 100000.
    let values = UInt8Array::from(vec![7u8; 50 * 36]);
    let item = Arc::new(Field::new("item", DataType::UInt8, false));
    let list = FixedSizeListArray::new(item.clone(), 36, Arc::new(values), None);
    let metadata = std::collections::HashMap::from([
        (
            "ARROW:extension:name".to_string(),
            "arrow.fixed_shape_tensor".to_string(),
        ),
        (
            "ARROW:extension:metadata".to_string(),
            r#"{"shape":[100000,100000]}"#.to_string(),
        ),
    ]);
    let field =
        Field::new("image", DataType::FixedSizeList(item, 36), true).with_metadata(metadata);
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        field,
    ]));
    let batch = arrow::record_batch::RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(ids(0, 50))),
            Arc::new(list),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(d.join("f.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    write_config(d, "p.toml", "f.parquet", "out", "");
    let stderr = bounded(d, &["run", "p.toml"], 65);
    assert!(stderr.contains("shape"), "{stderr}");
}

/// CRC-32 (IEEE) of a PNG chunk's type and data.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let body = [&kind[..], data].concat();
    [
        &(data.len() as u32).to_be_bytes()[..],
        &body,
        &crc32(&body).to_be_bytes(),
    ]
    .concat()
}

/// A 100000 x 100000 greyscale PNG header with a few bytes of image data: a decoder that
/// believed it would allocate 10 GB.
fn png_bomb() -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    // A stored (uncompressed) zlib stream of a few zero bytes.
    let idat = [
        0x78, 0x01, 0x01, 0x04, 0x00, 0xfb, 0xff, 0, 0, 0, 0, 0, 0x04, 0x00, 0x01,
    ];
    [
        &b"\x89PNG\r\n\x1a\n"[..],
        &chunk(b"IHDR", &ihdr),
        &chunk(b"IDAT", &idat),
        &chunk(b"IEND", &[]),
    ]
    .concat()
}

#[test]
fn a_png_decompression_bomb_is_rejected_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut pngs: Vec<Vec<u8>> = images(60, 6, 6, 3)
        .iter()
        .map(|img| png(img, 6, 6))
        .collect();
    pngs[7] = png_bomb();
    write_png_struct(&d.join("f.parquet"), &ids(0, 60), &pngs);
    write_config(d, "p.toml", "f.parquet", "out", "");
    bounded(
        d,
        &["run", "p.toml", "--set", "source.max_reject_fraction=0.5"],
        0,
    );
    let rejects = read_table(&d.join("out/rejects"));
    assert_eq!(strings(&rejects, "id"), vec![Some("img-00007".to_string())]);
    let reason = strings(&rejects, "reason")[0].clone().unwrap();
    assert!(reason.contains("PNG"), "{reason}");
    // Every row a bomb: the run fails as bad data, still bounded.
    write_png_struct(&d.join("f.parquet"), &ids(0, 5), &vec![png_bomb(); 5]);
    bounded(d, &["run", "p.toml"], 65);
}

/// Fits a small model and returns its directory.
fn small_fitted_model(d: &Path) -> std::path::PathBuf {
    write_tensor_u8(
        &d.join("f.parquet"),
        &ids(0, 200),
        &images(200, 6, 6, 1),
        &[6, 6],
    );
    write_config(
        d,
        "p.toml",
        "f.parquet",
        "out",
        "[model]\nkind = \"nade\"\nhidden = 8\n\n[train]\nepochs = 1\n",
    );
    d.join(fit_model(d, "p.toml"))
}

#[test]
fn tampered_model_artifacts_are_data_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = small_fitted_model(d);
    let model_arg = model.to_str().unwrap().to_string();
    let score = ["score", "p.toml", "--model", &model_arg];
    let json_path = model.join("model.json");
    let weights_path = model.join("model.safetensors");
    let json = std::fs::read_to_string(&json_path).unwrap();
    let weights = std::fs::read(&weights_path).unwrap();

    // A safetensors header that claims a 2^40-element tensor whose bytes lie past the file.
    let header = br#"{"output_bias":{"dtype":"F64","shape":[1099511627776],"data_offsets":[0,8796093022208]}}"#;
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend_from_slice(header);
    lying.extend_from_slice(&[0u8; 64]);
    std::fs::write(&weights_path, &lying).unwrap();
    let stderr = bounded(d, &score, 65);
    assert!(stderr.contains("model.safetensors"), "{stderr}");
    // A header length far beyond the file.
    std::fs::write(&weights_path, u64::MAX.to_le_bytes()).unwrap();
    bounded(d, &score, 65);
    std::fs::write(&weights_path, &weights).unwrap();

    // model.json naming an unknown kind.
    let mut meta: serde_json::Value = serde_json::from_str(&json).unwrap();
    meta["kind"] = "quantum".into();
    std::fs::write(&json_path, meta.to_string()).unwrap();
    let stderr = bounded(d, &score, 65);
    assert!(
        stderr.contains("quantum") || stderr.contains("kind"),
        "{stderr}"
    );
    // model.json claiming an enormous image and hidden layer with the real (small) weights:
    // refused before anything that size is allocated.
    let mut meta: serde_json::Value = serde_json::from_str(&json).unwrap();
    meta["shape"] = serde_json::json!({"height": 1_000_000, "width": 1_000_000, "channels": 3});
    meta["hyperparameters"]["hidden"] = 65_536.into();
    std::fs::write(&json_path, meta.to_string()).unwrap();
    bounded(d, &score, 65);
    std::fs::write(&json_path, &json).unwrap();
    bounded(d, &score, 0);
}

#[test]
fn absurd_toml_is_a_config_error_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("f.parquet"),
        &ids(0, 50),
        &images(50, 6, 6, 1),
        &[6, 6],
    );
    // Deeply nested arrays.
    let depth = 100_000;
    let nested = format!(
        "[pipeline]\nname = \"x\"\nnested = {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    std::fs::write(d.join("nested.toml"), nested).unwrap();
    bounded(d, &["validate", "nested.toml"], 78);
    // Deeply nested inline tables.
    let inline = format!(
        "[pipeline]\nname = \"x\"\nnested = {}{}\n",
        "{a = ".repeat(depth),
        "}".repeat(depth)
    );
    std::fs::write(d.join("inline.toml"), inline).unwrap();
    bounded(d, &["validate", "inline.toml"], 78);
    // A 10 MB string.
    let huge = format!(
        "[pipeline]\nname = \"{}\"\n\n[source]\nuri = \"f.parquet\"\n\n[sink]\nuri = \"out\"\n",
        "a".repeat(10 << 20)
    );
    std::fs::write(d.join("huge.toml"), huge).unwrap();
    let stderr = bounded(d, &["validate", "huge.toml"], 78);
    assert!(stderr.len() < 10_000, "the error does not echo the string");
}

#[test]
fn run_ids_that_would_leave_the_sink_are_refused() {
    let dir = small_source(50);
    let d = dir.path();
    for bad in ["../../escaped", "a/../../b", "/etc/x", "..", "a\\..\\b"] {
        let code = pipeline(d, &["run", "p.toml", "--run-id", bad], &[]).code;
        assert!(code == 64 || code == 78, "{bad:?}: exit {code}");
        let in_toml = format!(
            "[pipeline]\nname = \"t\"\nrun_id = {bad:?}\n\n[source]\nuri = \"f.parquet\"\n\n[sink]\nuri = \"out\"\n"
        );
        std::fs::write(d.join("bad.toml"), in_toml).unwrap();
        pipeline(d, &["run", "bad.toml"], &[]).expect(78);
    }
    assert!(!d.join("escaped").exists() && !d.join("out/runs").exists());
}

/// Credentials planted in the environment appear in no output: not in trace-level logs, error
/// messages, the manifest, or any file the run writes, on success or on a storage failure.
#[test]
fn planted_credentials_appear_in_no_output() {
    let dir = small_source(120);
    let d = dir.path();
    let secrets = [
        ("AWS_ACCESS_KEY_ID", "AKIAPLANTEDKEY0001"),
        ("AWS_SECRET_ACCESS_KEY", "planted-aws-secret-8f3a"),
        ("AWS_SESSION_TOKEN", "planted-session-token-77c1"),
        ("AZURE_STORAGE_ACCOUNT_KEY", "cGxhbnRlZC1henVyZS1rZXk="),
        ("GOOGLE_SERVICE_ACCOUNT_KEY", "planted-gcs-key-5d2e"),
    ];
    let mut env: Vec<(&str, &str)> = secrets.to_vec();
    env.extend([("PIPELINE_LOG", "trace"), ("AWS_REGION", "us-east-1")]);
    let mut outputs = Vec::new();
    let ok = pipeline(d, &["run", "p.toml", "--log-format", "json"], &env);
    ok.expect(0);
    outputs.push(ok.stdout + &ok.stderr);
    // A store that refuses connections: the error path and its retries, at trace level.
    env.extend([
        ("AWS_ENDPOINT", "http://127.0.0.1:9"),
        ("AWS_ALLOW_HTTP", "true"),
    ]);
    let failed = pipeline(
        d,
        &[
            "run",
            "p.toml",
            "-v",
            "--set",
            "sink.uri=\"s3://bucket/out\"",
            "--set",
            "storage.max_retries=1",
            "--set",
            "storage.request_timeout_seconds=2",
        ],
        &env,
    );
    failed.expect(75);
    outputs.push(failed.stdout + &failed.stderr);
    for entry in walk(&d.join("out")) {
        outputs.push(String::from_utf8_lossy(&std::fs::read(entry).unwrap()).into_owned());
    }
    for text in &outputs {
        for (name, value) in secrets {
            assert!(!text.contains(value), "{name}'s value leaked:\n{text}");
        }
    }
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A temp dir with `f.parquet` (`n` 6x6 images) and `p.toml` reading it into `out`.
fn small_source(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("f.parquet"),
        &ids(0, n),
        &images(n, 6, 6, 1),
        &[6, 6],
    );
    write_config(d, "p.toml", "f.parquet", "out", "");
    dir
}

/// A temp dir with `f.parquet`, a copy of the fuzzer's find `tests/data/{name}`, and `p.toml`
/// reading it into `out`.
fn found_file_source(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("tests/data").join(name),
        dir.path().join("f.parquet"),
    )
    .unwrap();
    write_config(dir.path(), "p.toml", "f.parquet", "out", "");
    dir
}

/// A file the fuzzer found: a data page that claims dictionary encoding with no dictionary
/// page makes the parquet crate panic. The run must fail as bad data, not end the read early
/// and commit the rows before it as if they were all.
#[test]
fn a_page_that_panics_the_parquet_reader_is_a_data_error_not_lost_rows() {
    let dir = found_file_source("fuzz-dict-page-without-dictionary.parquet");
    let d = dir.path();
    let out = pipeline(
        d,
        &[
            "run",
            "p.toml",
            "--set",
            "source.height_column=\"height\"",
            "--set",
            "source.width_column=\"width\"",
        ],
        &[],
    );
    assert_eq!(out.code, 65, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("the Parquet reader failed inside this file")
            && out.stderr.contains("Decoder for dict"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("Internal error") && !out.stderr.contains("panicked"),
        "a caught panic is not reported as a bug: {}",
        out.stderr
    );
    assert!(!d.join("out/runs").exists(), "nothing committed");
}

/// A file the fuzzer found: a dictionary page header claiming 1.7 billion values in 384 bytes,
/// which the parquet crate would allocate gigabytes for before reading one. The run refuses it
/// as bad data, naming the column, without the allocation.
#[test]
fn a_dictionary_page_claiming_more_values_than_its_bytes_is_a_data_error() {
    let dir = found_file_source("fuzz-oversized-dictionary.parquet");
    let d = dir.path();
    let out = pipeline(d, &["run", "p.toml"], &[]);
    assert_eq!(out.code, 65, "{}", out.stderr);
    assert!(
        out.stderr.contains("image.list.element")
            && out
                .stderr
                .contains("a dictionary page declares 1690932006 values in 384 bytes"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(!d.join("out/runs").exists(), "nothing committed");
}

/// A file whose footer places its column chunks beyond its end (its data cut out, the footer
/// kept, as a truncated upload that kept its tail would be): a data error naming the file and
/// the chunk, before any row is read, not a read past the end.
#[test]
fn a_footer_that_places_chunks_outside_the_file_is_a_data_error() {
    let dir = small_source(300);
    let d = dir.path();
    let path = d.join("f.parquet");
    let bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    let footer_len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().unwrap()) as usize;
    let tail = &bytes[n - 8 - footer_len..];
    // "PAR1", then the footer: every chunk the footer places now starts or ends past the end.
    let mut cut = bytes[..4].to_vec();
    cut.extend_from_slice(tail);
    std::fs::write(&path, &cut).unwrap();
    let stderr = bounded(d, &["run", "p.toml"], 65);
    assert!(
        stderr.contains("f.parquet") && stderr.contains("outside the"),
        "{stderr}"
    );
}
