//! Fast keys and values for remote tokens (ASTRA.md §2, step 4). A remote token is a
//! concatenation of G codewords, so LayerNorm followed by the key/value projection need no matmul
//! per token: with A = [W_k; W_v]·diag(γ),
//!
//!   [K̂ V̂] = (Σ_g P_g[k_g]) / σ − (μ / σ)·(A·1) + (A·β + b),   P_g[k] = c_{g,k} · A[:, group g]ᵀ
//!
//! where μ and σ² come from per-codeword sums (Σ_g s1_g[k_g] / D and Σ_g s2_g[k_g] / D − μ²). Per
//! remote token that is G gathers and adds of 2D values instead of a D × 2D matmul.

use tch::{Kind, Tensor};

/// Clones share the tables' storage (they are never written after construction).
impl Clone for CodewordKv {
    fn clone(&self) -> Self {
        CodewordKv {
            tables: self.tables.shallow_clone(),
            s1: self.s1.shallow_clone(),
            s2: self.s2.shallow_clone(),
            colsum: self.colsum.shallow_clone(),
            constant: self.constant.shallow_clone(),
            groups: self.groups,
            k: self.k,
            dim: self.dim,
            eps: self.eps,
        }
    }
}

pub struct CodewordKv {
    /// [G·K, 2D] projected codewords.
    tables: Tensor,
    /// [G·K] sums and sums of squares of each codeword (f64 for the variance).
    s1: Tensor,
    s2: Tensor,
    colsum: Tensor,
    constant: Tensor,
    groups: i64,
    k: i64,
    dim: i64,
    eps: f64,
}

impl CodewordKv {
    /// `codebook` [G, K, D/G]; LayerNorm `gamma`, `beta` [D]; `w_k`, `w_v` [D_out, D] (nn.Linear
    /// layout) with biases [D_out] (None: no bias).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        codebook: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        w_k: &Tensor,
        b_k: Option<&Tensor>,
        w_v: &Tensor,
        b_v: Option<&Tensor>,
        eps: f64,
    ) -> Self {
        let (g, k, w) = codebook.size3().expect("[G, K, D/G]");
        let d = g * w;
        let cb = codebook.to_kind(Kind::Float);
        let a = Tensor::cat(&[w_k, w_v], 0).to_kind(Kind::Float); // [2D_out, D]
        let out = a.size()[0];
        let a_gamma = &a * gamma.to_kind(Kind::Float).view([1, d]);
        let per_group = a_gamma.view([out, g, w]).permute([1, 2, 0]); // [G, w, 2D_out]
        let tables = cb.bmm(&per_group).reshape([g * k, out]);
        let cb64 = cb.to_kind(Kind::Double);
        let bias = |b: Option<&Tensor>, n: i64| {
            b.map(|t| t.to_kind(Kind::Float))
                .unwrap_or_else(|| Tensor::zeros([n], (Kind::Float, codebook.device())))
        };
        let constant = a.matmul(&beta.to_kind(Kind::Float))
            + Tensor::cat(&[bias(b_k, w_k.size()[0]), bias(b_v, w_v.size()[0])], 0);
        CodewordKv {
            tables,
            s1: cb64
                .sum_dim_intlist(-1, false, Kind::Double)
                .reshape([g * k]),
            s2: cb64
                .square()
                .sum_dim_intlist(-1, false, Kind::Double)
                .reshape([g * k]),
            colsum: a_gamma.sum_dim_intlist(1, false, Kind::Float),
            constant,
            groups: g,
            k,
            dim: d,
            eps,
        }
    }

    /// Keys and values [.., 2·D_out] (keys first) of the tokens whose indices are `idx` [.., G].
    pub fn kv(&self, idx: &Tensor) -> Tensor {
        let shape = idx.size();
        let g = self.groups;
        let offsets = Tensor::arange(g, (Kind::Int64, idx.device())) * self.k;
        let slot = (idx.reshape([-1, g]) + offsets.view([1, g])).reshape([-1]);
        let m = slot.size()[0] / g;
        // Gather-and-sum over the G codewords of each token in one pass (no [M, G, 2D] tensor).
        let bag_offsets = Tensor::arange_start_step(0, m * g, g, (Kind::Int64, idx.device()));
        let (projected, _, _, _) = Tensor::embedding_bag(
            &self.tables,
            &slot,
            &bag_offsets,
            false,
            0,
            false,
            None::<Tensor>,
            false,
        );
        let mu = self
            .s1
            .index_select(0, &slot)
            .view([m, g])
            .sum_dim_intlist(1, true, Kind::Double)
            / self.dim as f64;
        let ex2 =
            self.s2
                .index_select(0, &slot)
                .view([m, g])
                .sum_dim_intlist(1, true, Kind::Double)
                / self.dim as f64;
        let rstd = (ex2 - mu.square() + self.eps).rsqrt();
        let (mu, rstd) = (mu.to_kind(Kind::Float), rstd.to_kind(Kind::Float));
        let out = &projected * &rstd - (&mu * &rstd) * self.colsum.view([1, -1])
            + self.constant.view([1, -1]);
        let mut out_shape = shape[..shape.len() - 1].to_vec();
        out_shape.push(out.size()[1]);
        out.reshape(out_shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn equals_layernorm_then_projection() {
        tch::manual_seed(5);
        let (g, k, w) = (4i64, 32i64, 8i64);
        let d = g * w;
        let o = (Kind::Float, Device::Cpu);
        let cb = Tensor::randn([g, k, w], o) + 0.3;
        let (gamma, beta) = (
            Tensor::randn([d], o) * 0.2 + 1.0,
            Tensor::randn([d], o) * 0.1,
        );
        let (wk, wv, bk, bv) = (
            Tensor::randn([d, d], o) * 0.1,
            Tensor::randn([d, d], o) * 0.1,
            Tensor::randn([d], o),
            Tensor::randn([d], o),
        );
        let fast = CodewordKv::new(&cb, &gamma, &beta, &wk, Some(&bk), &wv, Some(&bv), 1e-6);
        let idx = Tensor::randint(k, [3, 10, g], (Kind::Int64, Device::Cpu));
        // Direct: decode, LayerNorm, two linear maps.
        let offsets = Tensor::arange(g, (Kind::Int64, Device::Cpu)) * k;
        let x = cb
            .reshape([g * k, w])
            .index_select(
                0,
                &(idx.reshape([-1, g]) + offsets.view([1, g])).reshape([-1]),
            )
            .reshape([3, 10, d]);
        let y = x.layer_norm([d], Some(&gamma), Some(&beta), 1e-6, false);
        let direct = Tensor::cat(&[y.matmul(&wk.tr()) + &bk, y.matmul(&wv.tr()) + &bv], 2);
        let got = fast.kv(&idx);
        let rel =
            (&got - &direct).abs().max().double_value(&[]) / direct.abs().max().double_value(&[]);
        assert!(rel < 1e-5, "relative difference {rel}");
        let nobias = CodewordKv::new(&cb, &gamma, &beta, &wk, None, &wv, None, 1e-6).kv(&idx);
        let direct_nb = Tensor::cat(&[y.matmul(&wk.tr()), y.matmul(&wv.tr())], 2);
        assert!(
            (&nobias - &direct_nb).abs().max().double_value(&[])
                / direct_nb.abs().max().double_value(&[])
                < 1e-5
        );
    }
}
