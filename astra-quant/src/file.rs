//! The codebook file: per-block grouped codebooks and NAQ noise models in one safetensors file.
//!
//! Tensors (all float32, row-major), for every block l in 0..blocks:
//! - `blocks.{l}.codebook`        [G, K, D/G]  the grouped codebook
//! - `blocks.{l}.residual_mean`   [D]          µ of X − X̂ (present when the block has a noise model)
//! - `blocks.{l}.residual_chol`   [D, D]       lower Cholesky factor of Σ (noise = "full")
//! - `blocks.{l}.residual_std`    [D]          per-coordinate σ (noise = "diagonal")
//! - `blocks.{l}.code_usage`      [G, K]       optional: the share of the fitting rows nearest to
//!   each codeword, per group (each group sums to 1); EMA fine-tuning starts its counts from it
//!
//! Metadata (all strings, as safetensors requires): `format` = "astra-codebooks",
//! `format_version` = "1", `k`, `groups`, `dim`, `bits` (= ceil(log2 K)), `blocks`, `noise`
//! ("none", "full" or "diagonal"), plus any caller-supplied keys (provenance such as the command line).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::codebook::GroupedCodebook;
use crate::error::{QuantError, Result};
use crate::residual::NoiseModel;

pub const FORMAT: &str = "astra-codebooks";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq)]
pub struct BlockQuantizer {
    pub codebook: GroupedCodebook,
    pub noise: Option<NoiseModel>,
    /// [G·K], group-major: the share of the rows the codebook was fitted on (or last trained on)
    /// that each codeword is nearest to; None when unknown (EMA then assumes uniform use).
    pub usage: Option<Vec<f32>>,
}

