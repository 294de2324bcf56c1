//! ImageNet-style class folders: `DIR/<class>/*.{JPEG,jpg,jpeg,png}`, classes in sorted name
//! order (as torchvision's `ImageFolder`). Images are decoded on demand (the loader's worker
//! threads), converted to RGB, resized so the shorter side is the model's size and centre-cropped
//! to a square (the standard evaluation transform; training adds the augmentation on top).

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
            return Err(TrainError::File {
                path: dir.into(),
                reason: "holds no class folders (expected <class>/*.JPEG inside)".into(),
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
