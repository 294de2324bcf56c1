//! `--config FILE.json`: options read before the command line, which overrides them. FILE is
//! either an object of option names and values, or a run folder's own `config.json` (the full
//! effective configuration the trainer saved), which reruns that run:
//! `astra-train finetune --config RUN/config.json --out RUN2` trains the same run again.

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::train::TrainConfig;

/// The command line with the file's options spliced in, and for a run's config.json the model
/// configuration it holds (used as is: it cannot always be rebuilt from shape options).
pub struct Expanded {
    pub args: Vec<String>,
    pub model: Option<ModelConfig>,
}

/// Splices the options of `--config FILE` in right after the subcommand, so that the command
/// line (which comes later, and `args_override_self`) overrides them.
pub fn expand_config(mut args: Vec<String>) -> Result<Expanded> {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))
    else {
        return Ok(Expanded { args, model: None });
    };
    let path = match args[pos].strip_prefix("--config=") {
        Some(p) => p.to_string(),
        None => args
            .get(pos + 1)
            .cloned()
            .ok_or_else(|| anyhow!("--config needs a file"))?,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow!("--config {path}: {e}"))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("--config {path}: not valid JSON: {e}"))?;
    let mut obj = v
        .as_object()
        .cloned()
        .ok_or_else(|| anyhow!("--config {path}: expected a JSON object of options"))?;
    let mut model = None;
    if obj.get("model").is_some_and(Value::is_object) && obj.contains_key("optim") {
        let run: TrainConfig = serde_json::from_value(v)
            .map_err(|e| anyhow!("--config {path}: not a run's config.json: {e}"))?;
        let command = args.get(1).map(String::as_str).unwrap_or_default();
        let want = if run.astra.is_some() {
            "astra"
        } else {
            "finetune"
        };
        if command != want {
            bail!("--config {path}: a run of `astra-train {want}`, given to `{command}`");
        }
        obj = run_options(&run);
        model = Some(run.model);
    }
    let spliced = flags(&obj).map_err(|k| {
        anyhow!("--config {path}: option '{k}' must be a string, number or boolean")
    })?;
    // Drop --config (and its value) from the command line; splice after the subcommand name.
    let n = if args[pos].contains('=') { 1 } else { 2 };
    args.drain(pos..pos + n);
    let at = 2.min(args.len());
    args.splice(at..at, spliced);
    Ok(Expanded { args, model })
}

/// Command-line flags for an object of options; Err names an option of another JSON type.
fn flags(obj: &Map<String, Value>) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (k, v) in obj {
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            Value::Bool(true) => out.push(flag),
            Value::Bool(false) | Value::Null => {}
            Value::String(s) => out.push(format!("{flag}={s}")),
            Value::Number(n) => out.push(format!("{flag}={n}")),
            _ => return Err(k.clone()),
        }
    }
    Ok(out)
}

/// The options that make `finetune`/`astra` build `run` again (the model comes separately).
fn run_options(run: &TrainConfig) -> Map<String, Value> {
    let mut o = json!({
        "data": run.data,
        "epochs": run.epochs,
        "batch": run.batch,
        "lr": run.optim.lr,
        "weight_decay": run.optim.weight_decay,
        "warmup_steps": run.optim.warmup_steps,
        "clip": run.optim.clip_norm,
        "seed": run.seed,
        "max_train": run.max_train,
        "max_test": run.max_test,
        "valid": run.valid,
        "pad": run.augment.pad,
        "flip": run.augment.flip,
        "context": run.context,
        "bf16": run.bf16,
        "init": run.init,
    });
    if let Some(a) = &run.astra {
        o["codebooks"] = json!(a.codebooks);
        o["devices"] = json!(a.devices);
        o["beta"] = json!(a.beta);
        o["lambda"] = json!(a.vq.noise_lambda);
        o["decay"] = json!(a.vq.decay);
        o["single_cls"] = json!(a.single_cls);
        o["random_partition"] = json!(a.random_partition);
    }
    o.as_object().cloned().expect("an object")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_file_options_are_overridden_by_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.json");
        std::fs::write(
            &f,
            r#"{"data": "mnist:/d", "out": "/r", "epochs": 3, "max_train": 10, "flip": true, "bf16": false}"#,
        )
        .unwrap();
        let a = expand_config(args(&[
            "astra-train",
            "finetune",
            "--config",
            f.to_str().unwrap(),
            "--epochs",
            "5",
        ]))
        .unwrap();
        assert!(a.model.is_none());
        let Command::Finetune(f_args) = Cli::try_parse_from(a.args).unwrap().command else {
            panic!("not finetune")
        };
        let t = f_args.train;
        assert_eq!(
            (t.epochs, t.max_train, t.flip, t.bf16),
            (5, Some(10), true, false)
        );
        assert_eq!(t.data, "mnist:/d");
        // Unknown options and bad files are named.
        std::fs::write(&f, r#"{"epochz": 3}"#).unwrap();
        let a = expand_config(args(&[
            "astra-train",
            "finetune",
            &format!("--config={}", f.display()),
        ]))
        .unwrap();
        assert!(Cli::try_parse_from(a.args)
            .err()
            .unwrap()
            .to_string()
            .contains("--epochz"));
        std::fs::write(&f, "[1]").unwrap();
        let e = expand_config(args(&[
            "astra-train",
            "finetune",
            "--config",
            f.to_str().unwrap(),
        ]))
        .err()
        .unwrap();
        assert!(e.to_string().contains("JSON object"), "{e}");
    }
}
