//! CUDA kernels for ASTRA's hot spots, written in CUDA C, compiled at run time with NVRTC and
//! launched through cudarc on the memory of libtorch tensors.
//!
//! - [`nearest`]: the nearest codeword of every row and group, distances and argmin fused so the
//!   [G, M, K] distance tile is never written;
//! - [`ema`]: the per-code counts and sums of the EMA codebook update in one scatter;
//! - [`target`]: the training quantizer's codewords and straight-through offset (NAQ noise
//!   included) in one pass;
//! - [`adamw`]: an AdamW step over the flat parameter buffer in one pass;
//! - [`xent`]: a language model's softmax cross-entropy and its gradient, in place, one pass.
//!
//! They run in libtorch's context (the device's primary context, which cudarc retains as well) and
//! on the legacy default stream: tch never makes another stream current, so that is where libtorch
//! enqueues its own work, and a kernel here is ordered after the ops that made its inputs and before
//! those that read its outputs without any synchronisation. Outputs are allocated by libtorch (its
//! caching allocator owns all memory); kernels only read and write through data pointers.
//!
//! Each source is compiled once per process and device. Without a CUDA driver or NVRTC, or with
//! `ASTRA_CUDA_KERNELS=0`, [`kernels`] returns None and callers keep their ATen path; why the
//! kernels are off is said once, in one line.

pub mod adamw;
pub mod ema;
pub mod host_wait;
pub mod nccl;
pub mod nearest;
pub mod target;
pub mod xent;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use tch::{Device, Kind, Tensor};

/// Why a kernel could not be built or launched (one line).
#[derive(Debug, thiserror::Error)]
#[error("CUDA kernel: {0}")]
pub struct KernelError(pub String);

impl KernelError {
    fn from<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> KernelError + '_ {
        move |e| KernelError(format!("{what}: {e}"))
    }
}

/// The kernels of one CUDA device: its context, the stream libtorch uses, the compiled modules.
pub struct Kernels {
    ordinal: usize,
    stream: Arc<CudaStream>,
    /// `compute_XY` of the device, the architecture NVRTC compiles for.
    arch: String,
    /// The X of compute capability X.Y.
    major: i32,
    /// Streaming multiprocessors: a kernel with fewer blocks than this leaves the device idle.
    sms: i64,
    /// Shared memory one block may have when it asks for it (dynamic, past the default 48 KiB).
    smem_optin: i64,
    /// Compiled sources, or why one did not compile (said once; never retried: a failed NVRTC
    /// run costs tens of milliseconds, every call).
    modules: Mutex<HashMap<&'static str, Result<Arc<CudaModule>, String>>>,
}

/// A kernel source: a name for the cache and error messages, and its CUDA C text.
pub struct Source {
    pub name: &'static str,
    pub text: &'static str,
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Option<Arc<Kernels>>>>> = OnceLock::new();
static ENABLED: OnceLock<AtomicBool> = OnceLock::new();

fn enabled_flag() -> &'static AtomicBool {
    ENABLED.get_or_init(|| {
        let off = std::env::var("ASTRA_CUDA_KERNELS").is_ok_and(|v| v == "0" || v == "off");
        AtomicBool::new(!off)
    })
}

/// Turns the kernels on or off for this process (benchmarks and tests compare both paths; the
/// environment variable `ASTRA_CUDA_KERNELS=0` sets the initial state).
pub fn set_enabled(on: bool) {
    enabled_flag().store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    enabled_flag().load(Ordering::Relaxed)
}

/// The kernels of `device`, or None (not CUDA, turned off, or no driver/NVRTC: said once).
pub fn kernels(device: Device) -> Option<Arc<Kernels>> {
    let Device::Cuda(ordinal) = device else {
        return None;
    };
    if !enabled() {
        return None;
    }
    let mut devices = DEVICES.get_or_init(Default::default).lock().ok()?;
    devices
        .entry(ordinal)
        .or_insert_with(|| match Kernels::open(ordinal) {
            Ok(k) => Some(Arc::new(k)),
            Err(e) => {
                eprintln!("astra: CUDA kernels off on cuda:{ordinal} ({e}); using the ATen path");
                None
            }
        })
        .clone()
}

