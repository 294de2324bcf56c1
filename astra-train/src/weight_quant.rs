//! Post-training weight quantization (round to nearest, symmetric), combined with ASTRA as the
//! paper's Table 5 does: `astra-train quantize-weights` writes a model folder whose linear layers
//! are stored as integers, and every loader of the workspace (predict, the sweeps, the runtime,
//! generation) dequantizes them on load.
//!
//! Layout in model.safetensors, per quantized weight `NAME` (the tensor it replaces is absent):
//! - `NAME.qweight`: the weight as [out, in] (the output channel first, whatever the model stores:
//!   GPT-2's Conv1D weights, kept [in, out], are transposed): int8 for 8 bits; for 4 bits uint8
//!   [out, in / 2], two values per byte, the even input column in the low nibble, each value
//!   stored as q + 8 (q in −8..=7);
//! - `NAME.scales`: fp32, [out] for 8 bits (one per output channel), [out, in / group] for 4 bits
//!   (one per group of `group` consecutive input columns); w ≈ q · scale;
//! - `NAME.qshape`: int64 [3], the weight's shape as the model stores it and 1 when that is
//!   [in, out] (the loader transposes back), else 0.
//!
//! config.json gets `quantization_config` ({"quant_method": "astra_rtn", "bits", "group_size",
//! "modules"}) describing it; transformers does not know the method, so these folders are for this
//! workspace's tools (export the fp32 model for transformers).

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

/// What to quantize and how.
#[derive(Clone, Debug)]
pub struct WeightQuant {
    /// 8 (per output channel) or 4 (group-wise).
    pub bits: u8,
    /// Input columns per 4-bit scale.
    pub group_size: i64,
    /// Also the token/patch embeddings (2-D ones).
    pub embeddings: bool,
    /// Also the classifier / LM head.
    pub head: bool,
}

impl WeightQuant {
    pub fn validate(&self) -> Result<()> {
        if self.bits != 8 && self.bits != 4 {
            return Err(TrainError::invalid(
                "bits",
                format!("must be 8 or 4, got {}", self.bits),
            ));
        }
        if self.group_size < 2 || self.group_size % 2 != 0 {
            return Err(TrainError::invalid(
                "group_size",
                format!("must be an even number ≥ 2, got {}", self.group_size),
            ));
        }
        Ok(())
    }

    /// The config.json entry describing the stored weights.
    pub fn config_entry(&self) -> serde_json::Value {
        serde_json::json!({
            "quant_method": "astra_rtn",
            "bits": self.bits,
            "group_size": if self.bits == 4 { Some(self.group_size) } else { None },
            "symmetric": true,
            "modules": format!(
                "linear layers of the blocks{}{}",
                if self.embeddings { ", embeddings" } else { "" },
                if self.head { ", head" } else { "" }
            ),
            "layout": "NAME.qweight [out, in] (int8, or uint8 two 4-bit values per byte, low nibble first, stored as q + 8), NAME.scales fp32 ([out] or [out, in / group_size]), NAME.qshape int64 [rows, cols, 1 if stored [in, out]]",
        })
    }

    /// Whether the model tensor `name` (of shape `shape`) is quantized.
    fn selects(&self, name: &str, shape: &[i64]) -> bool {
        if shape.len() != 2 || !name.ends_with(".weight") {
            return false;
        }
        let is = |parts: &[&str]| parts.iter().any(|p| name.contains(p));
        if is(&["embed", "wte.", "wpe."]) {
            return self.embeddings;
        }
        if is(&["classifier", "lm_head"]) {
            return self.head;
        }
        true
    }
}

/// Whether a stored 2-D weight keeps its input axis first (GPT-2's Conv1D: [in, out]).
fn stored_in_out(name: &str, gpt2: bool) -> bool {
    gpt2 && name.contains(".h.")
}

