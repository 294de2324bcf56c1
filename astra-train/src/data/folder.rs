//! ImageNet-style class folders: `DIR/<class>/*.{JPEG,jpg,jpeg,png}`, classes in sorted name
//! order (as torchvision's `ImageFolder`). A validation split may also be ImageNet's flat folder
//! as distributed (`val/ILSVRC2012_val_00000001.JPEG`, …) with its labels in Kaggle's
//! `LOC_val_solution.csv` (`ImageId,PredictionString`, the first word of the string the synset),
//! found in the folder or up to four levels above it (Kaggle's download holds it beside
//! `ILSVRC/`, four levels above `ILSVRC/Data/CLS-LOC/val`), in the devkit's
//! `ILSVRC2012_validation_ground_truth.txt` (line n: the ILSVRC2012_ID of `ILSVRC2012_val_n`,
//! mapped to synsets by the devkit's `meta.mat` beside it; found as `ILSVRC2012_devkit_t12/data/`
//! or `data/` in the folder or up to four levels above), or in a `val_labels.txt` beside the images
//! (`FILE SYNSET` per line). Images are decoded on demand (the loader's worker threads),
//! converted to RGB, resized so the shorter side is the model's size and centre-cropped to a
//! square (the standard evaluation transform; training adds the augmentation on top).

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::ImageSet;
use crate::error::{Result, TrainError};

pub struct ImageFolder {
    pub class_names: Vec<String>,
    files: Vec<(PathBuf, i64)>,
    size: usize,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpeg" | "jpg" | "png"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(TrainError::io(dir))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

impl ImageFolder {
    /// Lists `dir`; with `classes` (the training split's), every class folder here must be one of
    /// them and labels follow that list.
    pub fn open(dir: &Path, size: usize, classes: Option<&[String]>) -> Result<Self> {
        if size == 0 {
            return Err(TrainError::invalid("image size", "must be positive"));
        }
        let class_dirs: Vec<PathBuf> = sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if class_dirs.is_empty() {
            if let Some(labels) = flat_labels_file(dir) {
                return Self::open_flat(dir, &labels, size, classes);
            }
            return Err(TrainError::File {
                path: dir.into(),
                reason: "holds no class folders (expected <class>/*.JPEG inside, or flat images with a LOC_val_solution.csv, the devkit's ILSVRC2012_validation_ground_truth.txt or a val_labels.txt)".into(),
            });
        }
        let names: Vec<String> = class_dirs
            .iter()
            .map(|p| p.file_name().expect("entry").to_string_lossy().into_owned())
            .collect();
        let class_names = classes.map_or_else(|| names.clone(), |c| c.to_vec());
        let mut files = Vec::new();
        for (d, name) in class_dirs.iter().zip(&names) {
            let label =
                class_names
                    .iter()
                    .position(|c| c == name)
                    .ok_or_else(|| TrainError::File {
                        path: d.clone(),
                        reason: "is a class the training split does not have".into(),
                    })?;
            files.extend(
                sorted_entries(d)?
                    .into_iter()
                    .filter(|p| p.is_file() && is_image(p))
                    .map(|p| (p, label as i64)),
            );
        }
        if files.is_empty() {
            return Err(TrainError::File {
                path: dir.into(),
                reason: format!(
                    "its {} class folders hold no .JPEG/.jpg/.png images",
                    names.len()
                ),
            });
        }
        Ok(ImageFolder {
            class_names,
            files,
            size,
        })
    }
}

/// The devkit's ground-truth file name.
const DEVKIT_TRUTH: &str = "ILSVRC2012_validation_ground_truth.txt";

/// The labels file of a flat validation folder, if there is one: `val_labels.txt` beside the
/// images, else Kaggle's CSV, else the devkit's ground truth, in the folder or up to four above.
fn flat_labels_file(dir: &Path) -> Option<PathBuf> {
    let beside = dir.join("val_labels.txt");
    if beside.is_file() {
        return Some(beside);
    }
    let near = || dir.ancestors().take(5);
    near()
        .map(|d| d.join("LOC_val_solution.csv"))
        .chain(near().flat_map(|d| {
            [
                d.join("ILSVRC2012_devkit_t12/data").join(DEVKIT_TRUTH),
                d.join("data").join(DEVKIT_TRUTH),
                d.join(DEVKIT_TRUTH),
            ]
        }))
        .find(|p| p.is_file())
}

/// (image stem, synset) pairs of the devkit's ground truth: line n holds the ILSVRC2012_ID of
/// `ILSVRC2012_val_{n:08}`; `meta.mat` beside it maps IDs to WordNet ids (its `synsets` struct
/// array: ILSVRC2012_ID, WNID, …; the IDs are not in synset order, so the mapping is needed).
fn read_devkit_truth(path: &Path) -> Result<Vec<(String, String)>> {
    let meta = path.with_file_name("meta.mat");
    if !meta.is_file() {
        return Err(TrainError::File {
            path: meta,
            reason: format!("missing: the devkit's synset table, needed to read {DEVKIT_TRUTH}"),
        });
    }
    let synsets = super::matlab::variable(&meta, "synsets")?;
    let mut wnid = std::collections::HashMap::new();
    for i in 0..synsets.len() {
        let id = synsets.field(i, "ILSVRC2012_ID").and_then(|a| a.scalar());
        let name = synsets.field(i, "WNID").and_then(|a| a.text());
        let (Some(id), Some(name)) = (id, name) else {
            return Err(TrainError::File {
                path: meta,
                reason: format!("synsets({}) lacks a numeric ILSVRC2012_ID or a WNID", i + 1),
            });
        };
        wnid.insert(id as i64, name.to_string());
    }
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|l| !l.1.trim().is_empty()) {
        let synset = line
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(|id| wnid.get(&id))
            .ok_or_else(|| TrainError::File {
                path: path.into(),
                reason: format!(
                    "line {}: '{}' is not an ILSVRC2012_ID of {}",
                    n + 1,
                    line.trim(),
                    meta.display()
                ),
            })?;
        pairs.push((format!("ILSVRC2012_val_{:08}", n + 1), synset.clone()));
    }
    Ok(pairs)
}

