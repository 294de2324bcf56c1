//! `astra-train calibrate`: block inputs of a trained model (ViT over a sample of training
//! images, GPT-2 over training windows) → one grouped codebook per block (astra-quant k-means)
//! and its NAQ residual statistics. On a CUDA device the block inputs stay on the GPU but for the
//! rows the reservoir keeps ([`RowReservoir::push_tensor`]), and every nearest-codeword search
//! (k-means' assignments, the code shares, the residual pass's encoding) runs there
//! ([`TorchSearch`], its rows resident for all iterations); the rest of k-means (initialisation,
//! updates, splits) is astra-quant's, unchanged. (An f64 segment-sum update on the GPU measured
//! slower than astra-quant's on 16 cores: 3.5 vs 2.3 s per ViT-B/GPT-2 codebook at G = 1, ~10×
//! at G = 32.)

use astra_quant::nearest::{Cpu, FixedRows, Search};
use astra_quant::residual::NoiseKind;
use astra_quant::{
    BlockQuantizer, CodebookFile, GroupedCodebook, KMeansConfig, ResidualAccumulator,
};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;
use tch::{Device, Kind, Tensor};

use super::Task;
use crate::error::{Result, TrainError};
use crate::model::Model;

pub struct CalibrationSettings {
    pub data: String,
    pub samples: usize,
    pub groups: usize,
    pub k: usize,
    pub iters: usize,
    pub seed: u64,
    pub noise: Option<NoiseKind>,
    /// Tokens per window for language models (None: the model's n_positions).
    pub context: Option<usize>,
    /// The validation hold-out of the model's training run: calibration samples only what the
    /// run trained on.
    pub valid: crate::data::split::HoldOut,
}

fn to_rows(t: &Tensor) -> Result<Array2<f32>> {
    let d = *t.size().last().expect("non-scalar");
    let flat = t
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
        .reshape([-1, d])
        .contiguous();
    let n = flat.size()[0] as usize;
    let v = Vec::<f32>::try_from(flat.reshape([-1]))?;
    Ok(Array2::from_shape_vec((n, d as usize), v).expect("sized"))
}

/// A seeded reservoir of at most `cap` rows (Algorithm R): every row seen has the same chance
/// of being kept, whatever the order and however many rows pass, and memory stays `cap` rows.
/// The rows live on the device they come from (the GPU during calibration, where copying every
/// block input to the host cost more than the forward passes), or on the host where the device
/// has no room for them.
pub struct RowReservoir {
    /// [capacity, dim] fp32; rows `0..kept` are the sample. Grows by doubling up to `cap`.
    store: Option<Tensor>,
    kept: usize,
    dim: usize,
    cap: usize,
    seen: u64,
    rng: rand_chacha::ChaCha8Rng,
}

