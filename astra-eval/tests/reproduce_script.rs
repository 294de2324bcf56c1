//! scripts/reproduce-paper.sh, every step at tiny scale: hub checkpoints from an HF cache, CIFAR-100
//! binary batches, an ImageNet-style folder and WikiText-103 raw files (fixtures in the original
//! formats), CPU, a few images per run. Then a second run skips everything, and a run whose model
//! is missing is continued with --resume.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script(tmp: &Path, steps: &str) -> String {
    let o = script_with(tmp, steps, &[]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "reproduce-paper.sh {steps} failed:\n{}\n{}",
        out.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn script_with(tmp: &Path, steps: &str, env: &[(&str, &str)]) -> std::process::Output {
    let bin = bin_dir();
    let f = tmp.join("fixtures");
    Command::new("bash")
        .arg(root().join("scripts/reproduce-paper.sh"))
        .envs([
            ("STEPS", steps),
            ("OUT", tmp.join("out").to_str().unwrap()),
            ("DATA", tmp.join("data").to_str().unwrap()),
            ("BIN", bin.to_str().unwrap()),
            ("DEVICE", "cpu"),
            ("PRECISION", ""),
            ("DEVICES", "4"),
            ("K", "16"),
            ("VQ_GROUPS", "1 32"),
            ("TABLE2_DEVICES", "2"),
            ("BATCH", "8"),
            ("IMAGE_SIZE", "32"),
            ("CALIB_SAMPLES", "8"),
            ("CIFAR_BASE_EPOCHS", "1"),
            ("CIFAR_EPOCHS", "1"),
            ("IMAGENET_EPOCHS", "1"),
            ("TEXT_EPOCHS", "1"),
            ("CONTEXT", "32"),
            ("TEXT_BATCH", "4"),
            ("EXTRA", "--max-train 16"),
            ("EVAL_EXTRA", "--max-test 8"),
            ("VIT_INIT", "tiny/vit-in21k"),
            ("IMAGENET_INIT", "tiny/vit-imagenet"),
            ("GPT2_MODELS", "tiny/gpt2"),
            ("CIFAR100_DIR", f.join("cifar100").to_str().unwrap()),
            ("IMAGENET_DIR", f.join("imagenet").to_str().unwrap()),
            (
                "WIKITEXT103_DIR",
                f.join("wikitext-103-raw").to_str().unwrap(),
            ),
            ("HF_HOME", f.join("hf_home").to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Fresh binaries of every crate (the script calls astra-train and astra-sim too). `--tests`
/// resolves features as `cargo test` does, so after `cargo test --workspace` this builds nothing
/// (plain `--bins` rebuilt half the dependency tree with other features: a second target folder).
fn build_all() {
    let st = Command::new(env!("CARGO"))
        .args(["build", "--workspace", "--bins", "--tests", "-q"])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(st.success());
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_astra-eval"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `--rehearse tiny`: every step of the recipe on generated data and tiny random models, each
/// command metered, and a report with a measured row per step and the projection.
#[test]
fn rehearse_tiny_runs_every_step_and_reports_what_each_cost() {
    build_all();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reh");
    // The wikipedia step with GPT-2 small only, as `--rehearse full` runs it: the report derives
    // GPT-2 medium's Wikipedia rows from its WikiText-103 ones.
    let o = Command::new("bash")
        .arg(root().join("scripts/reproduce-paper.sh"))
        .args(["--rehearse", "tiny", "--out"])
        .arg(&out)
        .env("BIN", bin_dir())
        .env("WIKI_GPT2_MODELS", out.join("data/models/gpt2"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{}",
        stdout.lines().rev().take(30).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&o.stderr)
    );
    let report = std::fs::read_to_string(out.join("rehearsal.md")).unwrap();
    for step in [
        "| generate data |",
        "| train vit-c100 |",
        "| calibrate c100-g32 |",
        "| train vit-c100-astra-g32-n2 |",
        "| evaluate imagenet-astra-g1 |",
        "| train gpt2-medium-wt103-astra-g32 |",
        "| evaluate wt103-gpt2-pretrained |",
        "| train gpt2-wiki |",
        "| evaluate wiki-gpt2-astra-g32 |",
        "| evaluate zero-shot-gpt2-astra-g1 |",
        "| export vit-c100-astra-g32 |",
        "| runtime gpt2-wt103-astra-g32 |",
        "| simulate |",
    ] {
        assert!(report.contains(step), "{step} missing:\n{report}");
    }
    // What the rehearsal did not run is derived from the step it repeats, so the projection
    // covers the whole recipe (G = 16, Table 2's other N, Wikipedia's GPT-2 medium).
    for derived in [
        "| *calibrate c100-g16*: derived from calibrate c100-g32 |",
        "| *train vit-c100-astra-g32-n8*: derived from train vit-c100-astra-g32-n2 |",
        "| *calibrate wiki-gpt2-medium-g16*: derived from calibrate wt103-gpt2-medium-g32 |",
        "| *train gpt2-medium-wiki-astra-g1*: derived from train gpt2-medium-wt103-astra-g1 |",
        "| *evaluate zero-shot-gpt2-medium-astra-g32*: derived from evaluate wt103-gpt2-medium-astra-g32 |",
    ] {
        assert!(report.contains(derived), "{derived} missing:\n{report}");
    }
    assert!(!report.contains("| train gpt2-medium-wiki |"), "{report}");
    assert!(
        report.contains("projected to 2,000 examples: first pass and residual ×250"),
        "{report}"
    );
    assert!(
        !report.contains("(failed)")
            && !report.contains("Failed steps")
            && !report.contains("Not measured and not derived"),
        "{report}"
    );
    assert!(
        report.contains("images/s (2 steps)") && report.contains("tokens/s"),
        "{report}"
    );
    assert!(
        report.contains("## Projected cost of the real recipe"),
        "{report}"
    );
    // Each command's cost is on record, and the runtime ran over the shaped links.
    let steps = std::fs::read_to_string(out.join("steps.jsonl")).unwrap();
    assert!(steps.lines().count() >= 40, "{steps}");
    assert!(steps.lines().all(|l| l.contains("\"rc\": 0")), "{steps}");
    let runtime =
        std::fs::read_to_string(out.join("deploy/vit-c100-astra-g32/runtime.json")).unwrap();
    assert!(runtime.contains("median_ms"), "{runtime}");
    // A bad mode is refused before anything runs.
    let bad = Command::new("bash")
        .arg(root().join("scripts/reproduce-paper.sh"))
        .args(["--rehearse", "huge", "--out"])
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && e.contains("must be full or tiny"),
        "{e}"
    );
    assert!(!tmp.path().join("bad").exists());
}

#[test]
fn reproduce_paper_runs_every_step_at_tiny_scale_and_resumes() {
    build_all();
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(common::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_paper_fixtures.py"))
        .arg(tmp.path().join("fixtures"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    script(tmp.path(), "data cifar imagenet text sim summary");
    let out = tmp.path().join("out");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for table in [
        "c100-original",
        "c100-astra-g1",
        "c100-astra-g32",
        "c100-astra-g32-n2",
        "imagenet-original",
        "imagenet-astra-g1",
        "imagenet-astra-g32",
        "wt103-gpt2-pretrained",
        "wt103-gpt2-original",
        "wt103-gpt2-astra-g1",
        "wt103-gpt2-astra-g32",
    ] {
        assert!(
            summary.contains(&format!("## {table}\n")),
            "{table} missing:\n{summary}"
        );
    }
    assert!(
        summary.contains("accuracy") && summary.contains("perplexity"),
        "{summary}"
    );
    assert!(out.join("sim/speedups.csv").exists());
    let commands = std::fs::read_to_string(out.join("commands.txt")).unwrap();
    assert!(
        commands.contains("astra-train astra --init") && commands.contains("astra-eval perplexity")
    );

    // Everything is there: a second run trains and evaluates nothing.
    let again = script(tmp.path(), "data cifar imagenet text sim summary");
    assert!(
        !again.contains("== train") && !again.contains("== evaluate"),
        "{again}"
    );
    assert!(again.contains("skip:"), "{again}");

    // A run killed part-way (the trainer's test hook stops it after one of two epochs, failing
    // like a kill): the script stops there; run again, it resumes that run, not restarts it.
    let fresh = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(tmp.path().join("fixtures"), fresh.path().join("fixtures")).unwrap();
    let env = [
        ("CIFAR_BASE_EPOCHS", "2"),
        ("VQ_GROUPS", "1"),
        ("TABLE2_DEVICES", ""),
    ];
    let mut stopped = env.to_vec();
    stopped.push(("ASTRA_STOP_AFTER_EPOCHS", "1"));
    let o = script_with(fresh.path(), "cifar", &stopped);
    assert!(!o.status.success(), "the stopped run must fail the script");
    let run = fresh.path().join("out/runs/vit-c100");
    assert!(run.join("checkpoints").exists() && !run.join("complete.json").exists());
    let o = script_with(fresh.path(), "cifar summary", &env);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("== train {} (resuming)", run.display())),
        "{out}"
    );
    assert!(run.join("complete.json").exists());
    let epochs = std::fs::read_to_string(run.join("summary.csv"))
        .unwrap()
        .lines()
        .count()
        - 1;
    assert_eq!(epochs, 2, "one epoch before the stop, one after the resume");
}
