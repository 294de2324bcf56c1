//! Nearest codeword of every row and group, distances and argmin fused in one kernel.
//!
//! The ATen path computes the [G, M, K] tile ‖c‖² − 2·x·c with baddbmm and reads it back for the
//! argmin: 3.3 GB per ViT-B/16 block at batch 128. Here only the indices are written. Two kernels:
//! - on tensor cores (`TENSOR_CORE_SOURCE`, groups of ≤ 32 values on compute capability ≥ 8.0:
//!   ViT-B and GPT-2 at G = 32), in 3×TF32, which keeps fp32's accuracy (see there);
//! - on CUDA cores (`SOURCE`: any width, any GPU): a block of 256 threads takes 128 rows of one
//!   group and scans all K codewords in tiles of 128, each thread keeping an 8 × 8 tile of dot
//!   products in registers and the running best of its 8 rows; fused multiply-adds in fp32.
//!
//! The distance is the ATen path's expression, ‖c‖² − 2·x·c (‖x‖² is the same for every codeword
//! of a row). Ties go to the lowest index, as `argmin` does; a row with a NaN gives index 0, as
//! `argmin` does. The paths sum in different orders, so where two codewords' distances are within
//! fp32 rounding of each other they may pick differently (tests/cuda_kernels.rs bounds how often
//! and by how much, for each kernel).

use tch::{Kind, Tensor};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig};

use super::{int, launch_config, ptr, KernelError, Kernels, Source};

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

/// The same search on tensor cores, for groups of at most 32 (ViT-B and GPT-2 at G = 32: 24), on
/// GPUs of compute capability 8.0 and later. A separate source, so that a GPU or NVRTC without TF32
/// `mma` keeps the CUDA-core kernels above.
///
/// TF32 keeps 10 of fp32's 23 mantissa bits, so one TF32 product would pick a different codeword
/// for about one row in a thousand (the issue's Triton probe: 99.88%). Split in the way of CUTLASS's
/// 3×TF32: every value v = hi + lo with hi = tf32(v) and lo = tf32(v − hi), and
/// x·c ≈ hi·hi + hi·lo + lo·hi (the lo·lo term, 2⁻²² of the product, dropped), accumulated in fp32
/// by the tensor cores. The accumulator starts at ‖c‖² and the rows enter as −2x (exact), so the
/// mma gives the distance ‖c‖² − 2·x·c itself. The distances then differ from the fp32 FMA sum by
/// a few fp32 roundings of ‖x‖·‖c‖: the same near-tie bound as the FMA kernel (tests/cuda_kernels.rs).
pub(super) const TENSOR_CORE_SOURCE: Source = Source {
    name: "nearest_codeword_tf32x3",
    text: r#"
#define INF __int_as_float(0x7f800000)
// v rounded to TF32 (round half away from zero, as CUTLASS does), as the bits of an fp32 value.
__device__ __forceinline__ unsigned tf32_bits(float v) {
  return (__float_as_uint(v) + 0x1000u) & 0xffffe000u;
}
__device__ __forceinline__ void split(float v, unsigned& hi, unsigned& lo) {
  hi = tf32_bits(v);
  lo = tf32_bits(v - __uint_as_float(hi));
}
// d += a·b for one 16 x 8 tile: a 16 x 8 (rows), b 8 x 8 (columns), TF32 in, fp32 accumulate.
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A warp's 16 MT rows of group g as A fragments (-2x split into hi and lo; zeros past the last
// row and column), which of the rows hold a NaN, and each row's best codeword so far. A row with a
// NaN has NaN distances to every codeword: it gives index 0, as the FMA kernel and ATen's argmin
// do (tensor cores do not carry NaN through as CUDA cores do).
template <int S, int MT>
struct RowTiles {
  unsigned ah[MT][S][4], al[MT][S][4];
  bool nan_row[MT][2];
  float best[MT][2];
  int bi[MT][2];

  __device__ __forceinline__ void load(const float* __restrict__ x, int row0, int M, int G, int g,
                                       int W, int gid, int tig) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      nan_row[m][0] = nan_row[m][1] = false;
      best[m][0] = best[m][1] = INF;
      bi[m][0] = bi[m][1] = 0;
#pragma unroll
      for (int s = 0; s < S; ++s)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int row = row0 + m * 16 + gid + (q & 1) * 8, col = s * 8 + tig + (q >> 1) * 4;
          const float v =
              (row < M && col < W) ? -2.f * x[((long long)row * G + g) * W + col] : 0.f;
          nan_row[m][q & 1] |= v != v;
          split(v, ah[m][s][q], al[m][s][q]);
        }
    }
  }

  // Distances to 8 codewords (B fragments bh/bl, norms c0/c1 of this lane's two columns, the
  // first of them `code`), folded into the running best.
  __device__ __forceinline__ void scan8(const unsigned (&bh)[S][2], const unsigned (&bl)[S][2],
                                        float c0, float c1, int code) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float d[4] = {c0, c1, c0, c1};
      // The small terms first, then the large one.