impl BlockQuantizer {
    pub fn new(codebook: GroupedCodebook, noise: Option<NoiseModel>) -> Self {
        BlockQuantizer {
            codebook,
            noise,
            usage: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CodebookFile {
    pub blocks: Vec<BlockQuantizer>,
    /// Extra metadata written verbatim (provenance); keys of the format itself are reserved.
    pub extra: BTreeMap<String, String>,
}

const RESERVED: [&str; 8] = [
    "format",
    "format_version",
    "k",
    "groups",
    "dim",
    "bits",
    "blocks",
    "noise",
];

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl CodebookFile {
    pub fn single(codebook: GroupedCodebook, noise: Option<NoiseModel>) -> Self {
        CodebookFile {
            blocks: vec![BlockQuantizer::new(codebook, noise)],
            extra: BTreeMap::new(),
        }
    }

    fn noise_kind(&self) -> &'static str {
        match self.blocks.first().and_then(|b| b.noise.as_ref()) {
            None => "none",
            Some(NoiseModel::Full { .. }) => "full",
            Some(NoiseModel::Diagonal { .. }) => "diagonal",
        }
    }

    fn check_consistent(&self) -> Result<()> {
        let first = self.blocks.first().ok_or_else(|| {
            QuantError::param("blocks", "a codebook file needs at least one block")
        })?;
        let (k, g, d) = (
            first.codebook.k(),
            first.codebook.groups(),
            first.codebook.dim(),
        );
        let kind = self.noise_kind();
        for (l, b) in self.blocks.iter().enumerate() {
            let c = &b.codebook;
            if (c.k(), c.groups(), c.dim()) != (k, g, d) {
                return Err(QuantError::Shape {
                    what: format!("block {l} codebook"),
                    expected: format!("K={k} G={g} D={d}"),
                    found: format!("K={} G={} D={}", c.k(), c.groups(), c.dim()),
                });
            }
            let this_kind = match &b.noise {
                None => "none",
                Some(NoiseModel::Full { .. }) => "full",
                Some(NoiseModel::Diagonal { .. }) => "diagonal",
            };
            if this_kind != kind {
                return Err(QuantError::param(
                    "noise",
                    format!("block {l} has {this_kind}, block 0 has {kind}"),
                ));
            }
            if let Some(u) = &b.usage {
                check_usage(u, g, k)
                    .map_err(|r| QuantError::param("usage", format!("block {l}: {r}")))?;
            }
            if let Some(n) = &b.noise {
                if n.dim() != d {
                    return Err(QuantError::Shape {
                        what: format!("block {l} noise model width"),
                        expected: d.to_string(),
                        found: n.dim().to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.check_consistent()?;
        let c0 = &self.blocks[0].codebook;
        let mut meta: HashMap<String, String> = self
            .extra
            .iter()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, value) in [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("k", c0.k().to_string()),
            ("groups", c0.groups().to_string()),
            ("dim", c0.dim().to_string()),
            ("bits", c0.bits().to_string()),
            ("blocks", self.blocks.len().to_string()),
            ("noise", self.noise_kind().to_string()),
        ] {
            meta.insert(key.into(), value);
        }
        // Owned buffers first, views over them second.
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (l, b) in self.blocks.iter().enumerate() {
            let c = &b.codebook;
            owned.push((
                format!("blocks.{l}.codebook"),
                vec![c.groups(), c.k(), c.sub_dim()],
                f32_bytes(c.to_flat()),
            ));
            if let Some(u) = &b.usage {
                owned.push((
                    format!("blocks.{l}.code_usage"),
                    vec![c.groups(), c.k()],
                    f32_bytes(u.iter().copied()),
                ));
            }
            match &b.noise {
                None => {}
                Some(NoiseModel::Full { mean, chol }) => {
                    owned.push((
                        format!("blocks.{l}.residual_mean"),
                        vec![mean.len()],
                        f32_bytes(mean.iter().copied()),
                    ));
                    owned.push((
                        format!("blocks.{l}.residual_chol"),
                        vec![chol.nrows(), chol.ncols()],
                        f32_bytes(chol.iter().copied()),
                    ));
                }
                Some(NoiseModel::Diagonal { mean, std }) => {
                    owned.push((
                        format!("blocks.{l}.residual_mean"),
                        vec![mean.len()],
                        f32_bytes(mean.iter().copied()),
                    ));
                    owned.push((
                        format!("blocks.{l}.residual_std"),
                        vec![std.len()],
                        f32_bytes(std.iter().copied()),
                    ));
                }
            }
        }
        let views: Vec<(String, TensorView)> = owned
            .iter()
            .map(|(n, s, d)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), d).expect("sizes match"),
                )
            })
            .collect();
        safetensors::serialize(views, &Some(meta))
            .map_err(|e| QuantError::param("codebook file", e.to_string()))
    }

    /// Writes atomically (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::atomic::write_bytes(path, &bytes).map_err(|e| QuantError::io(path, e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| QuantError::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            QuantError::File { reason, .. } => QuantError::file(path, reason),
            other => QuantError::file(path, other.to_string()),
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |r: String| QuantError::file("<codebook>", r);
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
            bad(format!(
                "not a readable safetensors file (truncated or corrupt): {e:?}"
            ))
        })?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            bad(format!(
                "not a readable safetensors file (truncated or corrupt): {e:?}"
            ))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| -> Result<&String> {
            meta.get(key).ok_or_else(|| {
                bad(format!(
                    "metadata key '{key}' is missing (not an astra-codebooks file?)"
                ))
            })
        };
        let num = |key: &str| -> Result<usize> {
            let v = get(key)?;
            v.parse()
                .map_err(|_| bad(format!("metadata '{key}' = '{v}' is not a number")))
        };
        if get("format")? != FORMAT {
            return Err(bad(format!(
                "metadata 'format' is '{}', expected '{FORMAT}'",
                get("format")?
            )));
        }
        let version = num("format_version")?;
        if version != FORMAT_VERSION as usize {
            return Err(bad(format!(
                "format_version {version} is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        let (k, groups, dim, blocks) = (num("k")?, num("groups")?, num("dim")?, num("blocks")?);
        if groups == 0 || !dim.is_multiple_of(groups) {
            return Err(bad(format!(
                "groups = {groups} does not divide dim = {dim}"
            )));
        }
        let noise = get("noise")?.clone();
        let shape = BlockShape {
            groups,
            k,
            dim,
            noise: &noise,
        };
        let blocks = (0..blocks)
            .map(|l| read_block(&st, l, &shape))
            .collect::<Result<Vec<_>>>()?;
        let extra = meta
            .into_iter()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()))
            .collect();
        Ok(CodebookFile { blocks, extra })
    }
}

/// The shape every block of a file shares (from its metadata).
struct BlockShape<'a> {
    groups: usize,
    k: usize,
    dim: usize,
    noise: &'a str,
}

/// Tensor `name` of `st` as f32 values, checked: present, F32, of `shape`, all finite.
fn read_tensor(st: &SafeTensors, name: String, shape: &[usize]) -> Result<Vec<f32>> {
    let bad = |r: String| QuantError::file("<codebook>", r);
    let t = st
        .tensor(&name)
        .map_err(|_| bad(format!("tensor '{name}' is missing")))?;
    if t.dtype() != Dtype::F32 {
        return Err(bad(format!(
            "tensor '{name}' is {:?}, expected F32",
            t.dtype()
        )));
    }
    if t.shape() != shape {
        return Err(bad(format!(
            "tensor '{name}' has shape {:?}, expected {shape:?}",
            t.shape()
        )));
    }
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    // One NaN codeword would make every output NaN downstream: refuse it here.
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(bad(format!(
            "tensor '{name}' holds {x} at flat index {i} (values must be finite)"
        )));
    }
    Ok(v)
}

