//! The one rule for `--threads` options: 0 means one per core; more than a few threads per core
//! only thrashes (100,000 threads once drove a box's load to 2,800), so such a request is refused.

use crate::error::{QuantError, Result};

/// Threads allowed per core.
pub const PER_CORE: usize = 8;

/// The cores of this machine (1 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `requested` threads, or `default` when 0; an error above [`PER_CORE`] × the cores.
pub fn checked(requested: usize, default: usize) -> Result<usize> {
    let limit = PER_CORE * cores();
    if requested > limit {
        return Err(QuantError::param(
            "threads",
            format!(
                "{requested} is more than {limit} ({PER_CORE} per core on this {}-core machine)",
                cores()
            ),
        ));
    }
    Ok(if requested == 0 { default } else { requested })
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_means_the_default_and_absurd_counts_are_refused() {
        assert_eq!(super::checked(0, 3).unwrap(), 3);
        assert_eq!(super::checked(1, 3).unwrap(), 1);
        let e = super::checked(100_000, 1).unwrap_err().to_string();
        assert!(e.contains("threads") && e.contains("100000"), "{e}");
    }
}
