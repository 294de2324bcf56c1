//! CIFAR-10 and CIFAR-100 in both published forms. Binary batches (the `-binary` archives):
//! CIFAR-10 records are a label byte and 3,072 pixel bytes (`data_batch_{1..5}.bin`,
//! `test_batch.bin`); CIFAR-100 records carry a coarse and a fine label byte first (`train.bin`,
//! `test.bin`; the fine label is used). Python batches (the `-python` archives): pickled dicts with
//! `data` (uint8 [10000, 3072], channel-major rows like the binary records) and `labels` (CIFAR-10)
//! or `fine_labels` (CIFAR-100), files `data_batch_{1..5}`/`test_batch` and `train`/`test`.
//!
//! `load_cifar10(dir)` accepts the batches folder itself or the folder the archive was unpacked
//! into (holding `cifar-10-batches-bin` or `cifar-10-batches-py`), and reads whichever form is there.

use std::path::{Path, PathBuf};

use super::{find_file, pickle, ImageDataset};
use crate::error::{Result, TrainError};

const PIXELS: usize = 3 * 32 * 32;

fn read_records(path: &Path, label_bytes: usize, out: &mut ImageDataset) -> Result<()> {
    let b = std::fs::read(path).map_err(TrainError::io(path))?;
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

/// One pickled batch: its `data` rows and `label_key` labels appended to `out`.
fn read_pickled(path: &Path, label_key: &str, out: &mut ImageDataset) -> Result<()> {
    let bad = |reason: String| TrainError::File {
        path: path.into(),
        reason,
    };
    let b = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let v = pickle::load(&b).map_err(|e| bad(format!("not a CIFAR python batch: {e}")))?;
    let data = v
        .get("data")
        .ok_or_else(|| bad("has no 'data' entry".into()))?;
    let (raw, shape) = pickle::ndarray_u8(data).map_err(|e| bad(format!("'data': {e}")))?;
    if shape.len() != 2 || shape[1] != PIXELS {
        return Err(bad(format!(
            "'data' has shape {shape:?}, expected [n, {PIXELS}]"
        )));
    }
    let labels = v
        .get(label_key)
        .ok_or_else(|| bad(format!("has no '{label_key}' entry")))?;
    let labels = pickle::int_list(labels).map_err(|e| bad(format!("'{label_key}': {e}")))?;
    if labels.len() != shape[0] {
        return Err(bad(format!(
            "{} labels for {} images",
            labels.len(),
            shape[0]
        )));
    }
    if let Some(&l) = labels.iter().find(|&&l| l < 0 || l as usize >= out.classes) {
        return Err(bad(format!(
            "label {l} out of range for {} classes",
            out.classes
        )));
    }
    out.labels.extend(labels);
    out.images.extend_from_slice(&raw);
    Ok(())
}

fn empty(classes: usize) -> ImageDataset {
    ImageDataset {
        images: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: 32,
        width: 32,
        classes,
    }
}

/// Binary or python batches, and the folder that holds them.
enum Form {
    Binary(PathBuf),
    Python(PathBuf),
}

fn detect(
    dir: &Path,
    bin_dir: &str,
    py_dir: &str,
    bin_probe: &str,
    py_probe: &str,
) -> Result<Form> {
    for d in [dir.to_path_buf(), dir.join(bin_dir), dir.join(py_dir)] {
        if d.join(bin_probe).exists() {
            return Ok(Form::Binary(d));
        }
        if d.join(py_probe).exists() {
            return Ok(Form::Python(d));
        }
    }
    Err(TrainError::File {
        path: dir.into(),
        reason: format!(
            "holds no CIFAR batches (looked for {bin_probe} or {py_probe}, here and in {bin_dir}/ and {py_dir}/)"
        ),
    })
}

/// CIFAR-10 from `dir` (binary or python batches; see the module notes).
pub fn load_cifar10(dir: &Path, train: bool) -> Result<ImageDataset> {
    let mut ds = empty(10);
    let names: Vec<String> = if train {
        (1..=5).map(|i| format!("data_batch_{i}")).collect()
    } else {
        vec!["test_batch".into()]
    };
    match detect(
        dir,
        "cifar-10-batches-bin",
        "cifar-10-batches-py",
        "test_batch.bin",
        "test_batch",
    )? {
        Form::Binary(d) => {
            for f in names {
                read_records(&find_file(&d, &[&format!("{f}.bin")])?, 1, &mut ds)?;
            }
        }
        Form::Python(d) => {
            for f in names {
                read_pickled(&find_file(&d, &[&f])?, "labels", &mut ds)?;
            }
        }
    }
    Ok(ds)
}

/// CIFAR-100 from `dir` (binary or python batches), fine labels.
pub fn load_cifar100(dir: &Path, train: bool) -> Result<ImageDataset> {
    let mut ds = empty(100);
    let name = if train { "train" } else { "test" };
    match detect(
        dir,
        "cifar-100-binary",
        "cifar-100-python",
        "test.bin",
        "test",
    )? {
        Form::Binary(d) => read_records(&find_file(&d, &[&format!("{name}.bin")])?, 2, &mut ds)?,
        Form::Python(d) => read_pickled(&find_file(&d, &[name])?, "fine_labels", &mut ds)?,
    }
    Ok(ds)
}
