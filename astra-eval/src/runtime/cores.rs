//! Pinning local workers to disjoint cores (`--pin-cores`). N workers on one host otherwise
//! share every core: the scheduler moves their libtorch threads across each other's caches,
//! which N separate devices would not do. Pinning gives each worker (and the single device)
//! its own `threads` cores, as a device of its own would have.

use crate::error::{EvalError, Result};

/// The cores this process may run on, in order (Linux; elsewhere, 0..available_parallelism).
pub fn allowed() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if unsafe { libc::sched_getaffinity(0, size, &mut set) } == 0 {
            return (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect();
        }
    }
    (0..astra_quant::threads::cores()).collect()
}

/// Worker `rank`'s cores: the rank-th run of `threads` among `allowed`.
pub fn share(allowed: &[usize], devices: usize, threads: usize, rank: usize) -> Result<Vec<usize>> {
    if threads == 0 || devices * threads > allowed.len() {
        return Err(EvalError::Invalid(format!(
            "--pin-cores needs {devices} × {threads} cores (devices × threads per worker); this process may use {}",
            allowed.len()
        )));
    }
    Ok(allowed[rank * threads..(rank + 1) * threads].to_vec())
}

/// Pins the calling thread, and so every thread it starts afterwards (libtorch's pool, the
/// readers), to `cores`.
pub fn pin(cores: &[usize]) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as in `allowed`; CPU_SET indexes within the set for cores < CPU_SETSIZE.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cores {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(EvalError::Invalid(format!("core {c} is out of range")));
            }
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
            return Err(EvalError::Invalid(format!(
                "pinning to cores {cores:?}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cores;
        Err(EvalError::Invalid("--pin-cores needs Linux".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_disjoint_runs_and_too_many_is_refused() {
        let allowed = [0, 1, 2, 3, 8, 9, 10, 11];
        assert_eq!(share(&allowed, 4, 2, 2).unwrap(), vec![8, 9]);
        assert_eq!(share(&allowed, 2, 4, 1).unwrap(), vec![8, 9, 10, 11]);
        let e = share(&allowed, 4, 3, 0).unwrap_err().to_string();
        assert!(
            e.contains("--pin-cores needs 4 × 3 cores") && e.contains("may use 8"),
            "{e}"
        );
        assert!(share(&allowed, 1, 0, 0).is_err());
    }

    #[test]
    fn pinning_restricts_this_thread() {
        let all = allowed();
        let one = all[all.len() - 1];
        std::thread::spawn(move || {
            pin(&[one]).unwrap();
            assert_eq!(allowed(), vec![one]);
        })
        .join()
        .unwrap();
    }
}
