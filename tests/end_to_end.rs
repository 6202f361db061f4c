//! The demo and the fit → score path, end to end, with the written tables read back.

use std::collections::HashMap;

use anomaly_pipeline::data::{id_hash, unit_interval};

use crate::common::*;

/// Runs the bundled demo into `out` with run id `run_id`.
fn run_demo(dir: &std::path::Path, run_id: &str) -> Output {
    let out = dir.join("out");
    pipeline(
        &repo(),
        &[
            "run",
            "pipelines/demo.toml",
            "--run-id",
            run_id,
            "--log-format",
            "json",
        ],
        &[("DEMO_OUT", out.to_str().unwrap())],
    )
}

#[test]
fn the_demo_writes_every_table_and_reruns_replace_rows() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = run_demo(dir.path(), "first");
    result.expect(0);
    assert!(result.stdout.contains("scores"), "{}", result.stdout);
    assert!(
        result.stdout.contains(out.to_str().unwrap()),
        "the summary names the sink"
    );

    let scores = read_table(&out.join("scores"));
    assert_eq!(rows(&scores), 2000, "one row per input image");
    // The written columns are the documented ones (schemas/tables.json), passthrough after id.
    let documented: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo().join("schemas/tables.json")).unwrap())
            .unwrap();
    for (table, batches) in [
        ("scores", &scores),
        ("anomalies", &read_table(&out.join("anomalies"))),
    ] {
        let mut want: Vec<(String, String)> = documented[table]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().into(),
                    c["type"].as_str().unwrap().into(),
                )
            })
            .collect();
        want.splice(
            2..2,
            [
                // The source's uint8 label, as the signed type that holds it (Delta and Spark
                // have no unsigned types).
                ("label".into(), "Int16".into()),
                ("condition".into(), "Utf8".into()),
            ],
        );
        let got: Vec<(String, String)> = batches[0]
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().to_string()))
            .collect();
        assert_eq!(got, want, "{table} columns");
    }
    let ll = floats(&scores, "log_likelihood");
    let bits = floats(&scores, "bits_per_dim");
    let score = floats(&scores, "score");
    for ((l, b), s) in ll.iter().zip(&bits).zip(&score) {
        assert!(l.is_finite() && *l <= 0.0, "log-likelihood {l}");
        let want = -l / (784.0 * std::f64::consts::LN_2);
        assert!((b - want).abs() < 1e-12, "bits_per_dim {b} vs {want}");
        assert_eq!(*s, -l, "score is the NLL");
    }
    let ids = strings(&scores, "id");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 2000, "ids are unique");
    assert!(
        strings(&scores, "run_id")
            .iter()
            .all(|r| r.as_deref() == Some("first"))
    );

    // Every damaged frame is flagged, and the flags match the threshold.
    let condition = strings(&scores, "condition");
    let flags = bools(&scores, "is_anomaly");
    let threshold = floats(&scores, "threshold")[0];
    for i in 0..ids.len() {
        assert_eq!(flags[i], score[i] > threshold);
        if condition[i].as_deref() != Some("normal") {
            assert!(flags[i], "{:?} ({:?}) not flagged", ids[i], condition[i]);
        }
    }
    let anomalies = read_table(&out.join("anomalies"));
    assert_eq!(rows(&anomalies), flags.iter().filter(|f| **f).count());
    let maps = anomalies[0]
        .column_by_name("pixel_nll")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::ListArray>()
        .unwrap()
        .clone();
    assert_eq!(maps.value(0).len(), 784);

    assert!(out.join("runs/first/_SUCCESS").exists());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("runs/first/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["rows"]["scored"], 2000);
    assert!(!out.join("_staging").exists(), "staging is cleaned up");

    // The same run id again: the same rows, not twice as many.
    run_demo(dir.path(), "first").expect(0);
    let again = read_table(&out.join("scores"));
    assert_eq!(rows(&again), 2000);
    assert_eq!(likelihoods(&out.join("scores")).len(), 2000);
    assert_eq!(
        floats(&again, "log_likelihood"),
        ll,
        "reruns are deterministic"
    );

    // Another run id adds its own rows beside the first run's.
    run_demo(dir.path(), "second").expect(0);
    assert_eq!(rows(&read_table(&out.join("scores"))), 4000);
    assert!(out.join("runs/second/_SUCCESS").exists());
}

#[test]
fn held_out_normal_images_are_flagged_at_about_one_minus_the_quantile() {
    let dir = tempfile::tempdir().unwrap();
    let train = images(4000, 8, 8, 1);
    let fresh = images(3000, 8, 8, 2);
    write_tensor_u8(
        &dir.path().join("train.parquet"),
        &ids(0, 4000),
        &train,
        &[8, 8],
    );
    write_tensor_u8(
        &dir.path().join("fresh.parquet"),
        &ids(10_000, 3000),
        &fresh,
        &[8, 8],
    );
    let extra = "[threshold]\nquantile = 0.95\n\n[train]\nvalidation_fraction = 0.3\nseed = 4\n";
    write_config(dir.path(), "fit.toml", "train.parquet", "out", extra);
    write_config(dir.path(), "score.toml", "fresh.parquet", "out", extra);

    let model_dir = fit_model(dir.path(), "fit.toml");
    let model: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(&model_dir).join("model.json")).unwrap(),
    )
    .unwrap();
    // The held-out split is the one the id hash picks.
    let held_out = ids(0, 4000)
        .iter()
        .filter(|id| unit_interval(id_hash(4, id)) < 0.3)
        .count();
    assert_eq!(model["training"]["validation_images"], held_out as u64);
    assert_eq!(
        model["calibration_scores"].as_array().unwrap().len(),
        held_out
    );

    pipeline(
        dir.path(),
        &[
            "score",
            "score.toml",
            "--model",
            &model_dir,
            "--run-id",
            "fresh",
        ],
        &[],
    )
    .expect(0);
    let scores = read_table(&dir.path().join("out/scores"));
    let flags = bools(&scores, "is_anomaly");
    let fraction = flags.iter().filter(|f| **f).count() as f64 / flags.len() as f64;
    // With n calibration scores the threshold is the k-th smallest, k = ⌈0.95·n⌉, so a fresh
    // normal image exceeds it with probability Beta(n − k + 1, k): mean (n − k + 1)/(n + 1),
    // variance p(1 − p)/(n + 2). The m = 3,000 fresh images add their binomial variance
    // p(1 − p)/m. The flagged fraction must lie within 3.5 standard deviations of the mean
    // (about ±0.025 with n ≈ 1,200 held out; a threshold off by one quantile step moves it
    // by 1/n).
    let n = held_out as f64;
    let k = (0.95 * n).ceil();
    let mean = (n - k + 1.0) / (n + 1.0);
    let variance = mean * (1.0 - mean) * (1.0 / (n + 2.0) + 1.0 / flags.len() as f64);
    let tolerance = 3.5 * variance.sqrt();
    assert!(
        (fraction - mean).abs() < tolerance,
        "flagged fraction {fraction}, expected {mean:.4} ± {tolerance:.4} with {held_out} held out"
    );
}

