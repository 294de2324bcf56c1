//! An analytic device model for what-if studies: per-device compute time of each method from FLOP
//! and memory-traffic counts of a ViT-style encoder block on a device of given peak FLOP/s and
//! memory bandwidth (a roofline: each matrix product takes the larger of its FLOP time and its
//! weight-read time).
//!
//! Counts per block, D hidden, MLP 4D, t local tokens, T all tokens, N devices, K codewords:
//! - single: QKV 6TD², attention 4T²D, output 2TD², MLP 16TD²;
//! - SP (Voltage) and ASTRA: local queries, keys/values of all T tokens: Q+output 4tD², K,V 4TD²,
//!   attention 4tTD, MLP 16tD²; ASTRA adds the VQ encode of its t tokens, 2tKD (any G);
//! - TP: the single-device work with weights split N ways, every token on every device: 1/N of it;
//! - BP (our reading of DeTransformer): the N_b kept original blocks as SP, the others attend only
//!   to the device's own t tokens (4t²D of attention, 24tD² of projections).
//!   Weights (12D² floats a block) are read once per block whatever the method (TP: 1/N of them).

use crate::error::{Result, SimError};
use crate::method::{partition, Method, ModelShape};
use crate::profile::ComputeSource;

#[derive(Clone, Debug)]
pub struct AnalyticDevice {
    pub tflops: f64,
    pub mem_gbps: f64,
    /// Fraction of peak the kernels reach (0.5 is typical of fp32 GEMM on consumer GPUs).
    pub efficiency: f64,
    pub model: ModelShape,
    pub codewords: u64,
    name: String,
}

impl AnalyticDevice {
    /// `analytic:TFLOPS:GBPS[:EFFICIENCY]`, e.g. `analytic:5.0:288` for a GTX 1660 Ti-like device.
    pub fn parse(spec: &str, model: ModelShape) -> Result<Self> {
        let parts: Vec<&str> = spec.split(':').collect();
        let bad = || {
            SimError::invalid(
                "profile",
                format!("'{spec}' is not analytic:TFLOPS:GBPS[:EFFICIENCY] with positive numbers"),
            )
        };
        if parts.len() < 3 || parts.len() > 4 || parts[0] != "analytic" {
            return Err(bad());
        }
        let num = |s: &str| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(bad)
        };
        let efficiency = if parts.len() == 4 {
            num(parts[3])?
        } else {
            0.5
        };
        if efficiency > 1.0 {
            return Err(bad());
        }
        Ok(AnalyticDevice {
            tflops: num(parts[1])?,
            mem_gbps: num(parts[2])?,
            efficiency,
            model,
            codewords: 1u64 << model.index_bits,
            name: spec.to_string(),
        })
    }

    /// Milliseconds for `flops` of matrix work that must read `bytes` of weights.
    fn ms(&self, flops: f64, bytes: f64) -> f64 {
        let compute = flops / (self.tflops * 1e12 * self.efficiency);
        let memory = bytes / (self.mem_gbps * 1e9);
        1e3 * compute.max(memory)
    }
}

impl ComputeSource for AnalyticDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn provenance(&self) -> String {
        format!(
            "analytic roofline: {} TFLOP/s fp32 at {:.0}% efficiency, {} GB/s; counts in astra-sim's analytic module",
            self.tflops,
            self.efficiency * 100.0,
            self.mem_gbps
        )
    }

    fn compute_ms(&self, method: Method, devices: u32, tokens: u64) -> Result<f64> {
        let d = self.model.hidden as f64;
        let big_t = tokens as f64;
        let n = if method == Method::Single { 1 } else { devices };
        let t = *partition(tokens, n).iter().max().expect("n > 0") as f64;
        let weights = 12.0 * d * d * self.model.element_bits as f64 / 8.0;
        let sp_block =
            4.0 * t * d * d + 4.0 * big_t * d * d + 4.0 * t * big_t * d + 16.0 * t * d * d;
        let local_block = 24.0 * t * d * d + 4.0 * t * t * d;
        let l = self.model.blocks as f64;
        let per_block = |flops: f64, w: f64| self.ms(flops, w);
        Ok(match method {
            Method::Single => {
                l * per_block(24.0 * big_t * d * d + 4.0 * big_t * big_t * d, weights)
            }
            Method::Tp => {
                l * per_block(
                    (24.0 * big_t * d * d + 4.0 * big_t * big_t * d) / n as f64,
                    weights / n as f64,
                )
            }
            Method::Sp => l * per_block(sp_block, weights),
            Method::Astra { .. } => {
                l * per_block(sp_block + 2.0 * t * self.codewords as f64 * d, weights)
            }
            Method::BpAg { nb } | Method::BpSp { nb } => {
                let kept = (nb as f64).min(l);
                kept * per_block(sp_block, weights) + (l - kept) * per_block(local_block, weights)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_sensibly() {
        let dev = AnalyticDevice::parse("analytic:5:288", ModelShape::default()).unwrap();
        let single = dev.compute_ms(Method::Single, 1, 1024).unwrap();
        let sp4 = dev.compute_ms(Method::Sp, 4, 1024).unwrap();
        let astra4 = dev
            .compute_ms(Method::Astra { groups: 1 }, 4, 1024)
            .unwrap();
        let tp4 = dev.compute_ms(Method::Tp, 4, 1024).unwrap();
        // A 1660 Ti-class device runs ViT-Base at T = 1024 in tens to hundreds of ms.
        assert!((20.0..400.0).contains(&single), "{single}");
        assert!(sp4 < single && sp4 > single / 4.0);
        assert!(astra4 > sp4);
        assert!((tp4 - single / 4.0).abs() / single < 0.05);
        for bad in ["analytic:5", "analytic:-1:2", "analytic:1:2:1.5", "gpu:1:2"] {
            assert!(
                AnalyticDevice::parse(bad, ModelShape::default()).is_err(),
                "{bad}"
            );
        }
    }
}
