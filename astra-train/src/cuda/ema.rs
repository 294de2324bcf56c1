//! Per-code counts and sums of a batch (the EMA codebook update's statistics) in one scatter.
//!
//! The ATen path builds a ones vector and runs two index_adds (counts, then sums) over the same
//! indices. Here, where a group's statistics fit a block's shared memory (K = 1,024 codes of 24
//! values: 100 KiB), a few blocks per group each add their share of the rows into a copy in
//! shared memory and then add that copy into the global statistics: a global atomic per code,
//! value and block instead of one per element (ViT-B at batch 128: 19.3 million of them).
//! Otherwise one thread per element adds its value to its code's sum in global memory, and the
//! first thread of each row also counts it. Float atomics make the order of additions (and so the
//! last bits of a sum) vary from run to run, as ATen's CUDA index_add does.

use tch::{Kind, Tensor};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig};

use super::{int, ptr, KernelError, Kernels, Source};

pub(super) const SOURCE: Source = Source {
    name: "code_stats",
    text: r#"
// x [M, G, W] fp32, idx [M, G] int64 -> counts [G, K] += 1, sums [G, K, W] += x (both zeroed).
extern "C" __global__ void code_stats(const float* __restrict__ x, const long long* __restrict__ idx,
                                      float* __restrict__ counts, float* __restrict__ sums,
                                      int M, int G, int K, int W) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)M * G * W) return;
  const long long mg = t / W;
  const int w = (int)(t - mg * W), g = (int)(mg % G);
  const long long slot = (long long)g * K + idx[mg];
  atomicAdd(&sums[slot * W + w], x[t]);
  if (w == 0) atomicAdd(&counts[slot], 1.f);
}

// The same statistics with group blockIdx.y's [K, W] sums and [K] counts in shared memory
// (dynamic, (K W + K) floats): block x takes rows [x c, (x + 1) c) of M, c = ceil(M / gridDim.x),
// then adds its non-zero entries into the zeroed global statistics. Each thread keeps UNROLL loads
// in flight before it adds them: with one, the rows would stream at a few GB/s per multiprocessor.
#define UNROLL 8
extern "C" __global__ void __launch_bounds__(1024)
code_stats_shared(const float* __restrict__ x, const long long* __restrict__ idx,
                  float* __restrict__ counts, float* __restrict__ sums, int M, int G, int K,
                  int W) {
  extern __shared__ float shared_stats[];
  float* s_sum = shared_stats;         // [K, W]
  float* s_cnt = shared_stats + K * W;  // [K]
  const int g = blockIdx.y;
  for (int e = threadIdx.x; e < K * W + K; e += blockDim.x) shared_stats[e] = 0.f;
  __syncthreads();
  const int chunk = (M + gridDim.x - 1) / gridDim.x;
  const int r0 = min(M, blockIdx.x * chunk), r1 = min(M, r0 + chunk);
  const long long end = (long long)r1 * W;
  for (long long base = (long long)r0 * W; base < end; base += (long long)UNROLL * blockDim.x) {
    float v[UNROLL];
    int slot[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long e = base + (long long)u * blockDim.x + threadIdx.x;
      slot[u] = -1;
      if (e < end) {
        const long long row = e / W;
        const int w = (int)(e - row * W);
        const long long mg = row * G + g;
        slot[u] = (int)idx[mg] * W + w;
        v[u] = x[mg * W + w];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (slot[u] >= 0) atomicAdd(&s_sum[slot[u]], v[u]);
  }
  for (int row = r0 + threadIdx.x; row < r1; row += blockDim.x)
    atomicAdd(&s_cnt[idx[(long long)row * G + g]], 1.f);
  __syncthreads();
  // Adding +0 changes nothing (the statistics start at +0): only non-zero entries go out.
  float* gs = sums + (long long)g * K * W;
  for (int e = threadIdx.x; e < K * W; e += blockDim.x)
    if (s_sum[e] != 0.f) atomicAdd(&gs[e], s_sum[e]);
  for (int c = threadIdx.x; c < K; c += blockDim.x)
    if (s_cnt[c] != 0.f) atomicAdd(&counts[(long long)g * K + c], s_cnt[c]);
}

// One EMA step of group blockIdx.x's codebook from this batch's counts/sums [G, K(, W)]: the
// ATen path's expressions op by op (rounded, not contracted into FMAs), except that the group's
// total n is summed in another order. Dead codes restart on rows[pick[g, k], g, :].
extern "C" __global__ void __launch_bounds__(1024)
ema_step(const float* __restrict__ counts, const float* __restrict__ sums,
         const float* __restrict__ ema_count, const float* __restrict__ ema_sum,
         const float* __restrict__ rows, const long long* __restrict__ pick,
         float* __restrict__ out_count, float* __restrict__ out_sum, float* __restrict__ out_cb,
         int G, int K, int W, float decay, float keep, float eps, float eps_k, float inv_k,
         float threshold) {
  __shared__ float partial[32];
  __shared__ float total;
  const int g = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long gk = (long long)g * K;
  float mine = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const float c = __fadd_rn(__fmul_rn(ema_count[gk + k], decay), __fmul_rn(counts[gk + k], keep));
    out_count[gk + k] = c;
    mine += c;
  }
  for (int off = 16; off > 0; off >>= 1) mine += __shfl_xor_sync(0xffffffffu, mine, off);
  if (lane == 0) partial[warp] = mine;
  __syncthreads();
  if (warp == 0) {
    float v = lane < (blockDim.x >> 5) ? partial[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) total = v;
  }
  __syncthreads();
  const float n = total, mean = __fmul_rn(n, inv_k), floor_ = __fmul_rn(mean, threshold);
  const float denominator = __fadd_rn(n, eps_k);
  for (long long e = threadIdx.x; e < (long long)K * W; e += blockDim.x) {
    const int k = (int)(e / W), w = (int)(e - (long long)k * W);
    const float c = out_count[gk + k];  // this thread's own write or another's: after the barrier
    const long long at = (gk + k) * W + w;
    if (c < floor_) {
      const float fresh = rows[(pick[gk + k] * G + g) * W + w];
      out_cb[at] = fresh;
      out_sum[at] = __fmul_rn(fresh, mean);
    } else {
      const float s = __fadd_rn(__fmul_rn(ema_sum[at], decay), __fmul_rn(sums[at], keep));
      const float smoothed = __fmul_rn(__fdiv_rn(__fadd_rn(c, eps), denominator), n);
      out_cb[at] = __fdiv_rn(s, smoothed);
      out_sum[at] = s;
    }
  }
  __syncthreads();  // every count read above before a dead code's count is replaced
  for (int k = threadIdx.x; k < K; k += blockDim.x)
    if (out_count[gk + k] < floor_) out_count[gk + k] = mean;
}
"#,
};