impl RowReservoir {
    pub fn new(dim: usize, cap: usize, seed: u64) -> Self {
        use rand::SeedableRng;
        RowReservoir {
            store: None,
            kept: 0,
            dim,
            cap: cap.max(1),
            seen: 0,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Algorithm R's decisions for the next `m` rows: (row of the batch, slot) for every row
    /// kept, in row order; a slot chosen twice in one batch keeps its last row only.
    fn admit(&mut self, m: usize) -> Vec<(usize, usize)> {
        use rand::Rng;
        let base = self.kept;
        let mut writes: Vec<(usize, usize)> = Vec::new();
        let mut at_slot = std::collections::HashMap::new();
        for i in 0..m {
            // Filling: every row is kept, so the batch's row i goes to slot base + i.
            let slot = if base + i < self.cap {
                Some(base + i)
            } else {
                let j = self.rng.random_range(0..=self.seen) as usize;
                (j < self.cap).then_some(j)
            };
            if let Some(slot) = slot {
                if let Some(w) = at_slot.insert(slot, writes.len()) {
                    writes[w].1 = usize::MAX; // superseded by this later row
                }
                writes.push((i, slot));
            }
            self.seen += 1;
        }
        writes.retain(|w| w.1 != usize::MAX);
        writes
    }

    /// The store, with room for `rows` rows (allocated where `like` lives, else on the host).
    fn room(&mut self, rows: usize, like: Device) -> Result<&mut Tensor> {
        let have = self.store.as_ref().map_or(0, |s| s.size()[0] as usize);
        if rows > have {
            let want = rows.max(2 * have).min(self.cap) as i64;
            let device = self.store.as_ref().map_or(like, |s| s.device());
            let d = self.dim as i64;
            let grown = Tensor::f_zeros([want, d], (Kind::Float, device)).or_else(|e| {
                eprintln!(
                    "calibrate: no room for the reservoir on {device:?} ({}); keeping it on the host",
                    e.to_string().lines().next().unwrap_or_default()
                );
                Tensor::f_zeros([want, d], (Kind::Float, Device::Cpu))
            })?;
            if let Some(old) = &self.store {
                grown.narrow(0, 0, have as i64).copy_(old);
            }
            self.store = Some(grown);
        }
        Ok(self.store.as_mut().expect("allocated"))
    }

    pub fn push(&mut self, x: ndarray::ArrayView2<f32>) {
        let x = x.as_standard_layout();
        let t = Tensor::from_slice(x.as_slice().expect("standard layout"));
        self.push_tensor(&t).expect("host rows");
    }

    /// Offers rows [.., D] of a tensor: the kept ones are selected and stored where they are
    /// (one gather and one indexed copy per batch).
    pub fn push_tensor(&mut self, t: &Tensor) -> Result<()> {
        let rows = t.reshape([-1, self.dim as i64]);
        let writes = self.admit(rows.size()[0] as usize);
        let Some(end) = writes.iter().map(|w| w.1 + 1).max() else {
            return Ok(());
        };
        let store = self.room(end, t.device())?;
        let dev = store.device();
        let index = |f: fn(&(usize, usize)) -> usize| {
            let v: Vec<i64> = writes.iter().map(|w| f(w) as i64).collect();
            Tensor::from_slice(&v)
        };
        let picked = rows
            .index_select(0, &index(|w| w.0).to_device(rows.device()))
            .to_kind(Kind::Float)
            .to_device(dev);
        let _ = store.f_index_copy_(0, &index(|w| w.1).to_device(dev), &picked)?;
        self.kept = self.kept.max(end);
        Ok(())
    }

    /// Rows seen in all.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The sample, on the host.
    pub fn into_rows(self) -> Result<Array2<f32>> {
        let Some(store) = self.store else {
            return Ok(Array2::zeros((0, self.dim)));
        };
        to_rows(&store.narrow(0, 0, self.kept as i64))
    }
}

/// The exact fp32 nearest-codeword search on a libtorch device (the trainer's: the fused kernel
/// where it fills the GPU, matmul + argmin otherwise), for astra-quant's k-means and encoding.
/// k-means' rows stay on the device for all its iterations ([`Search::over`]); only the
/// centroids go up and the labels and distances come back.
pub struct TorchSearch(pub Device);

impl TorchSearch {
    fn upload(&self, a: ndarray::ArrayView2<f32>) -> Tensor {
        let a = a.as_standard_layout();
        let (r, c) = a.dim();
        Tensor::from_slice(a.as_slice().expect("standard layout"))
            .view([r as i64, c as i64])
            .to_device(self.0)
    }
}

/// Rows already on the device.
struct Resident<'a> {
    search: &'a TorchSearch,
    x: Tensor,
}

impl FixedRows for Resident<'_> {
    fn nearest(&self, centroids: ndarray::ArrayView2<f32>) -> (Vec<u32>, Vec<f32>) {
        nearest_on_device(&self.x, &self.search.upload(centroids))
    }
}

/// Labels and squared distances of rows `x` [n, d] to their nearest row of `c` [k, d].
fn nearest_on_device(x: &Tensor, c: &Tensor) -> (Vec<u32>, Vec<f32>) {
    let idx = crate::models::vq::nearest_codewords(&x.unsqueeze(1), &c.unsqueeze(0)).view([-1]);
    let dist = (x - c.index_select(0, &idx))
        .square()
        .sum_dim_intlist(-1, false, Kind::Float);
    let labels = Vec::<i64>::try_from(idx.to_device(Device::Cpu)).expect("int64 indices");
    let dist = Vec::<f32>::try_from(dist.to_device(Device::Cpu)).expect("fp32 distances");
    (labels.into_iter().map(|l| l as u32).collect(), dist)
}

