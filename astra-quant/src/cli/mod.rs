//! The `astra-quant` commands: the binary parses ([`args`]) and calls [`run`]; each command is a
//! function taking its options struct.

pub mod args;
pub mod parse;

use std::path::Path;
use std::time::Instant;

use crate::bitpack::{pack, packed_len, unpack};
use crate::residual::NoiseKind;
use crate::{npy, CodebookFile, GroupedCodebook, KMeansConfig, ResidualAccumulator};
use anyhow::{bail, Context, Result};
use ndarray::Array2;

pub use args::*;

/// Runs one parsed command line (the thread pool first: `--threads` applies to every command).
pub fn run(cli: Cli) -> Result<()> {
    let threads = crate::threads::checked(cli.threads, 0)?;
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting up the thread pool")?;
    }

    match cli.command {
        Command::Fit(a) => fit(a),
        Command::Encode(a) => encode(a),
        Command::Decode(a) => decode(a),
        Command::Stats(a) => stats(a),
        Command::Bench(a) => bench(a),
    }
}

pub fn fit(a: FitArgs) -> Result<()> {
    let FitArgs {
        input,
        tensor,
        k,
        groups,
        iters,
        seed,
        init,
        max_points_per_centroid,
        tol,
        noise,
        out,
        report,
        quiet,
    } = a;
    let cfg = KMeansConfig {
        k,
        iters,
        seed,
        init,
        max_points_per_centroid,
        tol,
        progress: !quiet,
    };
    let inputs = fit_inputs(&input, tensor.as_deref())?;
    let mut blocks = Vec::new();
    let mut reports = Vec::new();
    let mut rows = 0;
    for (name, x) in &inputs {
        let t0 = Instant::now();
        let (cb, stats) = GroupedCodebook::fit(x.view(), groups, &cfg)
            .with_context(|| format!("fitting {name}"))?;
        let fit_s = t0.elapsed().as_secs_f64();
        let mse = cb.mse(x.view())?;
        let noise_model = fit_noise(&cb, x, noise, name)?;
        let objective = stats
            .iter()
            .filter_map(|s| s.last())
            .map(|s| s.objective)
            .sum::<f64>();
        println!(
                "{name}: fitted K={} G={} D={} on {} rows in {:.2}s: reconstruction MSE {:.6e} per row (last-iteration objective summed over groups {:.6e}), {} bits per row",
                cb.k(), cb.groups(), cb.dim(), x.nrows(), fit_s, mse, objective, cb.bits_per_token()
            );
        rows += x.nrows();
        reports.push(serde_json::json!({
                "input": name, "k": k, "groups": groups, "dim": cb.dim(), "rows": x.nrows(), "iters": iters, "seed": seed,
                "threads": rayon::current_num_threads(), "fit_seconds": fit_s, "mse": mse, "groups_stats": stats,
            }));
        blocks.push(crate::BlockQuantizer {
            usage: Some(cb.code_shares(x.view())?),
            codebook: cb,
            noise: noise_model,
        });
    }
    let mut file = CodebookFile {
        blocks,
        extra: Default::default(),
    };
    file.extra.insert(
        "command".into(),
        std::env::args().collect::<Vec<_>>().join(" "),
    );
    file.extra.insert("rows".into(), rows.to_string());
    file.save(&out)?;
    println!("{} block(s) -> {}", file.blocks.len(), out.display());
    if let Some(r) = report {
        // One block: its report; several: {"blocks": [...]}.
        let json = if reports.len() == 1 {
            reports.pop().expect("one")
        } else {
            serde_json::json!({ "blocks": reports })
        };
        crate::atomic::write_bytes(&r, serde_json::to_string_pretty(&json)?.as_bytes())
            .with_context(|| r.display().to_string())?;
    }
    Ok(())
}

/// The rows to fit: one set per block when a safetensors input holds `blocks.{l}.input` tensors
/// (block inputs collected from a model), otherwise the one set given.
fn fit_inputs(input: &Path, tensor: Option<&str>) -> Result<Vec<(String, Array2<f32>)>> {
    let per_block = match tensor {
        None => block_inputs(input)?,
        Some(_) => Vec::new(),
    };
    if !per_block.is_empty() {
        return Ok(per_block);
    }
    Ok(vec![(
        input.display().to_string(),
        read_rows(input, tensor)?,
    )])
}

