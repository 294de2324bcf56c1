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

/// `x` through each of `layers` (of one input width): on CUDA [`fused_linears`], elsewhere layer
/// by layer, so the CPU's int8 weights still apply. `ASTRA_LINEARS=separate` (read once) keeps
/// them separate on CUDA too (benchmarks compare the two).
pub fn linears<const N: usize>(x: &Tensor, layers: [&Linear; N]) -> [Tensor; N] {
    static SEPARATE: OnceLock<bool> = OnceLock::new();
    let separate =
        *SEPARATE.get_or_init(|| std::env::var("ASTRA_LINEARS").is_ok_and(|v| v == "separate"));
    if x.device().is_cuda() && !separate {
        if let Some(parts) = fused_linears(x, layers) {
            return parts;
        }
    }
    layers.map(|l| x.apply(l))
}

/// `x` through each of `layers` as one GEMM over their weights concatenated, its output split:
/// one launch instead of N, x read once, and in the backward one GEMM for x's gradient instead of
/// N and their sum (ViT's query/key/value; the parameters stay separate, as HF names them). None
/// where some layers have a bias and some not.
pub fn fused_linears<const N: usize>(x: &Tensor, layers: [&Linear; N]) -> Option<[Tensor; N]> {
    let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.bs.as_ref()).collect();
    if !biases.is_empty() && biases.len() != N {
        return None;
    }
    let w = Tensor::cat(&layers.map(|l| &l.ws), 0);
    let b = (!biases.is_empty()).then(|| Tensor::cat(&biases, 0));
    let widths = layers.map(|l| l.ws.size()[0]);
    let mut parts = x
        .linear(&w, b.as_ref())
        .split_with_sizes(widths, -1)
        .into_iter();
    Some(layers.map(|_| parts.next().expect("one part per layer")))
}

/// `a` [B, Sa, D] and `b` [B, Sb, D] stacked along the rows, in the type a GEMM under autocast
/// would cast them to (bf16 on CUDA under autocast; as they are elsewhere), with `a` in that type:
/// the keys and values of [x | X̃] then come from one GEMM over the stacked rows. Concatenating
/// them after two GEMMs copied strided views of the GEMMs' outputs with ATen's unvectorized cat
/// (four a block with the backward's: 0.54 of a ViT-B block's 6.9 ms on an H200).
pub fn stacked_rows(a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
    let for_gemm = |t: &Tensor| t.to_kind(crate::precision::gemm_kind(t));
    let a = for_gemm(a);
    let rows = Tensor::cat(&[&a, &for_gemm(b)], 1);
    (a, rows)
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
        conv1d(x, &self.weight, &self.bias)
    }
}

/// `x` [.., in] · `w` [in, out] + `b` as HF's Conv1D computes it, one addmm: the bias is added in
/// the GEMM, so under bf16 autocast the output stays bf16 (a matmul and a separate add of the
/// fp32 bias would promote it to fp32 and cost a pass over it).
pub fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let mut shape = x.size();
    let width = shape.pop().expect("x has a last dimension");
    shape.push(w.size()[1]);
    b.addmm(&x.reshape([-1, width]), w).view(shape.as_slice())
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
    /// Added to each query's scores before the softmax (float, broadcast to [B, H, S, Sk]):
    /// log-counts of distinct remote codewords ([`codeword_bias`]), −∞ where one may not attend.
    Bias(&'a Tensor),
}

impl Sight<'_> {
    /// Attention in head layout: q [B, H, S, hd], k/v [B, H, Sk, hd] → [B, H, S, hd].
    pub fn attend_heads(self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (mask, causal) = match self {
            Sight::All => (None, false),
            Sight::Causal => (None, true),
            Sight::Mask(m) | Sight::Bias(m) => (Some(m), false),
        };
        Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None::<f64>, false)
    }
}