impl Kernels {
    fn open(ordinal: usize) -> Result<Self, KernelError> {
        // SAFETY: only tries to dlopen the library by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError("no CUDA driver library (libcuda.so)".into()));
        }
        if !nvrtc_available() {
            return Err(KernelError(
                "NVRTC not found (libnvrtc.so.13): put the lib folder of PyTorch's nvidia/cu13 \
                 wheel on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(KernelError::from("context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(KernelError::from("compute capability"))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(KernelError::from("multiprocessor count"))?;
        let smem_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(KernelError::from("shared memory per block"))?;
        Ok(Kernels {
            ordinal,
            stream: ctx.default_stream(),
            arch: format!("compute_{major}{minor}"),
            major,
            sms: sms as i64,
            smem_optin: smem_optin as i64,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Function `name` of `src`, compiling the source on first use.
    pub fn function(&self, src: &Source, name: &str) -> Result<CudaFunction, KernelError> {
        let module = {
            let mut modules = self
                .modules
                .lock()
                .map_err(|_| KernelError("module cache poisoned".into()))?;
            let m = modules
                .entry(src.name)
                .or_insert_with(|| self.compile(src).map_err(|e| e.0));
            m.clone().map_err(KernelError)?
        };
        module
            .load_function(name)
            .map_err(KernelError::from(&format!("{}: function {name}", src.name)))
    }

    fn compile(&self, src: &Source) -> Result<Arc<CudaModule>, KernelError> {
        let ptx = ptx_of(src, &self.arch)?;
        self.stream
            .context()
            .load_module(ptx)
            .map_err(KernelError::from(&format!("loading {}", src.name)))
    }

    pub fn multiprocessors(&self) -> i64 {
        self.sms
    }

    /// Bytes of shared memory a block can have (opting in past the default 48 KiB).
    pub fn shared_memory_optin(&self) -> i64 {
        self.smem_optin
    }

    /// Whether the device has TF32 tensor cores (`mma … .tf32`: compute capability 8.0 on).
    pub fn has_tf32_mma(&self) -> bool {
        self.major >= 8
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Checks that `t` lives on this device, has kind `kind` and is contiguous: kernels index
    /// its memory directly.
    pub fn check(&self, what: &str, t: &Tensor, kind: Kind) -> Result<(), KernelError> {
        if t.device() != Device::Cuda(self.ordinal) {
            return Err(KernelError(format!(
                "{what} is on {:?}, not cuda:{}",
                t.device(),
                self.ordinal
            )));
        }
        if t.kind() != kind || !t.is_contiguous() {
            return Err(KernelError(format!(
                "{what} must be contiguous {kind:?} (is {:?}, contiguous: {})",
                t.kind(),
                t.is_contiguous()
            )));
        }
        Ok(())
    }
}

/// A launch of `blocks` × `groups` blocks (grid x, y) of `threads` threads with `smem` bytes of
/// dynamic shared memory.
pub(crate) fn launch_config(blocks: u32, groups: u32, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, groups, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// One thread per element of `total`, `threads` to a block (the caller has checked that the
/// block count fits a grid).
pub(crate) fn grid_1d(total: i64, threads: u32) -> LaunchConfig {
    let t = threads as i64;
    launch_config(((total + t - 1) / t) as u32, 1, threads, 0)
}

/// Every kernel source, for the check that they compile ([`ptx_of`]; no GPU needed).
#[cfg(test)]
const SOURCES: [&Source; 6] = [
    &adamw::SOURCE,
    &ema::SOURCE,
    &nearest::SOURCE,
    &nearest::TENSOR_CORE_SOURCE,
    &target::SOURCE,
    &xent::SOURCE,
];

/// `src` compiled by NVRTC for `arch` (`compute_XY`); the error names the source and the
/// compiler's first error line.
pub(crate) fn ptx_of(src: &Source, arch: &str) -> Result<cudarc::nvrtc::Ptx, KernelError> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        name: Some(format!("{}.cu", src.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src.text, opts).map_err(|e| {
        // The compiler's log names the line; the error's Debug form is a struct dump.
        let why = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => log
                .to_string_lossy()
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or_default()
                .to_string(),
            other => format!("{other:?}"),
        };
        KernelError(format!("NVRTC on {}: {why}", src.name))
    })
}

/// Whether NVRTC can be loaded (by name, or from beside libtorch): kernels compile without a GPU.
pub(crate) fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by name.
    let by_name = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    by_name || preload_nvrtc_beside_libtorch()
}

/// Loads NVRTC from the CUDA libraries that came with libtorch (PyTorch's wheels keep them in
/// `site-packages/nvidia/*/lib`, beside `torch/lib`, where the loader does not look by itself).
/// Once loaded, cudarc's dlopen by soname finds it. True when it was found.
fn preload_nvrtc_beside_libtorch() -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let Some(torch_lib) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cuda.so") || p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| std::path::Path::new(p).parent().map(|d| d.to_path_buf()))
    else {
        return false;
    };
    let Ok(dirs) = std::fs::read_dir(torch_lib.join("../../nvidia")) else {
        return false;
    };
    // NVRTC opens its builtins by soname, which the loader does not find in that folder either:
    // loaded first, the later dlopen finds them already mapped.
    dirs.flatten().map(|d| d.path().join("lib")).any(|lib| {
        load_first(&lib, "libnvrtc-builtins.so.");
        load_first(&lib, "libnvrtc.so.")
    })
}

/// Loads, for the rest of the process, the first file of `dir` whose name starts with `prefix`
/// (NVRTC's libraries: `.alt` variants do not match); true when one loaded.
fn load_first(dir: &std::path::Path, prefix: &str) -> bool {
    let Ok(files) = std::fs::read_dir(dir) else {
        return false;
    };
    for f in files.flatten().map(|f| f.path()) {
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with(prefix) {
            // SAFETY: loading NVRTC's libraries runs no code of ours; kept loaded for the process.
            if let Ok(l) = unsafe { libloading::Library::new(&f) } {
                std::mem::forget(l);
                return true;
            }
        }
    }
    false
}

/// The kernel's result, or None after saying (once per process) why the ATen path takes over.
pub fn or_aten<T>(r: Result<T, KernelError>) -> Option<T> {
    static SAID: std::sync::Once = std::sync::Once::new();
    said_once(r, &SAID, "using the ATen path")
}

/// `r`'s value, or None after saying (once per `said`) why, and what takes over (`then`).
pub(crate) fn said_once<T>(
    r: Result<T, KernelError>,
    said: &'static std::sync::Once,
    then: &str,
) -> Option<T> {
    r.map_err(|e| said.call_once(|| eprintln!("astra: {e}; {then}")))
        .ok()
}

/// The device address of a tensor's first element, as a kernel argument.
pub fn ptr(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

/// A size as a kernel's `int` argument.
pub fn int(what: &str, n: i64) -> Result<i32, KernelError> {
    i32::try_from(n).map_err(|_| KernelError(format!("{what} = {n} does not fit a kernel's int")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles for the GPUs we run on (A100, H100/H200), here, without a GPU: an
    /// error in a kernel's C would otherwise only show on the GPU machine, as the ATen fallback.
    /// Skipped where NVRTC cannot be loaded (set-up without PyTorch's CUDA wheels).
    #[test]
    fn every_kernel_source_compiles_with_nvrtc() {
        if !nvrtc_available() {
            eprintln!("NVRTC not found: the kernel compile check is skipped here");
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            for src in SOURCES {
                if let Err(e) = ptx_of(src, arch) {
                    panic!("{arch}: {e}");
                }
            }
        }
    }
}
