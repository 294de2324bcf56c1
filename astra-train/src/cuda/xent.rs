//! Softmax cross-entropy and its gradient over a chunk of logits, in place, one block per row
//! ([`crate::models::lm_head`]).
//!
//! The ATen path reads and writes the [C, V] logits about seven times (an fp32 copy, logsumexp,
//! the exponentials, the one-hot, the mask, the copy back); here a block reads its row twice
//! (a running max and sum of exponentials with the argmax, then the exponentials again, mostly
//! from L2) and writes the gradient once, in the logits' own type.

use tch::{Kind, Tensor};

use super::{int, ptr, KernelError, Kernels, Source};

pub(super) const SOURCE: Source = Source {
    name: "softmax_xent",
    text: r#"
// bf16 as its bits, infinity and NaN from theirs: NVRTC compiles without any header.
#define NEG_INF __int_as_float(0xff800000)
#define QNAN __int_as_float(0x7fc00000)
__device__ __forceinline__ float load(const unsigned short* p, long long i) {
  return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ void store(unsigned short* p, long long i, float v) {
  unsigned u = __float_as_uint(v);
  p[i] = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }

// (max, sum of exp(x - max), argmax) of two parts of a row; ties go to the lower index.
struct Part { float m, s; int a; };
__device__ __forceinline__ Part merge(Part x, Part y) {
  if (y.m > x.m || (y.m == x.m && y.a < x.a)) { Part t = x; x = y; y = t; }
  if (y.s == 0.f) return x;
  x.s += y.s * __expf(y.m - x.m);
  return x;
}

template <typename T>
__device__ void xent(T* logits, const long long* targets, float* loss, float* hit, int V,
                     long long stride, long long ignore) {
  __shared__ Part parts[32];
  const long long row = blockIdx.x;
  T* x = logits + row * stride;
  Part p = {NEG_INF, 0.f, V};
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float v = load(x, j);
    if (v > p.m) { p.s = p.s * __expf(p.m - v) + 1.f; p.m = v; p.a = j; }
    else { p.s += __expf(v - p.m); }
  }
  for (int o = 16; o > 0; o >>= 1) {
    Part q = {__shfl_down_sync(0xffffffffu, p.m, o), __shfl_down_sync(0xffffffffu, p.s, o),
              __shfl_down_sync(0xffffffffu, p.a, o)};
    p = merge(p, q);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) parts[warp] = p;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    p = lane < warps ? parts[lane] : Part{NEG_INF, 0.f, V};
    for (int o = 16; o > 0; o >>= 1) {
      Part q = {__shfl_down_sync(0xffffffffu, p.m, o), __shfl_down_sync(0xffffffffu, p.s, o),
                __shfl_down_sync(0xffffffffu, p.a, o)};
      p = merge(p, q);
    }
    if (lane == 0) {
      const long long t = targets[row];
      const bool keep = t != ignore, valid = t >= 0 && t < V;
      const float lse = p.m + __logf(p.s);
      // A target outside the vocabulary makes the row NaN (the trainer then stops and says so)
      // instead of reading outside it. Read before any thread writes the row.
      loss[row] = !keep ? 0.f : valid ? lse - load(x, t) : QNAN;
      hit[row] = keep && p.a == t ? 1.f : 0.f;
      parts[0] = Part{lse, !keep ? 0.f : valid ? 1.f : QNAN, keep && valid ? (int)t : -1};
    }
  }
  __syncthreads();
  const float lse = parts[0].m, keep = parts[0].s;
  const int t = parts[0].a;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float g = keep * (__expf(load(x, j) - lse) - (j == t ? 1.f : 0.f));
    store(x, j, g);
  }
}

extern "C" __global__ void xent_bf16(unsigned short* logits, const long long* targets, float* loss,
                                     float* hit, int V, long long stride, long long ignore) {
  xent(logits, targets, loss, hit, V, stride, ignore);
}
extern "C" __global__ void xent_f32(float* logits, const long long* targets, float* loss,
                                    float* hit, int V, long long stride, long long ignore) {
  xent(logits, targets, loss, hit, V, stride, ignore);
}
"#,
};

/// The kernel form of [`crate::models::lm_head::softmax_cross_entropy_grad`]: `logits` [C, V]
/// (bf16 or fp32; rows contiguous, any row stride ≥ V: a narrow of logits padded for aligned
/// GEMMs) become softmax − one-hot (0 on ignored rows); returns (summed loss, hits) of the kept
/// rows. A target neither in 0..V nor `ignore` makes its row's loss and gradient NaN.
pub fn softmax_xent_grad(
    k: &Kernels,
    logits: &Tensor,
    targets: &Tensor,
    ignore: i64,
) -> Result<(Tensor, Tensor), KernelError> {
    let name = match logits.kind() {
        Kind::BFloat16 => "xent_bf16",
        Kind::Float => "xent_f32",
        other => {
            return Err(KernelError(format!(
                "logits of kind {other:?}: bf16 or fp32 only"
            )))
        }
    };
    k.check("targets", targets, Kind::Int64)?;
    let (s, st) = (logits.size(), logits.stride());
    if s.len() != 2 || targets.size() != s[..1] {
        return Err(KernelError(format!(
            "logits {s:?} and targets {:?} are not [C, V] and [C]",
            targets.size()
        )));
    }
    let (c, v) = (s[0], s[1]);
    if logits.device() != targets.device() || st[1] != 1 || (c > 1 && st[0] < v) {
        return Err(KernelError(format!(
            "logits {s:?} with strides {st:?} on {:?}: rows must be contiguous, apart and beside \
             the targets",
            logits.device()
        )));
    }
    let stride = st[0];
    let loss = Tensor::zeros([c], (Kind::Float, logits.device()));
    let hit = Tensor::zeros([c], (Kind::Float, logits.device()));
    if c > 0 {
        let f = k.function(&SOURCE, name)?;
        let v32 = int("V", v)?;
        u32::try_from(c).map_err(|_| KernelError(format!("{c} rows do not fit a grid")))?;
        let (pl, pt, po, ph) = (ptr(logits), ptr(targets), ptr(&loss), ptr(&hit));
        let cfg = super::launch_config(c as u32, 1, 512, 0);
        let mut launch = k.stream().launch_builder(&f);
        use cudarc::driver::PushKernelArg;
        launch
            .arg(&pl)
            .arg(&pt)
            .arg(&po)
            .arg(&ph)
            .arg(&v32)
            .arg(&stride)
            .arg(&ignore);
        // SAFETY: checked [C, V] logits with contiguous rows `stride` apart (the first C − 1
        // strides inside the tensor's storage, as a view of it) and [C] targets on the device
        // of the targets, which `check` put on this one; one block per row, reading and writing
        // its V entries only; a row's target entry is read only when it lies in 0..V.
        unsafe { launch.launch(cfg) }.map_err(KernelError::from("launching softmax_xent"))?;
    }
    Ok((loss.sum(Kind::Float), hit.sum(Kind::Float)))
}