/// The score bias of attention over [own keys | distinct remote codewords]: 0 for own keys that
/// `sees` allows (all of them without a mask; `sees` [S, S] boolean otherwise, −∞ where false),
/// then each codeword's log-count [B, U] (−∞ where a batch item holds none). A codeword that
/// stands for c identical remote keys weighs e^{s + log c} = c·e^s in the softmax, exactly as the
/// c keys would: [B, 1, 1, S + U] without a mask, [B, 1, S, S + U] with one.
pub fn codeword_bias(own: i64, log_count: &Tensor, sees: Option<&Tensor>) -> Tensor {
    let b = log_count.size()[0];
    let zeros = || Tensor::zeros([b, 1, 1, own], (log_count.kind(), log_count.device()));
    let counts = log_count.view([b, 1, 1, -1]);
    match sees {
        None => Tensor::cat(&[zeros(), counts], -1),
        Some(m) => {
            let s = m.size()[0];
            let local = zeros()
                .expand([b, 1, s, own], false)
                .masked_fill(&m.logical_not().view([1, 1, s, own]), f64::NEG_INFINITY);
            let u = counts.size()[3];
            Tensor::cat(&[local, counts.expand([b, 1, s, u], false)], -1)
        }
    }
}

/// Own keys `k` and values `v` [B, S, D] followed by the remote ones in `kv` [B, T_r, 2D] (keys
/// first), in the queries' type `kind`: the keys and values a device's block attends over.
pub fn append_remote(k: Tensor, v: Tensor, kv: &Tensor, kind: tch::Kind) -> (Tensor, Tensor) {
    let d = k.size()[2];
    (
        Tensor::cat(&[k, kv.narrow(2, 0, d).to_kind(kind)], 1),
        Tensor::cat(&[v, kv.narrow(2, d, d).to_kind(kind)], 1),
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    /// Outputs and the gradients of x and of every weight and bias of the layers, given a loss
    /// that weighs each output differently (so a swapped split would show).
    fn run(x: &Tensor, vs: &VarStore, outs: &[Tensor]) -> Vec<Tensor> {
        let loss: Tensor = outs
            .iter()
            .enumerate()
            .map(|(i, o)| (o * (i as f64 + 1.0)).sin().sum(Kind::Double))
            .sum();
        let mut vars: Vec<Tensor> = vec![x.shallow_clone()];
        let mut named = vs.variables().into_iter().collect::<Vec<_>>();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        vars.extend(named.into_iter().map(|(_, t)| t));
        let grads = Tensor::run_backward(&[loss], &vars, false, false);
        outs.iter().map(|o| o.detach()).chain(grads).collect()
    }

    #[test]
    fn fused_linears_equal_the_layers_one_by_one_in_values_and_gradients() {
        tch::manual_seed(5);
        for bias in [true, false] {
            let vs = VarStore::new(Device::Cpu);
            let cfg = nn::LinearConfig {
                bias,
                ..Default::default()
            };
            let p = vs.root();
            let (a, b, c) = (
                linear(&p / "a", 12, 12, cfg),
                linear(&p / "b", 12, 5, cfg),
                linear(&p / "c", 12, 7, cfg),
            );
            let x = Tensor::randn([3, 4, 12], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let [fa, fb, fc] = fused_linears(&x, [&a, &b, &c]).expect("biases alike");
            assert_eq!(fb.size(), [3, 4, 5]);
            let fused = run(&x, &vs, &[fa, fb, fc]);
            let one_by_one = run(&x, &vs, &[x.apply(&a), x.apply(&b), x.apply(&c)]);
            for (f, o) in fused.iter().zip(&one_by_one) {
                let gap = (f - o).abs().max().double_value(&[]);
                assert!(gap < 1e-5, "bias {bias}: {gap}");
            }
        }
        let vs = VarStore::new(Device::Cpu);
        let with = nn::LinearConfig::default();
        let without = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let (a, b) = (
            linear(vs.root() / "a", 4, 4, with),
            linear(vs.root() / "b", 4, 4, without),
        );
        let x = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        assert!(fused_linears(&x, [&a, &b]).is_none());
        // The CPU takes the layers one by one.
        let [la, lb] = linears(&x, [&a, &b]);
        assert!(la.allclose(&x.apply(&a), 0.0, 0.0, false));
        assert!(lb.allclose(&x.apply(&b), 0.0, 0.0, false));
    }
}