/// (image stem, synset) pairs of a labels file: Kaggle's CSV, the devkit's ground truth or
/// `FILE SYNSET` lines.
fn read_flat_labels(path: &Path) -> Result<Vec<(String, String)>> {
    if path.ends_with(DEVKIT_TRUTH) {
        return read_devkit_truth(path);
    }
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let kaggle = path.extension().is_some_and(|e| e == "csv");
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| TrainError::File {
            path: path.into(),
            reason: format!("line {}: {why}", n + 1),
        };
        let line = line.trim();
        if line.is_empty() || (kaggle && n == 0 && line.starts_with("ImageId")) {
            continue;
        }
        let (file, synset) = if kaggle {
            let (id, pred) = line
                .split_once(',')
                .ok_or_else(|| bad("expected ImageId,PredictionString"))?;
            (
                id,
                pred.split_whitespace()
                    .next()
                    .ok_or_else(|| bad("no synset"))?,
            )
        } else {
            let mut w = line.split_whitespace();
            match (w.next(), w.next()) {
                (Some(f), Some(c)) => (f, c),
                _ => return Err(bad("expected FILE SYNSET")),
            }
        };
        let stem = Path::new(file)
            .file_stem()
            .map_or(file.into(), |s| s.to_string_lossy().into_owned());
        pairs.push((stem, synset.to_string()));
    }
    Ok(pairs)
}

impl ImageFolder {
    /// A flat folder of images labelled by `labels`: every image must have a label and every
    /// label an image; synsets follow `classes` (the training split's) when given.
    fn open_flat(
        dir: &Path,
        labels: &Path,
        size: usize,
        classes: Option<&[String]>,
    ) -> Result<Self> {
        let pairs = read_flat_labels(labels)?;
        let by_stem: std::collections::HashMap<&str, &str> = pairs
            .iter()
            .map(|(f, c)| (f.as_str(), c.as_str()))
            .collect();
        let class_names: Vec<String> = match classes {
            Some(c) => c.to_vec(),
            None => {
                let mut c: Vec<String> = pairs.iter().map(|p| p.1.clone()).collect();
                c.sort();
                c.dedup();
                c
            }
        };
        let images: Vec<PathBuf> = sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if images.len() != pairs.len() {
            return Err(TrainError::File {
                path: labels.into(),
                reason: format!(
                    "labels {} images, {} holds {}",
                    pairs.len(),
                    dir.display(),
                    images.len()
                ),
            });
        }
        let mut files = Vec::with_capacity(images.len());
        for p in images {
            let stem = p
                .file_stem()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            let synset = by_stem.get(stem.as_str()).ok_or_else(|| TrainError::File {
                path: p.clone(),
                reason: format!("has no label in {}", labels.display()),
            })?;
            let label = class_names
                .iter()
                .position(|c| c == synset)
                .ok_or_else(|| TrainError::File {
                    path: p.clone(),
                    reason: format!(
                        "is labelled {synset}, a class the training split does not have"
                    ),
                })?;
            files.push((p, label as i64));
        }
        Ok(ImageFolder {
            class_names,
            files,
            size,
        })
    }
}

impl ImageSet for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn classes(&self) -> usize {
        self.class_names.len()
    }
    fn shape(&self) -> (usize, usize, usize) {
        (3, self.size, self.size)
    }
    fn label(&self, i: usize) -> i64 {
        self.files[i].1
    }
    fn read_into(&self, i: usize, out: &mut [u8]) -> Result<()> {
        let path = &self.files[i].0;
        let img = image::open(path).map_err(|e| TrainError::File {
            path: path.clone(),
            reason: format!("cannot decode image: {e}"),
        })?;
        let s = self.size as u32;
        let rgb = img.resize_to_fill(s, s, FilterType::Triangle).to_rgb8();
        let plane = self.size * self.size;
        for (p, px) in rgb.pixels().enumerate() {
            for ch in 0..3 {
                out[ch * plane + p] = px.0[ch];
            }
        }
        Ok(())
    }
}
