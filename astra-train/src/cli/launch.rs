//! Data-parallel launches (`--gpus N`, `--cpu-ranks N`): the launcher starts one process per GPU
//! and watches them; each rank joins the NCCL group and trains its slice (train/parallel.rs).
//! A rank that fails stops all the others (they would wait in a collective forever).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::Device;

use crate::cuda::nccl::{NcclGroup, UniqueId};
use crate::train::parallel::{Collective, LocalGroup};
use crate::train::run::{RunFolder, RunResult};
use crate::train::{train_ranked, TrainConfig};

use super::args::TrainArgs;

/// A rank started by the launcher: its rank, the world size and the group's id.
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    pub id: UniqueId,
}

const RANK: &str = "ASTRA_DP_RANK";
const WORLD: &str = "ASTRA_DP_WORLD";
const ID: &str = "ASTRA_NCCL_ID";

/// This process's rank, when the launcher started it.
pub fn rank_from_env() -> Result<Option<RankEnv>> {
    let Ok(rank) = std::env::var(RANK) else {
        return Ok(None);
    };
    let parse = |name: &str, v: &str| -> Result<usize> {
        v.parse()
            .with_context(|| format!("{name}={v} is not a count"))
    };
    let world = std::env::var(WORLD).with_context(|| format!("{RANK} without {WORLD}"))?;
    let id = std::env::var(ID).with_context(|| format!("{RANK} without {ID}"))?;
    Ok(Some(RankEnv {
        rank: parse(RANK, &rank)?,
        world: parse(WORLD, &world)?,
        id: UniqueId::from_hex(&id)?,
    }))
}

/// Checks a data-parallel request before anything starts.
fn check(t: &TrainArgs, ranks: usize) -> Result<()> {
    if t.batch < ranks {
        bail!(
            "--batch {} is smaller than the {ranks} ranks it is split over",
            t.batch
        );
    }
    Ok(())
}

/// `--gpus N`: starts rank r of N as this same command on GPU r (its only visible device), and
/// waits for all of them.
pub fn spawn_gpu_ranks(t: &TrainArgs) -> Result<()> {
    let n = t.gpus;
    let count = if tch::Cuda::is_available() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    if count < n {
        bail!("--gpus {n}: this machine has {count} CUDA device(s)");
    }
    if t.device != "cpu" {
        bail!(
            "--gpus places rank r on GPU r; leave --device out (got '{}')",
            t.device
        );
    }
    check(t, n)?;
    let id = UniqueId::new()?.to_hex();
    let visible: Vec<String> = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => (0..count).map(|i| i.to_string()).collect(),
    };
    let exe = std::env::current_exe().context("locating this program")?;
    let mut ranks = Ranks(Vec::new());
    for (r, gpu) in visible.iter().take(n).enumerate() {
        let mut c = Command::new(&exe);
        c.args(std::env::args_os().skip(1))
            .env(RANK, r.to_string())
            .env(WORLD, n.to_string())
            .env(ID, &id)
            .env("CUDA_VISIBLE_DEVICES", gpu)
            // NVLink SHARP multicast stays off (GPU.md).
            .env("NCCL_NVLS_ENABLE", "0");
        if r > 0 {
            // Rank 0 speaks for the run; the others' output is shown only when they fail.
            c.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = c.spawn().with_context(|| format!("starting rank {r}"))?;
        let said = Arc::new(Mutex::new(String::new()));
        if let Some(e) = child.stderr.take() {
            drain(e, said.clone());
        }
        ranks.0.push((child, said));
    }
    ranks.wait()
}

/// Reads a rank's stderr as it comes (a full pipe would stop the rank), keeping its last line.
fn drain(e: std::process::ChildStderr, last: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(e).lines().map_while(|l| l.ok()) {
            if !line.trim().is_empty() {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = line;
            }
        }
    });
}

/// The launcher's children, each with the last line it said on stderr (ranks > 0); killed and
/// reaped if the launcher leaves early.
struct Ranks(Vec<(Child, Arc<Mutex<String>>)>);

impl Ranks {
    /// Until all exit 0, or the first failure (then the others are stopped).
    fn wait(&mut self) -> Result<()> {
        let mut done = vec![false; self.0.len()];
        while done.iter().any(|d| !d) {
            for (r, (c, last)) in self.0.iter_mut().enumerate() {
                if done[r] {
                    continue;
                }
                if let Some(status) = c.try_wait()? {
                    done[r] = true;
                    if !status.success() {
                        // Let the reader take the rank's last words.
                        std::thread::sleep(Duration::from_millis(100));
                        let last = last.lock().unwrap_or_else(|p| p.into_inner());
                        let said = match last.is_empty() {
                            true => String::new(),
                            false => format!(": {last}"),
                        };
                        bail!(
                            "rank {r} of {} failed ({status}){said}; the other ranks were stopped",
                            done.len()
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for (c, _) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One rank started by [`spawn_gpu_ranks`]: its GPU is the only one it sees.
pub fn run_gpu_rank(
    cfg: &TrainConfig,
    t: &TrainArgs,
    me: RankEnv,
    stop_after: Option<usize>,
) -> Result<Option<RunResult>> {
    let device = Device::Cuda(0);
    // libtorch makes its context current on the GPU before NCCL joins on it.
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, device));
    let group: Arc<dyn Collective> = Arc::new(NcclGroup::join(&me.id, me.rank, me.world)?);
    let run = match me.rank {
        0 => Some(RunFolder::open(&t.out, cfg, t.resume)?),
        _ => None,
    };
    Ok(train_ranked(
        cfg,
        run.as_ref(),
        device,
        me.rank == 0,
        stop_after,
        group,
    )?)
}

/// `--cpu-ranks N`: the ranks as threads of this process.
pub fn run_cpu_ranks(
    cfg: &TrainConfig,
    t: &TrainArgs,
    stop_after: Option<usize>,
) -> Result<Option<RunResult>> {
    if t.device != "cpu" {
        bail!("--cpu-ranks trains on the CPU; drop --device {}", t.device);
    }
    check(t, t.cpu_ranks)?;
    let run = RunFolder::open(&t.out, cfg, t.resume)?;
    let mut run = Some(run);
    let results: Vec<Result<Option<RunResult>>> = std::thread::scope(|s| {
        let handles: Vec<_> = LocalGroup::group(t.cpu_ranks)
            .into_iter()
            .map(|g| {
                let run = run.take();
                s.spawn(move || {
                    let rank = g.rank();
                    let g: Arc<dyn Collective> = Arc::new(g);
                    let r = train_ranked(cfg, run.as_ref(), Device::Cpu, rank == 0, stop_after, g);
                    r.map_err(anyhow::Error::from)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))
            })
            .collect()
    });
    let mut first = None;
    for r in results {
        match r {
            Ok(Some(x)) => first = first.or(Some(x)),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(first)
}