#[test]
fn fit_then_score_gives_the_same_scores_as_run() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(500, 6, 5, 3);
    write_tensor_u8(&dir.path().join("d.parquet"), &ids(0, 500), &imgs, &[6, 5]);
    let extra = "[model]\nkind = \"categorical\"\n\n[preprocess]\nbinarize = \"none\"\n";
    write_config(dir.path(), "p.toml", "d.parquet", "out", extra);
    pipeline(dir.path(), &["run", "p.toml", "--run-id", "a"], &[]).expect(0);
    let model_dir = fit_model(dir.path(), "p.toml");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("out/runs/a/manifest.json")).unwrap(),
    )
    .unwrap();
    let id = manifest["model"]["model_id"].as_str().unwrap();
    assert!(
        model_dir.ends_with(id),
        "refitting the same data gives the same model id: {model_dir} vs {id}"
    );
    let out2 = dir.path().join("out2");
    pipeline(
        dir.path(),
        &[
            "score",
            "p.toml",
            "--model",
            &model_dir,
            "--set",
            &format!("sink.uri={}", out2.display()),
            "--run-id",
            "b",
        ],
        &[],
    )
    .expect(0);
    let a = likelihoods(&dir.path().join("out/scores"));
    let b = likelihoods(&out2.join("scores"));
    assert_eq!(a, b);
    assert!(a.values().all(|v| *v < 0.0));
}

/// The mean share of pixels on each sampled tile's majority side (bright above 128) of a
/// `pipeline sample` grid of `count` tiles of `h`×`w` (scale 1; tiles 2 pixels apart).
fn majority_agreement(grid: &image::GrayImage, count: usize, h: usize, w: usize) -> f64 {
    const GAP: usize = 2;
    let cols = (count as f64).sqrt().ceil() as usize;
    let mut total = 0.0;
    for k in 0..count {
        let (oy, ox) = (GAP + (k / cols) * (h + GAP), GAP + (k % cols) * (w + GAP));
        let bright = (0..h * w)
            .filter(|i| grid.get_pixel((ox + i % w) as u32, (oy + i / w) as u32).0[0] > 128)
            .count();
        total += bright.max(h * w - bright) as f64 / (h * w) as f64;
    }
    total / count as f64
}

#[test]
fn every_model_kind_runs_end_to_end_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("d.parquet"),
        &ids(0, 400),
        &latent_images(400, 30, 12),
        &[5, 6],
    );
    // Mean log-likelihood of the independent baselines (bernoulli for binary pixels,
    // categorical for 8-bit), which every model with a context must beat on these images.
    let mut baseline: std::collections::HashMap<bool, f64> = Default::default();
    for (kind, extra) in [
        ("bernoulli", ""),
        ("categorical", "[preprocess]\nbinarize = \"none\"\n"),
        (
            "ar",
            "k = 3\ncontext = \"neighbourhood\"\norder = \"random\"\n",
        ),
        ("fvsbn", "[train]\nepochs = 20\nlearning_rate = 0.05\n"),
        (
            "nade",
            "hidden = 20\norder = \"random\"\n\n[train]\nepochs = 20\nlearning_rate = 0.05\n",
        ),
        (
            "ar",
            "k = 4\ncomponents = 3\n\n[preprocess]\nbinarize = \"none\"\n\n[train]\nepochs = 20\nlearning_rate = 0.03\n",
        ),
        (
            "rnade",
            "hidden = 8\ncomponents = 3\n\n[preprocess]\nbinarize = \"none\"\n\n[train]\nepochs = 20\nlearning_rate = 0.03\n",
        ),
        (
            "pixelrnn",
            "architecture = \"diagonal_bilstm\"\nlayers = 2\nhidden = 4\n\n[train]\nepochs = 2\nlearning_rate = 0.01\n",
        ),
        (
            "pixelrnn",
            "architecture = \"row_lstm\"\nlayers = 1\nhidden = 4\n\n[preprocess]\nbinarize = \"none\"\n\n[train]\nepochs = 20\nlearning_rate = 0.02\n",
        ),
    ] {
        let eight_bit = extra.contains("binarize");
        let name = match (eight_bit, kind) {
            (true, "ar") => "ar-8bit",
            (true, "pixelrnn") => "pixelrnn-8bit",
            _ => kind,
        };
        let sink = format!("out-{name}");
        let model_table = if extra.starts_with('[') {
            format!("[model]\nkind = \"{kind}\"\n\n{extra}")
        } else {
            format!("[model]\nkind = \"{kind}\"\n{extra}")
        };
        let cfg = format!("{name}.toml");
        write_config(d, &cfg, "d.parquet", &sink, &model_table);
        // The families with a hidden layer write embeddings; the others refuse to, up front.
        let width = match name {
            "nade" => Some(20),
            "rnade" => Some(8),
            // The default `embedding_grid` (7 × 7 regions) of 2 · hidden features.
            "pixelrnn" | "pixelrnn-8bit" => Some(7 * 7 * 2 * 4),
            _ => None,
        };
        let embed = ["--set", "sink.embeddings=true"];
        if width.is_none() {
            pipeline(d, &["run", &cfg, "--run-id", kind, embed[0], embed[1]], &[])
                .expect(78)
                .mentions(&["sink.embeddings", "nade, rnade, pixelrnn"]);
        }
        let args: Vec<&str> = ["run", cfg.as_str(), "--run-id", kind]
            .into_iter()
            .chain(width.map_or(&[][..], |_| &embed[..]).iter().copied())
            .collect();
        pipeline(d, &args, &[]).expect(0);
        let scores = read_table(&d.join(&sink).join("scores"));
        assert_eq!(rows(&scores), 400, "{kind}");
        let embeddings_dir = d.join(&sink).join("embeddings");
        if let Some(width) = width {
            let table = read_table(&embeddings_dir);
            assert_eq!(strings(&table, "id"), strings(&scores, "id"), "{name}");
            let vectors = float_lists(&table, "embedding");
            assert!(vectors.iter().all(|v| v.len() == width), "{name}");
            // σ units lie in (0, 1) and ReLU features are never negative; and images differ.
            assert!(
                vectors
                    .iter()
                    .flatten()
                    .all(|&v| v.is_finite() && v >= 0.0 && (kind != "nade" || v < 1.0)),
                "{name}"
            );
            assert!(
                vectors.iter().any(|v| v != &vectors[0]),
                "{name}: every embedding alike"
            );
        } else {
            assert!(
                !embeddings_dir.exists(),
                "{name}: no embeddings table unasked"
            );
        }
        let ll = floats(&scores, "log_likelihood");
        assert!(ll.iter().all(|l| l.is_finite() && *l <= 0.0));
        let mean = ll.iter().sum::<f64>() / ll.len() as f64;
        let binary_pixels = !eight_bit && kind != "categorical";
        match baseline.get(&binary_pixels) {
            None => {
                baseline.insert(binary_pixels, mean);
            }
            // Each image's pixels share one hidden brightness: after a few pixels a model
            // with a context knows it, an independent one never does (about 10 nats apart
            // for binary pixels when learned; a few epochs must at least win).
            Some(&independent) => assert!(
                mean > independent + 1.0,
                "{name}: mean log-likelihood {mean:.2} does not beat the independent {independent:.2}"
            ),
        }
        assert!(
            strings(&scores, "model")
                .iter()
                .all(|m| m.as_deref() == Some(kind))
        );
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.join(&sink).join(format!("runs/{kind}/manifest.json"))).unwrap(),
        )
        .unwrap();
        let model_dir = d
            .join(&sink)
            .join("models")
            .join(manifest["model"]["model_id"].as_str().unwrap());
        let png = format!("{name}.png");
        pipeline(
            d,
            &[
                "sample",
                model_dir.to_str().unwrap(),
                "-n",
                "16",
                "--scale",
                "1",
                "--out",
                &png,
            ],
            &[],
        )
        .expect(0);
        let grid = image::open(d.join(&png))
            .unwrap_or_else(|e| panic!("{kind} sample grid: {e}"))
            .to_luma8();
        // A drawn image of these data is bright or dark as a whole when the model learned that
        // its pixels go together: about 90% of them on the majority side, against about 60%
        // for independent pixels.
        let agreement = majority_agreement(&grid, 16, 5, 6);
        eprintln!("{name}: samples agree with their majority at {agreement:.2}");
        let independent = ["bernoulli", "categorical"].contains(&kind);
        assert!(
            if independent {
                agreement < 0.75
            } else {
                agreement > 0.75
            },
            "{name}: samples agree with their majority at {agreement:.2}"
        );
        if kind != "categorical" && (["fvsbn", "nade", "pixelrnn"].contains(&kind) || eight_bit) {
            let meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(model_dir.join("model.json")).unwrap())
                    .unwrap();
            let curve = meta["training"]["curve"].as_array().unwrap();
            assert!(
                !curve.is_empty() && curve[0]["validation_nll"].is_number(),
                "{curve:?}"
            );
        }
    }
}

