//! IDX files (MNIST, Fashion-MNIST), gzip-compressed or not: magic 2051 for images (n × rows ×
//! cols), 2049 for labels.

use std::io::Read;
use std::path::Path;

use super::{find_file, ImageDataset};
use crate::error::{Result, TrainError};

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(TrainError::io(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| TrainError::File {
                path: path.into(),
                reason: format!("corrupt gzip: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Images (n, rows, cols, pixels).
pub fn read_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let b = read_maybe_gz(path)?;
    let bad = |r: String| TrainError::File {
        path: path.into(),
        reason: r,
    };
    if b.len() < 16 || be32(&b, 0) != 2051 {
        return Err(bad("not an IDX image file (magic 2051)".into()));
    }
    let (n, r, c) = (
        be32(&b, 4) as usize,
        be32(&b, 8) as usize,
        be32(&b, 12) as usize,
    );
    let need = 16 + n * r * c;
    if b.len() != need {
        return Err(bad(format!(
            "header says {n} images of {r}×{c} ({need} bytes), file has {} bytes (truncated?)",
            b.len()
        )));
    }
    Ok((n, r, c, b[16..].to_vec()))
}

pub fn read_labels(path: &Path) -> Result<Vec<i64>> {
    let b = read_maybe_gz(path)?;
    let bad = |r: String| TrainError::File {
        path: path.into(),
        reason: r,
    };
    if b.len() < 8 || be32(&b, 0) != 2049 {
        return Err(bad("not an IDX label file (magic 2049)".into()));
    }
    let n = be32(&b, 4) as usize;
    if b.len() != 8 + n {
        return Err(bad(format!(
            "header says {n} labels, file has {} bytes (truncated?)",
            b.len() - 8
        )));
    }
    Ok(b[8..].iter().map(|&v| v as i64).collect())
}

/// MNIST or Fashion-MNIST from a folder with the four standard files (`.gz` or not); `train`
/// picks the 60,000-image split, else the 10,000-image test split.
pub fn load(dir: &Path, train: bool) -> Result<ImageDataset> {
    let prefix = if train { "train" } else { "t10k" };
    let img = find_file(
        dir,
        &[
            &format!("{prefix}-images-idx3-ubyte.gz"),
            &format!("{prefix}-images-idx3-ubyte"),
        ],
    )?;
    let lab = find_file(
        dir,
        &[
            &format!("{prefix}-labels-idx1-ubyte.gz"),
            &format!("{prefix}-labels-idx1-ubyte"),
        ],
    )?;
    let (n, r, c, images) = read_images(&img)?;
    let labels = read_labels(&lab)?;
    if labels.len() != n {
        return Err(TrainError::File {
            path: lab,
            reason: format!("{} labels for {n} images", labels.len()),
        });
    }
    let classes = labels.iter().max().map_or(0, |&m| m as usize + 1).max(10);
    Ok(ImageDataset {
        images,
        labels,
        channels: 1,
        height: r,
        width: c,
        classes,
    })
}