impl Search for TorchSearch {
    fn nearest(
        &self,
        x: ndarray::ArrayView2<f32>,
        centroids: ndarray::ArrayView2<f32>,
    ) -> (Vec<u32>, Vec<f32>) {
        nearest_on_device(&self.upload(x), &self.upload(centroids))
    }

    fn over<'a>(&'a self, x: ndarray::ArrayView2<'a, f32>) -> Box<dyn FixedRows + 'a> {
        Box::new(Resident {
            search: self,
            x: self.upload(x),
        })
    }
}

/// The search calibration runs on: the GPU's when it calibrates on one, else astra-quant's.
fn search_on(device: Device) -> Box<dyn Search> {
    if device.is_cuda() {
        Box::new(TorchSearch(device))
    } else {
        Box::new(Cpu)
    }
}

/// Fits per-block codebooks and NAQ statistics on a sample of the training data. Memory is
/// bounded whatever the sample size: the first pass keeps a seeded reservoir of K × 256 rows per
/// block (all that k-means trains on), the second streams every row through the fitted codebook
/// into the residual statistics (which merge).
pub fn calibrate(
    model: &Model,
    a: &CalibrationSettings,
    device: Device,
    progress: bool,
) -> Result<CodebookFile> {
    let task = Task::open(&a.data, &model.config, a.context, a.valid)?;
    let n = a.samples.min(task.train_len());
    if n == 0 {
        return Err(TrainError::invalid("samples", "must be at least 1"));
    }
    // One codebook per quantizer: per block, or per block's keys and values (Llama).
    let layers = model.quantizers() as usize;
    let dim = model.quantized_width() as usize;
    let cap = a.k * KMeansConfig::new(a.k).max_points_per_centroid;
    let mut reservoirs: Vec<RowReservoir> = (0..layers)
        .map(|l| RowReservoir::new(dim, cap, a.seed.wrapping_add(l as u64)))
        .collect();
    let sample = Sample {
        task: &task,
        n,
        seed: a.seed,
        device,
    };
    let clock = std::time::Instant::now();
    for_each_block_input(model, &sample, |l, t| reservoirs[l].push_tensor(t))?;
    let first_pass = clock.elapsed().as_secs_f64();
    if progress {
        eprintln!(
            "calibrate: inputs of {layers} quantizers over {n} examples ({} rows each) in {first_pass:.1} s",
            reservoirs[0].seen()
        );
    }
    let search = search_on(device);
    let bar = progress_bar(progress, layers, "calibrate blocks");
    let mut codebooks = Vec::with_capacity(layers);
    let mut usage = Vec::with_capacity(layers);
    for r in reservoirs {
        let rows = r.into_rows()?;
        let cfg = KMeansConfig {
            iters: a.iters,
            seed: a.seed,
            ..KMeansConfig::new(a.k)
        };
        let cb = GroupedCodebook::fit_with(rows.view(), a.groups, &cfg, &*search)?.0;
        // The reservoir is a uniform sample of the block's rows: its code shares estimate the
        // whole sample's, which EMA fine-tuning starts its counts from.
        usage.push(cb.code_shares_with(rows.view(), &*search)?);
        codebooks.push(cb);
        bar.inc(1);
        if progress && bar.is_hidden() {
            // No terminal (a log): one line per codebook instead of the bar.
            eprintln!(
                "calibrate: codebook {}/{layers} fitted ({:.1} s in all)",
                codebooks.len(),
                clock.elapsed().as_secs_f64() - first_pass
            );
        }
    }
    bar.finish_and_clear();
    let fitted = clock.elapsed().as_secs_f64();
    let noise = match a.noise {
        None => vec![None; layers],
        Some(kind) => residual_models(model, &sample, &codebooks, kind)?,
    };
    let seconds = format!(
        "{first_pass:.1} s block inputs and reservoirs, {:.1} s k-means and code shares, {:.1} s residual statistics",
        fitted - first_pass,
        clock.elapsed().as_secs_f64() - fitted
    );
    let blocks = codebooks
        .into_iter()
        .zip(noise)
        .zip(usage)
        .map(|((codebook, noise), usage)| BlockQuantizer {
            codebook,
            noise,
            usage: Some(usage),
        })
        .collect();
    let mut file = CodebookFile {
        blocks,
        extra: Default::default(),
    };
    file.extra.insert("data".into(), a.data.clone());
    file.extra.insert("samples".into(), n.to_string());
    file.extra.insert("seconds".into(), seconds);
    file.extra.insert(
        "sampling".into(),
        format!(
            "{n} training examples drawn at random with seed {}; k-means on a reservoir of at most {cap} rows per block; residual statistics over every row",
            a.seed
        ),
    );
    Ok(file)
}