#[test]
fn conformal_flags_planted_anomalies_by_benjamini_hochberg_over_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("train.parquet"),
        &ids(0, 4000),
        &images(4000, 8, 8, 1),
        &[8, 8],
    );
    // 300 fresh normal images, then 30 inverted ones (bright where normal images are dark).
    let mut fresh = images(330, 8, 8, 2);
    for img in &mut fresh[300..] {
        img.iter_mut().for_each(|v| *v = 255 - *v);
    }
    write_tensor_u8(&d.join("fresh.parquet"), &ids(10_000, 330), &fresh, &[8, 8]);
    let extra =
        "[threshold]\nmethod = \"conformal\"\nfdr = 0.1\n\n[train]\nvalidation_fraction = 0.5\n";
    write_config(d, "fit.toml", "train.parquet", "out", extra);
    write_config(d, "score.toml", "fresh.parquet", "out", extra);
    let scores = fit_then_score(d);
    let ids_read = strings(&scores, "id");
    let p = floats(&scores, "p_value");
    let score = floats(&scores, "score");
    let threshold = floats(&scores, "threshold");
    let flags = bools(&scores, "is_anomaly");
    assert!(p.iter().all(|p| *p > 0.0 && *p <= 1.0));
    assert!(
        threshold.windows(2).all(|w| w[0] == w[1]),
        "one threshold per run"
    );
    // Benjamini–Hochberg by hand over the written p-values gives the same flags, and the
    // flags are exactly the scores above the run's threshold.
    let bh = benjamini_hochberg(&p, 0.1);
    for i in 0..flags.len() {
        assert_eq!(flags[i], bh[i], "row {i}");
        assert_eq!(flags[i], score[i] > threshold[0], "row {i}");
    }
    let planted = |i: usize| ids_read[i].as_deref().unwrap() >= "img-10300";
    let found = (0..flags.len()).filter(|&i| flags[i] && planted(i)).count();
    let false_flags = (0..flags.len())
        .filter(|&i| flags[i] && !planted(i))
        .count();
    assert_eq!(found, 30, "every planted anomaly is flagged");
    assert!(false_flags <= 10, "{false_flags} normal images flagged");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/runs/r/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["threshold"]["method"], "conformal");
    assert_eq!(manifest["threshold"]["fdr"], 0.1);
    assert_eq!(manifest["threshold"]["value"], threshold[0]);
}

/// Fits `fit.toml` in `d`, scores `score.toml` with that model as run `r`, and reads the
/// scores back.
fn fit_then_score(d: &std::path::Path) -> Vec<arrow::record_batch::RecordBatch> {
    let model_dir = fit_model(d, "fit.toml");
    let args = [
        "score",
        "score.toml",
        "--model",
        &model_dir,
        "--run-id",
        "r",
    ];
    pipeline(d, &args, &[]).expect(0);
    read_table(&d.join("out/scores"))
}

/// Benjamini–Hochberg over all p-values at level `fdr`: which of `p` are flagged.
fn benjamini_hochberg(p: &[f64], fdr: f64) -> Vec<bool> {
    let mut sorted = p.to_vec();
    sorted.sort_by(f64::total_cmp);
    let m = sorted.len() as f64;
    let cutoff = (0..sorted.len())
        .rev()
        .find(|&k| sorted[k] <= (k + 1) as f64 * fdr / m)
        .map(|k| sorted[k]);
    p.iter().map(|&p| cutoff.is_some_and(|c| p <= c)).collect()
}

