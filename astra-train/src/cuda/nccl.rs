//! NCCL for data-parallel training across GPU processes: a communicator per rank, all-reduce and
//! broadcast on libtorch tensors' memory, on the legacy default stream where libtorch enqueues its
//! own work (see the module docs of [`crate::cuda`]), so a collective is ordered after the
//! backward that wrote the gradients and before the step that reads them, without a sync.
//!
//! The library is the one PyTorch's CUDA wheels ship (`nvidia/nccl/lib/libnccl.so.2`, which
//! libtorch_cuda itself loads). cudarc's NCCL module looks only for `libnccl.so` and
//! CUDA-versioned names, so the seven entry points used here are bound by hand through
//! `libloading` (the loader cudarc uses), from the copy already in this process when there is
//! one.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::train::parallel::{check_kind, Collective};

/// `ncclUniqueId`: 128 opaque bytes that rank 0's launcher makes and every rank joins with.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
type NcclResult = c_int;
/// ncclAllReduce and ncclBroadcast: (send, recv, count, datatype, op or root, comm, stream).
type InPlace = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    Comm,
    *mut c_void,
) -> NcclResult;

struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    all_reduce: InPlace,
    broadcast: InPlace,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    _lib: libloading::Library,
}

// SAFETY: the function pointers and the library handle are immutable after loading.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

fn err(what: &str, reason: impl Into<String>) -> TrainError {
    TrainError::invalid(format!("NCCL {what}"), reason)
}

/// Where libnccl.so.2 is: already mapped into this process (libtorch_cuda loads it), else by
/// its name on the library path.
fn library_path() -> String {
    std::fs::read_to_string("/proc/self/maps")
        .ok()
        .and_then(|maps| {
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| p.contains("/libnccl.so"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "libnccl.so.2".into())
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let path = library_path();
        // SAFETY: loading NCCL runs only its initialisers; the symbols are NCCL's public C API
        // with the signatures of nccl.h (2.x).
        unsafe {
            let lib = libloading::Library::new(&path).map_err(|e| {
                format!("{path} not found ({e}): put the lib folder of PyTorch's nvidia/nccl wheel on LD_LIBRARY_PATH")
            })?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("{path}: {e}"))?
                };
            }
            Ok(Api {
                get_unique_id: sym!(b"ncclGetUniqueId"),
                comm_init_rank: sym!(b"ncclCommInitRank"),
                comm_destroy: sym!(b"ncclCommDestroy"),
                all_reduce: sym!(b"ncclAllReduce"),
                broadcast: sym!(b"ncclBroadcast"),
                error_string: sym!(b"ncclGetErrorString"),
                version: sym!(b"ncclGetVersion"),
                _lib: lib,
            })
        }
    })
    .as_ref()
    .map_err(|e| err("library", e.clone()))
}

fn check(api: &Api, what: &str, r: NcclResult) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr((api.error_string)(r)) };
    Err(err(what, text.to_string_lossy().into_owned()))
}

/// NCCL's version code (e.g. 22703 for 2.27.3).
pub fn version() -> Result<i32> {
    let api = api()?;
    let mut v = 0;
    // SAFETY: writes one int.
    check(api, "version", unsafe { (api.version)(&mut v) })?;
    Ok(v)
}

impl UniqueId {
    /// A fresh id (the launcher's; it travels to the ranks as hex).
    pub fn new() -> Result<Self> {
        let api = api()?;
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: writes the 128-byte id.
        check(api, "unique id", unsafe { (api.get_unique_id)(&mut id) })?;
        Ok(id)
    }

    pub fn to_hex(&self) -> String {
        self.internal
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
            .collect()
    }

    pub fn from_hex(s: &str) -> Result<Self> {
        let bad = || err("unique id", format!("'{s}' is not 256 hex digits"));
        if s.len() != 256 || !s.is_ascii() {
            return Err(bad());
        }
        let mut internal = [0 as c_char; 128];
        for (i, b) in internal.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())? as c_char;
        }
        Ok(UniqueId { internal })
    }
}

/// One rank's communicator.
pub struct NcclGroup {
    comm: Comm,
    rank: usize,
    world: usize,
}

// SAFETY: a communicator is used by one thread at a time (the training loop's).
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

impl NcclGroup {
    /// Joins the group of `world` ranks as `rank` on the current CUDA device (blocks until every
    /// rank has joined). libtorch must have made its context current on that device first.
    pub fn join(id: &UniqueId, rank: usize, world: usize) -> Result<Self> {
        let api = api()?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: NCCL writes the communicator handle.
        let r = unsafe { (api.comm_init_rank)(&mut comm, world as c_int, *id, rank as c_int) };
        check(api, &format!("init of rank {rank} of {world}"), r)?;
        Ok(NcclGroup { comm, rank, world })
    }

    fn dtype(t: &Tensor) -> Result<c_int> {
        check_kind(t)?;
        Ok(match t.kind() {
            Kind::Int64 => 4,
            Kind::Half => 6,
            Kind::Float => 7,
            Kind::Double => 8,
            _ => 9, // BFloat16
        })
    }

    fn buffer(t: &Tensor) -> Result<*mut c_void> {
        if !t.device().is_cuda() || !t.is_contiguous() {
            return Err(err("buffer", "collectives take contiguous CUDA tensors"));
        }
        Ok(t.data_ptr())
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        // 0 = ncclSum.
        self.in_place("all-reduce", |a| a.all_reduce, t)
    }
    fn broadcast(&self, t: &Tensor) -> Result<()> {
        // 0 = root rank 0.
        self.in_place("broadcast", |a| a.broadcast, t)
    }
}

impl NcclGroup {
    /// Runs the collective `pick` in place over `t` with 0 as its op (sum) or root.
    fn in_place(&self, what: &str, pick: impl Fn(&Api) -> InPlace, t: &Tensor) -> Result<()> {
        let api = api()?;
        let (p, dtype) = (Self::buffer(t)?, Self::dtype(t)?);
        // SAFETY: in place over t's numel elements of its kind; the null stream is the legacy
        // default stream.
        let r = unsafe { pick(api)(p, p, t.numel(), dtype, 0, self.comm, std::ptr::null_mut()) };
        check(api, what, r)
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: the handle came from ncclCommInitRank and is destroyed once.
            unsafe { (api.comm_destroy)(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_as_hex_and_bad_hex_is_named() {
        let mut id = UniqueId { internal: [0; 128] };
        id.internal[0] = -1;
        id.internal[127] = 7;
        let back = UniqueId::from_hex(&id.to_hex()).unwrap();
        assert_eq!(back.internal, id.internal);
        let e = UniqueId::from_hex("zz").err().unwrap().to_string();
        assert!(e.contains("not 256 hex digits"), "{e}");
    }
}