/// The model's named tensors with the selected weights replaced by their quantized form.
pub fn quantize(
    named: Vec<(String, Tensor)>,
    q: &WeightQuant,
    gpt2: bool,
) -> Result<Vec<(String, Tensor)>> {
    q.validate()?;
    let mut out = Vec::with_capacity(named.len());
    for (name, t) in named {
        if !q.selects(&name, &t.size()) || !t.is_floating_point() {
            out.push((name, t));
            continue;
        }
        let w = t.detach().to_kind(Kind::Float);
        let in_out = stored_in_out(&name, gpt2);
        let w = if in_out { w.transpose(0, 1) } else { w }.contiguous();
        let (qweight, scales) = match q.bits {
            8 => quantize_8(&w),
            _ => quantize_4(&w, q.group_size).map_err(|reason| TrainError::Weight {
                name: name.clone(),
                reason,
            })?,
        };
        let mut shape = t.size();
        shape.push(i64::from(in_out));
        out.push((format!("{name}.qshape"), Tensor::from_slice(&shape)));
        out.push((format!("{name}.qweight"), qweight));
        out.push((format!("{name}.scales"), scales));
    }
    Ok(out)
}

/// 8 bits per output channel: scale = max |w| / 127.
fn quantize_8(w: &Tensor) -> (Tensor, Tensor) {
    let scales = w.abs().amax([1], true).clamp_min(1e-12) / 127.0;
    let q = (w / &scales).round().clamp(-127, 127).to_kind(Kind::Int8);
    (q, scales.squeeze_dim(1))
}

/// Clipping ratios tried per 4-bit group: the scale is r · max |w| / 7 for the r with the smallest
/// squared rounding error (clipping a group's outlier often rounds the rest more finely; the usual
/// refinement of round-to-nearest, e.g. AWQ's and GPTQ's scale search).
const CLIP_RATIOS: [f64; 8] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65];

/// 4 bits per group of input columns: values −8..=7 packed two per byte, each group's scale the
/// best of [`CLIP_RATIOS`].
fn quantize_4(w: &Tensor, group: i64) -> std::result::Result<(Tensor, Tensor), String> {
    let (o, i) = (w.size()[0], w.size()[1]);
    if i % group != 0 {
        return Err(format!(
            "--group-size {group} does not divide its {i} input columns"
        ));
    }
    let g = w.view([o, i / group, group]);
    let max = g.abs().amax([2], true).clamp_min(1e-12);
    let error = |s: &Tensor| {
        ((&g / s).round().clamp(-8, 7) * s - &g)
            .square()
            .sum_dim_intlist(2, true, Kind::Float)
    };
    let mut scales = &max / 7.0;
    let mut best = error(&scales);
    for r in &CLIP_RATIOS[1..] {
        let s = &max * (*r / 7.0);
        let e = error(&s);
        let better = e.lt_tensor(&best);
        scales = s.where_self(&better, &scales);
        best = e.where_self(&better, &best);
    }
    let q = ((&g / &scales).round().clamp(-8, 7) + 8)
        .to_kind(Kind::Uint8)
        .view([o, i / 2, 2]);
    let packed = q.select(2, 0).bitwise_or_tensor(&(q.select(2, 1) * 16));
    Ok((packed.contiguous(), scales.squeeze_dim(2)))
}

/// Replaces every `NAME.qweight` / `.scales` / `.qshape` triple of a loaded file by the fp32
/// tensor `NAME` it encodes (a file without them is returned as it is).
pub fn dequantize(mut by_name: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let names: Vec<String> = by_name
        .keys()
        .filter_map(|k| k.strip_suffix(".qweight").map(str::to_string))
        .collect();
    for name in names {
        let bad = |reason: String| TrainError::Weight {
            name: name.clone(),
            reason,
        };
        let take = |m: &mut HashMap<String, Tensor>, s: &str| {
            m.remove(&format!("{name}.{s}"))
                .ok_or_else(|| bad(format!("quantized, but its .{s} is missing")))
        };
        let q = take(&mut by_name, "qweight")?;
        let scales = take(&mut by_name, "scales")?.to_kind(Kind::Float);
        let shape = Vec::<i64>::try_from(take(&mut by_name, "qshape")?.to_kind(Kind::Int64))
            .map_err(|e| bad(format!("unreadable .qshape: {e}")))?;
        let w = unpack(&q, &scales).map_err(bad)?;
        let w = match shape.as_slice() {
            [a, b, 0] if [*a, *b] == w.size()[..] => w,
            [a, b, 1] if [*b, *a] == w.size()[..] => w.transpose(0, 1).contiguous(),
            _ => return Err(bad(format!("qshape {shape:?} does not fit {:?}", w.size()))),
        };
        if !bool::try_from(w.isfinite().all())? {
            return Err(bad("its scales are not finite".into()));
        }
        by_name.insert(name, w);
    }
    Ok(by_name)
}