/// With `source.partition_by`, each partition's model calibrates its own p-values and
/// Benjamini–Hochberg runs within each partition: a partition full of anomalies does not lower
/// the bar for a clean one (as pooling the run's p-values would).
#[test]
fn conformal_runs_benjamini_hochberg_within_each_partition() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train_labels: Vec<u16> = (0..4000).map(|i| (i % 2) as u16).collect();
    write_tensor_u8_labelled(
        &d.join("train.parquet"),
        &ids(0, 4000),
        &images(4000, 8, 8, 1),
        &[8, 8],
        &train_labels,
    );
    // Partition 0: 300 fresh normal images and 100 inverted ones; partition 1: 300 normal.
    let mut fresh = images(700, 8, 8, 2);
    for img in &mut fresh[300..400] {
        img.iter_mut().for_each(|v| *v = 255 - *v);
    }
    let labels: Vec<u16> = (0..700).map(|i| u16::from(i >= 400)).collect();
    write_tensor_u8_labelled(
        &d.join("fresh.parquet"),
        &ids(10_000, 700),
        &fresh,
        &[8, 8],
        &labels,
    );
    let extra = "[threshold]\nmethod = \"conformal\"\nfdr = 0.1\n\n\
                 [train]\nvalidation_fraction = 0.5\nmin_images = 100\n";
    for (name, source) in [
        ("fit.toml", "train.parquet"),
        ("score.toml", "fresh.parquet"),
    ] {
        let path = write_config(d, name, source, "out", extra);
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "[source]\n",
            "[source]\npartition_by = [\"label\"]\n",
            1,
        );
        std::fs::write(&path, text).unwrap();
    }
    let scores = fit_then_score(d);
    let ids_read = strings(&scores, "id");
    let p = floats(&scores, "p_value");
    let flags = bools(&scores, "is_anomaly");
    let threshold = floats(&scores, "threshold");
    let partition = |i: usize| u16::from(ids_read[i].as_deref().unwrap() >= "img-10400");
    let planted = |i: usize| {
        let id = ids_read[i].as_deref().unwrap();
        ("img-10300".."img-10400").contains(&id)
    };
    for part in [0, 1] {
        let rows: Vec<usize> = (0..p.len()).filter(|&i| partition(i) == part).collect();
        let bh = benjamini_hochberg(&rows.iter().map(|&i| p[i]).collect::<Vec<_>>(), 0.1);
        for (k, &i) in rows.iter().enumerate() {
            assert_eq!(flags[i], bh[k], "partition {part}, row {i}");
            assert_eq!(
                threshold[i], threshold[rows[0]],
                "one threshold per partition"
            );
        }
    }
    let found = (0..p.len()).filter(|&i| flags[i] && planted(i)).count();
    assert_eq!(found, 100, "every planted anomaly is flagged");
    // The data make the difference visible: pooled over the run, BH would flag other images.
    assert_ne!(
        benjamini_hochberg(&p, 0.1),
        flags,
        "pooling would flag the same images: the test cannot tell per-partition BH from pooled"
    );
}

#[test]
fn likelihood_ratio_and_complexity_scores_are_fitted_stored_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("d.parquet"),
        &ids(0, 600),
        &images(600, 6, 6, 5),
        &[6, 6],
    );
    for (name, extra) in [
        (
            "lr-mutated",
            "[score]\nmethod = \"likelihood_ratio\"\n[score.background]\nkind = \"mutated\"\nmutation_rate = 0.3\n",
        ),
        (
            "lr-bernoulli",
            "[model]\nkind = \"ar\"\nk = 2\n\n[score]\nmethod = \"likelihood_ratio\"\n[score.background]\nkind = \"bernoulli\"\nalpha = 0.5\n",
        ),
        (
            "lr-default",
            "[model]\nkind = \"nade\"\nhidden = 5\n[train]\nepochs = 2\n[score]\nmethod = \"likelihood_ratio\"\n",
        ),
        ("complexity", "[score]\nmethod = \"complexity\"\n"),
    ] {
        let cfg = format!("{name}.toml");
        let sink = format!("out-{name}");
        write_config(d, &cfg, "d.parquet", &sink, extra);
        let model_dir = fit_model(d, &cfg);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join(&model_dir).join("model.json")).unwrap())
                .unwrap();
        let method = meta["score"]["method"].as_str().unwrap();
        let has_background = d.join(&model_dir).join("background.safetensors").exists();
        assert_eq!(has_background, method == "likelihood_ratio", "{name}");
        let background = &meta["score"]["background"];
        match name {
            "lr-bernoulli" => {
                assert_eq!(background["kind"], "bernoulli");
                assert_eq!(background["hyperparameters"]["alpha"], 0.5);
            }
            "lr-mutated" => {
                assert_eq!(background["fitted_on"], "mutated");
                assert_eq!(background["mutation_rate"], 0.3);
            }
            // Without `[score.background]`: the local AR-3 measured best.
            "lr-default" => {
                assert_eq!(background["kind"], "ar");
                assert_eq!(background["hyperparameters"]["k"], 3);
                assert_eq!(background["hyperparameters"]["context"], "neighbourhood");
            }
            _ => {}
        }
        // Scoring with the stored model (and its background) gives finite scores in the
        // method's units: a ratio is not the NLL, the complexity score is below it.
        pipeline(
            d,
            &["score", &cfg, "--model", &model_dir, "--run-id", "r"],
            &[],
        )
        .expect(0);
        let scores = read_table(&d.join(&sink).join("scores"));
        let nll: Vec<f64> = floats(&scores, "log_likelihood")
            .iter()
            .map(|l| -l)
            .collect();
        let score = floats(&scores, "score");
        assert!(score.iter().all(|s| s.is_finite()), "{name}");
        match method {
            "likelihood_ratio" => assert!(
                nll.iter().zip(&score).any(|(n, s)| (n - s).abs() > 1e-6),
                "{name}: the ratio differs from the NLL"
            ),
            "complexity" => assert!(nll.iter().zip(&score).all(|(n, s)| s < n), "{name}"),
            other => panic!("unexpected method {other}"),
        }
    }
    // A background that is neither "mutated" nor a kind, the old spelling of one, and a
    // misspelt key under the table are config errors naming the key and its line.
    for (extra, wanted) in [
        (
            "[score.background]\nkind = \"gaussian\"\n",
            vec![
                "bad.toml:13:",
                "`score.background.kind`: unknown model kind \"gaussian\"",
                "mutated",
            ],
        ),
        (
            "background = \"ar\"\n",
            vec![
                "bad.toml:12:",
                "old spelling",
                "[score.background]",
                "kind = \"ar\"",
            ],
        ),
        (
            "[score.background]\nkind = \"ar\"\ncontxt = \"neighbourhood\"\n",
            vec![
                "bad.toml:14:",
                "unknown key `score.background.contxt`",
                "`context`",
            ],
        ),
    ] {
        write_config(
            d,
            "bad.toml",
            "d.parquet",
            "out",
            &format!("[score]\nmethod = \"likelihood_ratio\"\n{extra}"),
        );
        pipeline(d, &["validate", "bad.toml"], &[])
            .expect(78)
            .mentions(&wanted);
    }
}