/// The calibration sample: `n` training examples of `task` drawn with `seed`, run on `device`.
#[derive(Clone, Copy)]
struct Sample<'a> {
    task: &'a Task,
    n: usize,
    seed: u64,
    device: Device,
}

/// Calls `f(block, rows)` with every block's input rows [M, D] for the calibration sample.
fn for_each_block_input(
    model: &Model,
    sample: &Sample<'_>,
    mut f: impl FnMut(usize, &Tensor) -> Result<()>,
) -> Result<()> {
    let Sample {
        task,
        n,
        seed,
        device,
    } = *sample;
    tch::no_grad(|| -> Result<()> {
        for x in task.calibration_batches(n, seed, device)? {
            for (l, t) in model.block_inputs(&x)?.iter().enumerate() {
                f(l, t)?;
            }
        }
        Ok(())
    })
}

/// The second pass: the residual X − X̂ of every row under the fitted codebooks, streamed.
fn residual_models(
    model: &Model,
    sample: &Sample<'_>,
    codebooks: &[GroupedCodebook],
    kind: NoiseKind,
) -> Result<Vec<Option<astra_quant::NoiseModel>>> {
    let mut acc: Vec<ResidualAccumulator> = codebooks
        .iter()
        .map(|cb| ResidualAccumulator::new(cb.dim(), kind))
        .collect();
    // On a GPU the rows never leave it: encode, decode and the batch's moments there, only the
    // D × D scatter comes back (for GPT-2 medium at 2,000 windows the CPU's f64 GEMMs over every
    // row took minutes per block).
    let on_gpu: Option<Vec<Tensor>> = sample.device.is_cuda().then(|| {
        codebooks
            .iter()
            .map(|cb| codebook_tensor(cb, sample.device))
            .collect()
    });
    for_each_block_input(model, sample, |l, t| match &on_gpu {
        Some(tables) => {
            let (n, mean, scatter) = residual_moments(t, &tables[l], kind)?;
            Ok(acc[l].push_moments(n, &mean, &scatter)?)
        }
        None => {
            let rows = to_rows(t)?;
            let cb = &codebooks[l];
            let xh = cb.decode(cb.encode(rows.view())?.view())?;
            Ok(acc[l].push_pair(rows.view(), xh.view())?)
        }
    })?;
    acc.iter()
        .map(|a| Ok(Some(a.finish()?.noise_model().model)))
        .collect()
}

/// A grouped codebook as a [G, K, w] fp32 tensor on `device`.
fn codebook_tensor(cb: &GroupedCodebook, device: Device) -> Tensor {
    let (g, k, w) = (cb.groups() as i64, cb.k() as i64, cb.sub_dim() as i64);
    let flat: Vec<f32> = (0..cb.groups())
        .flat_map(|i| cb.group(i).iter().copied().collect::<Vec<_>>())
        .collect();
    Tensor::from_slice(&flat).view([g, k, w]).to_device(device)
}

