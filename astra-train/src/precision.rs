//! bf16 autocast on CUDA. tch's `autocast` uses libtorch's default CUDA autocast dtype (fp16) and
//! deprecated entry points that print a warning on every call; libtorch's C API has nothing
//! better, so the C++ functions are looked up by their (Itanium-mangled, stable across 2.x) names
//! in the loaded libtorch_cpu.so.

use crate::error::{Result, TrainError};

/// c10::DeviceType::CUDA and c10::ScalarType::BFloat16.
const DEVICE_CUDA: i8 = 1;
const SCALAR_BF16: i8 = 15;

type SetDtype = unsafe extern "C" fn(i8, i8);
type SetEnabled = unsafe extern "C" fn(i8, bool);
type IsEnabled = unsafe extern "C" fn(i8) -> bool;
type ClearCache = unsafe extern "C" fn();

struct Hooks {
    set_dtype: SetDtype,
    set_enabled: SetEnabled,
    is_enabled: IsEnabled,
    clear_cache: ClearCache,
}

fn hooks() -> Result<&'static Hooks> {
    static HOOKS: std::sync::OnceLock<std::result::Result<Hooks, String>> =
        std::sync::OnceLock::new();
    HOOKS
        .get_or_init(|| {
            // SAFETY: libtorch_cpu.so is already loaded (RTLD_NOLOAD only returns its handle, which
            // is kept for the life of the process); the signatures take one-byte enums and a bool
            // by value, passed as integers under the x86-64 SysV ABI.
            unsafe {
                let lib = libloading::os::unix::Library::open(Some("libtorch_cpu.so"), libc_flags())
                    .map_err(|e| format!("libtorch_cpu.so is not loaded: {e}"))?;
                let get = |name: &[u8]| lib.get::<*const ()>(name).map(|s| *s).map_err(|e| format!("{e}"));
                let hooks = Hooks {
                    set_dtype: std::mem::transmute::<*const (), SetDtype>(get(b"_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE\0")?),
                    set_enabled: std::mem::transmute::<*const (), SetEnabled>(get(b"_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb\0")?),
                    is_enabled: std::mem::transmute::<*const (), IsEnabled>(get(b"_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE\0")?),
                    clear_cache: std::mem::transmute::<*const (), ClearCache>(get(b"_ZN2at8autocast11clear_cacheEv\0")?),
                };
                std::mem::forget(lib);
                Ok(hooks)
            }
        })
        .as_ref()
        .map_err(|e| TrainError::invalid("bf16 autocast", e.clone()))
}

fn libc_flags() -> std::os::raw::c_int {
    const RTLD_LAZY: std::os::raw::c_int = 0x1;
    const RTLD_NOLOAD: std::os::raw::c_int = 0x4;
    RTLD_LAZY | RTLD_NOLOAD
}

/// Runs `f` under CUDA autocast in bfloat16 (when `enabled`), restoring the previous state after.
pub fn bf16_autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> Result<T> {
    if !enabled {
        return Ok(f());
    }
    let h = hooks()?;
    // SAFETY: see `hooks`.
    let prev = unsafe {
        let prev = (h.is_enabled)(DEVICE_CUDA);
        (h.set_dtype)(DEVICE_CUDA, SCALAR_BF16);
        (h.set_enabled)(DEVICE_CUDA, true);
        prev
    };
    let out = f();
    // SAFETY: see `hooks`.
    unsafe {
        (h.set_enabled)(DEVICE_CUDA, prev);
        // Leaving the outermost region: drop the bf16 copies autocast cached of the fp32 weights,
        // as torch.autocast's __exit__ does. Kept, the next step would run on the copies made
        // before the optimizer moved the weights.
        if !prev {
            (h.clear_cache)();
        }
    }
    Ok(out)
}

/// Whether CUDA autocast is on here (in bf16: the only type [`bf16_autocast`] sets).
pub fn cuda_autocast_on() -> bool {
    // SAFETY: see `hooks`.
    hooks().is_ok_and(|h| unsafe { (h.is_enabled)(DEVICE_CUDA) })
}

/// The type a GEMM would cast `t` to here: bf16 for an fp32 CUDA tensor under autocast, its own
/// type otherwise (for operands made once instead of cast at every GEMM).
pub fn gemm_kind(t: &tch::Tensor) -> tch::Kind {
    if t.device().is_cuda() && t.kind() == tch::Kind::Float && cuda_autocast_on() {
        tch::Kind::BFloat16
    } else {
        t.kind()
    }
}

/// Runs `f` with CUDA autocast off (restoring the previous state after). Nearest-codeword search
/// needs fp32: under bf16 autocast ‖c‖² − 2·x·c keeps ~3 significant digits, so the argmin picks
/// among near-ties at random and the EMA codebook drifts to the mean.
pub fn without_autocast<T>(f: impl FnOnce() -> T) -> T {
    // No hooks (libtorch without the symbols): autocast can never have been enabled either.
    let Ok(h) = hooks() else {
        return f();
    };
    // SAFETY: see `hooks`.
    let prev = unsafe { (h.is_enabled)(DEVICE_CUDA) };
    if !prev {
        return f();
    }
    unsafe { (h.set_enabled)(DEVICE_CUDA, false) };
    let out = f();
    // SAFETY: see `hooks`.
    unsafe { (h.set_enabled)(DEVICE_CUDA, prev) };
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hooks_resolve_in_this_libtorch() {
        // Touch libtorch so libtorch_cpu.so is certainly mapped.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(super::bf16_autocast(true, || 7).unwrap(), 7);
    }
}
