//! validate, inspect, sample, schema, and the bundled pipeline files.

use crate::common::*;

#[test]
fn validate_accepts_the_demo_and_describes_it() {
    let out = pipeline(&repo(), &["validate", "pipelines/demo.toml"], &[]);
    out.expect(0);
    assert!(out.stdout.contains("is valid"), "{}", out.stdout);
    assert!(
        out.stdout.contains("2000 rows, images 28x28"),
        "{}",
        out.stdout
    );
}

#[test]
fn the_nightly_pipeline_validates_when_its_variables_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let day = dir.path().join("frames/date=2026-11-28");
    std::fs::create_dir_all(&day).unwrap();
    write_camera_frames(&day.join("part-0.parquet"), 10);
    let nightly = repo().join("pipelines/nightly.toml");
    let nightly = nightly.to_str().unwrap();
    let frames = dir.path().join("frames");
    let env = [
        ("RUN_DATE", "2026-11-28"),
        ("FRAMES_URI", frames.to_str().unwrap()),
        ("RESULTS_URI", dir.path().to_str().unwrap()),
    ];
    pipeline(dir.path(), &["validate", nightly], &env).expect(0);
    // Without RUN_DATE the file says what is missing.
    pipeline(dir.path(), &["validate", nightly], &env[1..])
        .expect(78)
        .mentions(&["RUN_DATE"]);
}

#[test]
fn inspect_reports_the_shape_and_draws_images() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("look.png");
    let out = pipeline(
        &repo(),
        &[
            "inspect",
            "data/demo/digits.parquet",
            "--out",
            png.to_str().unwrap(),
            "-n",
            "9",
        ],
        &[],
    );
    out.expect(0);
    for needle in [
        "2000 rows",
        "arrow.fixed_shape_tensor",
        "images: 28x28 (grayscale)",
        "drew 9 image(s)",
    ] {
        assert!(
            out.stdout.contains(needle),
            "missing {needle:?} in\n{}",
            out.stdout
        );
    }
    let img = image::open(&png).unwrap();
    assert!(img.width() > 3 * 28 && img.height() > 3 * 28);
}

#[test]
fn sample_draws_a_reproducible_grid_from_a_fitted_model() {
    let dir = tempfile::tempdir().unwrap();
    write_tensor_u8(
        &dir.path().join("d.parquet"),
        &ids(0, 300),
        &images(300, 6, 6, 8),
        &[6, 6],
    );
    write_config(dir.path(), "p.toml", "d.parquet", "out", "");
    let model = fit_model(dir.path(), "p.toml");
    for name in ["a.png", "b.png"] {
        pipeline(
            dir.path(),
            &["sample", &model, "-n", "16", "--out", name, "--seed", "3"],
            &[],
        )
        .expect(0);
    }
    let a = std::fs::read(dir.path().join("a.png")).unwrap();
    assert_eq!(
        a,
        std::fs::read(dir.path().join("b.png")).unwrap(),
        "same seed, same grid"
    );
    pipeline(
        dir.path(),
        &[
            "sample", &model, "-n", "16", "--out", "c.png", "--seed", "4",
        ],
        &[],
    )
    .expect(0);
    assert_ne!(a, std::fs::read(dir.path().join("c.png")).unwrap());
    let img = image::load_from_memory(&a).unwrap().into_luma8();
    // 4x4 tiles of 6x6 pixels at scale 2, with 2-pixel gaps.
    assert_eq!(
        (img.width(), img.height()),
        (4 * 12 + 5 * 2, 4 * 12 + 5 * 2)
    );
    pipeline(
        dir.path(),
        &["sample", "nowhere/", "-n", "4", "--out", "x.png"],
        &[],
    )
    .expect(66);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    write_tensor_u8(
        &dir.path().join("d.parquet"),
        &ids(0, 50),
        &images(50, 4, 4, 1),
        &[4, 4],
    );
    write_config(
        dir.path(),
        "p.toml",
        "d.parquet",
        "out",
        "[train]\nvalidation_fraction = 0.5\n",
    );
    let out = pipeline(dir.path(), &["run", "p.toml", "--log-format", "json"], &[]);
    out.expect(0);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(lines.len() >= 3);
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{l}");
    }
}