#pragma unroll
      for (int s = 0; s < S; ++s) { mma(d, al[m][s], bh[s]); mma(d, ah[m][s], bl[s]); }
#pragma unroll
      for (int s = 0; s < S; ++s) mma(d, ah[m][s], bh[s]);
      // Codes in increasing order and a strict '<': the lowest index wins a tie.
      if (d[0] < best[m][0]) { best[m][0] = d[0]; bi[m][0] = code; }
      if (d[1] < best[m][0]) { best[m][0] = d[1]; bi[m][0] = code + 1; }
      if (d[2] < best[m][1]) { best[m][1] = d[2]; bi[m][1] = code; }
      if (d[3] < best[m][1]) { best[m][1] = d[3]; bi[m][1] = code + 1; }
    }
  }

  // A row's candidates are in the 4 lanes of its gid: the lowest distance (lowest index on a
  // tie) is its index, 0 for a row with a NaN.
  __device__ __forceinline__ void write(long long* __restrict__ out, int row0, int M, int G, int g,
                                        int gid, int tig) const {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float d = best[m][h];
        int c = bi[m][h], has_nan = nan_row[m][h];
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
          const float d2 = __shfl_xor_sync(0xffffffffu, d, off);
          const int c2 = __shfl_xor_sync(0xffffffffu, c, off);
          has_nan |= __shfl_xor_sync(0xffffffffu, has_nan, off);
          if (d2 < d || (d2 == d && c2 < c)) { d = d2; c = c2; }
        }
        const int row = row0 + m * 16 + h * 8 + gid;
        if (tig == 0 && row < M) out[(long long)row * G + g] = has_nan ? 0 : c;
      }
  }
};

// ‖c‖² of codeword `code` of group g in the FMA kernel's order (its W values loaded at once);
// +inf past the last codeword, so that one is never chosen.
template <int KW>
__device__ __forceinline__ float norm2(const float* __restrict__ cbg, int code, int K, int W) {
  if (code >= K) return INF;
  float v[KW], s2 = 0.f;
#pragma unroll
  for (int k = 0; k < KW; ++k) v[k] = k < W ? cbg[(long long)code * W + k] : 0.f;
#pragma unroll
  for (int k = 0; k < KW; ++k)
    if (k < W) s2 = fmaf(v[k], v[k], s2);
  return s2;
}