/// `train.max_minutes`: a budget the first step already spends ends training there; the model
/// keeps that epoch and its curve and the run's manifest say the budget ended it. Without the
/// key, neither says anything.
#[test]
fn a_training_budget_ends_the_fit_and_the_manifest_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("d.parquet"),
        &ids(0, 300),
        &images(300, 6, 6, 2),
        &[6, 6],
    );
    for (name, budget) in [("budget", "max_minutes = 1e-9\n"), ("none", "")] {
        let cfg = format!("{name}.toml");
        write_config(
            d,
            &cfg,
            "d.parquet",
            &format!("out-{name}"),
            &format!(
                "[model]\nkind = \"fvsbn\"\n[train]\nepochs = 3\nbatch_size = 10\nclip = 5.0\n{budget}"
            ),
        );
        pipeline(d, &["run", &cfg, "--run-id", "r"], &[]).expect(0);
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.join(format!("out-{name}/runs/r/manifest.json"))).unwrap(),
        )
        .unwrap();
        let model_dir = d
            .join(format!("out-{name}/models"))
            .join(manifest["model"]["model_id"].as_str().unwrap());
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model_dir.join("model.json")).unwrap()).unwrap();
        let curve = meta["training"]["curve"].as_array().unwrap();
        if name == "budget" {
            assert_eq!(curve.len(), 1, "{curve:?}");
            assert_eq!(curve[0]["budget_ended"], true);
            assert_eq!(manifest["model"]["training_budget_ended"], true);
        } else {
            assert_eq!(curve.len(), 3);
            assert!(curve.iter().all(|r| r.get("budget_ended").is_none()));
            assert!(manifest["model"].get("training_budget_ended").is_none());
        }
    }
    write_config(
        d,
        "bad.toml",
        "d.parquet",
        "out",
        "[train]\nmax_minutes = -1.0\nclip = 0.0\n",
    );
    pipeline(d, &["validate", "bad.toml"], &[])
        .expect(78)
        .mentions(&[
            "`train.max_minutes` must be a positive number, got -1",
            "`train.clip` must be a positive number, got 0",
        ]);
}

/// A model written by the previous version of the program (model.json format 1, before the
/// model layer became one folder per family) still loads, and scores the demo digits exactly
/// as that version did: a NADE-8 with a likelihood ratio against an AR-3 background, fitted by
/// `pipeline run pipelines/demo.toml --set model.kind=nade --set model.hidden=8 --set
/// train.epochs=2 --set score.method=likelihood_ratio --set score.background=ar --set model.k=3
/// --set 'model.context="neighbourhood"'` (commit eb27741), with every tenth image's scores.
#[test]
fn a_model_written_by_the_previous_version_scores_as_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = repo().join("tests/data");
    let config = std::fs::read_to_string(repo().join("pipelines/demo.toml"))
        .unwrap()
        .replace(
            "data/demo/digits.parquet",
            repo().join("data/demo/digits.parquet").to_str().unwrap(),
        );
    std::fs::write(d.join("demo.toml"), config).unwrap();
    let model = data.join("model-v1-nade-lr");
    pipeline(
        d,
        &[
            "score",
            "demo.toml",
            "--model",
            model.to_str().unwrap(),
            "--run-id",
            "v2",
        ],
        &[("DEMO_OUT", "out")],
    )
    .expect(0);
    let scores = read_table(&d.join("out/scores"));
    let got: HashMap<String, (f64, f64)> = strings(&scores, "id")
        .into_iter()
        .map(Option::unwrap)
        .zip(
            floats(&scores, "log_likelihood")
                .into_iter()
                .zip(floats(&scores, "score")),
        )
        .collect();
    let expected = std::fs::read_to_string(data.join("model-v1-nade-lr-scores.csv")).unwrap();
    let mut compared = 0;
    for line in expected.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (ll, score): (f64, f64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        assert_eq!(got[f[0]], (ll, score), "{}", f[0]);
        compared += 1;
    }
    assert_eq!(compared, 200);
}

#[test]
fn partitions_score_like_separate_runs_and_small_ones_get_no_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 1,005 images whose `label` is i % 10: labels 0-4 have 101 images, 5-9 have 100.
    let all_ids = ids(0, 1005);
    let all_images = images(1005, 6, 6, 9);
    write_tensor_u8(&d.join("all.parquet"), &all_ids, &all_images, &[6, 6]);
    let model = "[model]\nkind = \"ar\"\nk = 2\n\n[train]\nmin_images = 101\n";
    std::fs::write(
        d.join("parts.toml"),
        format!(
            "[pipeline]\nname = \"test\"\n\n[source]\nuri = \"all.parquet\"\npartition_by = [\"label\"]\n\n[sink]\nuri = \"out-parts\"\n\n{model}"
        ),
    )
    .unwrap();
    let run = pipeline(d, &["run", "parts.toml", "--run-id", "p"], &[]);
    run.expect(0);
    assert!(run.stdout.contains("5 partitions"), "{}", run.stdout);

    let scores = read_table(&d.join("out-parts/scores"));
    let got_ids = strings(&scores, "id");
    let labels = scores.iter().flat_map(|b| {
        let c = b.column_by_name("label").unwrap();
        let c = c
            .as_any()
            .downcast_ref::<arrow::array::Int32Array>()
            .unwrap();
        c.values().iter().map(|&v| v as u16).collect::<Vec<_>>()
    });
    let score_col = optional_floats(&scores, "score");
    let partitioned: std::collections::HashMap<String, (String, Option<f64>)> = got_ids
        .iter()
        .zip(labels)
        .zip(score_col)
        .map(|((id, l), s)| (id.clone().unwrap(), (l.to_string(), s)))
        .collect();
    assert_eq!(partitioned.len(), 1005);
    // Labels 5-9 had too few images: no model, no score, no flag.
    for (id, (label, score)) in &partitioned {
        let small = label.parse::<u32>().unwrap() >= 5;
        assert_eq!(score.is_none(), small, "{id} (label {label})");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out-parts/runs/p/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["partitions"].as_object().unwrap().len(), 5);
    assert_eq!(manifest["unmodelled_partitions"]["7"], 100);
    assert_eq!(manifest["rows"]["unmodelled"], 500);

    // Each modelled partition scores exactly as a separate run on its own rows.
    for label in 0..5usize {
        let rows: Vec<usize> = (0..1005).filter(|i| i % 10 == label).collect();
        let part_ids: Vec<String> = rows.iter().map(|&i| all_ids[i].clone()).collect();
        let part_images: Vec<Vec<u8>> = rows.iter().map(|&i| all_images[i].clone()).collect();
        let file = format!("label-{label}.parquet");
        write_tensor_u8(&d.join(&file), &part_ids, &part_images, &[6, 6]);
        let sink = format!("out-{label}");
        let cfg = format!("label-{label}.toml");
        write_config(d, &cfg, &file, &sink, model);
        pipeline(d, &["run", &cfg, "--run-id", "alone"], &[]).expect(0);
        let alone = likelihoods(&d.join(&sink).join("scores"));
        for id in &part_ids {
            let expected = -alone[id];
            let (_, got) = &partitioned[id];
            assert_eq!(
                got.unwrap(),
                expected,
                "{id}: partitioned vs separate score"
            );
        }
    }

    // The fitted set reloads for `pipeline score` and gives the same scores.
    let set_dir = manifest["model"]["uri"].as_str().unwrap();
    pipeline(
        d,
        &[
            "score",
            "parts.toml",
            "--model",
            set_dir,
            "--run-id",
            "again",
        ],
        &[],
    )
    .expect(0);
    let again = read_table(&d.join("out-parts/scores"));
    let runs = strings(&again, "run_id");
    let ids_again = strings(&again, "id");
    let ll = optional_floats(&again, "log_likelihood");
    for ((run, id), ll) in runs.iter().zip(&ids_again).zip(ll) {
        if run.as_deref() == Some("again") {
            let (_, first) = &partitioned[id.as_deref().unwrap()];
            assert_eq!(ll.map(|l| -l), *first);
        }
    }
}

