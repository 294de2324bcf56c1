//! Data sets in their original formats — IDX (MNIST, Fashion-MNIST, gzip or not), CIFAR-10/100
//! (binary and python batches), ImageNet-style class folders (decoded with the `image` crate) and
//! plain-text corpora (GPT-2 BPE) — plus augmentation, the background batch loader and the
//! downloader.
//!
//! A data set is named by a spec string: `fashion-mnist:DIR`, `mnist:DIR`, `cifar10:DIR`,
//! `cifar100:DIR`, `imagefolder:DIR` (DIR/train/<class>/*, DIR/val/<class>/* or a flat val/ with
//! its ground truth, see [`folder`]), `text:FILE` / `text:TRAIN,TEST` / `text:TRAIN,VALID,TEST`
//! (see [`text`]) or `parquet:PATH[:COLUMN][:max-docs=N]` (documents of HF-style Parquet shards,
//! e.g. Wikipedia; see [`parquet_docs`]); the validation split is held out of the training data
//! unless given ([`split`]).

pub mod augment;
pub mod cifar;
pub mod download;
pub mod fake;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod matlab;
pub mod parquet_docs;
pub mod pickle;
pub mod split;
pub mod text;
pub mod token_cache;
pub mod tokenizer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Device, Tensor};

use crate::error::{Result, TrainError};

/// A labelled image collection read image by image (in memory, or decoded from files on demand).
pub trait ImageSet: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn classes(&self) -> usize;
    /// (channels, height, width) of every image this set yields.
    fn shape(&self) -> (usize, usize, usize);
    fn label(&self, i: usize) -> i64;
    /// Image `i` as u8 [c, h, w] into `out` (of length c·h·w).
    fn read_into(&self, i: usize, out: &mut [u8]) -> Result<()>;
}

/// Images [n, c, h, w] as u8 with integer labels, all in memory (IDX, CIFAR).
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

    /// Images `indices` as normalised float [B, C, H, W] and their labels [B] (no augmentation).
    pub fn batch(
        &self,
        indices: &[usize],
        mean: &[f64],
        std: &[f64],
        device: Device,
    ) -> (Tensor, Tensor) {
        let raw = loader::read_batch(self, indices, None).expect("in-memory reads cannot fail");
        raw.to_tensors(mean, std, self.height, device)
    }
}

impl ImageSet for ImageDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }
    fn label(&self, i: usize) -> i64 {
        self.labels[i]
    }
    fn read_into(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let il = self.image_len();
        out.copy_from_slice(&self.images[i * il..(i + 1) * il]);
        Ok(())
    }
}

/// The splits of an image data set and its per-channel normalisation: `valid` is held out of the
/// data set's training images ([`split`]), `test` is its own test (or val) split.
#[derive(Clone)]
pub struct ImageData {
    pub train: Arc<dyn ImageSet>,
    pub valid: Arc<dyn ImageSet>,
    pub test: Arc<dyn ImageSet>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Whether a data spec names a text corpus (`text:…`, `parquet:…`) rather than images.
pub fn is_text(spec: &str) -> bool {
    spec.starts_with("text:") || spec.starts_with("parquet:")
}

/// Opens an image data set spec and holds `hold_out` of its training images out for validation.
/// `folder_size` is the side image folders are resized to (the model's image size); fixed-size
/// formats ignore it.
pub fn open_images(spec: &str, folder_size: usize, hold_out: split::HoldOut) -> Result<ImageData> {
    let (kind, dir) = spec
        .split_once(':')
        .ok_or_else(|| TrainError::invalid("data", format!("'{spec}' is not KIND:DIR")))?;
    let dir = Path::new(dir);
    let pair = |a: ImageDataset, b: ImageDataset| -> (Arc<dyn ImageSet>, Arc<dyn ImageSet>) {
        (Arc::new(a), Arc::new(b))
    };
    let ((train, test), mean, std) = match kind {
        "fashion-mnist" => (
            pair(idx::load(dir, true)?, idx::load(dir, false)?),
            vec![0.2860],
            vec![0.3530],
        ),
        "mnist" => (
            pair(idx::load(dir, true)?, idx::load(dir, false)?),
            vec![0.1307],
            vec![0.3081],
        ),
        "cifar10" => (
            pair(
                cifar::load_cifar10(dir, true)?,
                cifar::load_cifar10(dir, false)?,
            ),
            vec![0.4914, 0.4822, 0.4465],
            vec![0.2470, 0.2435, 0.2616],
        ),
        "cifar100" => (
            pair(
                cifar::load_cifar100(dir, true)?,
                cifar::load_cifar100(dir, false)?,
            ),
            vec![0.5071, 0.4865, 0.4409],
            vec![0.2673, 0.2564, 0.2762],
        ),
        "fake" => {
            let dir = dir.to_str().unwrap_or_default();
            let (train, test) = fake::open(dir, folder_size)?;
            let pair: (Arc<dyn ImageSet>, Arc<dyn ImageSet>) = (Arc::new(train), Arc::new(test));
            (pair, vec![0.5; 3], vec![0.29; 3])
        }
        // ImageNet statistics, as torchvision's ImageNet recipes use.
        "imagefolder" => {
            let train = folder::ImageFolder::open(&dir.join("train"), folder_size, None)?;
            let test =
                folder::ImageFolder::open(&dir.join("val"), folder_size, Some(&train.class_names))?;
            let pair: (Arc<dyn ImageSet>, Arc<dyn ImageSet>) = (Arc::new(train), Arc::new(test));
            (pair, vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        }
        other => {
            return Err(TrainError::invalid(
                "data",
                format!(
                    "kind '{other}' is not fashion-mnist, mnist, cifar10, cifar100, imagefolder, fake or text"
                ),
            ))
        }
    };
    let (train, valid) = split::split_images(train, hold_out)?;
    Ok(ImageData {
        train,
        valid,
        test,
        mean,
        std,
    })
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
