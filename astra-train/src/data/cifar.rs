//! CIFAR-10 and CIFAR-100 binary batches (the `-binary` archives): CIFAR-10 records are a label byte
//! and 3,072 pixel bytes (`data_batch_{1..5}.bin`, `test_batch.bin`); CIFAR-100 records carry a
//! coarse and a fine label byte first (`train.bin`, `test.bin`; the fine label is used).

use std::path::Path;

use super::{find_file, ImageDataset};
use crate::error::{Result, TrainError};

const PIXELS: usize = 3 * 32 * 32;

fn read_records(path: &Path, label_bytes: usize, out: &mut ImageDataset) -> Result<()> {
    let b = std::fs::read(path).map_err(|e| TrainError::File {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let rec = label_bytes + PIXELS;
    if b.is_empty() || b.len() % rec != 0 {
        return Err(TrainError::File {
            path: path.into(),
            reason: format!(
                "{} bytes is not a whole number of {rec}-byte records (truncated?)",
                b.len()
            ),
        });
    }
    for r in b.chunks_exact(rec) {
        let label = r[label_bytes - 1] as i64;
        if label as usize >= out.classes {
            return Err(TrainError::File {
                path: path.into(),
                reason: format!("label {label} out of range for {} classes", out.classes),
            });
        }
        out.labels.push(label);
        out.images.extend_from_slice(&r[label_bytes..]);
    }
    Ok(())
}

/// CIFAR-10 from `dir` (the folder `cifar-10-batches-bin`).
pub fn load_cifar10(dir: &Path, train: bool) -> Result<ImageDataset> {
    let mut ds = ImageDataset {
        images: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: 32,
        width: 32,
        classes: 10,
    };
    let files: Vec<String> = if train {
        (1..=5).map(|i| format!("data_batch_{i}.bin")).collect()
    } else {
        vec!["test_batch.bin".into()]
    };
    for f in files {
        read_records(&find_file(dir, &[&f])?, 1, &mut ds)?;
    }
    Ok(ds)
}

/// CIFAR-100 from `dir` (the folder `cifar-100-binary`), fine labels.
pub fn load_cifar100(dir: &Path, train: bool) -> Result<ImageDataset> {
    let mut ds = ImageDataset {
        images: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: 32,
        width: 32,
        classes: 100,
    };
    read_records(
        &find_file(dir, &[if train { "train.bin" } else { "test.bin" }])?,
        2,
        &mut ds,
    )?;
    Ok(ds)
}
