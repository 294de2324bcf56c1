//! Nearest codeword of every row and group, distances and argmin fused in one kernel.
//!
//! The ATen path computes the [G, M, K] tile ‖c‖² − 2·x·c with baddbmm and reads it back for the
//! argmin: 3.3 GB per ViT-B/16 block at batch 128. Here a block of 256 threads takes 128 rows of
//! one group and scans all K codewords in tiles of 128, each thread keeping an 8 × 8 tile of dot
//! products in registers and the running best of its 8 rows; only the indices are written.
//!
//! The distance is the same fp32 expression as the ATen path's, ‖c‖² − 2·x·c (‖x‖² is the same
//! for every codeword of a row), accumulated with fused multiply-adds on CUDA cores, not TF32.
//! Ties go to the lowest index, as `argmin` does; an all-NaN row gives index 0, as `argmin` does.
//! The two paths sum in different orders, so where two codewords' distances are within fp32
//! rounding of each other they may pick differently (tests/cuda_kernels.rs bounds how often and
//! by how much).

use tch::{Kind, Tensor};

use super::{int, ptr, KernelError, Kernels, Source};

pub(super) const SOURCE: Source = Source {
    name: "nearest_codeword",
    text: r#"
#define BM 128
#define BN 128
#define BK 8
#define TM 8
#define TN 8
// x [M, G, W], codebook [G, K, W] (fp32, contiguous) -> out [M, G] int64.
// Thread (tx, ty) of the 16 x 16 block owns rows ty + 16 i and codes tx + 16 j of the tile.
extern "C" __global__ void __launch_bounds__(256)
nearest_codeword(const float* __restrict__ x, const float* __restrict__ cb,
                 long long* __restrict__ out, int M, int G, int K, int W) {
  __shared__ float xs[BK][BM];
  __shared__ float cs[BK][BN];
  const int g = blockIdx.y, row0 = blockIdx.x * BM;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float best_d[TM];
  int best_i[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) { best_d[i] = __int_as_float(0x7f800000); best_i[i] = 0; }
  for (int n0 = 0; n0 < K; n0 += BN) {
    float acc[TM][TN], cn[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      cn[j] = 0.f;
#pragma unroll
      for (int i = 0; i < TM; ++i) acc[i][j] = 0.f;
    }
    for (int k0 = 0; k0 < W; k0 += BK) {
      // Stage BK columns of the 128 rows and of the 128 codewords (zeros past the edges).
      for (int e = tid; e < BM * BK; e += 256) {
        const int r = e / BK, k = e % BK, kk = k0 + k;
        const int row = row0 + r, code = n0 + r;
        xs[k][r] = (row < M && kk < W) ? x[((long long)row * G + g) * W + kk] : 0.f;
        cs[k][r] = (code < K && kk < W) ? cb[((long long)g * K + code) * W + kk] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = xs[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          b[j] = cs[k][tx + 16 * j];
          cn[j] = fmaf(b[j], b[j], cn[j]);
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Codes in increasing order and a strict '<': the lowest index wins a tie.
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int code = n0 + tx + 16 * j;
      if (code < K) {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const float d = cn[j] - 2.f * acc[i][j];
          if (d < best_d[i]) { best_d[i] = d; best_i[i] = code; }
        }
      }
    }
  }
  // The 16 threads of a row are 16 consecutive lanes of one warp: reduce with shuffles.
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    float d = best_d[i];
    int c = best_i[i];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float d2 = __shfl_xor_sync(0xffffffffu, d, off);
      const int c2 = __shfl_xor_sync(0xffffffffu, c, off);
      if (d2 < d || (d2 == d && c2 < c)) { d = d2; c = c2; }
    }
    const int row = row0 + ty + 16 * i;
    if (tx == 0 && row < M) out[(long long)row * G + g] = c;
  }
}

// The same search for narrow groups (W <= WN, e.g. D = 768 in G = 32 groups of 24): each block
// stages its 128 rows once and each tile of 128 codewords whole, so a tile costs two barriers
// instead of two per 8 columns, and the rows are read from memory once instead of once per tile.
// Rows are padded by one float so the transposing stores do not collide on a bank.
#define WN 32
extern "C" __global__ void __launch_bounds__(256)
nearest_codeword_narrow(const float* __restrict__ x, const float* __restrict__ cb,
                        long long* __restrict__ out, int M, int G, int K, int W) {
  __shared__ float xs[WN][BM + 1];
  __shared__ float cs[WN][BN + 1];
  const int g = blockIdx.y, row0 = blockIdx.x * BM;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int e = tid; e < BM * W; e += 256) {
    const int r = e / W, k = e - r * W, row = row0 + r;
    xs[k][r] = row < M ? x[((long long)row * G + g) * W + k] : 0.f;
  }
  float best_d[TM];
  int best_i[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) { best_d[i] = __int_as_float(0x7f800000); best_i[i] = 0; }
  for (int n0 = 0; n0 < K; n0 += BN) {
    for (int e = tid; e < BN * W; e += 256) {
      const int r = e / W, k = e - r * W, code = n0 + r;
      cs[k][r] = code < K ? cb[((long long)g * K + code) * W + k] : 0.f;
    }
    __syncthreads();
    float acc[TM][TN], cn[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      cn[j] = 0.f;
#pragma unroll
      for (int i = 0; i < TM; ++i) acc[i][j] = 0.f;
    }
#pragma unroll 4
    for (int k = 0; k < W; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = xs[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        b[j] = cs[k][tx + 16 * j];
        cn[j] = fmaf(b[j], b[j], cn[j]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int code = n0 + tx + 16 * j;
      if (code < K) {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const float d = cn[j] - 2.f * acc[i][j];
          if (d < best_d[i]) { best_d[i] = d; best_i[i] = code; }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    float d = best_d[i];
    int c = best_i[i];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float d2 = __shfl_xor_sync(0xffffffffu, d, off);
      const int c2 = __shfl_xor_sync(0xffffffffu, c, off);
      if (d2 < d || (d2 == d && c2 < c)) { d = d2; c = c2; }
    }
    const int row = row0 + ty + 16 * i;
    if (tx == 0 && row < M) out[(long long)row * G + g] = c;
  }
}

// Codewords of indices: out [M, G, W] = codebook[g, idx[m, g], :]. An index outside 0..K (which
// the search never gives, but a caller's indices might) gives NaN rather than a stray read.
extern "C" __global__ void gather_codewords(const float* __restrict__ cb,
                                            const long long* __restrict__ idx,
                                            float* __restrict__ out, long long total, int G, int K,
                                            int W) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= total) return;
  const long long mg = t / W;
  const int w = (int)(t - mg * W), g = (int)(mg % G);
  const long long c = idx[mg];
  out[t] = (c >= 0 && c < K) ? cb[((long long)g * K + c) * W + w] : __int_as_float(0x7fc00000);
}
"#,
};