/// The NAQ noise model of `cb`'s residual over `x` (None for `--noise none`).
fn fit_noise(
    cb: &GroupedCodebook,
    x: &Array2<f32>,
    noise: Noise,
    name: &str,
) -> Result<Option<crate::NoiseModel>> {
    let kind = match noise {
        Noise::None => return Ok(None),
        Noise::Full => NoiseKind::Full,
        Noise::Diagonal => NoiseKind::Diagonal,
    };
    let mut acc = ResidualAccumulator::new(cb.dim(), kind);
    for chunk in x.axis_chunks_iter(ndarray::Axis(0), 8192) {
        let xh = cb.decode(cb.encode(chunk)?.view())?;
        acc.push_pair(chunk, xh.view())?;
    }
    let fitted = acc.finish()?.noise_model();
    if fitted.jitter > 0.0 {
        eprintln!("note: {name}: residual covariance was not positive definite; added jitter {:.3e} to its diagonal", fitted.jitter);
    }
    Ok(Some(fitted.model))
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    let EncodeArgs {
        codebook,
        input,
        tensor,
        block,
        out,
        packed,
    } = a;
    if out.is_none() && packed.is_none() {
        bail!("encode needs --out (indices .npy) or --packed (bitstream), or both");
    }
    let cb = load_block(&codebook, block)?;
    let x = read_rows(&input, tensor.as_deref())?;
    let idx = cb
        .encode(x.view())
        .with_context(|| format!("encoding {}", input.display()))?;
    if let Some(p) = &out {
        npy::write_u16(p, &idx)?;
    }
    if let Some(p) = &packed {
        let flat: Vec<u16> = idx.iter().copied().collect();
        crate::atomic::write_bytes(p, &pack(&flat, cb.bits())?)
            .with_context(|| p.display().to_string())?;
    }
    println!(
        "encoded {} rows × {} groups at {} bits: {} bytes packed ({:.1}× smaller than fp32)",
        idx.nrows(),
        cb.groups(),
        cb.bits(),
        packed_len(idx.len(), cb.bits()),
        (x.len() * 4) as f64 / packed_len(idx.len(), cb.bits()).max(1) as f64
    );
    Ok(())
}

pub fn decode(a: DecodeArgs) -> Result<()> {
    let DecodeArgs {
        codebook,
        block,
        indices,
        packed,
        rows,
        out,
    } = a;
    let cb = load_block(&codebook, block)?;
    let idx = match (indices, packed) {
        (Some(p), None) => npy::read_indices(&p)?,
        (None, Some(p)) => {
            let rows = rows.expect("clap requires --rows with --packed");
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            let flat = unpack(&bytes, rows * cb.groups(), cb.bits())
                .with_context(|| format!("{}", p.display()))?;
            Array2::from_shape_vec((rows, cb.groups()), flat).expect("sized by unpack")
        }
        _ => bail!("decode needs --indices FILE.npy or --packed FILE --rows N"),
    };
    let x = cb.decode(idx.view())?;
    npy::write_f32(&out, &x)?;
    println!(
        "decoded {} rows of width {} -> {}",
        x.nrows(),
        x.ncols(),
        out.display()
    );
    Ok(())
}

