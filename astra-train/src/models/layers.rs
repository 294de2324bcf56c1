//! Building blocks shared by the models: linear layers (nn.Linear's and GPT-2's Conv1D, both with
//! an int8 CPU path), activations, and attention over [full | quantized] keys through libtorch's
//! scaled_dot_product_attention.

use std::sync::OnceLock;

use tch::{nn, Tensor};

use crate::int8_linear::{self, Int8Linear};

/// nn.Linear (`weight` [out, in], optional `bias`) that computes in int8 on the CPU when
/// [`int8_linear::set_compute`] is on: its weights are packed on first use, once (the switch is
/// for inference; weights changed afterwards would keep the old packing).
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    packed: OnceLock<Int8Linear>,
}

/// As `nn::linear`: the same variables, initialisation and names.
pub fn linear(p: nn::Path, inp: i64, out: i64, cfg: nn::LinearConfig) -> Linear {
    let l = nn::linear(p, inp, out, cfg);
    Linear {
        ws: l.ws,
        bs: l.bs,
        packed: OnceLock::new(),
    }
}

impl nn::Module for Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        if int8_linear::applies_to(x) {
            return int8(&self.packed, x, || {
                (self.ws.shallow_clone(), self.bs.as_ref())
            });
        }
        x.linear(&self.ws, self.bs.as_ref())
    }
}

/// x through the int8 weights in `packed`, packing them from `weights` (W [out, in], bias) first.
fn int8<'a>(
    packed: &OnceLock<Int8Linear>,
    x: &Tensor,
    weights: impl FnOnce() -> (Tensor, Option<&'a Tensor>),
) -> Tensor {
    let lin = packed.get_or_init(|| {
        let (w, b) = weights();
        Int8Linear::from_float(&w, b).expect("packing a float linear layer for int8")
    });
    lin.forward(x).expect("int8 linear on a float CPU input")
}

/// GPT-2's Conv1D: a linear layer whose weight is stored [in, out] (transposed from nn.Linear).
#[derive(Debug)]
pub struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
    packed: OnceLock<Int8Linear>,
}

impl Conv1D {
    pub fn new(p: nn::Path, inp: i64, out: i64) -> Self {
        Conv1D {
            weight: p.var(
                "weight",
                &[inp, out],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            bias: p.var("bias", &[out], nn::Init::Const(0.0)),
            packed: OnceLock::new(),
        }
    }
}

impl nn::Module for Conv1D {
    fn forward(&self, x: &Tensor) -> Tensor {
        if int8_linear::applies_to(x) {
            return int8(&self.packed, x, || (self.weight.tr(), Some(&self.bias)));
        }
        x.matmul(&self.weight) + &self.bias
    }
}

/// HF activation names: "gelu" (exact), "gelu_new" (tanh approximation), "relu".
pub fn activate(x: &Tensor, name: &str) -> Tensor {
    match name {
        "gelu_new" => x.gelu("tanh"),
        "relu" => x.relu(),
        _ => x.gelu("none"),
    }
}

/// Which keys each query of an attention sees.
#[derive(Clone, Copy, Debug)]
pub enum Sight<'a> {
    /// Every key.
    All,
    /// Query i sees keys 0..=i (aligned top-left, as SDPA's causal flag).
    Causal,
    /// Boolean [S, Sk], true = may attend.
    Mask(&'a Tensor),
}

impl Sight<'_> {
    /// Attention in head layout: q [B, H, S, hd], k/v [B, H, Sk, hd] → [B, H, S, hd].
    pub fn attend_heads(self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (mask, causal) = match self {
            Sight::All => (None, false),
            Sight::Causal => (None, true),
            Sight::Mask(m) => (Some(m), false),
        };
        Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None::<f64>, false)
    }
}

/// Multi-head attention of queries q [B, S, D] over keys/values [B, Sk, D], as `sight` says.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, sight: Sight<'_>) -> Tensor {
    let (b, s, d) = q.size3().expect("q is [B, S, D]");
    let sk = k.size()[1];
    let hd = d / heads;
    let split = |t: &Tensor, len: i64| t.view([b, len, heads, hd]).transpose(1, 2);
    let out = sight.attend_heads(&split(q, s), &split(k, sk), &split(v, sk));
    out.transpose(1, 2).contiguous().view([b, s, d])
}
