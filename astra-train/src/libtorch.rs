//! What libtorch this process runs on and what accelerators it sees (`astra-train info`).

use serde::Serialize;

/// Re-executes this program with OMP_WAIT_POLICY=PASSIVE unless the user set a policy. libgomp
/// (libtorch's OpenMP) spins its idle threads by default; with many small ops on a few cores that
/// spinning took 57% of a small ViT's training time here and made it 2.8× slower (measured). The
/// variable is read when libgomp loads, before main, hence the re-exec.
pub fn ensure_passive_openmp() {
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .exec();
        eprintln!("note: could not re-execute with OMP_WAIT_POLICY=PASSIVE ({err}); continuing");
    }
}

/// `cpu`, `cuda` or `cuda:N`, checked against what this process sees.
pub fn parse_device(s: &str) -> Result<tch::Device, String> {
    let device = match s {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(i) => tch::Device::Cuda(i),
            None => return Err(format!("--device: '{s}' is not cpu, cuda or cuda:N")),
        },
    };
    if let tch::Device::Cuda(i) = device {
        if !tch::Cuda::is_available() || i as i64 >= tch::Cuda::device_count() {
            return Err(format!(
                "--device {s}: no such CUDA device here (see `astra-train info`)"
            ));
        }
    }
    Ok(device)
}

#[derive(Debug, Serialize)]
pub struct RuntimeInfo {
    /// Version of the libtorch the binary was built against.
    pub libtorch_build_version: String,
    /// Version of the libtorch actually loaded (read beside the loaded libtorch_cpu.so).
    pub libtorch_loaded_version: String,
    pub libtorch_loaded_from: String,
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cuda_devices: Vec<String>,
    pub cudnn_available: bool,
    pub cudnn_version: Option<i64>,
    pub cuda_runtime_version: Option<i64>,
    pub cpu_threads: i32,
    pub mkl: bool,
    pub openmp: bool,
}

impl RuntimeInfo {
    pub fn collect() -> Self {
        let cuda_available = tch::Cuda::is_available();
        let cuda_device_count = tch::Cuda::device_count();
        let (loaded_from, loaded_version) = loaded_libtorch();
        let cudnn_available = cuda_available && tch::Cuda::cudnn_is_available();
        RuntimeInfo {
            libtorch_build_version: option_env!("ASTRA_LIBTORCH_BUILD_VERSION")
                .unwrap_or("unknown")
                .to_string(),
            libtorch_loaded_version: loaded_version,
            libtorch_loaded_from: loaded_from,
            cuda_available,
            cuda_device_count,
            cuda_devices: if cuda_available {
                cuda_device_names(cuda_device_count)
            } else {
                Vec::new()
            },
            cudnn_available,
            cudnn_version: cudnn_available.then(tch::utils::version_cudnn),
            cuda_runtime_version: tch::utils::has_cudart().then(tch::utils::version_cudart),
            cpu_threads: tch::utils::get_num_threads(),
            mkl: tch::utils::has_mkl(),
            openmp: tch::utils::has_openmp(),
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "libtorch        {} (built against {})\n",
            self.libtorch_loaded_version, self.libtorch_build_version
        );
        s += &format!("loaded from     {}\n", self.libtorch_loaded_from);
        s += &format!(
            "CUDA            {} ({} device{})\n",
            if self.cuda_available {
                "available"
            } else {
                "not available"
            },
            self.cuda_device_count,
            if self.cuda_device_count == 1 { "" } else { "s" }
        );
        for (i, name) in self.cuda_devices.iter().enumerate() {
            s += &format!("  cuda:{i}         {name}\n");
        }
        if let Some(v) = self.cuda_runtime_version {
            s += &format!("CUDA runtime    {}.{}\n", v / 1000, (v % 1000) / 10);
        }
        s += &format!(
            "cuDNN           {}\n",
            match self.cudnn_version {
                Some(v) => format!("available (version {v})"),
                None => "not available".into(),
            }
        );
        s += &format!(
            "CPU threads     {} (MKL {}, OpenMP {})\n",
            self.cpu_threads,
            yes_no(self.mkl),
            yes_no(self.openmp)
        );
        s
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Path and version of the libtorch_cpu.so mapped into this process.
fn loaded_libtorch() -> (String, String) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let Some(path) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
    else {
        return ("unknown".into(), "unknown".into());
    };
    let lib = std::path::Path::new(path);
    let root = lib.parent().and_then(|p| p.parent());
    let version = root
        .and_then(|r| {
            std::fs::read_to_string(r.join("build-version"))
                .ok()
                .map(|v| v.trim().to_string())
                .or_else(|| {
                    let py = std::fs::read_to_string(r.join("version.py")).ok()?;
                    py.lines()
                        .find_map(|l| l.strip_prefix("__version__ = "))
                        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
                })
        })
        .unwrap_or_else(|| "unknown".into());
    (path.to_string(), version)
}

/// Device names through the CUDA driver API (libtorch's C API, and so tch, does not expose them).
fn cuda_device_names(count: i64) -> Vec<String> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuDeviceGetName = unsafe extern "C" fn(*mut std::ffi::c_char, i32, i32) -> i32;
    let fallback = || (0..count).map(|i| format!("device {i}")).collect();
    // SAFETY: the driver library and these three entry points have had these C signatures since
    // CUDA 2.0; every buffer passed is owned here and sized as declared.
    unsafe {
        let Ok(lib) = libloading::Library::new("libcuda.so.1") else {
            return fallback();
        };
        let (Ok(init), Ok(get), Ok(name)) = (
            lib.get::<CuInit>(b"cuInit\0"),
            lib.get::<CuDeviceGet>(b"cuDeviceGet\0"),
            lib.get::<CuDeviceGetName>(b"cuDeviceGetName\0"),
        ) else {
            return fallback();
        };
        if init(0) != 0 {
            return fallback();
        }
        (0..count as i32)
            .map(|i| {
                let mut dev = 0i32;
                let mut buf = [0 as std::ffi::c_char; 256];
                if get(&mut dev, i) != 0 || name(buf.as_mut_ptr(), buf.len() as i32, dev) != 0 {
                    return format!("device {i}");
                }
                std::ffi::CStr::from_ptr(buf.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

/// Copies a host tensor to `device` without a stream synchronisation: a blocking copy waits for
/// every kernel already queued, idling the GPU while the host queues the next ones. From pageable
/// memory a non-blocking copy is still safe (CUDA stages the bytes before returning); pinning
/// would overlap more, but tch can only pin through a call libtorch 2.11 warns about every time.
pub fn upload(t: &tch::Tensor, device: tch::Device) -> tch::Tensor {
    if device.is_cuda() {
        t.to_device_(device, t.kind(), true, false)
    } else {
        t.to_device(device)
    }
}