/// The residuals X − X̂ of block inputs `t` [.., D] under `codebook` [G, K, w], as (rows, mean,
/// centred scatter) in f64: the full D × D matrix, or its diagonal.
fn residual_moments(
    t: &Tensor,
    codebook: &Tensor,
    kind: NoiseKind,
) -> Result<(u64, Vec<f64>, Vec<f64>)> {
    let (g, k, w) = codebook.size3()?;
    let rows = t.to_kind(Kind::Float).reshape([-1, g, w]);
    let idx = crate::models::vq::nearest_codewords(&rows, codebook); // [M, G]
    let offsets = Tensor::arange(g, (Kind::Int64, t.device())) * k;
    let x_hat = codebook
        .reshape([g * k, w])
        .index_select(0, &(idx + offsets.view([1, g])).reshape([-1]))
        .view([-1, g * w]);
    let r = (rows.view([-1, g * w]) - x_hat).to_kind(Kind::Double);
    let n = r.size()[0];
    let mean = r.mean_dim(0, false, Kind::Double);
    let c = &r - &mean;
    let scatter = match kind {
        NoiseKind::Full => c.transpose(0, 1).mm(&c),
        NoiseKind::Diagonal => c.square().sum_dim_intlist(0, false, Kind::Double),
    };
    let host = |t: Tensor| Vec::<f64>::try_from(t.to_device(Device::Cpu).reshape([-1]));
    Ok((n as u64, host(mean)?, host(scatter)?))
}

fn progress_bar(progress: bool, len: usize, what: &str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len as u64);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}]"
        ))
        .expect("static"),
    );
    b
}

#[cfg(test)]
mod tests {
    use super::{RowReservoir, TorchSearch};
    use astra_quant::nearest::{Cpu, Search};
    use astra_quant::{GroupedCodebook, KMeansConfig};

    /// The GPU's residual pass (here run on CPU tensors) gives the statistics the rows give.
    #[test]
    fn residual_moments_from_tensors_equal_the_rows() {
        use astra_quant::residual::NoiseKind;
        use astra_quant::ResidualAccumulator;
        let x =
            ndarray::Array2::from_shape_fn((500, 8), |(i, j)| ((i * 5 + j * 3) % 17) as f32 / 3.0);
        let (cb, _) = GroupedCodebook::fit(x.view(), 2, &KMeansConfig::new(16)).unwrap();
        let table = super::codebook_tensor(&cb, tch::Device::Cpu);
        for kind in [NoiseKind::Full, NoiseKind::Diagonal] {
            let (mut rows, mut moments) = (
                ResidualAccumulator::new(8, kind),
                ResidualAccumulator::new(8, kind),
            );
            for chunk in x.axis_chunks_iter(ndarray::Axis(0), 128) {
                let xh = cb.decode(cb.encode(chunk).unwrap().view()).unwrap();
                rows.push_pair(chunk, xh.view()).unwrap();
                let t =
                    tch::Tensor::from_slice(chunk.to_owned().as_slice().unwrap()).view([-1, 4, 2]);
                let (n, mean, scatter) = super::residual_moments(&t, &table, kind).unwrap();
                moments.push_moments(n, &mean, &scatter).unwrap();
            }
            let (a, b) = (rows.finish().unwrap(), moments.finish().unwrap());
            for (u, v) in a.cov.iter().zip(b.cov.iter()) {
                assert!((u - v).abs() < 1e-9, "{kind:?}: {u} vs {v}");
            }
        }
    }

