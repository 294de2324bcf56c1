//! Building blocks shared by the models: GPT-2's Conv1D, activations, and attention over
//! [full | quantized] keys through libtorch's scaled_dot_product_attention.

use tch::{nn, Tensor};

/// GPT-2's Conv1D: a linear layer whose weight is stored [in, out] (transposed from nn.Linear).
#[derive(Debug)]
pub struct Conv1D {
    pub weight: Tensor,
    pub bias: Tensor,
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
        }
    }
}

impl nn::Module for Conv1D {
    fn forward(&self, x: &Tensor) -> Tensor {
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

/// Multi-head attention of queries q [B, S, D] over keys/values [B, Sk, D]; `mask` [S, Sk] is
/// boolean (true = may attend); `causal` applies when there is no mask.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: i64,
    mask: Option<&Tensor>,
    causal: bool,
) -> Tensor {
    let (b, s, d) = q.size3().expect("q is [B, S, D]");
    let sk = k.size()[1];
    let hd = d / heads;
    let split = |t: &Tensor, len: i64| t.view([b, len, heads, hd]).transpose(1, 2);
    let out = Tensor::scaled_dot_product_attention(
        &split(q, s),
        &split(k, sk),
        &split(v, sk),
        mask,
        0.0,
        causal && mask.is_none(),
        None::<f64>,
        false,
    );
    out.transpose(1, 2).contiguous().view([b, s, d])
}
