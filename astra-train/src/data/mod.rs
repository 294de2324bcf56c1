//! Data sets in their original formats: IDX (MNIST, Fashion-MNIST, gzip or not) and CIFAR-10/100
//! binary batches, held in memory as uint8 images and turned into normalised float batches.

pub mod cifar;
pub mod idx;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// Images [n, c, h, w] as u8 with integer labels.
#[derive(Clone, Debug)]
pub struct ImageDataset {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Images `indices` as float [B, C, H, W], scaled to [0, 1] then normalised per channel, and
    /// their labels [B].
    pub fn batch(
        &self,
        indices: &[usize],
        mean: &[f64],
        std: &[f64],
        device: Device,
    ) -> (Tensor, Tensor) {
        let il = self.image_len();
        let mut bytes = Vec::with_capacity(indices.len() * il);
        for &i in indices {
            bytes.extend_from_slice(&self.images[i * il..(i + 1) * il]);
        }
        let shape = [
            indices.len() as i64,
            self.channels as i64,
            self.height as i64,
            self.width as i64,
        ];
        let x = Tensor::from_slice(&bytes).view(shape).to_kind(Kind::Float) / 255.0;
        let c = self.channels as i64;
        let m = Tensor::from_slice(&mean.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .view([1, c, 1, 1]);
        let s = Tensor::from_slice(&std.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .view([1, c, 1, 1]);
        let labels =
            Tensor::from_slice(&indices.iter().map(|&i| self.labels[i]).collect::<Vec<_>>());
        (((x - m) / s).to_device(device), labels.to_device(device))
    }
}

/// The first of `names` that exists in `dir` (so `x.gz` and `x` are both accepted).
pub(crate) fn find_file(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .ok_or_else(|| TrainError::File {
            path: dir.join(names[0]),
            reason: format!("missing (looked for {})", names.join(", ")),
        })
}
