//! int8 compute for linear layers on the CPU: fbgemm's dynamic int8 linear (int8 weights per
//! output channel, activations quantized per tensor at run time, int32 accumulation), the kernel
//! PyTorch's `quantize_dynamic` runs on x86. tch does not bind libtorch's `quantized::` ops, so
//! csrc/int8_linear.cpp calls them through the dispatcher.
//!
//! Weights are quantized as `quantize-weights --bits 8` stores them (symmetric, scale =
//! max |w| / 127 per output channel), so a model loaded from an 8-bit file computes on exactly
//! its stored integers. Activations are quantized to 7 bits (`reduce_range`, as PyTorch does on
//! x86, where 8-bit products can saturate AVX2's 16-bit accumulation).

use std::ffi::{c_char, c_void, CStr};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

// Tensors cross as libtorch's `at::Tensor*`, which is what tch's tensor pointers are.
extern "C" {
    fn astra_int8_prepack(
        qweight: *const c_void,
        scales: *const c_void,
        bias: *const c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn astra_int8_linear(
        packed: *mut c_void,
        x: *const c_void,
        reduce_range: bool,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn astra_int8_free(packed: *mut c_void);
}

static COMPUTE: AtomicBool = AtomicBool::new(false);

/// Whether the models' linear layers compute in int8 when they run on the CPU without gradients
/// (`astra-eval profile --weights int8`, the sweeps' `--int8-compute`); off by default. A
/// process-wide switch, as libtorch's own backend switches are: every model of the process
/// follows it.
pub fn set_compute(on: bool) {
    COMPUTE.store(on, Ordering::Relaxed);
}

pub fn compute() -> bool {
    COMPUTE.load(Ordering::Relaxed)
}

/// Whether a linear layer should take the int8 path for input `x`: the switch is on, and x is a
/// float CPU tensor outside autograd (training and GPUs keep their float path).
pub fn applies_to(x: &Tensor) -> bool {
    compute() && x.device() == Device::Cpu && x.kind() == Kind::Float && !x.requires_grad()
}

/// A linear layer's weights packed for fbgemm: y = x Wᵀ + b with W in int8.
#[derive(Debug)]
pub struct Int8Linear {
    packed: NonNull<c_void>,
    out_features: i64,
}

// The packed weights are immutable after packing; fbgemm reads them from any thread.
unsafe impl Send for Int8Linear {}
unsafe impl Sync for Int8Linear {}

/// Symmetric int8 per output channel: (integers, scales) of a float [out, in] weight.
pub fn quantize_per_channel(w: &Tensor) -> (Tensor, Tensor) {
    let w = w.to_kind(Kind::Float);
    let scales = w
        .abs()
        .amax([1].as_slice(), false)
        .clamp_min(f32::MIN_POSITIVE as f64)
        / 127.0;
    let q = (&w / scales.unsqueeze(1))
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q, scales)
}

fn call_error(what: &str, err: &[c_char]) -> TrainError {
    let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
    TrainError::invalid("int8 linear", format!("{what}: {msg}"))
}

impl Int8Linear {
    /// Packs a float weight [out, in] (quantized here, per output channel) and optional bias.
    pub fn from_float(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (q, scales) = quantize_per_channel(weight);
        Self::from_int8(&q, &scales, bias)
    }

    /// Packs int8 weights [out, in] with their per-output-channel scales [out].
    pub fn from_int8(q: &Tensor, scales: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let size = q.size();
        if size.len() != 2 || q.kind() != Kind::Int8 || scales.size() != [size[0]] {
            return Err(TrainError::invalid(
                "int8 linear",
                format!(
                    "weights must be int8 [out, in] with scales [out], got {:?} {:?} and scales {:?}",
                    q.kind(),
                    size,
                    scales.size()
                ),
            ));
        }
        let cpu = |t: &Tensor, k: Kind| t.to_device(Device::Cpu).to_kind(k).contiguous();
        let (q, scales) = (cpu(q, Kind::Int8), cpu(scales, Kind::Float));
        let bias = bias.map(|b| cpu(b, Kind::Float));
        let mut err = [0 as c_char; 512];
        let packed = unsafe {
            astra_int8_prepack(
                q.as_ptr() as *const c_void,
                scales.as_ptr() as *const c_void,
                bias.as_ref()
                    .map_or(std::ptr::null(), |b| b.as_ptr() as *const c_void),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        let packed = NonNull::new(packed).ok_or_else(|| call_error("packing", &err))?;
        Ok(Int8Linear {
            packed,
            out_features: size[0],
        })
    }

    pub fn out_features(&self) -> i64 {
        self.out_features
    }

    /// y = x Wᵀ + b for a float CPU tensor x [..., in]; y is float [..., out].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_kind(Kind::Float).contiguous();
        let mut err = [0 as c_char; 512];
        let y = unsafe {
            astra_int8_linear(
                self.packed.as_ptr(),
                x.as_ptr() as *const c_void,
                true,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if y.is_null() {
            return Err(call_error("forward", &err));
        }
        Ok(unsafe { Tensor::from_ptr(y as *mut _) })
    }
}

impl Drop for Int8Linear {
    fn drop(&mut self) {
        unsafe { astra_int8_free(self.packed.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_linear_is_close_to_fp32_and_uses_the_stored_integers() {
        tch::manual_seed(0);
        let w = Tensor::randn([96, 64], (Kind::Float, Device::Cpu)) * 0.05;
        let b = Tensor::randn([96], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([3, 7, 64], (Kind::Float, Device::Cpu));
        let lin = Int8Linear::from_float(&w, Some(&b)).unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.size(), [3, 7, 96]);
        let want = x.matmul(&w.tr()) + &b;
        let rel = f64::try_from((&y - &want).norm() / want.norm()).unwrap();
        assert!(rel < 0.02, "relative error {rel}");
        // The same integers given directly compute the same.
        let (q, s) = quantize_per_channel(&w);
        let again = Int8Linear::from_int8(&q, &s, Some(&b)).unwrap();
        assert!(again.forward(&x).unwrap().equal(&y));
        // Without bias; and refusals in one line.
        let nb = Int8Linear::from_float(&w, None)
            .unwrap()
            .forward(&x)
            .unwrap();
        assert!((&y - &nb - &b).abs().max().double_value(&[]) < 1e-4);
        let e = Int8Linear::from_int8(&w, &s, None).unwrap_err().to_string();
        assert!(e.contains("int8 [out, in]") && !e.contains('\n'), "{e}");
        let bad = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let e = lin.forward(&bad).unwrap_err().to_string();
        assert!(e.contains("int8 linear") && !e.contains('\n'), "{e}");
    }
}