#[test]
fn bench_measures_every_kernel_and_writes_its_figures() {
    let dir = tempfile::tempdir().unwrap();
    for (model, label) in [
        ("nade", "NADE-20 on 64"),
        ("rnade", "RNADE-20 (K = 10) on 64"),
    ] {
        let json = dir.path().join(format!("{model}.json"));
        let out = pipeline(
            &repo(),
            &[
                "bench",
                "--model",
                model,
                "--hidden",
                "20",
                "--images",
                "64",
                "--reference-images",
                "4",
                "--repeats",
                "1",
                "--json",
                json.to_str().unwrap(),
            ],
            &[],
        );
        out.expect(0);
        assert!(
            out.stdout.contains(&format!("{label} images of 28x28")),
            "{}",
            out.stdout
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let fast = report["fast"].as_array().unwrap();
        assert!(fast.iter().any(|f| f["isa"] == "portable"), "{report}");
        for rates in fast.iter().chain([&report["naive"]]) {
            for key in ["train_images_per_s", "score_images_per_s"] {
                let v = rates[key].as_f64().unwrap();
                assert!(v.is_finite() && v > 0.0, "{key} = {v} in {report}");
            }
        }
        assert!(report["sgemm_flops_per_s"].as_f64().unwrap() > 0.0);
    }
    // PixelRNN (1 layer, h = 3) with `python` as the comparison's interpreter and `more`
    // arguments; the JSON report it wrote.
    let json = dir.path().join("pixelrnn.json");
    let pixelrnn = |python: &str, more: &[&str]| {
        let mut args = vec![
            "bench", "--model", "pixelrnn", "--layers", "1", "--hidden", "3",
        ];
        args.extend([
            "--reference-images",
            "1",
            "--repeats",
            "1",
            "--python",
            python,
        ]);
        args.extend(["--json", json.to_str().unwrap()]);
        args.extend(more);
        pipeline(&repo(), &args, &[]).expect(0);
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&json).unwrap()).unwrap()
    };
    // Both architectures, each with its comparison (skipped here: no such python).
    let reports = pixelrnn("no-such-python", &["--images", "24"]);
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2, "{reports:?}");
    for (report, name) in reports.iter().zip(["Row LSTM", "Diagonal BiLSTM"]) {
        assert!(report["model"].as_str().unwrap().contains(name), "{report}");
        for rates in report["fast"]
            .as_array()
            .unwrap()
            .iter()
            .chain([&report["naive"]])
        {
            for key in ["train_images_per_s", "score_images_per_s"] {
                let v = rates[key].as_f64().unwrap();
                assert!(v.is_finite() && v > 0.0, "{key} = {v} in {report}");
            }
        }
        assert!(
            report["comparison"]["skipped"]
                .as_str()
                .unwrap()
                .contains("no-such-python")
        );
    }
    // An interpreter that starts but fails: the comparison says why, in the last line it wrote
    // to stderr (`ls` rejects the script's arguments and ends with where to read its help).
    let reports = pixelrnn("ls", &["--architecture", "row_lstm", "--images", "8"]);
    let skipped = reports[0]["comparison"]["skipped"].as_str().unwrap();
    assert!(
        skipped.starts_with("ls ") && skipped.contains("--help"),
        "{skipped}"
    );
    // Bad arguments are usage errors, not panics.
    pipeline(&repo(), &["bench", "--repeats", "0"], &[])
        .expect(64)
        .mentions(&["--repeats"]);
    pipeline(&repo(), &["bench", "--data", "no/such.parquet"], &[]).expect(66);
}

