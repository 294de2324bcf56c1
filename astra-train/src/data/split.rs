//! The validation hold-out: a part of the training data set aside before training, on which runs
//! select their best epoch, so that the test split is scored once, for the selected model only.
//!
//! Images: a seeded random subset of the training images ([`SPLIT_SEED`], the same for every run,
//! so a plain run and the ASTRA runs fine-tuned from it hold out the same images and never train
//! on them). Text: the last tokens of the training stream, contiguous, so no validation text
//! reaches a training window (a corpus given as three files uses its own validation file).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ImageSet;
use crate::error::{Result, TrainError};

/// The seed of the image hold-out (fixed: every run of a data set holds out the same images).
pub const SPLIT_SEED: u64 = 0x5A11D;

/// How much of the training data is held out for validation: a fraction of it or a count of
/// examples (images, or text windows of the run's context).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HoldOut {
    /// Exactly this many examples (before `Fraction`, so JSON integers parse as counts).
    Count(usize),
    /// This fraction of the examples, in (0, 1), at most [`HoldOut::DEFAULT_CAP`] of them when
    /// it is the default.
    Fraction(f64),
}

impl HoldOut {
    /// The default: 10% of the training data, at most 10,000 examples (ImageNet's 1.28 M images
    /// would otherwise give 128 k validation images to score every epoch).
    pub const DEFAULT_FRACTION: f64 = 0.1;
    pub const DEFAULT_CAP: usize = 10_000;

    /// Examples held out of `len` (at least one, and at least one left to train on).
    pub fn count(&self, len: usize) -> Result<usize> {
        let n = match *self {
            HoldOut::Count(n) => n,
            HoldOut::Fraction(f) if f == Self::DEFAULT_FRACTION => {
                ((len as f64 * f).round() as usize).min(Self::DEFAULT_CAP)
            }
            HoldOut::Fraction(f) => (len as f64 * f).round() as usize,
        };
        let n = n.max(1);
        if n >= len {
            return Err(TrainError::invalid(
                "valid",
                format!("holding out {n} of {len} training examples leaves none to train on"),
            ));
        }
        Ok(n)
    }
}

impl Default for HoldOut {
    fn default() -> Self {
        HoldOut::Fraction(Self::DEFAULT_FRACTION)
    }
}

impl fmt::Display for HoldOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldOut::Count(n) => write!(f, "{n}"),
            HoldOut::Fraction(x) => write!(f, "{x}"),
        }
    }
}

impl FromStr for HoldOut {
    type Err = String;
    /// `0.1` (a fraction in (0, 1)) or `5000` (a count ≥ 1).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Ok(n) = s.parse::<usize>() {
            return match n {
                0 => Err(
                    "must hold out at least 1 example (a count ≥ 1 or a fraction in (0, 1))".into(),
                ),
                n => Ok(HoldOut::Count(n)),
            };
        }
        match s.parse::<f64>() {
            Ok(x) if x > 0.0 && x < 1.0 => Ok(HoldOut::Fraction(x)),
            _ => Err(format!(
                "'{s}' is neither a count ≥ 1 nor a fraction in (0, 1)"
            )),
        }
    }
}

/// Some images of another set, by index (a split of it).
pub struct Subset {
    base: Arc<dyn ImageSet>,
    indices: Vec<usize>,
}

impl ImageSet for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn classes(&self) -> usize {
        self.base.classes()
    }
    fn shape(&self) -> (usize, usize, usize) {
        self.base.shape()
    }
    fn label(&self, i: usize) -> i64 {
        self.base.label(self.indices[i])
    }
    fn read_into(&self, i: usize, out: &mut [u8]) -> Result<()> {
        self.base.read_into(self.indices[i], out)
    }
}

/// (train, valid): `set` split by a seeded random hold-out of `hold_out.count(len)` images.
pub fn split_images(
    set: Arc<dyn ImageSet>,
    hold_out: HoldOut,
) -> Result<(Arc<dyn ImageSet>, Arc<dyn ImageSet>)> {
    let len = set.len();
    let valid = crate::train::task::sample_sorted(len, hold_out.count(len)?, SPLIT_SEED);
    let mut held = vec![false; len];
    for &i in &valid {
        held[i] = true;
    }
    let train = (0..len).filter(|&i| !held[i]).collect();
    let part = |indices| -> Arc<dyn ImageSet> {
        Arc::new(Subset {
            base: Arc::clone(&set),
            indices,
        })
    };
    Ok((part(train), part(valid)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fake::FakeImages;

    #[test]
    fn hold_out_parses_counts_and_fractions_and_refuses_the_rest() {
        assert_eq!("5000".parse::<HoldOut>(), Ok(HoldOut::Count(5000)));
        assert_eq!("0.25".parse::<HoldOut>(), Ok(HoldOut::Fraction(0.25)));
        for bad in ["0", "0.0", "1.0", "1.5", "-3", "NaN", "inf", "ten"] {
            assert!(bad.parse::<HoldOut>().is_err(), "{bad}");
        }
        assert_eq!(HoldOut::default().count(60_000).unwrap(), 6_000);
        assert_eq!(HoldOut::default().count(1_281_167).unwrap(), 10_000);
        assert_eq!(HoldOut::Fraction(0.5).count(1_000_000).unwrap(), 500_000);
        assert_eq!(HoldOut::Count(7).count(8).unwrap(), 7);
        assert!(HoldOut::Count(8).count(8).is_err());
        assert_eq!(HoldOut::default().count(3).unwrap(), 1);
        let json = serde_json::to_string(&HoldOut::Count(12)).unwrap();
        assert_eq!(
            serde_json::from_str::<HoldOut>(&json).unwrap(),
            HoldOut::Count(12)
        );
        let json = serde_json::to_string(&HoldOut::Fraction(0.2)).unwrap();
        assert_eq!(
            serde_json::from_str::<HoldOut>(&json).unwrap(),
            HoldOut::Fraction(0.2)
        );
    }

    #[test]
    fn image_split_is_disjoint_complete_seeded_and_spread() {
        let set: Arc<dyn ImageSet> = Arc::new(FakeImages::new(1000, 4, 1));
        let (train, valid) = split_images(Arc::clone(&set), HoldOut::Count(100)).unwrap();
        assert_eq!((train.len(), valid.len()), (900, 100));
        let labels = |s: &Arc<dyn ImageSet>| (0..s.len()).map(|i| s.label(i)).collect::<Vec<_>>();
        let (again, _) = split_images(Arc::clone(&set), HoldOut::Count(100)).unwrap();
        assert_eq!(labels(&train), labels(&again));
        // Every image lands in exactly one split: compare pixels as a multiset of images.
        let image = |s: &Arc<dyn ImageSet>, i| {
            let mut b = vec![0u8; 48];
            s.read_into(i, &mut b).unwrap();
            b
        };
        let mut all: Vec<Vec<u8>> = (0..1000).map(|i| image(&set, i)).collect();
        let mut parts: Vec<Vec<u8>> = (0..900)
            .map(|i| image(&train, i))
            .chain((0..100).map(|i| image(&valid, i)))
            .collect();
        all.sort();
        parts.sort();
        assert_eq!(all, parts);
        // Not a prefix: the hold-out reaches the last tenth of a class-sorted set.
        let last = (0..1000).rposition(|j| image(&set, j) == image(&valid, 99));
        assert!(last.is_some_and(|j| j > 900), "{last:?}");
    }
}