/// The EMA settings of [`ema_step`]: decay, the Laplace smoothing ε and the dead-code threshold
/// (relative to the mean count per code).
pub struct EmaSettings {
    pub decay: f64,
    pub epsilon: f64,
    pub dead_threshold: f64,
}

/// One EMA step of a [G, K, W] codebook in one kernel (one block per group): from this batch's
/// `counts` [G, K] and `sums` [G, K, W] and the running `ema_count`/`ema_sum`, the new
/// (ema_count, ema_sum, codebook); codes whose count falls below the threshold restart on row
/// `pick[g, k]` of `rows` [M, G, W]. The ATen path's two dozen launches of [G, K]-sized work in one
/// (`vq::GroupedVq::ema_update`; equal to it up to the order of the per-group total's sum).
pub fn ema_step(
    k: &Kernels,
    (counts, sums): (&Tensor, &Tensor),
    (ema_count, ema_sum): (&Tensor, &Tensor),
    rows: &Tensor,
    pick: &Tensor,
    cfg: &EmaSettings,
) -> Result<(Tensor, Tensor, Tensor), KernelError> {
    for (what, t) in [
        ("counts", counts),
        ("sums", sums),
        ("EMA counts", ema_count),
        ("EMA sums", ema_sum),
        ("rows", rows),
    ] {
        k.check(what, t, Kind::Float)?;
    }
    k.check("restart picks", pick, Kind::Int64)?;
    let (ss, rs) = (sums.size(), rows.size());
    let [g, n, w] = ss[..] else {
        return Err(KernelError(format!("sums {ss:?} are not [G, K, W]")));
    };
    let shapes_agree = counts.size() == [g, n]
        && ema_count.size() == [g, n]
        && ema_sum.size() == ss
        && pick.size() == [g, n]
        && rs.len() == 3
        && rs[1..] == [g, w];
    if !shapes_agree {
        return Err(KernelError(format!(
            "EMA statistics {ss:?}, rows {rs:?} and picks {:?} do not agree",
            pick.size()
        )));
    }
    let out_count = Tensor::empty([g, n], (Kind::Float, sums.device()));
    let (out_sum, out_cb) = (ema_sum.empty_like(), ema_sum.empty_like());
    if g == 0 || n == 0 {
        return Ok((out_count, out_sum, out_cb));
    }
    let f = k.function(&SOURCE, "ema_step")?;
    let (g32, k32, w32) = (int("G", g)?, int("K", n)?, int("W", w)?);
    let floats = [
        cfg.decay as f32,
        (1.0 - cfg.decay) as f32,
        cfg.epsilon as f32,
        (cfg.epsilon * n as f64) as f32,
        (1.0 / n as f64) as f32,
        cfg.dead_threshold as f32,
    ];
    let ptrs = [
        counts, sums, ema_count, ema_sum, rows, pick, &out_count, &out_sum, &out_cb,
    ]
    .map(ptr);
    let cfg = super::launch_config(g32 as u32, 1, 1024, 0);
    let mut launch = k.stream().launch_builder(&f);
    use cudarc::driver::PushKernelArg;
    for p in &ptrs {
        launch.arg(p);
    }
    launch.arg(&g32).arg(&k32).arg(&w32);
    for x in &floats {
        launch.arg(x);
    }
    // SAFETY: checked contiguous fp32/int64 tensors of agreeing shapes on this device; picks are
    // row numbers drawn in 0..M by the caller; the outputs are fresh [G, K(, W)] tensors.
    unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching ema_step"))?;
    Ok((out_count, out_sum, out_cb))
}

