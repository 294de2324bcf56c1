//! The training quantizer's codewords and straight-through offset in one pass.
//!
//! After the search, the ATen path gathers the codewords X̂, forms the NAQ noise ξ = z·σ + μ from
//! a standard normal draw z, scales it by λ, adds it to X̂ and subtracts X: six launches, each a
//! full pass over [M, D] fp32. Here one thread per element reads x, its index and z once and writes
//! X̂ and the offset (X̂ + λ·ξ) − X, each operation rounded as the ATen op is (no FMA contraction),
//! so both outputs equal the ATen path's bit for bit. z is still drawn by libtorch, so the random
//! stream is the same on both paths.

use tch::{Kind, Tensor};

use super::{int, ptr, KernelError, Kernels, Source};

pub(super) const SOURCE: Source = Source {
    name: "codeword_target",
    text: r#"
// x [B, T, D] fp32 (strides sb, st, 1), idx [B*T, G] int64, cb [G, K, W] fp32 (D = G*W);
// z [B*T, D] or null (no noise), scale/shift [D]: the diagonal NAQ noise z*scale + shift, times
// lambda. Writes x_hat and offset = (x_hat + lambda*noise) - x, both [B*T, D] contiguous.
// An index outside 0..K gives NaN (as the codeword gather does).
extern "C" __global__ void codeword_target(const float* __restrict__ x,
                                           const long long* __restrict__ idx,
                                           const float* __restrict__ cb,
                                           const float* __restrict__ z,
                                           const float* __restrict__ scale,
                                           const float* __restrict__ shift, float lambda,
                                           float* __restrict__ x_hat, float* __restrict__ offset,
                                           long long total, long long T, long long sb,
                                           long long st, int G, int K, int W) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  const int D = G * W;
  const long long m = t / D;
  const int c = (int)(t - m * D), g = c / W, w = c - g * W;
  const long long b = m / T;
  const float xv = x[b * sb + (m - b * T) * st + c];
  const long long code = idx[m * G + g];
  const float h = (code >= 0 && code < K) ? cb[((long long)g * K + code) * W + w]
                                          : __int_as_float(0x7fc00000);
  float target = h;
  if (z != nullptr) {
    const float noise = __fadd_rn(__fmul_rn(z[t], scale[c]), shift[c]);
    target = __fadd_rn(h, __fmul_rn(noise, lambda));
  }
  x_hat[t] = h;
  offset[t] = __fsub_rn(target, xv);
}
"#,
};

/// NAQ's diagonal noise for [`codeword_target`]: a standard normal draw `z` [M, D], the per-dim
/// `scale` (σ) and `shift` (μ) [D], and the weight λ.
pub struct DiagonalNoise<'a> {
    pub z: &'a Tensor,
    pub scale: &'a Tensor,
    pub shift: &'a Tensor,
    pub lambda: f64,
}

/// (X̂, (X̂ + λ·ξ) − X) for `x` [B, T, D] or [M, D] (fp32, unit stride along D) under `indices`
/// [M, G] and `codebook` [G, K, W], both outputs [M, D]; without `noise`, (X̂, X̂ − X).
pub fn codeword_target(
    k: &Kernels,
    x: &Tensor,
    indices: &Tensor,
    codebook: &Tensor,
    noise: Option<&DiagonalNoise>,
) -> Result<(Tensor, Tensor), KernelError> {
    k.check("codebook", codebook, Kind::Float)?;
    k.check("indices", indices, Kind::Int64)?;
    let (cs, is) = (codebook.size(), indices.size());
    let [g, n, w] = cs[..] else {
        return Err(KernelError(format!("codebook {cs:?} is not [G, K, W]")));
    };
    let d = g * w;
    let x3 = match x.dim() {
        2 => x.unsqueeze(0),
        _ => x.shallow_clone(),
    };
    let (xs, st) = (x3.size(), x3.stride());
    if xs.len() != 3 || xs[2] != d || st[2] != 1 || is != [xs[0] * xs[1], g] {
        return Err(KernelError(format!(
            "x {:?} (strides {:?}) and indices {is:?} do not fit a [G, K, W] = {cs:?} codebook",
            x.size(),
            x.stride()
        )));
    }
    if x.kind() != Kind::Float || x.device() != codebook.device() {
        return Err(KernelError(format!(
            "x is {:?} on {:?}, expected fp32 beside the codebook",
            x.kind(),
            x.device()
        )));
    }
    let m = xs[0] * xs[1];
    let x_hat = Tensor::empty([m, d], (Kind::Float, x.device()));
    let offset = x_hat.empty_like();
    let total = m * d;
    if total == 0 {
        return Ok((x_hat, offset));
    }
    if let Some(nz) = noise {
        k.check("noise draw", nz.z, Kind::Float)?;
        k.check("noise scale", nz.scale, Kind::Float)?;
        k.check("noise shift", nz.shift, Kind::Float)?;
        if nz.z.numel() as i64 != total || nz.scale.size() != [d] || nz.shift.size() != [d] {
            return Err(KernelError(format!(
                "noise draw {:?}, scale {:?} and shift {:?} do not fit [{m}, {d}]",
                nz.z.size(),
                nz.scale.size(),
                nz.shift.size()
            )));
        }
    }
    let f = k.function(&SOURCE, "codeword_target")?;
    let (g32, k32, w32) = (int("G", g)?, int("K", n)?, int("W", w)?);
    int("M·D / 256 blocks", total / 256)?;
    let (z, scale, shift, lambda) = match noise {
        Some(nz) => (ptr(nz.z), ptr(nz.scale), ptr(nz.shift), nz.lambda as f32),
        None => (0u64, 0u64, 0u64, 0f32),
    };
    let ptrs = [ptr(&x3), ptr(indices), ptr(codebook), z, scale, shift];
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (((total + 255) / 256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = k.stream().launch_builder(&f);
    use cudarc::driver::PushKernelArg;
    for p in &ptrs {
        launch.arg(p);
    }
    let (po, pf) = (ptr(&x_hat), ptr(&offset));
    launch.arg(&lambda).arg(&po).arg(&pf).arg(&total);
    launch.arg(&xs[1]).arg(&st[0]).arg(&st[1]);
    launch.arg(&g32).arg(&k32).arg(&w32);
    // SAFETY: x is fp32 on this device with unit stride along D and [B, T] rows addressed through
    // its own strides; indices, codebook and the noise tensors are checked contiguous and sized
    // for [M, D]; a bad index reads nothing (NaN); the outputs are fresh [M, D] tensors.
    unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching codeword_target"))?;
    Ok((x_hat, offset))
}
