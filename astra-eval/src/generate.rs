//! `astra-eval generate`: a prompt (text through GPT-2 BPE, or ids) prefilled over N devices and
//! continued by the device holding its last token ([`astra_train::generate`]), the text streamed
//! to stdout as it is decoded; a JSON summary with the time to the first token, the decode rate
//! and the bytes of the cache.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use astra_train::data::tokenizer::TextCodec;
use astra_train::generate::{CacheBytes, Generator, Sampling};
use astra_train::model::Model;
use astra_train::models::{DevicePartition, GroupedVq, VqConfig};
use tch::{Device, Kind, Tensor};

use crate::cli::args::GenerateArgs;
use crate::error::Result;
use crate::fail;

#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub devices: usize,
    pub codebooks: Option<PathBuf>,
    pub batch: i64,
    pub prompt_tokens: i64,
    pub new_tokens: usize,
    /// Prefill and the first token's logits.
    pub time_to_first_token_ms: f64,
    /// Tokens after the first, per second and sequence.
    pub decode_tokens_per_s: Option<f64>,
    /// The decoding device's cache (in process; a runtime worker's is not reported back).
    pub cache_bytes: Option<CacheBytes>,
    /// Per block, the remote keys each decode step attended to: the remote tokens, or their
    /// distinct codewords (in process; empty from the runtime).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remote_keys: Vec<i64>,
    /// "in process", or the runtime's network ("shaped 10 Mbit/s …", "remote").
    pub network: String,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "{} new token(s) after {} prompt token(s) on {} device(s) ({}): first token {:.1} ms, decode {}{}",
            self.new_tokens,
            self.prompt_tokens,
            self.devices,
            self.network,
            self.time_to_first_token_ms,
            self.decode_tokens_per_s
                .map_or("–".into(), |r| format!("{r:.1} tokens/s")),
            self.cache_bytes.map_or(String::new(), |c| format!(
                "; cache {} B own + {} B remote",
                c.local, c.remote
            ))
        )
    }
}

fn sampling(a: &GenerateArgs) -> Result<Sampling> {
    if !a.temperature.is_finite() || a.temperature < 0.0 {
        fail!(
            "--temperature must be a finite number ≥ 0 (0: greedy), got {}",
            a.temperature
        );
    }
    if a.top_k.is_some_and(|k| k < 1) {
        fail!("--top-k must be at least 1");
    }
    if a.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        fail!("--top-p must be in (0, 1]");
    }
    if a.temperature == 0.0 && (a.top_k.is_some() || a.top_p.is_some()) {
        fail!("--top-k/--top-p sample: give a --temperature above 0 with them");
    }
    Ok(Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    })
}

/// The prompt ids [B, T]: from --input, or --prompt through the model's tokenizer (its
/// tokenizer.json, else GPT-2 BPE), with that tokenizer for the output text.
fn prompt(a: &GenerateArgs, model: &Model) -> Result<(Tensor, Option<TextCodec>)> {
    let (vocab, _) = model.config.language_model().ok_or_else(|| {
        crate::error::EvalError::Invalid(format!("{}: not a language model", a.model))
    })?;
    if let Some(path) = &a.input {
        return Ok((crate::predict::read_input(path, &model.config)?, None));
    }
    let codec = TextCodec::for_model(&astra_train::model::resolve(&a.model)?, vocab)?;
    let text = a.prompt.as_deref().unwrap_or_default();
    if text.is_empty() {
        fail!("--prompt is empty");
    }
    let ids: Vec<i64> = codec.encode(text)?.into_iter().map(i64::from).collect();
    if ids.is_empty() {
        fail!("--prompt has no tokens");
    }
    Ok((Tensor::from_slice(&ids).view([1, -1]), Some(codec)))
}