/// Widest group the narrow kernel takes (WN in the source).
const NARROW_WIDTH: i64 = 32;

/// Rows per block (BM in the source).
const ROWS_PER_BLOCK: i64 = 128;

/// Whether the fused search fills the device for M rows in G groups: it runs one block per 128
/// rows and group and scans all K codewords in each, so a small batch (one device's share at
/// inference: a few hundred rows, G = 1) would occupy a handful of the device's multiprocessors
/// while a matmul + argmin spreads over all of them. Below one block per multiprocessor the ATen
/// search is the faster of the two (and is exact as well).
pub fn fills_device(k: &Kernels, rows: i64, groups: i64) -> bool {
    (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK * groups >= k.multiprocessors()
}

/// Indices [M, G] (int64) of the nearest codeword of each row of `x` [M, G, W] in its group's
/// codebook `codebook` [G, K, W]; both fp32, contiguous, on the device of `k`.
pub fn nearest_codeword(k: &Kernels, x: &Tensor, codebook: &Tensor) -> Result<Tensor, KernelError> {
    k.check("rows", x, Kind::Float)?;
    k.check("codebook", codebook, Kind::Float)?;
    let (xs, cs) = (x.size(), codebook.size());
    if xs.len() != 3 || cs.len() != 3 || xs[1] != cs[0] || xs[2] != cs[2] {
        return Err(KernelError(format!(
            "rows {xs:?} and codebook {cs:?} are not [M, G, W] and [G, K, W]"
        )));
    }
    let (m, g, w, n) = (xs[0], xs[1], xs[2], cs[1]);
    let out = Tensor::empty([m, g], (Kind::Int64, x.device()));
    if m == 0 {
        return Ok(out);
    }
    let name = if w <= NARROW_WIDTH {
        "nearest_codeword_narrow"
    } else {
        "nearest_codeword"
    };
    let f = k.function(&SOURCE, name)?;
    let (m32, g32, k32, w32) = (int("M", m)?, int("G", g)?, int("K", n)?, int("W", w)?);
    let (px, pc, po) = (ptr(x), ptr(codebook), ptr(&out));
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (
            ((m + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK) as u32,
            g32 as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = k.stream().launch_builder(&f);
    use cudarc::driver::PushKernelArg;
    launch
        .arg(&px)
        .arg(&pc)
        .arg(&po)
        .arg(&m32)
        .arg(&g32)
        .arg(&k32)
        .arg(&w32);
    // SAFETY: the pointers are the checked, contiguous fp32/int64 tensors above, which stay alive
    // (x and codebook borrowed, out owned) until the launch is enqueued on libtorch's stream.
    unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching nearest_codeword"))?;
    Ok(out)
}

/// Codewords [M, G, W] of indices `idx` [M, G] (int64) in `codebook` [G, K, W] (fp32): the
/// decode of [`GroupedVq`](crate::models::vq::GroupedVq) in one coalesced pass (ATen's
/// index_select over 24-float rows is ten times slower). An index outside 0..K gives NaN.
pub fn gather_codewords(
    k: &Kernels,
    codebook: &Tensor,
    idx: &Tensor,
) -> Result<Tensor, KernelError> {
    k.check("codebook", codebook, Kind::Float)?;
    k.check("indices", idx, Kind::Int64)?;
    let (cs, is) = (codebook.size(), idx.size());
    if cs.len() != 3 || is.len() != 2 || is[1] != cs[0] {
        return Err(KernelError(format!(
            "codebook {cs:?} and indices {is:?} are not [G, K, W] and [M, G]"
        )));
    }
    let (m, g, n, w) = (is[0], cs[0], cs[1], cs[2]);
    let out = Tensor::empty([m, g, w], (Kind::Float, codebook.device()));
    let total = m * g * w;
    if total == 0 {
        return Ok(out);
    }
    let f = k.function(&SOURCE, "gather_codewords")?;
    let (g32, k32, w32) = (int("G", g)?, int("K", n)?, int("W", w)?);
    int("M·G·W / 256 blocks", total / 256)?;
    let (pc, pi, po) = (ptr(codebook), ptr(idx), ptr(&out));
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (((total + 255) / 256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = k.stream().launch_builder(&f);
    use cudarc::driver::PushKernelArg;
    launch
        .arg(&pc)
        .arg(&pi)
        .arg(&po)
        .arg(&total)
        .arg(&g32)
        .arg(&k32)
        .arg(&w32);
    // SAFETY: checked contiguous tensors on this device; the kernel reads the codebook only at
    // indices it has checked to be in 0..K and writes out's M·G·W elements.
    unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching gather_codewords"))?;
    Ok(out)
}