// x [M, G, W], codebook [G, K, W] (fp32, contiguous; W <= 8 S) -> out [M, G] int64.
// Codewords streamed: a block of 4 warps takes 4 * MT * 16 rows of one group; each warp keeps its
// rows' A fragments (hi and lo) in registers and scans the codewords, staged BN at a time in
// shared memory, 8 per mma. For codebooks too large for `nearest_tc_resident` below.
// Fragment layouts are PTX's for m16n8k8 (.tf32): lane = 4 * gid + tig; A holds rows gid and
// gid + 8, columns tig and tig + 4; B column gid, rows tig and tig + 4; C rows gid and gid + 8,
// columns 2 tig and 2 tig + 1.
// Measured on an H200 (ViT-B's 25,088 rows, G = 32, K = 1,024): MT = 4 1.10 ms, MT = 2 1.22 ms;
// codewords split once per tile into (hi, lo) pairs in shared memory 1.37-1.40 ms (the 64-bit
// loads collide on banks); separate accumulators for the small and large terms 1.17 ms.
template <int S, int MT>
__device__ __forceinline__ void nearest_tc(const float* __restrict__ x,
                                           const float* __restrict__ cb,
                                           long long* __restrict__ out, int M, int G, int K,
                                           int W) {
  constexpr int BN = 128, KW = 8 * S, STRIDE = KW + 4;  // + 4: B fragment loads hit 32 banks
  __shared__ float cs[BN * STRIDE];
  __shared__ float cn[BN];
  const int g = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int row0 = blockIdx.x * (4 * MT * 16) + warp * MT * 16;
  RowTiles<S, MT> rows;
  rows.load(x, row0, M, G, g, W, gid, tig);
  const float* cbg = cb + (long long)g * K * W;
  for (int n0 = 0; n0 < K; n0 += BN) {
    __syncthreads();  // the previous tile's readers are done
    for (int e = threadIdx.x; e < BN * KW; e += blockDim.x) {
      const int c = e / KW, k = e - c * KW, code = n0 + c;
      cs[c * STRIDE + k] = (code < K && k < W) ? cbg[(long long)code * W + k] : 0.f;
    }
    __syncthreads();
    // ‖c‖² in the FMA kernel's order; +inf past the last codeword, so it is never chosen.
    for (int c = threadIdx.x; c < BN; c += blockDim.x) {
      float s2 = 0.f;
      for (int k = 0; k < W; ++k) s2 = fmaf(cs[c * STRIDE + k], cs[c * STRIDE + k], s2);
      cn[c] = n0 + c < K ? s2 : INF;
    }
    __syncthreads();
#pragma unroll 2
    for (int j = 0; j < BN / 8; ++j) {
      unsigned bh[S][2], bl[S][2];
      const float* col = cs + (j * 8 + gid) * STRIDE + tig;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        split(col[s * 8], bh[s][0], bl[s][0]);
        split(col[s * 8 + 4], bh[s][1], bl[s][1]);
      }
      rows.scan8(bh, bl, cn[j * 8 + 2 * tig], cn[j * 8 + 2 * tig + 1], n0 + j * 8 + 2 * tig);
    }
  }
  rows.write(out, row0, M, G, g, gid, tig);
}

// The same search with the group's whole codebook resident in shared memory (dynamic: 8 KW K
// bytes + 4 K, 196 KiB at K = 1,024 and W = 24): each block fills it once, already split into hi
// and lo and laid out as the B fragments a lane loads (one 64-bit load per k-step and half, the
// warp's 32 lanes on consecutive words: no bank conflict), with the norms beside it; then its
// warps take 16 MT rows at a time, block after block of the same group, with no barrier and no
// split of codewords in the scan. Blocks per group: grid x; groups: grid y.
template <int S, int MT>
__device__ __forceinline__ void nearest_tc_resident(const float* __restrict__ x,
                                                    const float* __restrict__ cb,
                                                    long long* __restrict__ out, int M, int G,
                                                    int K, int W) {
  constexpr int KW = 8 * S;
  extern __shared__ uint2 resident[];
  const int Kp = (K + 7) & ~7;
  uint2* bhs = resident;                      // [Kp / 8][S][32 lanes] (hi of rows tig, tig + 4)
  uint2* bls = resident + Kp / 8 * S * 32;    // the same for lo
  float* cn = (float*)(bls + Kp / 8 * S * 32);  // [Kp]
  const int g = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3, warps = blockDim.x >> 5;
  const float* cbg = cb + (long long)g * K * W;
  for (int e = threadIdx.x; e < Kp / 8 * S * 32; e += blockDim.x) {
    const int l = e & 31, s = (e >> 5) % S, j = (e >> 5) / S;
    const int code = j * 8 + (l >> 2), k0 = s * 8 + (l & 3);
    const float v0 = (code < K && k0 < W) ? cbg[(long long)code * W + k0] : 0.f;
    const float v1 = (code < K && k0 + 4 < W) ? cbg[(long long)code * W + k0 + 4] : 0.f;
    split(v0, bhs[e].x, bls[e].x);
    split(v1, bhs[e].y, bls[e].y);
  }
  for (int c = threadIdx.x; c < Kp; c += blockDim.x) cn[c] = norm2<KW>(cbg, c, K, W);
  __syncthreads();
  const int tasks = (M + 16 * MT - 1) / (16 * MT);
  for (int t = blockIdx.x * warps + warp; t < tasks; t += gridDim.x * warps) {
    const int row0 = t * 16 * MT;
    RowTiles<S, MT> rows;
    rows.load(x, row0, M, G, g, W, gid, tig);
#pragma unroll 2
    for (int j = 0; j < Kp / 8; ++j) {
      unsigned bh[S][2], bl[S][2];
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const uint2 h = bhs[(j * S + s) * 32 + lane], l = bls[(j * S + s) * 32 + lane];
        bh[s][0] = h.x; bh[s][1] = h.y; bl[s][0] = l.x; bl[s][1] = l.y;
      }
      const float2 c = *(const float2*)(cn + j * 8 + 2 * tig);
      rows.scan8(bh, bl, c.x, c.y, j * 8 + 2 * tig);
    }
    rows.write(out, row0, M, G, g, gid, tig);
  }
}