    /// The libtorch search (here on the CPU; on the GPU in tests/cuda_kernels.rs) gives k-means
    /// and encoding the same results as astra-quant's: same labels up to fp32 near-ties, the
    /// same distances, the same fitted codebook's objective.
    #[test]
    fn the_libtorch_search_fits_what_astra_quants_fits() {
        let x = ndarray::Array2::from_shape_fn((3000, 12), |(i, j)| {
            ((i * 7 + j * 13) % 31) as f32 / 7.0 + ((i / 100) % 5) as f32
        });
        let c = x.slice(ndarray::s![..40, ..]).to_owned();
        let (lt, dt) = TorchSearch(tch::Device::Cpu).nearest(x.view(), c.view());
        let (lc, dc) = Cpu.nearest(x.view(), c.view());
        // Rows kept on the device for k-means' iterations search the same.
        let torch = TorchSearch(tch::Device::Cpu);
        assert_eq!(
            torch.over(x.view()).nearest(c.view()),
            (lt.clone(), dt.clone())
        );
        assert_eq!(
            Cpu.over(x.view()).nearest(c.view()),
            (lc.clone(), dc.clone())
        );
        let same = lt.iter().zip(&lc).filter(|(a, b)| a == b).count();
        assert!(
            same as f64 >= 0.999 * lt.len() as f64,
            "{same} of {} labels agree",
            lt.len()
        );
        for (a, b) in dt.iter().zip(&dc) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "distances {a} vs {b}"
            );
        }
        let cfg = KMeansConfig {
            iters: 8,
            ..KMeansConfig::new(32)
        };
        let (cb_t, st_t) =
            GroupedCodebook::fit_with(x.view(), 3, &cfg, &TorchSearch(tch::Device::Cpu)).unwrap();
        let (cb_c, st_c) = GroupedCodebook::fit(x.view(), 3, &cfg).unwrap();
        for (t, c) in st_t.iter().zip(&st_c) {
            let (ot, oc) = (t.last().unwrap().objective, c.last().unwrap().objective);
            assert!((ot - oc).abs() <= 1e-3 * oc, "objectives {ot} vs {oc}");
        }
        let shares_t = cb_t
            .code_shares_with(x.view(), &TorchSearch(tch::Device::Cpu))
            .unwrap();
        let shares_c = cb_c.code_shares(x.view()).unwrap();
        let gap: f32 = shares_t
            .iter()
            .zip(&shares_c)
            .map(|(a, b)| (a - b).abs())
            .sum();
        assert!(gap < 0.01, "code shares differ by {gap} in total");
    }

    #[test]
    fn the_reservoir_is_bounded_uniform_and_seeded() {
        let rows = ndarray::Array2::from_shape_fn((10_000, 2), |(i, j)| (i * 2 + j) as f32);
        let fill = |seed| {
            let mut r = RowReservoir::new(2, 500, seed);
            for chunk in rows.axis_chunks_iter(ndarray::Axis(0), 777) {
                r.push(chunk);
            }
            assert_eq!(r.seen(), 10_000);
            r.into_rows().unwrap()
        };
        let a = fill(1);
        assert_eq!(a.dim(), (500, 2));
        assert_eq!(a, fill(1));
        assert_ne!(a, fill(2));
        // Rows stay whole, and the sample covers the whole stream (not the first 500).
        assert!(a.outer_iter().all(|r| r[1] == r[0] + 1.0));
        let late = a.outer_iter().filter(|r| r[0] >= 10_000.0).count();
        assert!(
            (200..=300).contains(&late),
            "{late} of 500 from the second half"
        );
        // Equal to Algorithm R applied row by row (the reference below), and the same when the
        // rows come as tensors (selected where they are, then copied).
        let reference = |seed: u64| {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut kept: Vec<Vec<f32>> = Vec::new();
            for (seen, row) in rows.outer_iter().enumerate() {
                if kept.len() < 500 {
                    kept.push(row.to_vec());
                } else {
                    let j = rng.random_range(0..=seen as u64) as usize;
                    if j < 500 {
                        kept[j] = row.to_vec();
                    }
                }
            }
            kept.concat()
        };
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), reference(1));
        let mut t = RowReservoir::new(2, 500, 1);
        for chunk in rows.axis_chunks_iter(ndarray::Axis(0), 777) {
            let c = chunk.as_standard_layout();
            let tensor = tch::Tensor::from_slice(c.as_slice().unwrap()).view([-1, 2]);
            t.push_tensor(&tensor.to_kind(tch::Kind::Double)).unwrap();
        }
        assert_eq!(t.into_rows().unwrap(), a);
        // Fewer rows than the cap: all of them.
        let mut r = RowReservoir::new(2, 500, 1);
        r.push(rows.slice(ndarray::s![..10, ..]));
        assert_eq!(r.into_rows().unwrap().nrows(), 10);
    }
}