#[test]
fn the_same_run_writes_byte_identical_tables_and_thread_counts_agree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("d.parquet"),
        &ids(0, 700),
        &images(700, 6, 6, 3),
        &[6, 6],
    );
    let extra =
        "[model]\nkind = \"nade\"\nhidden = 12\n\n[train]\nepochs = 2\nlearning_rate = 0.01\n";
    let run = |sink: &str, threads: &str| {
        write_config(d, &format!("{sink}.toml"), "d.parquet", sink, extra);
        pipeline(
            d,
            &["run", &format!("{sink}.toml"), "--run-id", "same"],
            &[("RAYON_NUM_THREADS", threads)],
        )
        .expect(0);
        let part = std::fs::read_dir(d.join(sink).join("scores"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        (
            std::fs::read(&part).unwrap(),
            likelihoods(&d.join(sink).join("scores")),
        )
    };
    let (a, ll_a) = run("a", "2");
    let (b, _) = run("b", "2");
    assert!(
        a == b,
        "two runs with the same input, seed and threads write the same bytes"
    );
    let (_, ll_one) = run("c", "1");
    for (id, l) in &ll_a {
        let m = ll_one[id];
        assert!(
            (l - m).abs() <= 1e-9 * l.abs(),
            "{id}: {l} with 2 threads, {m} with 1"
        );
    }
}

/// The colour demo: 8-bit RGB patches, `ar` with discretized-logistic outputs, every table
/// written; per-sub-pixel maps add up to each flagged image's log-likelihood; bits/dim divide
/// by H·W·C; and the fitted model draws a colour grid.
#[test]
fn the_textures_demo_scores_rgb_patches_and_samples_a_colour_grid() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    pipeline(
        &repo(),
        &[
            "run",
            "pipelines/textures.toml",
            // Short: this is the unoptimized test build.
            "--set",
            "train.epochs=1",
            "--set",
            "model.k=4",
        ],
        &[("DEMO_OUT", out.to_str().unwrap())],
    )
    .expect(0);
    let scores = read_table(&out.join("scores"));
    assert_eq!(rows(&scores), 500);
    let dims = (32 * 32 * 3) as f64;
    for (ll, bpd) in floats(&scores, "log_likelihood")
        .iter()
        .zip(floats(&scores, "bits_per_dim"))
    {
        assert!(ll.is_finite() && *ll < 0.0);
        assert!((bpd + ll / (dims * std::f64::consts::LN_2)).abs() < 1e-9);
    }
    // Damaged patches score worse than normal ones on average, even after one epoch.
    let conditions = strings(&scores, "condition");
    let nll = floats(&scores, "log_likelihood");
    let mean = |want: bool| {
        let v: Vec<f64> = conditions
            .iter()
            .zip(&nll)
            .filter(|(c, _)| (c.as_deref() == Some("normal")) == want)
            .map(|(_, l)| -l)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(
        mean(false) > mean(true),
        "defects {} vs normal {}",
        mean(false),
        mean(true)
    );
    let anomalies = read_table(&out.join("anomalies"));
    assert!(rows(&anomalies) > 0);
    for (map, ll) in float_lists(&anomalies, "pixel_nll")
        .iter()
        .zip(floats(&anomalies, "log_likelihood"))
    {
        assert_eq!(map.len(), 32 * 32 * 3, "one value per sub-pixel");
        let total: f64 = map.iter().map(|&v| f64::from(v)).sum();
        assert!((total + ll).abs() < 1e-3 * ll.abs(), "{total} vs {ll}");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("runs/textures/manifest.json")).unwrap())
            .unwrap();
    let model = out
        .join("models")
        .join(manifest["model"]["model_id"].as_str().unwrap());
    let grid = dir.path().join("grid.png");
    pipeline(
        dir.path(),
        &[
            "sample",
            model.to_str().unwrap(),
            "-n",
            "9",
            "--out",
            grid.to_str().unwrap(),
        ],
        &[],
    )
    .expect(0);
    let img = image::open(&grid).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8, "a colour grid");
    let rgb = img.into_rgb8();
    let coloured = rgb
        .pixels()
        .filter(|p| p[0] != p[1] || p[1] != p[2])
        .count();
    assert!(
        coloured > 9 * 32 * 32 / 2,
        "most sampled pixels have distinct channels: {coloured}"
    );
}