#[test]
fn evaluate_reports_what_the_written_scores_say() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for run in ["one", "two"] {
        pipeline(
            &repo(),
            &["run", "pipelines/demo.toml", "--run-id", run],
            &[("DEMO_OUT", out.to_str().unwrap())],
        )
        .expect(0);
    }
    let scores_dir = out.join("scores");
    let scores_uri = scores_dir.to_str().unwrap();
    let args = [
        "evaluate",
        scores_uri,
        "--label-column",
        "condition",
        "--normal",
        "normal",
    ];
    // Two runs in the table: which one must be said.
    pipeline(&repo(), &args, &[])
        .expect(64)
        .mentions(&["--run-id", "one", "two"]);
    let mut json_args = args.to_vec();
    json_args.extend(["--run-id", "one", "--json"]);
    let result = pipeline(&repo(), &json_args, &[]);
    result.expect(0);
    let report: serde_json::Value = serde_json::from_str(&result.stdout).unwrap();
    let overall = &report["overall"];

    // The same figures from the rows, by counting pairs.
    let batches = read_table(&scores_dir);
    let runs = strings(&batches, "run_id");
    let score = floats(&batches, "score");
    let flags = bools(&batches, "is_anomaly");
    let condition = strings(&batches, "condition");
    let rows: Vec<(f64, bool, bool)> = (0..runs.len())
        .filter(|&i| runs[i].as_deref() == Some("one"))
        .map(|i| {
            (
                score[i],
                flags[i],
                condition[i].as_deref() != Some("normal"),
            )
        })
        .collect();
    let (mut wins, mut pairs) = (0.0, 0.0);
    for a in rows.iter().filter(|r| r.2) {
        for n in rows.iter().filter(|r| !r.2) {
            pairs += 1.0;
            wins += if a.0 > n.0 {
                1.0
            } else if a.0 == n.0 {
                0.5
            } else {
                0.0
            };
        }
    }
    assert_eq!(overall["images"], rows.len() as u64);
    assert_eq!(overall["anomalies"], 20);
    assert!((overall["auroc"].as_f64().unwrap() - wins / pairs).abs() < 1e-12);
    let flagged = rows.iter().filter(|r| r.1).count() as u64;
    let false_flags = rows.iter().filter(|r| r.1 && !r.2).count() as f64;
    assert_eq!(overall["flagged"], flagged);
    assert!((overall["fdr"].as_f64().unwrap() - false_flags / flagged as f64).abs() < 1e-12);

    // Per-group figures add up to the whole.
    let mut by_args = args.to_vec();
    by_args.extend(["--run-id", "two", "--by", "label", "--json"]);
    let result = pipeline(&repo(), &by_args, &[]);
    result.expect(0);
    let report: serde_json::Value = serde_json::from_str(&result.stdout).unwrap();
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 10);
    let total: u64 = groups
        .iter()
        .map(|g| g["evaluation"]["images"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 2000);

    let mut bad = args.to_vec();
    bad[3] = "no_such_column";
    pipeline(&repo(), &bad, &[])
        .expect(64)
        .mentions(&["no_such_column", "passthrough"]);
}

#[test]
fn report_renders_in_a_headless_browser_with_its_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    pipeline(
        &repo(),
        &["run", "pipelines/demo.toml", "--run-id", "r1"],
        &[("DEMO_OUT", out.to_str().unwrap())],
    )
    .expect(0);
    let html = dir.path().join("report.html");
    let result = pipeline(
        &repo(),
        &[
            "report",
            out.to_str().unwrap(),
            "--out",
            html.to_str().unwrap(),
            "--top",
            "8",
            "--by",
            "condition",
        ],
        &[],
    );
    result.expect(0);
    assert!(result.stdout.contains("run r1"), "{}", result.stdout);
    let text = std::fs::read_to_string(&html).unwrap();
    // 8 images and 8 heat maps, embedded; the groups with their counts; the threshold line.
    assert_eq!(text.matches("src=\"data:image/png;base64,").count(), 16);
    assert!(
        text.contains("<td>inverted</td><td>10</td><td>10</td>"),
        "per-group counts"
    );
    assert!(text.contains("class=\"threshold\""));
    // A run that is not there is a missing input, not a crash.
    pipeline(
        &repo(),
        &[
            "report",
            out.to_str().unwrap(),
            "--run-id",
            "nope",
            "--out",
            html.to_str().unwrap(),
        ],
        &[],
    )
    .expect(66)
    .mentions(&["--run-id"]);

    let Some(browser) = browser_for_report_tests() else {
        return;
    };
    let png = dir.path().join("report.png");
    screenshot(&browser, &html, &png, 1100, 1400);
    let shot = image::open(&png).unwrap().to_rgb8();
    let count = |f: &dyn Fn(&image::Rgb<u8>) -> bool| shot.pixels().filter(|p| f(p)).count();
    // Heat maps put saturated yellow on screen, the histogram blue bars, the digits black
    // strokes on white: all three only if the embedded images and SVG were decoded.
    let yellow = count(&|p| p[0] > 230 && p[1] > 230 && p[2] < 40);
    let blue = count(&|p| p[0] == 0x4a && p[1] == 0x7a && p[2] == 0xb5);
    let black = count(&|p| p[0] < 30 && p[1] < 30 && p[2] < 30);
    assert!(
        yellow > 2000 && blue > 2000 && black > 2000,
        "yellow {yellow}, blue {blue}, black {black}"
    );
}