// One kernel per number of 8-wide k-steps S. Streamed: four 16-row tiles per warp where the A
// fragments leave registers to spare (S <= 3: 96 of them), two at S = 4. Resident: 16 warps of
// two tiles each (at most 128 registers a thread), one block per multiprocessor (its shared
// memory); measured on an H200 (ViT-B's rows, K = 1,024, W = 24): 0.66 ms, against 0.66 with 12
// warps of two tiles and 0.94 / 0.96 with 8 warps of four / three (more warps hide the latency
// of the mma chains better than more tiles per warp; GPT-2's 8,192 rows 0.22 / 0.25 / 0.30 ms).
#define NEAREST_TC(S, MT)                                                                      \
  extern "C" __global__ void __launch_bounds__(128)                                           \
      nearest_codeword_tf32x3_##S(const float* __restrict__ x, const float* __restrict__ cb,   \
                                  long long* __restrict__ out, int M, int G, int K, int W) {   \
    nearest_tc<S, MT>(x, cb, out, M, G, K, W);                                                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(512, 1)                                        \
      nearest_codeword_tf32x3_resident_##S(const float* __restrict__ x,                        \
                                           const float* __restrict__ cb,                       \
                                           long long* __restrict__ out, int M, int G, int K,   \
                                           int W) {                                            \
    nearest_tc_resident<S, 2>(x, cb, out, M, G, K, W);                                         \
  }
NEAREST_TC(1, 4)
NEAREST_TC(2, 4)
NEAREST_TC(3, 4)
NEAREST_TC(4, 2)
"#,
};

/// Widest group the narrow kernel takes (WN in the source).
const NARROW_WIDTH: i64 = 32;

/// Rows per block of the FMA kernels (BM in the source).
const ROWS_PER_BLOCK: i64 = 128;

/// Threads of a block of the resident tensor-core kernel (`nearest_tc_resident`: 16 warps of two
/// 16-row tiles).
const RESIDENT_THREADS: u32 = 512;

/// Whether the fused search fills the device for M rows in G groups of `width` values and
/// `codes` codewords: the streamed kernels run one block per 128 (tensor cores: 256) rows and
/// group and scan all K codewords in each, the resident one a block per multiprocessor with at
/// least one 16-row tile per warp; so a small batch (one device's share at inference: a few
/// hundred rows, G = 1) would occupy a handful of the device's multiprocessors while a matmul +
/// argmin spreads over all of them. Below one block per multiprocessor the ATen search is the
/// faster of the two (and is exact as well).
pub fn fills_device(k: &Kernels, rows: i64, groups: i64, width: i64, codes: i64) -> bool {
    let per_block = rows_per_block(search_for(k, width, codes), width);
    (rows + per_block - 1) / per_block * groups >= k.multiprocessors()
}

