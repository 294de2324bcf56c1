use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use astra_quant::bitpack::{pack, packed_len, unpack};
use astra_quant::residual::NoiseKind;
use astra_quant::{npy, CodebookFile, GroupedCodebook, Init, KMeansConfig, ResidualAccumulator};
use clap::{Parser, Subcommand, ValueEnum};
use ndarray::Array2;

/// ASTRA vector quantisation: fit grouped codebooks with k-means, encode and decode token
/// embeddings, bit-pack indices, and inspect codebook files.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Worker threads (0 = one per core). Results do not depend on it.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Noise {
    None,
    Full,
    Diagonal,
}

#[derive(Subcommand)]
enum Command {
    /// Fit a grouped codebook (one k-means per group) to the rows of a 2-D float32 array.
    Fit {
        /// Rows to fit: a 2-D float32/float64 .npy, or a .safetensors file (see --tensor).
        #[arg(long)]
        input: PathBuf,
        /// Tensor to read from a .safetensors input (default: its only tensor).
        #[arg(long)]
        tensor: Option<String>,
        /// Codewords per group.
        #[arg(long, default_value_t = 1024)]
        k: usize,
        /// Groups G; each row of width D is split into G sub-vectors of width D/G.
        #[arg(long, default_value_t = 1)]
        groups: usize,
        /// Lloyd iterations.
        #[arg(long, default_value_t = 25)]
        iters: usize,
        /// Seed of subsampling and initialisation (group g uses seed + g).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Initialisation.
        #[arg(long, value_enum, default_value = "random")]
        init: Init,
        /// Rows used per centroid at most (0 = all rows).
        #[arg(long, default_value_t = 256)]
        max_points_per_centroid: usize,
        /// Stop when the objective improves by less than this fraction (0 = run all iterations).
        #[arg(long, default_value_t = 0.0)]
        tol: f64,
        /// Also store the residual noise model (for Noise-Augmented Quantization) computed on the input.
        #[arg(long, value_enum, default_value = "none")]
        noise: Noise,
        /// Output codebook file (safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Write per-group, per-iteration statistics as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Encode rows to indices (n × G, uint16 .npy) and optionally to a packed bitstream.
    Encode {
        #[arg(long)]
        codebook: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        tensor: Option<String>,
        /// Which block's codebook to use.
        #[arg(long, default_value_t = 0)]
        block: usize,
        /// Indices as a uint16 .npy of shape n × G.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Indices as a little-endian bitstream of ceil(log2 K) bits each.
        #[arg(long)]
        packed: Option<PathBuf>,
    },
    /// Decode indices (a .npy, or a packed bitstream with --rows) back to rows (float32 .npy).
    Decode {
        #[arg(long)]
        codebook: PathBuf,
        #[arg(long, default_value_t = 0)]
        block: usize,
        /// Indices .npy (any integer dtype), n × G.
        #[arg(long, conflicts_with = "packed")]
        indices: Option<PathBuf>,
        /// Packed bitstream written by `encode --packed`; needs --rows.
        #[arg(long, requires = "rows")]
        packed: Option<PathBuf>,
        /// Rows in the packed bitstream.
        #[arg(long)]
        rows: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe a codebook file; with --input also reconstruction error and code usage.
    Stats {
        #[arg(long)]
        codebook: PathBuf,
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long)]
        tensor: Option<String>,
        #[arg(long, default_value_t = 0)]
        block: usize,
    },
    /// Time k-means, encoding and bit packing on synthetic data; prints a markdown table.
    Bench {
        #[arg(long, default_value_t = 65536)]
        n: usize,
        #[arg(long, default_value_t = 48)]
        d: usize,
        #[arg(long, default_value_t = 1024)]
        k: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Repetitions of each throughput measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("astra-quant: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let threads = astra_quant::threads::checked(cli.threads, 0)?;
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting up the thread pool")?;
    }
    match cli.command {
        Command::Fit {
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
        } => {
            let cfg = KMeansConfig {
                k,
                iters,
                seed,
                init,
                max_points_per_centroid,
                tol,
                progress: !quiet,
            };
            // One codebook per block when a safetensors input holds blocks.{l}.input tensors
            // (block inputs collected from a model); otherwise one from the rows given.
            let per_block = match &tensor {
                None => block_inputs(&input)?,
                Some(_) => Vec::new(),
            };
            let inputs: Vec<(String, Array2<f32>)> = if per_block.is_empty() {
                vec![(
                    input.display().to_string(),
                    read_rows(&input, tensor.as_deref())?,
                )]
            } else {
                per_block
            };
            let mut blocks = Vec::new();
            let mut reports = Vec::new();
            let mut rows = 0;
            for (name, x) in &inputs {
                let t0 = Instant::now();
                let (cb, stats) = GroupedCodebook::fit(x.view(), groups, &cfg)
                    .with_context(|| format!("fitting {name}"))?;
                let fit_s = t0.elapsed().as_secs_f64();
                let mse = cb.mse(x.view())?;
                let noise_model = match noise {
                    Noise::None => None,
                    Noise::Full | Noise::Diagonal => {
                        let kind = if matches!(noise, Noise::Full) {
                            NoiseKind::Full
                        } else {
                            NoiseKind::Diagonal
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
                        Some(fitted.model)
                    }
                };
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
                blocks.push(astra_quant::BlockQuantizer {
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
                astra_quant::atomic::write_bytes(
                    &r,
                    serde_json::to_string_pretty(&json)?.as_bytes(),
                )
                .with_context(|| r.display().to_string())?;
            }
        }
        Command::Encode {
            codebook,
            input,
            tensor,
            block,
            out,
            packed,
        } => {
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
                astra_quant::atomic::write_bytes(p, &pack(&flat, cb.bits())?)
                    .with_context(|| p.display().to_string())?;
            }
            println!(
                "encoded {} rows × {} groups at {} bits: {} bytes packed ({:.1}× smaller than fp32)",
                idx.nrows(), cb.groups(), cb.bits(), packed_len(idx.len(), cb.bits()),
                (x.len() * 4) as f64 / packed_len(idx.len(), cb.bits()).max(1) as f64
            );
        }
        Command::Decode {
            codebook,
            block,
            indices,
            packed,
            rows,
            out,
        } => {
            let cb = load_block(&codebook, block)?;
            let idx = match (indices, packed) {
                (Some(p), None) => npy::read_indices(&p)?,
                (None, Some(p)) => {
                    let rows = rows.expect("clap requires --rows with --packed");
                    let bytes =
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
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
        }
        Command::Stats {
            codebook,
            input,
            tensor,
            block,
        } => {
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
                    Some(astra_quant::NoiseModel::Full { .. }) => "full covariance",
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
        }
        Command::Bench {
            n,
            d,
            k,
            iters,
            seed,
            repeats,
        } => {
            println!(
                "astra-quant bench on {} threads (synthetic Gaussian mixture)\n",
                rayon::current_num_threads()
            );
            let rows = astra_quant::bench::run(n, d, k, iters, seed, repeats.max(1))?;
            print!("{}", astra_quant::bench::to_markdown(&rows));
        }
    }
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