pub fn stats(a: StatsArgs) -> Result<()> {
    let StatsArgs {
        codebook,
        input,
        tensor,
        block,
    } = a;
    let file = CodebookFile::load(&codebook)?;
    let b = file.blocks.get(block).with_context(|| {
        format!(
            "{}: block {block} does not exist (file has {})",
            codebook.display(),
            file.blocks.len()
        )
    })?;
    let cb = &b.codebook;
    println!("{}: {} block(s), K={} G={} D={} (D/G={}), {} bits per index, {} bits per token, {:.1}× compression vs fp32",
            codebook.display(), file.blocks.len(), cb.k(), cb.groups(), cb.dim(), cb.sub_dim(), cb.bits(), cb.bits_per_token(),
            (32 * cb.dim()) as f64 / cb.bits_per_token() as f64);
    println!(
        "noise model: {}",
        match &b.noise {
            None => "none",
            Some(crate::NoiseModel::Full { .. }) => "full covariance",
            Some(_) => "diagonal",
        }
    );
    for (k, v) in &file.extra {
        println!("{k}: {v}");
    }
    if let Some(input) = input {
        let x = read_rows(&input, tensor.as_deref())?;
        let idx = cb.encode(x.view())?;
        let usage = cb.usage(idx.view());
        let mse = cb.mse(x.view())?;
        let energy: f64 =
            x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.nrows() as f64;
        println!(
            "on {} rows: MSE {:.6e} per row ({:.2}% of the mean squared norm)",
            x.nrows(),
            mse,
            100.0 * mse / energy.max(f64::MIN_POSITIVE)
        );
        let mean_ppl = usage.perplexity.iter().sum::<f64>() / usage.perplexity.len() as f64;
        let dead: usize = usage.dead_codes.iter().sum();
        println!(
            "code usage: mean perplexity {:.1} of K={}, dead codes {} of {} ({} groups)",
            mean_ppl,
            cb.k(),
            dead,
            cb.k() * cb.groups(),
            cb.groups()
        );
    }
    Ok(())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        n,
        d,
        k,
        iters,
        seed,
        repeats,
    } = a;
    println!(
        "astra-quant bench on {} threads (synthetic Gaussian mixture)\n",
        rayon::current_num_threads()
    );
    let rows = crate::bench::run(n, d, k, iters, seed, repeats.max(1))?;
    print!("{}", crate::bench::to_markdown(&rows));
    Ok(())
}

fn load_block(path: &Path, block: usize) -> Result<GroupedCodebook> {
    let file = CodebookFile::load(path)?;
    let n = file.blocks.len();
    file.blocks
        .into_iter()
        .nth(block)
        .map(|b| b.codebook)
        .with_context(|| {
            format!(
                "{}: block {block} does not exist (file has {n})",
                path.display()
            )
        })
}

/// The tensors blocks.0.input, blocks.1.input, … of a safetensors file (empty if it has none).
fn block_inputs(path: &Path) -> Result<Vec<(String, Array2<f32>)>> {
    if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!("{}: not a readable safetensors file: {e:?}", path.display())
    })?;
    let mut out = Vec::new();
    while st
        .names()
        .iter()
        .any(|n| **n == format!("blocks.{}.input", out.len()))
    {
        let name = format!("blocks.{}.input", out.len());
        let rows = tensor_rows(&st, path, &name)?;
        out.push((name, rows));
    }
    Ok(out)
}

/// A 2-D float tensor of an already parsed safetensors file, as rows.
fn tensor_rows(st: &safetensors::SafeTensors, path: &Path, name: &str) -> Result<Array2<f32>> {
    let t = st
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("{}: no tensor named '{name}'", path.display()))?;
    if t.shape().len() != 2 {
        bail!(
            "{}: tensor '{name}' has shape {:?}, expected 2-D",
            path.display(),
            t.shape()
        );
    }
    let data: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => bail!(
            "{}: tensor '{name}' is {other:?}, expected F32 or F64",
            path.display()
        ),
    };
    Ok(Array2::from_shape_vec((t.shape()[0], t.shape()[1]), data)?)
}

/// Rows from a .npy or a .safetensors file.
fn read_rows(path: &Path, tensor: Option<&str>) -> Result<Array2<f32>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext != "safetensors" {
        return Ok(npy::read_f32(path)?);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!("{}: not a readable safetensors file: {e:?}", path.display())
    })?;
    let name = match tensor {
        Some(t) => t.to_string(),
        None => {
            let names = st.names();
            if names.len() != 1 {
                bail!(
                    "{}: holds {} tensors; choose one with --tensor",
                    path.display(),
                    names.len()
                );
            }
            names[0].clone()
        }
    };
    tensor_rows(&st, path, &name)
}