/// (counts [G, K], sums [G, K, W]) of rows `x` [M, G, W] (fp32) under indices `idx` [M, G]
/// (int64, each in 0..K).
pub fn code_stats(
    k: &Kernels,
    x: &Tensor,
    idx: &Tensor,
    codes: i64,
) -> Result<(Tensor, Tensor), KernelError> {
    code_stats_with(k, x, idx, codes, Scatter::Shared)
}

/// Where [`code_stats_with`] adds: straight into global memory, or into a copy of each group's
/// statistics in shared memory first (where they fit a block; global otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scatter {
    Global,
    Shared,
}

/// [`code_stats`] with the scatter chosen by the caller (tests and benchmarks compare them).
pub fn code_stats_with(
    k: &Kernels,
    x: &Tensor,
    idx: &Tensor,
    codes: i64,
    scatter: Scatter,
) -> Result<(Tensor, Tensor), KernelError> {
    k.check("rows", x, Kind::Float)?;
    k.check("indices", idx, Kind::Int64)?;
    let xs = x.size();
    if xs.len() != 3 || idx.size() != xs[..2] {
        return Err(KernelError(format!(
            "rows {xs:?} and indices {:?} are not [M, G, W] and [M, G]",
            idx.size()
        )));
    }
    let (m, g, w) = (xs[0], xs[1], xs[2]);
    let counts = Tensor::zeros([g, codes], (Kind::Float, x.device()));
    let sums = Tensor::zeros([g, codes, w], (Kind::Float, x.device()));
    let total = m * g * w;
    if total == 0 {
        return Ok((counts, sums));
    }
    let (m32, g32, k32, w32) = (int("M", m)?, int("G", g)?, int("K", codes)?, int("W", w)?);
    let shared = match scatter {
        Scatter::Shared => shared_launch(k, [m, g, w, codes])?,
        Scatter::Global => None,
    };
    let (f, cfg) = match shared {
        Some(launch) => launch,
        None => {
            int("M·G·W / 256 blocks", total / 256)?;
            (
                k.function(&SOURCE, "code_stats")?,
                super::grid_1d(total, 256),
            )
        }
    };
    let (px, pi, pc, ps) = (ptr(x), ptr(idx), ptr(&counts), ptr(&sums));
    let mut launch = k.stream().launch_builder(&f);
    use cudarc::driver::PushKernelArg;
    launch
        .arg(&px)
        .arg(&pi)
        .arg(&pc)
        .arg(&ps)
        .arg(&m32)
        .arg(&g32)
        .arg(&k32)
        .arg(&w32);
    // SAFETY: checked contiguous tensors on this device; indices are in 0..K (they come from the
    // nearest-codeword search over K codewords), so every slot is inside counts and sums (and
    // inside the shared copy, sized for K codes of W values).
    unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching code_stats"))?;
    Ok((counts, sums))
}

/// Threads of a block of `code_stats_shared`.
const SHARED_THREADS: u32 = 1024;

/// The shared-memory statistics' kernel and launch for [M, G, W, K], where a group's statistics
/// fit a block: as many blocks per group as are resident on the device at once (at least one, at
/// most one per 64 rows), since every further block adds K·W global atomics to the flush.
fn shared_launch(
    k: &Kernels,
    [m, g, w, n]: [i64; 4],
) -> Result<Option<(CudaFunction, LaunchConfig)>, KernelError> {
    let bytes = (n * w + n) * 4;
    if bytes > k.shared_memory_optin() {
        return Ok(None);
    }
    let f = k.function(&SOURCE, "code_stats_shared")?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(KernelError::from("code statistics: shared memory"))?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(SHARED_THREADS, bytes as usize, None)
        .map_err(KernelError::from("code statistics: occupancy"))?
        .max(1) as i64;
    let per_group = (per_sm * k.multiprocessors() / g).clamp(1, (m + 63) / 64);
    let cfg = super::launch_config(per_group as u32, g as u32, SHARED_THREADS, bytes as u32);
    Ok(Some((f, cfg)))
}
