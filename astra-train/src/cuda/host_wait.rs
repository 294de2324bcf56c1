//! How a process's host threads wait for its CUDA work: `ASTRA_CUDA_HOST_WAIT=spin|yield|block`
//! (unset: the driver's choice, which spins while the process has fewer contexts than cores).
//! Several worker processes sharing one GPU each spin a core at every synchronisation, and the
//! threads that carry their messages then wait for a core; blocking sync frees it.
//!
//! The policy is a flag of the device's primary context, which libtorch uses: it must be set
//! before libtorch first touches the device.

use cudarc::driver::sys::{self, CUctx_flags, CUresult};
use tch::Device;

use super::KernelError;

/// The variable that names the policy.
pub const HOST_WAIT_ENV: &str = "ASTRA_CUDA_HOST_WAIT";

/// Sets the policy `ASTRA_CUDA_HOST_WAIT` names on `device`'s primary context; the policy set, or
/// None (not CUDA, or the variable unset).
pub fn apply_from_env(device: Device) -> Result<Option<String>, KernelError> {
    let Device::Cuda(ordinal) = device else {
        return Ok(None);
    };
    let Ok(name) = std::env::var(HOST_WAIT_ENV) else {
        return Ok(None);
    };
    let flag = match name.as_str() {
        "spin" => CUctx_flags::CU_CTX_SCHED_SPIN,
        "yield" => CUctx_flags::CU_CTX_SCHED_YIELD,
        "block" => CUctx_flags::CU_CTX_SCHED_BLOCKING_SYNC,
        other => {
            return Err(KernelError(format!(
                "{HOST_WAIT_ENV}={other}: expected spin, yield or block"
            )))
        }
    };
    // SAFETY: only tries to dlopen the library by name.
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError(format!(
            "{HOST_WAIT_ENV}={name}: no CUDA driver library (libcuda.so)"
        )));
    }
    let check = |what: &str, r: CUresult| match r {
        CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(KernelError(format!(
            "{HOST_WAIT_ENV}={name}: {what}: {e:?}"
        ))),
    };
    let mut dev = 0;
    // SAFETY: plain driver calls on out-parameters owned here; the library is present.
    unsafe {
        check("cuInit", sys::cuInit(0))?;
        check("cuDeviceGet", sys::cuDeviceGet(&mut dev, ordinal as i32))?;
        check(
            "cuDevicePrimaryCtxSetFlags",
            sys::cuDevicePrimaryCtxSetFlags_v2(dev, flag as u32),
        )?;
    }
    Ok(Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_do_off_cuda() {
        assert_eq!(apply_from_env(Device::Cpu).unwrap(), None);
    }
}
