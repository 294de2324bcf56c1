//! The parallelisation methods of the paper's latency study (ASTRA.md §4) and how many bits each
//! sends per device.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::SimError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// The whole model on one device.
    Single,
    /// Tensor parallelism (Megatron-LM): two all-reduces per block.
    Tp,
    /// Sequence parallelism (Voltage): one all-gather of full embeddings per block.
    Sp,
    /// Block parallelism (DeTransformer), `nb` original blocks kept, all-gather variant.
    BpAg { nb: u32 },
    /// Block parallelism, sequence-parallel variant (twice the exchanges of BpAg).
    BpSp { nb: u32 },
    /// ASTRA with G groups of ceil(log2 K)-bit indices per token per block.
    Astra { groups: u32 },
}

impl Method {
    /// The methods of the paper's figures, in its order.
    pub fn paper_methods() -> Vec<Method> {
        use Method::*;
        vec![
            Astra { groups: 1 },
            Astra { groups: 16 },
            Astra { groups: 32 },
            BpAg { nb: 1 },
            BpAg { nb: 4 },
            BpSp { nb: 1 },
            BpSp { nb: 4 },
            Tp,
            Sp,
        ]
    }

    pub fn is_astra(&self) -> bool {
        matches!(self, Method::Astra { .. })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::Single => write!(f, "single"),
            Method::Tp => write!(f, "tp"),
            Method::Sp => write!(f, "sp"),
            Method::BpAg { nb } => write!(f, "bp-ag-nb{nb}"),
            Method::BpSp { nb } => write!(f, "bp-sp-nb{nb}"),
            Method::Astra { groups } => write!(f, "astra-g{groups}"),
        }
    }
}

impl FromStr for Method {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, SimError> {
        let bad = || SimError::Invalid {
            field: "method".into(),
            reason: format!(
                "unknown method '{s}' (expected single, tp, sp, bp-ag-nbN, bp-sp-nbN or astra-gG)"
            ),
        };
        let num = |rest: &str| rest.parse::<u32>().ok().filter(|&v| v > 0).ok_or_else(bad);
        match s {
            "single" => Ok(Method::Single),
            "tp" => Ok(Method::Tp),
            "sp" => Ok(Method::Sp),
            _ => {
                if let Some(r) = s.strip_prefix("bp-ag-nb") {
                    Ok(Method::BpAg { nb: num(r)? })
                } else if let Some(r) = s.strip_prefix("bp-sp-nb") {
                    Ok(Method::BpSp { nb: num(r)? })
                } else if let Some(r) = s.strip_prefix("astra-g") {
                    Ok(Method::Astra { groups: num(r)? })
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The encoder whose blocks the methods split (defaults: the paper's 12-block, 768-wide ViT-Base
/// encoder in fp32 with K = 1024 codebooks).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub blocks: u32,
    pub hidden: u32,
    /// Bits of one embedding element on the wire (32 for fp32).
    pub element_bits: u32,
    /// Bits of one VQ index, ceil(log2 K) (10 for K = 1024).
    pub index_bits: u32,
    /// Codebooks per block whose indices a token sends: 1 (the block input, ViT and GPT-2) or
    /// 2 (keys and values, Llama): the paper's Llama accounting, 2·L·G·log2 K bits per token.
    #[serde(default = "one")]
    pub codebooks_per_block: u32,
}

fn one() -> u32 {
    1
}

impl Default for ModelShape {
    fn default() -> Self {
        ModelShape {
            blocks: 12,
            hidden: 768,
            element_bits: 32,
            index_bits: 10,
            codebooks_per_block: 1,
        }
    }
}

impl ModelShape {
    /// Bits one device sends in one exchange for `local` tokens: a full-precision embedding per
    /// token, or G indices per token for ASTRA.
    pub fn payload_bits(&self, method: Method, local_tokens: u64) -> u64 {
        match method {
            Method::Astra { groups } => {
                local_tokens * (groups * self.index_bits * self.codebooks_per_block) as u64
            }
            _ => local_tokens * self.hidden as u64 * self.element_bits as u64,
        }
    }

    /// Exchanges per inference (ASTRA.md §4's table): TP 2L, SP L, BP+AG N_b, BP+SP 2N_b, ASTRA L.
    pub fn exchanges(&self, method: Method) -> u32 {
        match method {
            Method::Single => 0,
            Method::Tp => 2 * self.blocks,
            Method::Sp | Method::Astra { .. } => self.blocks,
            Method::BpAg { nb } => nb,
            Method::BpSp { nb } => 2 * nb,
        }
    }

    /// Bits sent per device per inference, the paper's accounting.
    pub fn bits_per_device(&self, method: Method, local_tokens: u64) -> u64 {
        self.exchanges(method) as u64 * self.payload_bits(method, local_tokens)
    }
}

/// Tokens of each device when T tokens are split contiguously over N devices: the first T mod N
/// devices hold one more.
pub fn partition(tokens: u64, devices: u32) -> Vec<u64> {
    let n = devices as u64;
    (0..n)
        .map(|d| tokens / n + u64::from(d < tokens % n))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn llama_sends_key_and_value_indices_per_block() {
        // Llama-3-8B (32 blocks), K = 1024: 2·L·G·log2 K bits per token (the paper's Table 7).
        let shape = ModelShape {
            blocks: 32,
            hidden: 4096,
            codebooks_per_block: 2,
            ..ModelShape::default()
        };
        for (g, bits) in [(1, 640), (16, 10_240), (32, 20_480)] {
            assert_eq!(shape.bits_per_device(Method::Astra { groups: g }, 1), bits);
        }
        // SP still sends the block input: 32 × 4096 × 32 bits per token.
        assert_eq!(shape.bits_per_device(Method::Sp, 1), 32 * 4096 * 32);
    }

    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Method::paper_methods().into_iter().chain([Method::Single]) {
            assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
        }
        for bad in ["astra-g0", "bp-nb", "xyz", "astra-g", "tp2"] {
            let e = bad.parse::<Method>().unwrap_err().to_string();
            assert!(e.contains("unknown method"), "{e}");
        }
    }

    #[test]
    fn paper_bit_counts() {
        let m = ModelShape::default();
        // ASTRA.md §2: 120 / 1,920 / 3,840 bits per token over 12 blocks; fp32 294,912.
        assert_eq!(m.bits_per_device(Method::Astra { groups: 1 }, 1), 120);
        assert_eq!(m.bits_per_device(Method::Astra { groups: 16 }, 1), 1920);
        assert_eq!(m.bits_per_device(Method::Astra { groups: 32 }, 1), 3840);
        assert_eq!(m.bits_per_device(Method::Sp, 1), 294_912);
        assert_eq!(m.bits_per_device(Method::Tp, 1), 2 * 294_912);
        assert_eq!(partition(1024, 6), vec![171, 171, 171, 171, 170, 170]);
    }
}