/// Block `l`: its codebook, its noise model (of the file's kind) and its code usage, if stored.
fn read_block(st: &SafeTensors, l: usize, s: &BlockShape) -> Result<BlockQuantizer> {
    let bad = |r: String| QuantError::file("<codebook>", r);
    let tensor = |name: String, shape: &[usize]| read_tensor(st, name, shape);
    let (groups, k, dim) = (s.groups, s.k, s.dim);
    let sub = dim / groups;
    let codebook = GroupedCodebook::from_flat(
        groups,
        k,
        sub,
        tensor(format!("blocks.{l}.codebook"), &[groups, k, sub])?,
    )
    .map_err(|e| bad(format!("block {l}: {e}")))?;
    let noise = match s.noise {
        "none" => None,
        "full" => Some(NoiseModel::Full {
            mean: tensor(format!("blocks.{l}.residual_mean"), &[dim])?,
            chol: Array2::from_shape_vec(
                (dim, dim),
                tensor(format!("blocks.{l}.residual_chol"), &[dim, dim])?,
            )
            .expect("shape checked"),
        }),
        "diagonal" => Some(NoiseModel::Diagonal {
            mean: tensor(format!("blocks.{l}.residual_mean"), &[dim])?,
            std: tensor(format!("blocks.{l}.residual_std"), &[dim])?,
        }),
        other => {
            return Err(bad(format!(
                "metadata 'noise' = '{other}' is not none/full/diagonal"
            )))
        }
    };
    let name = format!("blocks.{l}.code_usage");
    let usage = match st.tensor(&name) {
        Err(_) => None,
        Ok(_) => {
            let u = tensor(name, &[groups, k])?;
            check_usage(&u, groups, k).map_err(|r| bad(format!("block {l}: code_usage {r}")))?;
            Some(u)
        }
    };
    Ok(BlockQuantizer {
        codebook,
        noise,
        usage,
    })
}

/// Usage shares are G groups of K non-negative shares that sum to 1 each.
fn check_usage(u: &[f32], groups: usize, k: usize) -> std::result::Result<(), String> {
    if u.len() != groups * k {
        return Err(format!(
            "holds {} shares, expected G·K = {}",
            u.len(),
            groups * k
        ));
    }
    for (g, shares) in u.chunks(k).enumerate() {
        let sum: f64 = shares.iter().map(|&x| x as f64).sum();
        if shares.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || (sum - 1.0).abs() > 1e-3 {
            return Err(format!("group {g} is not a distribution (sum {sum})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CodebookFile {
        let cb = GroupedCodebook::from_flat(2, 3, 2, (0..12).map(|v| v as f32).collect()).unwrap();
        let noise = NoiseModel::Full {
            mean: vec![0.1, 0.2, 0.3, 0.4],
            chol: Array2::from_shape_fn((4, 4), |(i, j)| if j <= i { (i + j) as f32 } else { 0.0 }),
        };
        let mut f = CodebookFile::single(cb.clone(), Some(noise.clone()));
        f.blocks.push(BlockQuantizer {
            codebook: cb,
            noise: Some(noise),
            usage: Some(vec![0.5, 0.25, 0.25, 0.0, 1.0, 0.0]),
        });
        f.extra
            .insert("command".into(), "astra-quant fit ...".into());
        f
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let back = CodebookFile::from_bytes(&f.to_bytes().unwrap()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn corrupt_and_mismatched_files() {
        let bytes = sample().to_bytes().unwrap();
        let e = CodebookFile::from_bytes(&bytes[..bytes.len() - 10])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
        assert!(CodebookFile::from_bytes(b"xx").is_err());
        // A valid safetensors file without our metadata.
        let t = TensorView::new(Dtype::F32, vec![1], &[0, 0, 0, 0]).unwrap();
        let other = safetensors::serialize(vec![("a", t)], &None).unwrap();
        assert!(CodebookFile::from_bytes(&other)
            .unwrap_err()
            .to_string()
            .contains("metadata key 'format'"));
        // Blocks that disagree.
        let mut f = sample();
        f.blocks[1].codebook = GroupedCodebook::from_flat(1, 3, 4, vec![0.0; 12]).unwrap();
        assert!(f.to_bytes().is_err());
        // Usage that is not a distribution per group, or of the wrong size.
        for bad in [
            vec![0.5, 0.5, 0.5, 0.0, 1.0, 0.0],
            vec![1.0, 0.0, 0.0],
            vec![-0.5, 1.5, 0.0, 0.0, 1.0, 0.0],
        ] {
            let mut f = sample();
            f.blocks[1].usage = Some(bad.clone());
            let e = f.to_bytes().unwrap_err().to_string();
            assert!(e.contains("usage") && e.contains("block 1"), "{bad:?}: {e}");
        }
    }
}
