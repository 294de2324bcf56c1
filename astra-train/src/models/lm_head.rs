//! A language model's head and its cross-entropy, fused: the logits [N, V] are formed a chunk of
//! rows at a time and turned into their gradient at once, never kept for a backward pass.
//!
//! Autograd's path keeps the logits, an fp32 copy, the log-softmax and, in backward, a zeroed
//! gradient, the log-softmax's gradient and its bf16 copy: about eight passes over [N, V] (GPT-2 at
//! batch 8 × 1,024 tokens: 412 M entries, 1.6 GB each in fp32). Here each chunk's logits come from
//! one matmul, one kernel (or a few ATen ops off CUDA) replaces them in place by
//! softmax − one-hot, and two matmuls give the chunk's share of the gradients of the states and
//! the output matrix. The loss returned carries those gradients through a linear surrogate
//! (⟨states, ∂states⟩ + ⟨W, ∂W⟩, whose value is subtracted again), so `backward` and any scaling
//! of the loss (data-parallel shares, added terms) work as with the unfused loss. Equal to
//! `task::loss` on the logits in value and gradients (tests).

use tch::{nn::Module, Kind, Tensor};

/// The head's parts: logits = norm(states) · weightᵀ.
pub struct LmHead<'a> {
    pub norm: &'a dyn Module,
    /// [V, D].
    pub weight: &'a Tensor,
}

/// [`crate::engine::AstraModel::final_states`] from a model's plain form and its ASTRA form
/// (states and summed commitment).
pub(crate) fn plain_or_astra(
    astra: Option<super::Astra>,
    plain: impl FnOnce() -> crate::error::Result<Tensor>,
    under: impl FnOnce(super::Astra) -> crate::error::Result<(Tensor, Tensor)>,
) -> crate::error::Result<(Tensor, Option<Tensor>)> {
    match astra {
        None => Ok((plain()?, None)),
        Some(a) => under(a).map(|(x, c)| (x, Some(c))),
    }
}

/// The mean cross-entropy over the targets that are not `ignore`, and how many of those the
/// logits' argmax hits (a no-grad count).
pub struct LmLoss {
    pub loss: Tensor,
    pub hits: Tensor,
}

/// Logits formed at once: at most 2²⁷ entries (256 MB in bf16), whatever the vocabulary.
const CHUNK_ENTRIES: i64 = 1 << 27;

impl LmHead<'_> {
    /// The loss of final `states` [.., D] against `targets` [..] (the shape of states without D).
    /// With no target kept the loss is 0 (the unfused mean would be NaN).
    pub fn loss(&self, states: &Tensor, targets: &Tensor, ignore: i64) -> LmLoss {
        self.loss_in_chunks(states, targets, ignore, CHUNK_ENTRIES)
    }

    /// [`Self::loss`] forming at most `entries` logits at once (at least one row).
    fn loss_in_chunks(
        &self,
        states: &Tensor,
        targets: &Tensor,
        ignore: i64,
        entries: i64,
    ) -> LmLoss {
        let h = self.norm.forward(states);
        let d = *h.size().last().expect("states have a feature axis");
        let (h, y) = (h.reshape([-1, d]), targets.reshape([-1]));
        let w = self.weight;
        let (n, v) = (h.size()[0], w.size()[0]);
        let rows = (entries / v.max(1)).clamp(1, n.max(1));
        let (dh, dw, loss_sum, hits) = tch::no_grad(|| {
            let wp = padded_weight(w);
            let mut dh = Vec::new();
            let mut dw = Tensor::zeros_like(w);
            let mut loss_sum = Tensor::zeros([], (Kind::Float, h.device()));
            let mut hits = Tensor::zeros([], (Kind::Float, h.device()));
            for start in (0..n).step_by(rows as usize) {
                let len = rows.min(n - start);
                let hc = h.narrow(0, start, len);
                // Under autocast: bf16 logits, as the unfused head makes them. With a padded
                // weight the padding's logits are 0 and its rows of the weight 0, so they add
                // nothing to ∂states; its rows of ∂W are dropped.
                let logits = hc.matmul(&wp.tr());
                let (l, c) = softmax_cross_entropy_grad(
                    &logits.narrow(1, 0, v),
                    &y.narrow(0, start, len),
                    ignore,
                );
                dh.push(logits.matmul(&wp));
                dw += logits.tr().matmul(&hc).narrow(0, 0, v).to_kind(w.kind());
                loss_sum += l;
                hits += c;
            }
            (Tensor::cat(&dh, 0), dw, loss_sum, hits)
        });
        let count = y.ne(ignore).sum(Kind::Float).clamp_min(1.0);
        let surrogate =
            ((&h * dh.to_kind(h.kind())).sum(Kind::Float) + (w * dw).sum(Kind::Float)) / &count;
        let loss = loss_sum / &count + &surrogate - surrogate.detach();
        LmLoss { loss, hits }
    }
}

/// Rows a padded output matrix is a multiple of: GPT-2's 50,257 words make every row of the
/// logits start at an odd address, and cuBLAS then runs its unaligned GEMMs (on an H200 the LM
/// head's three GEMMs took 15.8 of a 39.5 ms GPT-2 step).
const VOCAB_ALIGN: i64 = 64;

