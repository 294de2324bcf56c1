//! `fake:N[xSIZE]`: random images for benchmarks and smoke runs where the pixels do not matter
//! (latency of a model at a given resolution, codebooks for a randomly initialised model), in
//! the spirit of torchvision's FakeData. Pixels and labels are a pure function of (split, index),
//! so every reader sees the same data; nothing is kept in memory.

use super::ImageSet;
use crate::error::{Result, TrainError};

/// Channels and classes of fake images (RGB, ten classes).
const CHANNELS: usize = 3;
const CLASSES: usize = 10;

pub struct FakeImages {
    len: usize,
    side: usize,
    /// Distinguishes the splits.
    salt: u64,
}

/// SplitMix64: a fast, well-mixed hash of a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FakeImages {
    pub fn new(len: usize, side: usize, salt: u64) -> Self {
        FakeImages { len, side, salt }
    }

    fn seed(&self, i: usize) -> u64 {
        mix(self.salt.wrapping_mul(0x1_0000_0001) ^ i as u64)
    }
}

impl ImageSet for FakeImages {
    fn len(&self) -> usize {
        self.len
    }
    fn classes(&self) -> usize {
        CLASSES
    }
    fn shape(&self) -> (usize, usize, usize) {
        (CHANNELS, self.side, self.side)
    }
    fn label(&self, i: usize) -> i64 {
        (self.seed(i) % CLASSES as u64) as i64
    }
    fn read_into(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let s = self.seed(i);
        for (j, chunk) in out.chunks_mut(8).enumerate() {
            let bytes = mix(s ^ (j as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

/// Parses `N` or `NxSIZE` (SIZE defaults to `default_side`, the model's image size); the test
/// split holds N/5 images (at least one).
pub fn open(arg: &str, default_side: usize) -> Result<(FakeImages, FakeImages)> {
    let bad = || {
        TrainError::invalid(
            "data",
            format!("fake:{arg}: expected fake:N or fake:NxSIZE with N ≥ 1 and SIZE ≥ 1"),
        )
    };
    let (n, side) = match arg.split_once('x') {
        Some((n, s)) => (n.parse().map_err(|_| bad())?, s.parse().map_err(|_| bad())?),
        None => (arg.parse().map_err(|_| bad())?, default_side),
    };
    if n == 0 || side == 0 {
        return Err(bad());
    }
    Ok((
        FakeImages::new(n, side, 1),
        FakeImages::new((n / 5).max(1), side, 2),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_images_are_deterministic_and_split_apart() {
        let (train, test) = open("10x8", 224).unwrap();
        assert_eq!(train.shape(), (3, 8, 8));
        assert_eq!((train.len(), test.len()), (10, 2));
        let read = |s: &FakeImages, i| {
            let mut v = vec![0u8; 3 * 8 * 8];
            s.read_into(i, &mut v).unwrap();
            v
        };
        assert_eq!(read(&train, 3), read(&train, 3));
        assert_ne!(read(&train, 3), read(&train, 4));
        assert_ne!(read(&train, 0), read(&test, 0));
        // Bytes spread over the whole range (not a constant image).
        let v = read(&train, 1);
        assert!(v.iter().any(|&b| b < 64) && v.iter().any(|&b| b > 192));
        assert!(open("0", 8).is_err() && open("3xq", 8).is_err());
        assert_eq!(open("7", 32).unwrap().0.shape(), (3, 32, 32));
    }
}