/// [out, in] fp32 from a stored qweight and its scales.
fn unpack(q: &Tensor, scales: &Tensor) -> std::result::Result<Tensor, String> {
    let (qs, ss) = (q.size(), scales.size());
    match (q.kind(), qs.len(), ss.len()) {
        (Kind::Int8, 2, 1) if ss[0] == qs[0] => {
            Ok(q.to_kind(Kind::Float) * scales.unsqueeze(1))
        }
        (Kind::Uint8, 2, 2) if ss[0] == qs[0] && ss[1] > 0 && (2 * qs[1]) % ss[1] == 0 => {
            let (o, i) = (qs[0], 2 * qs[1]);
            let low = q.bitwise_and(15);
            let high = q.bitwise_right_shift_tensor_scalar(4);
            let v = Tensor::stack(&[low, high], 2).view([o, i]).to_kind(Kind::Float) - 8.0;
            let group = i / ss[1];
            Ok((v.view([o, ss[1], group]) * scales.unsqueeze(2)).view([o, i]))
        }
        _ => Err(format!(
            "qweight {:?} {qs:?} and scales {ss:?} are neither 8-bit per channel nor packed 4-bit per group",
            q.kind()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(bits: u8, group_size: i64) -> WeightQuant {
        WeightQuant {
            bits,
            group_size,
            embeddings: false,
            head: false,
        }
    }

    /// Round to nearest: every dequantized weight is within half a step of the original, and the
    /// round trip keeps names, shapes and the untouched tensors.
    #[test]
    fn round_trip_is_within_half_a_step() {
        tch::manual_seed(1);
        let w = Tensor::randn([6, 32], (Kind::Float, tch::Device::Cpu));
        let conv = Tensor::randn([32, 32], (Kind::Float, tch::Device::Cpu));
        let norm = Tensor::randn([32], (Kind::Float, tch::Device::Cpu));
        for (bits, levels) in [(8u8, 127.0), (4, 7.0)] {
            let named = vec![
                (
                    "transformer.h.0.mlp.c_fc.weight".to_string(),
                    conv.shallow_clone(),
                ),
                (
                    "vit.encoder.layer.0.intermediate.dense.weight".to_string(),
                    w.shallow_clone(),
                ),
                ("vit.layernorm.weight".to_string(), norm.shallow_clone()),
                ("classifier.weight".to_string(), w.shallow_clone()),
            ];
            let stored = quantize(named, &q(bits, 8), true).unwrap();
            let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
            assert!(
                names.contains(&"vit.layernorm.weight") && names.contains(&"classifier.weight")
            );
            let back = dequantize(stored.into_iter().collect()).unwrap();
            assert_eq!(back.len(), 4);
            for (name, orig) in [
                ("transformer.h.0.mlp.c_fc.weight", &conv),
                ("vit.encoder.layer.0.intermediate.dense.weight", &w),
            ] {
                let d = &back[name];
                assert_eq!(d.size(), orig.size(), "{name}");
                // The largest step of the tensor bounds every error by half of it.
                let step = orig.abs().max().double_value(&[]) / levels;
                let err = (d - orig).abs().max().double_value(&[]);
                assert!(
                    err <= 0.5 * step + 1e-6,
                    "{bits}-bit {name}: error {err}, step {step}"
                );
            }
            assert!(back["classifier.weight"].equal(&w));
        }
    }

    #[test]
    fn bad_settings_and_files_are_refused_in_one_line() {
        let w = Tensor::randn([4, 12], (Kind::Float, tch::Device::Cpu));
        let named = || vec![("m.layer.0.dense.weight".to_string(), w.shallow_clone())];
        for (s, needle) in [
            (q(3, 8), "must be 8 or 4"),
            (q(4, 5), "even number"),
            (q(4, 8), "does not divide its 12"),
        ] {
            let e = quantize(named(), &s, false).unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains('\n'), "{e}");
        }
        let mut stored: HashMap<String, Tensor> = quantize(named(), &q(8, 8), false)
            .unwrap()
            .into_iter()
            .collect();
        stored.remove("m.layer.0.dense.weight.scales");
        let e = dequantize(stored).unwrap_err().to_string();
        assert!(e.contains(".scales is missing"), "{e}");
    }
}