/// Rows of one group a block of `search`'s kernel takes (the resident kernel: at least): 4 warps
/// of 4 (at 25–32 values, 2) tiles of 16 rows on tensor cores with the codewords streamed, 16 warps
/// of 2 with them resident (NEAREST_TC in the source), BM on CUDA cores.
fn rows_per_block(search: Search, width: i64) -> i64 {
    let tiles = if (width + 7) / 8 <= 3 { 4 } else { 2 };
    match search {
        Search::TensorCores => 4 * tiles * 16,
        Search::TensorCoresResident => (RESIDENT_THREADS / 32) as i64 * 2 * 16,
        Search::Fma => ROWS_PER_BLOCK,
    }
}

/// Which kernel searches: FMAs on CUDA cores (any width, any GPU), or 3×TF32 on tensor cores with
/// the codewords streamed through shared memory tile by tile (any K) or resident there (a group's
/// codebook within one block's shared memory: 196 KiB at K = 1,024 and W = 24).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    Fma,
    TensorCores,
    TensorCoresResident,
}

/// The search [`nearest_codeword`] runs for groups of `width` and `codes` codewords: tensor cores
/// where the group fits their kernels and the GPU has them (the codebook resident where it fits),
/// unless `ASTRA_NEAREST` (read once) asks for `fma` or for the `streamed` tensor-core kernel.
pub fn search_for(k: &Kernels, width: i64, codes: i64) -> Search {
    static ASKED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let asked = ASKED.get_or_init(|| std::env::var("ASTRA_NEAREST").unwrap_or_default());
    if width > NARROW_WIDTH || !k.has_tf32_mma() || asked == "fma" {
        Search::Fma
    } else if resident_fits(k, width, codes) && asked != "streamed" {
        Search::TensorCoresResident
    } else {
        Search::TensorCores
    }
}

/// Whether a group's codebook of `codes` codewords of `width` values fits one block's shared memory
/// on `k`'s device (the resident kernel's condition; its groups are at most 32 wide).
pub fn resident_fits(k: &Kernels, width: i64, codes: i64) -> bool {
    width <= NARROW_WIDTH && resident_bytes(width, codes) <= k.shared_memory_optin()
}

/// Dynamic shared memory of the resident kernel for `codes` codewords of `width` values: hi and
/// lo of every value (padded to 8-wide k-steps and to tiles of 8 codewords) and a norm per codeword.
fn resident_bytes(width: i64, codes: i64) -> i64 {
    let (kw, padded) = ((width + 7) / 8 * 8, (codes + 7) / 8 * 8);
    padded * kw * 8 + padded * 4
}

/// Indices [M, G] (int64) of the nearest codeword of each row of `x` [M, G, W] in its group's
/// codebook `codebook` [G, K, W]; both fp32, contiguous, on the device of `k`. Tensor cores where
/// [`search_for`] says so and their source compiled, else the FMA kernels.
pub fn nearest_codeword(k: &Kernels, x: &Tensor, codebook: &Tensor) -> Result<Tensor, KernelError> {
    // Bad inputs are the caller's error whichever kernel runs: said as such, not as a fallback.
    let [_, _, w, n] = checked_shape(k, x, codebook)?;
    let search = search_for(k, w, n);
    if search != Search::Fma {
        // A failed compile (an old NVRTC) is said once; the FMA kernel then does the search.
        if let Some(idx) = or_fma(nearest_codeword_with(k, x, codebook, search)) {
            return Ok(idx);
        }
    }
    nearest_codeword_with(k, x, codebook, Search::Fma)
}