/// Codebooks for N > 1: --codebooks, else beside the model, else only with --no-vq.
fn quantizers(
    a: &GenerateArgs,
    model: &Model,
    device: Device,
) -> Result<(Vec<GroupedVq>, Option<PathBuf>)> {
    if a.devices == 1 || a.no_vq {
        return Ok((Vec::new(), None));
    }
    let path = match &a.codebooks {
        Some(p) => p.clone(),
        None => {
            let beside = astra_train::model::resolve(&a.model)?.join("codebooks.safetensors");
            if !beside.exists() {
                fail!(
                    "--devices {} without codebooks: {} has no codebooks.safetensors beside it; pass --codebooks FILE, or --no-vq",
                    a.devices,
                    a.model
                );
            }
            beside
        }
    };
    Ok((
        model.load_quantizers(&path, &VqConfig::default(), device)?,
        Some(path),
    ))
}

pub fn run(a: &GenerateArgs) -> Result<Summary> {
    let sampling = sampling(a)?;
    let device =
        astra_train::libtorch::parse_device(&a.device).map_err(crate::error::EvalError::Invalid)?;
    let (model, _) = Model::load(&a.model, device)?;
    let (ids, codec) = prompt(a, &model)?;
    let ids = ids.to_device(device);
    let (b, t) = (ids.size()[0], ids.size()[1]);
    if a.devices == 0 || a.devices as i64 > t {
        fail!(
            "--devices must be in 1..={t} (the prompt's tokens), got {}",
            a.devices
        );
    }
    let (_, positions) = model.config.language_model().expect("checked");
    if t + a.max_new_tokens as i64 > positions {
        fail!(
            "{t} prompt + {} new tokens exceed the model's {positions} positions",
            a.max_new_tokens
        );
    }
    let (vq, codebooks) = quantizers(a, &model, device)?;
    if a.links.is_some() || !a.workers.is_empty() {
        let s = over_runtime(a, &ids, codebooks, &sampling, codec.as_ref())?;
        write_summary(a, &s)?;
        return Ok(s);
    }
    let partition = DevicePartition::contiguous(t as usize, a.devices)?;
    tch::manual_seed(a.seed as i64);
    let mut stream = codec.as_ref().map(Stream::new);
    if let Some(p) = &a.prompt {
        print!("{p}");
    }
    let start = Instant::now();
    let (mut g, mut logits) = tch::no_grad(|| Generator::prefill(&model, &ids, &partition, &vq))?;
    let mut out = vec![ids.shallow_clone()];
    let mut first_ms = 0.0;
    let mut decode_start = start;
    for i in 0..a.max_new_tokens {
        let next = sampling.pick(&logits);
        if i == 0 {
            first_ms = start.elapsed().as_secs_f64() * 1e3;
            decode_start = Instant::now();
        }
        if let Some(s) = &mut stream {
            s.push(next.int64_value(&[0]) as u32);
        }
        out.push(next.view([-1, 1]));
        if i + 1 < a.max_new_tokens {
            logits = tch::no_grad(|| g.step(&next))?;
        }
    }
    let decode_s = decode_start.elapsed().as_secs_f64();
    if stream.is_some() {
        println!();
    }
    let all = Tensor::cat(&out, 1);
    if let Some(path) = &a.out {
        write_ids_atomic(&all, path)?;
    }
    let summary = Summary {
        devices: a.devices,
        codebooks,
        batch: b,
        prompt_tokens: t,
        new_tokens: a.max_new_tokens,
        time_to_first_token_ms: first_ms,
        decode_tokens_per_s: (a.max_new_tokens > 1)
            .then(|| (a.max_new_tokens - 1) as f64 / decode_s.max(1e-9)),
        cache_bytes: Some(g.cache_bytes()),
        remote_keys: g.remote_keys(),
        network: "in process".into(),
    };
    write_summary(a, &summary)?;
    Ok(summary)
}

