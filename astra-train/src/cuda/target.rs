//! The training quantizer's codewords and straight-through offset (or value) in one pass.
//!
//! After the search, the ATen path gathers the codewords X̂, forms the NAQ noise ξ = z·σ + μ from
//! a standard normal draw z, scales it by λ, adds it to X̂, subtracts X and adds the offset back to
//! X: seven launches, each a full pass over [M, D] fp32. Here one thread per element reads x, its
//! index and z once and writes X̂ and either the offset (X̂ + λ·ξ) − X or the value X + offset
//! (in place over a copy of X: [`codeword_value_in_place`]), each operation rounded as the ATen op
//! is (no FMA contraction), so the outputs equal the ATen path's bit for bit. z is still drawn by
//! libtorch, so the random stream is the same on both paths.

use tch::{Kind, Tensor};

use super::{int, ptr, KernelError, Kernels, Source};

pub(super) const SOURCE: Source = Source {
    name: "codeword_target",
    text: r#"
// x [B, T, D] fp32 (strides sb, st, 1), idx [B*T, G] int64, cb [G, K, W] fp32 (D = G*W);
// z [B*T, D] or null (no noise), scale/shift [D]: the diagonal NAQ noise z*scale + shift, times
// lambda. Writes x_hat and out = offset = (x_hat + lambda*noise) - x, both [B*T, D] contiguous,
// or (value != 0) out = x + offset, where out may be x itself (each thread reads its element
// before it writes it, so neither pointer is __restrict__). An index outside 0..K gives NaN (as
// the codeword gather does).
extern "C" __global__ void codeword_target(const float* x,
                                           const long long* __restrict__ idx,
                                           const float* __restrict__ cb,
                                           const float* __restrict__ z,
                                           const float* __restrict__ scale,
                                           const float* __restrict__ shift, float lambda,
                                           float* __restrict__ x_hat, float* out, int value,
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
  const float offset = __fsub_rn(target, xv);
  out[t] = value ? __fadd_rn(xv, offset) : offset;
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
    let m = checked_rows(k, x, indices, codebook, noise)?;
    let d = codebook.size()[0] * codebook.size()[2];
    let x_hat = Tensor::empty([m, d], (Kind::Float, x.device()));
    let offset = x_hat.empty_like();
    launch(k, x, indices, codebook, noise, (&x_hat, &offset, false))?;
    Ok((x_hat, offset))
}

/// X̂ of `rows` [M, D] (fp32, contiguous; a copy the caller owns) under `indices` [M, G] and
/// `codebook` [G, K, W], with `rows` overwritten by the value X + ((X̂ + λ·ξ) − X), rounded as
/// the ATen path's `x + offset`.
pub fn codeword_value_in_place(
    k: &Kernels,
    rows: &Tensor,
    indices: &Tensor,
    codebook: &Tensor,
    noise: Option<&DiagonalNoise>,
) -> Result<Tensor, KernelError> {
    k.check("rows", rows, Kind::Float)?;
    let m = checked_rows(k, rows, indices, codebook, noise)?;
    let d = codebook.size()[0] * codebook.size()[2];
    let x_hat = Tensor::empty([m, d], (Kind::Float, rows.device()));
    launch(k, rows, indices, codebook, noise, (&x_hat, rows, true))?;
    Ok(x_hat)
}

/// M, the rows of `x` [B, T, D] or [M, D], once `x`, the indices, the codebook and the noise
/// are checked to fit each other.
fn checked_rows(
    k: &Kernels,
    x: &Tensor,
    indices: &Tensor,
    codebook: &Tensor,
    noise: Option<&DiagonalNoise>,
) -> Result<i64, KernelError> {
    k.check("codebook", codebook, Kind::Float)?;
    k.check("indices", indices, Kind::Int64)?;
    let (cs, is) = (codebook.size(), indices.size());
    let [g, _, w] = cs[..] else {
        return Err(KernelError(format!("codebook {cs:?} is not [G, K, W]")));
    };
    let d = g * w;
    let (xs, st) = rows_view(x);
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
    if let Some(nz) = noise {
        k.check("noise draw", nz.z, Kind::Float)?;
        k.check("noise scale", nz.scale, Kind::Float)?;
        k.check("noise shift", nz.shift, Kind::Float)?;
        if nz.z.numel() as i64 != m * d || nz.scale.size() != [d] || nz.shift.size() != [d] {
            return Err(KernelError(format!(
                "noise draw {:?}, scale {:?} and shift {:?} do not fit [{m}, {d}]",
                nz.z.size(),
                nz.scale.size(),
                nz.shift.size()
            )));
        }
    }
    Ok(m)
}

/// Sizes and strides of `x` as [B, T, D] ([M, D] as [1, M, D]).
fn rows_view(x: &Tensor) -> (Vec<i64>, Vec<i64>) {
    let x3 = match x.dim() {
        2 => x.unsqueeze(0),
        _ => x.shallow_clone(),
    };
    (x3.size(), x3.stride())
}

/// Launches the kernel on checked inputs: writes X̂ into `x_hat` and the offset, or the value
/// (`value`), into `out` (which may be `x`).
fn launch(
    k: &Kernels,
    x: &Tensor,
    indices: &Tensor,
    codebook: &Tensor,
    noise: Option<&DiagonalNoise>,
    (x_hat, out, value): (&Tensor, &Tensor, bool),
) -> Result<(), KernelError> {
    let total = x_hat.numel() as i64;
    if total == 0 {
        return Ok(());
    }
    let [g, n, w] = codebook.size()[..] else {
        unreachable!("checked_rows saw [G, K, W]")
    };
    let (xs, st) = rows_view(x);
    let f = k.function(&SOURCE, "codeword_target")?;
    let (g32, k32, w32) = (int("G", g)?, int("K", n)?, int("W", w)?);
    int("M·D / 256 blocks", total / 256)?;
    let (z, scale, shift, lambda) = match noise {
        Some(nz) => (ptr(nz.z), ptr(nz.scale), ptr(nz.shift), nz.lambda as f32),
        None => (0u64, 0u64, 0u64, 0f32),
    };
    let ptrs = [ptr(x), ptr(indices), ptr(codebook), z, scale, shift];
    let cfg = super::grid_1d(total, 256);
    let mut launch = k.stream().launch_builder(&f);
    use cudarc::driver::PushKernelArg;
    for p in &ptrs {
        launch.arg(p);
    }
    let (po, pf, as_value) = (ptr(x_hat), ptr(out), value as i32);
    launch
        .arg(&lambda)
        .arg(&po)
        .arg(&pf)
        .arg(&as_value)
        .arg(&total);
    launch.arg(&xs[1]).arg(&st[0]).arg(&st[1]);
    launch.arg(&g32).arg(&k32).arg(&w32);
    // SAFETY: x is fp32 on this device with unit stride along D and [B, T] rows addressed through
    // its own strides; indices, codebook and the noise tensors are checked contiguous and sized
    // for [M, D]; a bad index reads nothing (NaN); x_hat and out are [M, D] contiguous (out is
    // either fresh or x itself, contiguous, each element read before it is written).
    unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching codeword_target"))?;
    Ok(())
}