/// [M, G, W, K] of rows `x` [M, G, W] and `codebook` [G, K, W], both contiguous fp32 on `k`'s
/// device, or why not.
fn checked_shape(k: &Kernels, x: &Tensor, codebook: &Tensor) -> Result<[i64; 4], KernelError> {
    k.check("rows", x, Kind::Float)?;
    k.check("codebook", codebook, Kind::Float)?;
    let (xs, cs) = (x.size(), codebook.size());
    if xs.len() != 3 || cs.len() != 3 || xs[1] != cs[0] || xs[2] != cs[2] {
        return Err(KernelError(format!(
            "rows {xs:?} and codebook {cs:?} are not [M, G, W] and [G, K, W]"
        )));
    }
    Ok([xs[0], xs[1], xs[2], cs[1]])
}

/// The tensor-core search's result, or None after saying (once per process) why not.
fn or_fma(r: Result<Tensor, KernelError>) -> Option<Tensor> {
    static SAID: std::sync::Once = std::sync::Once::new();
    super::said_once(r, &SAID, "searching on CUDA cores")
}

/// [`nearest_codeword`] with the kernel chosen by the caller (tests and benchmarks compare them).
pub fn nearest_codeword_with(
    k: &Kernels,
    x: &Tensor,
    codebook: &Tensor,
    search: Search,
) -> Result<Tensor, KernelError> {
    let [m, g, w, n] = checked_shape(k, x, codebook)?;
    let out = Tensor::empty([m, g], (Kind::Int64, x.device()));
    if m == 0 {
        return Ok(out);
    }
    if search != Search::Fma && w > NARROW_WIDTH {
        return Err(KernelError(format!(
            "the tensor-core search takes groups of at most {NARROW_WIDTH}, not {w}"
        )));
    }
    let steps = (w + 7) / 8;
    let (m32, g32, k32, w32) = (int("M", m)?, int("G", g)?, int("K", n)?, int("W", w)?);
    let (px, pc, po) = (ptr(x), ptr(codebook), ptr(&out));
    let blocks = |per_block: i64| ((m + per_block - 1) / per_block) as u32;
    let (f, cfg) = match search {
        Search::TensorCoresResident => {
            let name = format!("nearest_codeword_tf32x3_resident_{steps}");
            let f = k.function(&TENSOR_CORE_SOURCE, &name)?;
            let cfg = resident_launch(k, &f, [m, g, w, n])?;
            (f, cfg)
        }
        Search::TensorCores => (
            k.function(
                &TENSOR_CORE_SOURCE,
                &format!("nearest_codeword_tf32x3_{steps}"),
            )?,
            launch_config(blocks(rows_per_block(search, w)), g32 as u32, 128, 0),
        ),
        Search::Fma => (
            k.function(
                &SOURCE,
                if w <= NARROW_WIDTH {
                    "nearest_codeword_narrow"
                } else {
                    "nearest_codeword"
                },
            )?,
            launch_config(blocks(ROWS_PER_BLOCK), g32 as u32, 256, 0),
        ),
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

/// The resident kernel's launch for [M, G, W, K]: as many blocks per group as fill the device
/// once (resident blocks per multiprocessor × multiprocessors / G, at least one, at most one per
/// 16-row tile), each with the group's codebook in its shared memory.
fn resident_launch(
    k: &Kernels,
    f: &CudaFunction,
    [m, g, w, n]: [i64; 4],
) -> Result<LaunchConfig, KernelError> {
    let bytes = resident_bytes(w, n);
    if !resident_fits(k, w, n) {
        return Err(KernelError(format!(
            "a codebook of {n} × {w} needs {bytes} bytes of shared memory, a block has {}",
            k.shared_memory_optin()
        )));
    }
    let smem = bytes as u32;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(KernelError::from("resident search: shared memory"))?;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(RESIDENT_THREADS, smem as usize, None)
        .map_err(KernelError::from("resident search: occupancy"))?
        .max(1) as i64;
    let per_group = (per_sm * k.multiprocessors() / g).clamp(1, (m + 15) / 16);
    Ok(launch_config(
        per_group as u32,
        int("G", g)? as u32,
        RESIDENT_THREADS,
        smem,
    ))
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
    let cfg = super::grid_1d(total, 256);
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
