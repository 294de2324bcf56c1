//! Mixed-Precision Attention batched by device, without a mask (the training fast path; see
//! [`DeviceGroups`]). The masked form in [`super::mpa`] stays the reference and covers the rest
//! (uneven shares, a single CLS, lost messages, causal decoders).

use tch::{Device, Kind, Tensor};

use super::mpa::DevicePartition;

/// Mixed-Precision Attention without a mask, for the common case: every device holds the same
/// number of content tokens and one CLS copy (distributed CLS), nothing lost. Queries are batched
/// by device, [B·N, 1 + T/N, D], and device d's keys are its CLS copy's key followed by all T
/// content keys — full precision where d owns the token, quantized elsewhere — [B·N, 1 + T, D].
/// The same (query, key) pairs as the mask over [S full | T quantized] keys, with half the
/// scores and no mask, so the fused (flash) attention kernels apply.
pub struct DeviceGroups {
    pub devices: i64,
    pub tokens: i64,
    /// Rows of [CLS copies | content tokens] grouped by device (CLS copy d, then d's tokens), and
    /// its inverse permutation.
    pub order: Tensor,
    pub inverse: Tensor,
    /// [1, N, T, 1]: content token t is owned by device d.
    pub own: Tensor,
}

impl DeviceGroups {
    /// None when the partition is uneven or the CLS is not distributed (the masked path applies).
    pub fn new(partition: &DevicePartition, cls: usize, device: Device) -> Option<Self> {
        let n = partition.devices();
        let t = partition.tokens();
        if cls != n || !t.is_multiple_of(n) || (0..n).any(|d| partition.tokens_of(d).len() != t / n)
        {
            return None;
        }
        let order: Vec<i64> = (0..n)
            .flat_map(|d| {
                std::iter::once(d as i64)
                    .chain(partition.tokens_of(d).into_iter().map(|j| (cls + j) as i64))
            })
            .collect();
        let order = crate::runtime::upload(&Tensor::from_slice(&order), device);
        let inverse = order.argsort(0, false);
        let owner: Vec<i64> = (0..t).map(|j| partition.owner(j) as i64).collect();
        let owner = crate::runtime::upload(&Tensor::from_slice(&owner), device);
        let own = Tensor::arange(n as i64, (Kind::Int64, device))
            .view([n as i64, 1])
            .eq_tensor(&owner.view([1, t as i64]))
            .view([1, n as i64, t as i64, 1]);
        Some(DeviceGroups {
            devices: n as i64,
            tokens: t as i64,
            order,
            inverse,
            own,
        })
    }

    /// Queries [B, S, D] → [B·N, S/N, D], grouped by device.
    pub fn group(&self, x: &Tensor) -> Tensor {
        let (b, s, d) = x.size3().expect("[B, S, D]");
        x.index_select(1, &self.order)
            .reshape([b * self.devices, s / self.devices, d])
    }

    /// Back from [B·N, S/N, D] to [B, S, D] in sequence order.
    pub fn ungroup(&self, y: &Tensor) -> Tensor {
        let (bn, per, d) = y.size3().expect("[B·N, S/N, D]");
        y.reshape([bn / self.devices, per * self.devices, d])
            .index_select(1, &self.inverse)
    }

    /// Per-device keys (or values) [B·N, 1 + T, D] from the full ones of all S rows [B, S, D]
    /// (CLS copies first) and the quantized ones of the content tokens [B, T, D].
    pub fn keys(&self, full: &Tensor, quantized: &Tensor) -> Tensor {
        let (b, _, d) = full.size3().expect("[B, S, D]");
        let (n, t) = (self.devices, self.tokens);
        let cls = full.narrow(1, 0, n).unsqueeze(2); // [B, N, 1, D]
        let content = full.narrow(1, n, t).unsqueeze(1); // [B, 1, T, D]
        let mixed = content.where_self(&self.own, &quantized.to_kind(full.kind()).unsqueeze(1));
        Tensor::cat(&[cls, mixed], 2).reshape([b * n, 1 + t, d])
    }
}