/// The browser the report tests render in; `None` (the browser checks are skipped, saying so)
/// only where there is none and `PIPELINE_REQUIRE_BROWSER` is unset, as in CI it is set.
fn browser_for_report_tests() -> Option<std::path::PathBuf> {
    let browser = chromium();
    if browser.is_none() {
        skip_unless_required(
            "PIPELINE_REQUIRE_BROWSER",
            "the browser check: no chromium on this machine (.ci/run installs one)",
        );
    }
    browser
}

/// Counts, in headless Chromium, the images of `class` that decoded (naturalWidth > 0) once the
/// page has loaded: a copy of the page with a script that writes the count into its title.
fn decoded_images_in_browser(
    browser: &std::path::Path,
    html: &std::path::Path,
    class: &str,
) -> usize {
    let page = std::fs::read_to_string(html).unwrap();
    let script = format!(
        "<script>window.addEventListener('load', () => {{ document.title = 'decoded:' + [...document.querySelectorAll('img.{class}')].filter(i => i.complete && i.naturalWidth > 0).length; }});</script>"
    );
    let probe = html.with_extension("probe.html");
    std::fs::write(&probe, page.replace("</body>", &format!("{script}</body>"))).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", probe.display()))
        .stderr(std::process::Stdio::null())
        .output()
        .expect("chromium starts");
    let dom = String::from_utf8_lossy(&out.stdout);
    let at = dom
        .find("<title>decoded:")
        .unwrap_or_else(|| panic!("no count in the DOM: {dom:.300}"));
    dom[at + 15..].split('<').next().unwrap().parse().unwrap()
}