/// The output matrix for the chunks' GEMMs: on CUDA (where the kernels run) padded with zero rows
/// to a multiple of [`VOCAB_ALIGN`], and made once in the type autocast would cast it to; as is
/// elsewhere.
fn padded_weight(w: &Tensor) -> Tensor {
    let (v, d) = (w.size()[0], w.size()[1]);
    let padded = (v + VOCAB_ALIGN - 1) / VOCAB_ALIGN * VOCAB_ALIGN;
    if crate::cuda::kernels(w.device()).is_none() || padded == v {
        return w.shallow_clone();
    }
    let wp = Tensor::zeros([padded, d], (crate::precision::gemm_kind(w), w.device()));
    wp.narrow(0, 0, v).copy_(w);
    wp
}

/// Replaces `logits` [C, V] (bf16 or fp32, rows contiguous) by the gradient of the summed
/// cross-entropy, softmax − one-hot (0 on rows whose target is `ignore`), and returns (summed
/// loss, argmax hits) of the kept rows as fp32 scalars. One kernel on CUDA, ATen elsewhere.
pub fn softmax_cross_entropy_grad(
    logits: &Tensor,
    targets: &Tensor,
    ignore: i64,
) -> (Tensor, Tensor) {
    if let Some(k) = crate::cuda::kernels(logits.device()) {
        if let Some(r) = crate::cuda::or_aten(crate::cuda::xent::softmax_xent_grad(
            &k, logits, targets, ignore,
        )) {
            return r;
        }
    }
    softmax_cross_entropy_grad_aten(logits, targets, ignore)
}

/// [`softmax_cross_entropy_grad`] in ATen ops (the reference of the kernel).
pub fn softmax_cross_entropy_grad_aten(
    logits: &Tensor,
    targets: &Tensor,
    ignore: i64,
) -> (Tensor, Tensor) {
    let keep = targets.ne(ignore);
    let safe = targets.where_scalarother(&keep, 0).unsqueeze(1);
    let lf = logits.to_kind(Kind::Float);
    let lse = lf.logsumexp([-1], true);
    let keep_f = keep.to_kind(Kind::Float).unsqueeze(1);
    let loss = ((&lse - lf.gather(1, &safe, false)) * &keep_f).sum(Kind::Float);
    let hits = lf
        .argmax(-1, false)
        .eq_tensor(targets)
        .logical_and(&keep)
        .sum(Kind::Float);
    let mut grad = (lf - lse).exp();
    let minus_one = Tensor::full([targets.size()[0], 1], -1.0, (Kind::Float, logits.device()));
    let _ = grad.scatter_add_(1, &safe, &minus_one);
    grad *= keep_f;
    let mut out = logits.shallow_clone();
    out.copy_(&grad);
    (loss, hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    /// Value, hits and gradients of the fused loss equal the unfused one's (small chunks too).
    #[test]
    fn the_fused_loss_equals_cross_entropy_on_the_logits() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let ln = nn::layer_norm(vs.root() / "ln", vec![16], Default::default());
        let w = vs.root().randn("w", &[37, 16], 0.0, 1.0);
        let head = LmHead {
            norm: &ln,
            weight: &w,
        };
        let states = Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = Tensor::randint(37, [3, 5], (Kind::Int64, Device::Cpu));
        let _ = y.get(1).get(2).fill_(-100);
        let _ = y.get(2).get(0).fill_(-100);
        let grads =
            |loss: &Tensor| Tensor::run_backward(&[loss * 2.5], &[&states, &w], false, false);
        let logits = states.apply(&ln).matmul(&w.tr());
        let want = crate::train::task::loss(&logits, &y);
        let want_hits = logits
            .argmax(-1, false)
            .eq_tensor(&y)
            .logical_and(&y.ne(-100))
            .sum(Kind::Float);
        let want_g = grads(&want);
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-5;
        // One chunk, and chunks of 4 rows (the last one short).
        for entries in [CHUNK_ENTRIES, 4 * 37] {
            let got = head.loss_in_chunks(&states, &y, -100, entries);
            let got_g = grads(&got.loss);
            assert!(close(&got.loss, &want), "{:?} vs {want:?}", got.loss);
            assert!(got.hits.equal(&want_hits));
            for (a, b) in got_g.iter().zip(&want_g) {
                assert!(close(a, b), "gradients differ by {}", (a - b).abs().max());
            }
        }
    }

    #[test]
    fn ignored_rows_get_no_gradient_and_no_loss() {
        let mut logits = Tensor::randn([4, 9], (Kind::Float, Device::Cpu));
        let y = Tensor::from_slice(&[3i64, -100, 8, -100]);
        let before = logits.copy();
        let (loss, hits) = softmax_cross_entropy_grad_aten(&logits, &y, -100);
        let kept = before.index_select(0, &Tensor::from_slice(&[0i64, 2]));
        let want = kept.cross_entropy_loss::<Tensor>(
            &Tensor::from_slice(&[3i64, 8]),
            None,
            tch::Reduction::Sum,
            -100,
            0.0,
        );
        assert!((loss - want).abs().double_value(&[]) < 1e-6);
        assert!(hits.double_value(&[]) <= 2.0);
        assert_eq!(logits.get(1).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Kept rows: softmax − one-hot sums to 0.
        assert!(logits.get(0).sum(Kind::Float).abs().double_value(&[]) < 1e-6);
        let _ = logits.zero_();
    }
}