fn write_summary(a: &GenerateArgs, s: &Summary) -> Result<()> {
    if let Some(path) = &a.json {
        astra_quant::atomic::write_bytes(path, serde_json::to_string_pretty(s)?.as_bytes())
            .map_err(|e| crate::error::EvalError::Invalid(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// The prefill over the runtime (local workers behind --links, or --workers); the worker holding
/// the last token decodes with `sampling` and returns the tokens, printed and written here.
fn over_runtime(
    a: &GenerateArgs,
    ids: &Tensor,
    codebooks: Option<PathBuf>,
    sampling: &Sampling,
    codec: Option<&TextCodec>,
) -> Result<Summary> {
    let tmp = tempfile::tempdir()?;
    let input = match &a.input {
        Some(p) => p.clone(),
        None if !a.workers.is_empty() => fail!(
            "--prompt with --workers: the workers read the prompt from a file; write its ids to a path present on every host and pass --input"
        ),
        None => {
            let p = tmp.path().join("prompt.npy");
            write_ids_atomic(ids, &p)?;
            p
        }
    };
    let args = crate::cli::args::DistributedArgs {
        model: a.model.clone(),
        mode: if codebooks.is_some() { "astra" } else { "sp" }.into(),
        codebooks,
        devices: Some(a.devices),
        workers: a.workers.clone(),
        links: a.links.clone(),
        shaper: a.shaper,
        transport: crate::runtime::Transport::Tcp,
        group: None,
        loss_grace_ms: 20,
        device: "cpu".into(),
        threads: 0,
        pin_cores: false,
        input,
        out: tmp.path().join("logits.npy"),
        single_cls: false,
        all_logits: false,
        timeout_ms: 10_000,
        startup_timeout_ms: 60_000,
        runs: 1,
        warmup: 0,
        trace: None,
        json: None,
        decode: a.max_new_tokens as u32,
        sampling: Some(sampling.clone()),
    };
    let run = crate::runtime::DistributedRun::new(&args)?;
    let (s, _) = crate::runtime::distributed_with_summary(&run)?;
    let decoded = s.decoded.clone().unwrap_or_default();
    let b = ids.size()[0];
    let flat: Vec<i64> = decoded.concat();
    if flat.len() as i64 != b * a.max_new_tokens as i64 {
        fail!(
            "the runtime returned {} tokens for {b} × {}",
            flat.len(),
            a.max_new_tokens
        );
    }
    let new = Tensor::from_slice(&flat).view([b, a.max_new_tokens as i64]);
    if let Some(c) = codec {
        let first: Vec<u32> = decoded[0].iter().map(|&t| t as u32).collect();
        println!(
            "{}{}",
            a.prompt.as_deref().unwrap_or_default(),
            c.decode(&first)?
        );
    }
    if let Some(path) = &a.out {
        write_ids_atomic(&Tensor::cat(&[ids, &new], 1), path)?;
    }
    Ok(Summary {
        devices: a.devices,
        codebooks: (!run.sp).then(|| run.codebooks.clone()),
        batch: b,
        prompt_tokens: ids.size()[1],
        new_tokens: a.max_new_tokens,
        time_to_first_token_ms: s.median_ms,
        decode_tokens_per_s: s.decode_tokens_per_s,
        cache_bytes: None,
        remote_keys: Vec::new(),
        network: s.network.clone(),
    })
}

/// Prints the continuation's text as it grows (a token may complete a character, or change how
/// the tokenizer joins the text: only a stable extension is printed).
struct Stream<'c> {
    codec: &'c TextCodec,
    tokens: Vec<u32>,
    printed: String,
}

impl<'c> Stream<'c> {
    fn new(codec: &'c TextCodec) -> Self {
        Stream {
            codec,
            tokens: Vec::new(),
            printed: String::new(),
        }
    }

    fn push(&mut self, token: u32) {
        self.tokens.push(token);
        let Ok(text) = self.codec.decode(&self.tokens) else {
            return;
        };
        if let Some(rest) = text.strip_prefix(self.printed.as_str()) {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(rest.as_bytes());
            let _ = out.flush();
            self.printed = text;
        }
    }
}

/// Token ids as an int64 .npy, atomically.
fn write_ids_atomic(ids: &Tensor, path: &std::path::Path) -> Result<()> {
    let t = ids.to_kind(Kind::Int64).to_device(Device::Cpu).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<i64>::try_from(t.reshape([-1]))?;
    let a = ndarray::ArrayD::from_shape_vec(shape, data)?;
    astra_quant::npy::write(path, &a)?;
    Ok(())
}