/// With a model that embeds, each flagged image records its three nearest normal (reference)
/// images — the true nearest by cosine over the embeddings the run wrote — and the report
/// draws them beside it, as a real browser shows.
#[test]
fn flagged_images_name_their_nearest_normal_images_and_the_report_draws_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let demo = std::fs::read_to_string(repo().join("pipelines/demo.toml")).unwrap();
    let data = repo().join("data/demo/digits.parquet");
    let config = demo
        .replace(
            "uri = \"data/demo/digits.parquet\"",
            &format!("uri = \"{}\"", data.display()),
        )
        .replace(
            "kind = \"bernoulli\"\nalpha = 1.0",
            "kind = \"nade\"\nhidden = 24",
        )
        .replace("[train]\n", "[train]\nepochs = 4\nlearning_rate = 0.01\n")
        .replace("[sink]\n", "[sink]\nembeddings = true\n");
    assert!(config.contains("nade") && config.contains("embeddings = true"));
    let cfg = dir.path().join("nade-demo.toml");
    std::fs::write(&cfg, config).unwrap();
    pipeline(
        dir.path(),
        &["run", cfg.to_str().unwrap(), "--run-id", "n1"],
        &[("DEMO_OUT", out.to_str().unwrap())],
    )
    .expect(0);

    // The reference sample, as stored with the model.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("runs/n1/manifest.json")).unwrap()).unwrap();
    let model_dir = out
        .join("models")
        .join(manifest["model"]["model_id"].as_str().unwrap());
    let reference = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(model_dir.join("reference.parquet")).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap()
    .map(Result::unwrap)
    .collect::<Vec<_>>();
    let reference_ids: Vec<String> = strings(&reference, "id").into_iter().flatten().collect();
    // 1,600 training images of 2,000 (a fifth held out): all of them, under the cap of 2,000.
    assert!(
        (1500..=1700).contains(&reference_ids.len()),
        "{}",
        reference_ids.len()
    );

    let embeddings = read_table(&out.join("embeddings"));
    let by_id: std::collections::HashMap<String, Vec<f32>> = strings(&embeddings, "id")
        .into_iter()
        .flatten()
        .zip(float_lists(&embeddings, "embedding"))
        .collect();
    // Cosine after centring on the reference images' mean embedding.
    let width = by_id.values().next().unwrap().len();
    let mean: Vec<f64> = (0..width)
        .map(|j| {
            reference_ids
                .iter()
                .map(|r| f64::from(by_id[r][j]))
                .sum::<f64>()
                / reference_ids.len() as f64
        })
        .collect();
    let cosine = |a: &[f32], b: &[f32]| {
        let c = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .zip(&mean)
                .map(|(&x, m)| f64::from(x) - m)
                .collect()
        };
        let (a, b) = (c(a), c(b));
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (norm(&a) * norm(&b))
    };
    let anomalies = read_table(&out.join("anomalies"));
    let flagged: Vec<String> = strings(&anomalies, "id").into_iter().flatten().collect();
    assert!(flagged.len() >= 10, "{} flagged", flagged.len());
    let nearest = string_lists(&anomalies, "nearest_ids");
    for (id, near) in flagged.iter().zip(&nearest) {
        let e = &by_id[id];
        // Every reference image but the flagged one itself (it may be a training image).
        let mut all: Vec<&String> = reference_ids.iter().filter(|r| *r != id).collect();
        all.sort_by(|a, b| cosine(e, &by_id[*b]).total_cmp(&cosine(e, &by_id[*a])));
        assert_eq!(near.len(), 3, "{id}");
        assert!(
            !near.contains(id),
            "{id} is not its own nearest normal image"
        );
        // Saturated embeddings (inverted frames) tie to 1e-7: compare similarities, not ids.
        for (k, got) in near.iter().enumerate() {
            let (got, want) = (cosine(e, &by_id[got]), cosine(e, &by_id[all[k]]));
            assert!(
                (got - want).abs() < 1e-5,
                "{id}: neighbour {k} at {got}, brute force {want}"
            );
        }
    }

    // The groups: every flagged image has one, and the manifest counts them, largest first
    // (whether they follow the planted kinds is end_to_end's groups test).
    let group_of: Vec<i32> = optional_ints(&anomalies, "group")
        .into_iter()
        .map(|g| g.expect("every flagged image has a group"))
        .collect();
    let sizes: Vec<u64> = manifest["anomaly_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["images"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes.iter().sum::<u64>() as usize, flagged.len());
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
    for (g, &n) in sizes.iter().enumerate() {
        assert_eq!(
            group_of.iter().filter(|&&x| x == g as i32).count() as u64,
            n
        );
    }
    let html = dir.path().join("report.html");
    pipeline(
        dir.path(),
        &[
            "report",
            out.to_str().unwrap(),
            "--out",
            html.to_str().unwrap(),
            "--top",
            "5",
        ],
        &[],
    )
    .expect(0);
    let text = std::fs::read_to_string(&html).unwrap();
    let (top, by_group) = text
        .split_once("<h2>Groups of anomalies</h2>")
        .expect("a section of groups");
    assert_eq!(
        top.matches("class=\"nearest\"").count(),
        15,
        "3 for each of the top 5"
    );
    let groups = manifest["anomaly_groups"].as_array().unwrap();
    assert_eq!(
        by_group.matches("<div class=\"group\">").count(),
        groups.len()
    );
    let shown = text.matches("class=\"nearest\"").count();
    // Every card, including an image both among the top 5 and a group's examples, has its own
    // pixels read back from the source.
    assert_eq!(
        text.matches("class=\"image\"").count(),
        text.matches("class=\"heat\"").count(),
        "an image for every heat map"
    );
    assert!(!text.contains("image not readable here"));
    let Some(browser) = browser_for_report_tests() else {
        return;
    };
    assert_eq!(decoded_images_in_browser(&browser, &html, "nearest"), shown);
    let heat = text.matches("class=\"heat\"").count();
    assert!(heat > 5, "the top 5 and the groups' examples");
    assert_eq!(
        decoded_images_in_browser(&browser, &html, "heat"),
        heat,
        "the probe counts"
    );
}
