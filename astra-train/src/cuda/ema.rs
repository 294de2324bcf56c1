//! Per-code counts and sums of a batch (the EMA codebook update's statistics) in one scatter.
//!
//! The ATen path builds a ones vector and runs two index_adds (counts, then sums) over the same
//! indices; here one thread per element adds its value to its code's sum, and the first thread of
//! each row also counts it. Float atomics make the order of additions (and so the last bits of a
//! sum) vary from run to run, as ATen's CUDA index_add does.

use tch::{Kind, Tensor};

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
"#,
};

/// (counts [G, K], sums [G, K, W]) of rows `x` [M, G, W] (fp32) under indices `idx` [M, G]
/// (int64, each in 0..K).
pub fn code_stats(
    k: &Kernels,
    x: &Tensor,
    idx: &Tensor,
    codes: i64,
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
    let f = k.function(&SOURCE, "code_stats")?;
    let (m32, g32, k32, w32) = (int("M", m)?, int("G", g)?, int("K", codes)?, int("W", w)?);
    int("M·G·W / 256 blocks", total / 256)?;
    let (px, pi, pc, ps) = (ptr(x), ptr(idx), ptr(&counts), ptr(&sums));
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (((total + 255) / 256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
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
    // nearest-codeword search over K codewords), so every slot is inside counts and sums.
    unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching code_stats"))?;
    Ok((counts, sums))
}
