//! The deployment files agree with the program: the image's entrypoint runs, the ConfigMap
//! carries the nightly pipeline, and the Kubernetes commands use flags that exist.

use crate::common::*;

#[test]
fn the_image_entrypoint_answers_version() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let entrypoint = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(entrypoint).expect("exec form");
    assert_eq!(argv, ["/usr/local/bin/pipeline"]);
    // The same command line as the container's `--version`, with this build's binary.
    let out = pipeline(&repo(), &["--version"], &[]);
    out.expect(0);
    assert!(out.stdout.starts_with("pipeline "), "{}", out.stdout);
}

#[test]
fn the_configmap_carries_the_nightly_pipeline() {
    let yaml = std::fs::read_to_string(repo().join("deploy/configmap.yaml")).unwrap();
    let body: Vec<&str> = yaml
        .lines()
        .skip_while(|l| l.trim() != "nightly.toml: |")
        .skip(1)
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect();
    let nightly = std::fs::read_to_string(repo().join("pipelines/nightly.toml")).unwrap();
    assert_eq!(
        body.join("\n").trim_end(),
        nightly.trim_end(),
        "copy pipelines/nightly.toml into deploy/configmap.yaml"
    );
}

#[test]
fn the_indexed_job_uses_real_flags() {
    let yaml = std::fs::read_to_string(repo().join("deploy/indexed-job.yaml")).unwrap();
    let args: Vec<String> = yaml
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start()[2..].trim_matches('"').to_string())
        .collect();
    assert_eq!(args[0], "score");
    let help = pipeline(&repo(), &["score", "--help"], &[]);
    help.expect(0);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.stdout.contains(flag.as_str()),
            "`pipeline score` has no {flag}"
        );
    }
}