/// PixelRNN on 8-bit RGB: fitted on images whose G follows R and whose B is 255 − G, it scores
/// them and a few of noise, the noise worse (and flagged); the per-sub-pixel maps of the flagged
/// images add up to their log-likelihoods, and the model draws a colour grid.
#[test]
fn pixelrnn_scores_and_samples_8_bit_colour() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (h, w) = (6, 5);
    let mut rng = 7u64;
    let mut next = move || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as u32
    };
    let pictures: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            (0..h * w)
                .flat_map(|p| {
                    if i >= 280 {
                        return [next() as u8, next() as u8, next() as u8];
                    }
                    let r = (60 + 20 * (p % w) + (next() % 16) as usize) as u8;
                    let g = r.saturating_add((next() % 8) as u8);
                    [r, g, 255 - g]
                })
                .collect()
        })
        .collect();
    write_tensor_u8(&d.join("rgb.parquet"), &ids(0, 300), &pictures, &[h, w, 3]);
    write_tensor_u8(
        &d.join("normal.parquet"),
        &ids(0, 280),
        &pictures[..280],
        &[h, w, 3],
    );
    let model = "[model]\nkind = \"pixelrnn\"\nlayers = 1\nhidden = 6\n\n[preprocess]\nbinarize = \"none\"\n\n[train]\nepochs = 2\nlearning_rate = 0.01\n";
    write_config(d, "fit.toml", "normal.parquet", "out", model);
    write_config(d, "rgb.toml", "rgb.parquet", "out", model);
    let model_dir = fit_model(d, "fit.toml");
    pipeline(
        d,
        &[
            "score", "rgb.toml", "--model", &model_dir, "--run-id", "rgb",
        ],
        &[],
    )
    .expect(0);
    let scores = read_table(&d.join("out/scores"));
    assert_eq!(rows(&scores), 300);
    let (ids, nll): (Vec<_>, Vec<f64>) = strings(&scores, "id")
        .into_iter()
        .zip(floats(&scores, "log_likelihood").iter().map(|l| -l))
        .unzip();
    let index = |id: &Option<String>| id.as_deref().unwrap()[4..].parse::<usize>().unwrap();
    let mean = |noise: bool| {
        let v: Vec<f64> = ids
            .iter()
            .zip(&nll)
            .filter(|(id, _)| (index(id) >= 280) == noise)
            .map(|(_, &l)| l)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(
        mean(true) > mean(false) + 30.0,
        "noise {} vs normal {}",
        mean(true),
        mean(false)
    );
    let anomalies = read_table(&d.join("out/anomalies"));
    let flagged = strings(&anomalies, "id");
    assert!(
        flagged.iter().filter(|id| index(id) >= 280).count() >= 15,
        "{flagged:?}"
    );
    for (map, ll) in float_lists(&anomalies, "pixel_nll")
        .iter()
        .zip(floats(&anomalies, "log_likelihood"))
    {
        assert_eq!(map.len(), h * w * 3, "one value per sub-pixel");
        let total: f64 = map.iter().map(|&v| f64::from(v)).sum();
        assert!((total + ll).abs() < 1e-3 * ll.abs(), "{total} vs {ll}");
    }
    pipeline(
        d,
        &["sample", &model_dir, "-n", "4", "--out", "grid.png"],
        &[],
    )
    .expect(0);
    let img = image::open(d.join("grid.png")).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8, "a colour grid");
}

#[test]
fn scores_averaged_over_binarization_draws_are_fixed_at_fit_and_keep_maps_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut imgs = images(400, 5, 6, 21);
    // Images of only 0 and 255 binarize the same way in every draw.
    for (i, img) in imgs.iter_mut().enumerate().take(10) {
        img.iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = if (i + j) % 3 == 0 { 255 } else { 0 });
    }
    write_tensor_u8(&d.join("d.parquet"), &ids(0, 400), &imgs, &[5, 6]);
    let extra = |draws: usize| {
        format!(
            "[preprocess]\nbinarize = \"stochastic\"\ndraws = {draws}\n\n[threshold]\nquantile = 0.5\n"
        )
    };
    write_config(d, "one.toml", "d.parquet", "out-one", &extra(1));
    write_config(d, "four.toml", "d.parquet", "out-four", &extra(4));
    pipeline(d, &["run", "one.toml", "--run-id", "r"], &[]).expect(0);
    pipeline(d, &["run", "four.toml", "--run-id", "r"], &[]).expect(0);
    let one = likelihoods(&d.join("out-one/scores"));
    let four = likelihoods(&d.join("out-four/scores"));
    // Draw 0 is what both models trained on, so they are the same model: the deterministic
    // images score alike, and the others are means over three more draws.
    for (i, id) in ids(0, 400).iter().enumerate() {
        if i < 10 {
            assert!(
                (one[id] - four[id]).abs() < 1e-9,
                "{id}: {} vs {}",
                one[id],
                four[id]
            );
        } else {
            assert_ne!(one[id], four[id], "{id}");
        }
    }
    // The maps of flagged images are averaged over the same draws as their scores.
    let anomalies = read_table(&d.join("out-four/anomalies"));
    let maps = float_lists(&anomalies, "pixel_nll");
    let ll = floats(&anomalies, "log_likelihood");
    assert!(
        maps.len() > 100,
        "quantile 0.5 flags about half: {}",
        maps.len()
    );
    for (map, l) in maps.iter().zip(&ll) {
        let total: f64 = map.iter().map(|&v| f64::from(v)).sum();
        assert!(
            (total + l).abs() < 1e-4 * l.abs(),
            "map {total} vs nll {}",
            -l
        );
    }
    // The draws are fixed at fit: scoring with the four-draw model under a one-draw config
    // warns and gives the four-draw scores.
    let model_dir = fit_model(d, "four.toml");
    let scored = pipeline(
        d,
        &[
            "score",
            "one.toml",
            "--model",
            &model_dir,
            "--set",
            "sink.uri=\"out-again\"",
            "--run-id",
            "again",
        ],
        &[],
    );
    scored.expect(0).mentions(&["other [preprocess] settings"]);
    let again = likelihoods(&d.join("out-again/scores"));
    for id in ids(0, 400) {
        assert!((again[&id] - four[&id]).abs() < 1e-9, "{id}");
    }
}

#[test]
fn rebinarizing_each_epoch_trains_epoch_one_as_before_and_every_later_one_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("d.parquet"),
        &ids(0, 300),
        &images(300, 4, 5, 8),
        &[4, 5],
    );
    let fit = |name: &str, epochs: u32, rebinarize: bool| {
        let extra = format!(
            "[preprocess]\nbinarize = \"stochastic\"\n\n[model]\nkind = \"fvsbn\"\n\n[train]\nepochs = {epochs}\nrebinarize = {rebinarize}\n"
        );
        write_config(d, &format!("{name}.toml"), "d.parquet", name, &extra);
        pipeline(d, &["run", &format!("{name}.toml"), "--run-id", "r"], &[]).expect(0);
        likelihoods(&d.join(name).join("scores"))
    };
    // Epoch 1 sees draw 0 either way, so one epoch gives the same model.
    assert_eq!(fit("one", 1, false), fit("one-rebinarized", 1, true));
    // Later epochs see other draws: another model, and the same one again on a rerun.
    let fixed = fit("three", 3, false);
    let rebinarized = fit("three-rebinarized", 3, true);
    assert!(ids(0, 300).iter().all(|id| fixed[id] != rebinarized[id]));
    assert_eq!(rebinarized, fit("three-rebinarized-again", 3, true));
}

/// Two kinds of damage planted among normal images — a bright flare where images are dark, a
/// blackout where they are bright — are flagged and fall into groups of their own: the groups
/// recover the planted kinds (adjusted Rand index ≥ 0.8), numbered by size, counted in the
/// manifest; and three shards of the same night get the same groups and nearest normal images.
#[test]
fn anomalies_fall_into_groups_by_their_planted_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (h, w) = (12, 12);
    write_tensor_u8(
        &d.join("train.parquet"),
        &ids(0, 600),
        &images(600, h, w, 1),
        &[h, w],
    );
    let mut night = images(300, h, w, 2);
    for (k, mut image) in images(30, h, w, 3).into_iter().enumerate() {
        for r in 0..h {
            for c in 0..w {
                if k < 18 && r < 4 && c >= 6 {
                    image[r * w + c] = 255; // flare: 18 images
                } else if k >= 18 && r >= 8 && c < 6 {
                    image[r * w + c] = 0; // blackout: 12 images
                }
            }
        }
        night.push(image);
    }
    write_tensor_u8(&d.join("night.parquet"), &ids(0, 330), &night, &[h, w]);
    // The same night as three files, for three shards.
    std::fs::create_dir(d.join("night")).unwrap();
    let names = ids(0, 330);
    for k in 0..3 {
        let range = k * 110..(k + 1) * 110;
        write_tensor_u8(
            &d.join(format!("night/part-{k}.parquet")),
            &names[range.clone()],
            &night[range],
            &[h, w],
        );
    }
    let model =
        "[model]\nkind = \"nade\"\nhidden = 32\n\n[train]\nepochs = 10\nlearning_rate = 0.01\n";
    write_config(d, "fit.toml", "train.parquet", "out", model);
    write_config(d, "night.toml", "night.parquet", "out", model);
    let fitted = fit_model(d, "fit.toml");
    pipeline(
        d,
        &[
            "score",
            "night.toml",
            "--model",
            &fitted,
            "--run-id",
            "night",
        ],
        &[],
    )
    .expect(0);

    let anomalies = read_table(&d.join("out/anomalies"));
    let flagged = strings(&anomalies, "id");
    let groups: Vec<i32> = optional_ints(&anomalies, "group")
        .into_iter()
        .map(|g| g.expect("a group for every flagged image"))
        .collect();
    let kind = |id: &str| match id[4..].parse::<usize>().unwrap() {
        i if i < 300 => "normal",
        i if i < 318 => "flare",
        _ => "blackout",
    };
    let planted: Vec<(i32, &str)> = flagged
        .iter()
        .zip(&groups)
        .map(|(id, &g)| (g, kind(id.as_deref().unwrap())))
        .filter(|(_, k)| *k != "normal")
        .collect();
    assert!(
        planted.len() >= 27,
        "the planted images are flagged: {planted:?}"
    );
    let ari = anomaly_pipeline::decide::groups::adjusted_rand_index(
        &planted.iter().map(|p| p.0 as u32).collect::<Vec<_>>(),
        &planted
            .iter()
            .map(|p| u32::from(p.1 == "flare"))
            .collect::<Vec<_>>(),
    );
    assert!(ari >= 0.8, "adjusted Rand index {ari}: {planted:?}");

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/runs/night/manifest.json")).unwrap())
            .unwrap();
    let sizes: Vec<u64> = manifest["anomaly_groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["images"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sizes.iter().sum::<u64>() as usize,
        flagged.len(),
        "{sizes:?}"
    );
    assert!(
        sizes.windows(2).all(|s| s[0] >= s[1]),
        "largest first: {sizes:?}"
    );
    for (g, &n) in sizes.iter().enumerate() {
        assert_eq!(groups.iter().filter(|&&x| x == g as i32).count() as u64, n);
    }

    // Three shards, grouped once all have staged: the groups and nearest normal images of one
    // process, image by image.
    write_config(d, "shards.toml", "night/", "sharded", model);
    for i in 0..3 {
        let shard = format!("{i}/3");
        let args = [
            "score",
            "shards.toml",
            "--model",
            &fitted,
            "--run-id",
            "night",
            "--shard",
            &shard,
        ];
        pipeline(d, &args, &[]).expect(0);
    }
    let by_id = |dir: &str| -> HashMap<String, (i32, Vec<String>)> {
        let t = read_table(&d.join(dir).join("anomalies"));
        let near = string_lists(&t, "nearest_ids");
        let groups = optional_ints(&t, "group").into_iter().map(Option::unwrap);
        strings(&t, "id")
            .into_iter()
            .map(Option::unwrap)
            .zip(groups.zip(near))
            .collect()
    };
    let (one, three) = (by_id("out"), by_id("sharded"));
    assert_eq!(one.len(), flagged.len());
    assert_eq!(
        one, three,
        "sharded groups and neighbours are the one process's"
    );
}

/// PixelRNN's options beyond the defaults, end to end: skip connections and RMSProp are fitted,
/// stored (the hyper-parameter and one `layer{k}.skip` tensor per layer), reloaded and scored.
#[test]
fn pixelrnn_with_skip_connections_and_rmsprop_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_tensor_u8(
        &d.join("d.parquet"),
        &ids(0, 200),
        &images(200, 5, 6, 3),
        &[5, 6],
    );
    write_config(
        d,
        "fit.toml",
        "d.parquet",
        "out",
        "[model]\nkind = \"pixelrnn\"\nlayers = 2\nhidden = 4\nskip_connections = true\n\
         [train]\nepochs = 2\nbatch_size = 20\noptimizer = \"rmsprop\"\n",
    );
    let model_dir = fit_model(d, "fit.toml");
    let model_dir = d.join(model_dir);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("model.json")).unwrap()).unwrap();
    assert_eq!(meta["hyperparameters"]["skip_connections"], true, "{meta}");
    let weights = std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    for layer in 0..2 {
        let skip = &header[format!("layer{layer}.skip")];
        assert_eq!(skip["shape"], serde_json::json!([8, 8]), "{header}");
    }
    pipeline(
        d,
        &[
            "score",
            "fit.toml",
            "--model",
            model_dir.to_str().unwrap(),
            "--run-id",
            "again",
        ],
        &[],
    )
    .expect(0);
    let scores = read_table(&d.join("out/scores"));
    let ll = floats(&scores, "log_likelihood");
    assert_eq!(ll.len(), 200);
    assert!(ll.iter().all(|l| l.is_finite() && *l < 0.0), "{ll:?}");
}
