//! Mixed-Precision Attention run device by device, without the [S, S + T] mask.
//!
//! Under the mask every query is scored against all S full-precision and all T quantized keys,
//! and the masked kernel (no flash) throws most of the scores away: a query of device d only
//! sees d's own full keys and the other devices' quantized keys, about S of the S + T columns.
//! Here each device's query rows attend to exactly the keys it sees: one gather of the rows
//! (device by device), one of the keys, one attention call per device, one gather back. The
//! bidirectional case needs no mask at all (flash attention); under a causal mask a device whose
//! keys are its own tokens only is plain causal attention, the others keep a small
//! [n_d, K_d] mask. Attention does not depend on the order of its keys, so the result is the
//! masked one up to float summation order (tested against the mask for every partition, CLS
//! mode and lost-message draw, values and gradients).

use tch::{Device, Tensor};

use super::layers::Sight;
use super::mpa::{mixed_precision_mask_with_loss, received_messages, DevicePartition};
use super::LinkLoss;

/// How one device's queries see its keys.
#[derive(Debug)]
enum Seen {
    /// Every key (bidirectional attention).
    All,
    /// Keys are the device's own rows in the same order: query i sees keys 0..=i.
    Causal,
    /// Boolean [n_d, K_d], true = may attend.
    Mask(Tensor),
}

/// The rows and keys of each device for one sequence layout ([`DeviceGroups::new`]), as runs
/// of consecutive positions: every gather is a split into runs and a concatenation, whose
/// backward passes are copies (index_select's would be index_adds with atomics, which measured
/// slower on the GPU than the masked attention itself).
#[derive(Debug)]
pub struct DeviceGroups {
    devices: usize,
    /// The query axis [0, S) in runs of one owner: (length, device), in position order.
    rows: Vec<(i64, usize)>,
    /// The key axis [0, S + T') in runs seen by the same devices: (length, seen by device d).
    keys: Vec<(i64, Vec<bool>)>,
    seen: Vec<Seen>,
}

/// The sequence the groups are for: `cls` CLS slots (slot c on device min(c, N − 1)) followed by
/// the partition's content tokens; quantized key column j belongs to content token `sent[j]`.
pub struct Layout<'a> {
    pub partition: &'a DevicePartition,
    pub cls: usize,
    pub causal: bool,
    /// Content tokens with a quantized key column, in column order (all of them when None).
    pub sent: Option<&'a [usize]>,
    pub loss: Option<LinkLoss>,
}

impl DeviceGroups {
    /// The groups that reproduce [`super::mpa::mixed_precision_mask_with_loss`] for `layout`
    /// (with its key columns restricted to `sent`): device d's rows are the positions it holds;
    /// its keys are the full keys of those positions and the quantized keys of the other
    /// devices' tokens whose indices reached it (under a causal mask, only those before its
    /// last row).
    pub fn new(layout: &Layout, device: Device) -> Self {
        let p = layout.partition;
        let (n, cls, t) = (p.devices(), layout.cls, p.tokens());
        let owner_at = |pos: usize| {
            if pos < cls {
                pos.min(n - 1)
            } else {
                p.owner(pos - cls)
            }
        };
        let s = cls + t;
        let all: Vec<usize> = (0..t).collect();
        let sent = layout.sent.unwrap_or(&all);
        let received = received_messages(p, layout.loss);
        // seen_by[c][d]: device d attends to key column c of [S full | T' quantized].
        let mut seen_by: Vec<Vec<bool>> = (0..s + sent.len())
            .map(|c| (0..n).map(|d| c < s && owner_at(c) == d).collect())
            .collect();
        let mut seen = Vec::with_capacity(n);
        for d in 0..n {
            let mine: Vec<usize> = (0..s).filter(|&i| owner_at(i) == d).collect();
            let last = mine.last().copied().unwrap_or(0);
            // (position, column) of every quantized key device d sees.
            let remote: Vec<(usize, usize)> = sent
                .iter()
                .enumerate()
                .filter(|&(_, &tok)| p.owner(tok) != d)
                .filter(|&(_, &tok)| received.as_ref().is_none_or(|r| r[d * t + tok]))
                .map(|(j, &tok)| (cls + tok, s + j))
                .filter(|&(pos, _)| !layout.causal || pos < last)
                .collect();
            for &(_, c) in &remote {
                seen_by[c][d] = true;
            }
            seen.push(Self::seen(layout.causal, &mine, &remote, device));
        }
        let owners: Vec<usize> = (0..s).map(owner_at).collect();
        DeviceGroups {
            devices: n,
            rows: runs(&owners)
                .into_iter()
                .map(|(len, d)| (len, *d))
                .collect(),
            keys: runs(&seen_by)
                .into_iter()
                .map(|(len, m)| (len, m.clone()))
                .collect(),
            seen,
        }
    }

    /// How many runs the axes are cut into: the gathers' cost grows with them (contiguous shares
    /// cut a few per device; tokens dealt at random, about one per token).
    pub fn runs(&self) -> usize {
        self.rows.len() + self.keys.len()
    }

    /// Keys device d attends to.
    pub fn keys_of(&self, d: usize) -> i64 {
        self.keys.iter().filter(|(_, m)| m[d]).map(|(l, _)| l).sum()
    }

    fn seen(causal: bool, mine: &[usize], remote: &[(usize, usize)], device: Device) -> Seen {
        if !causal {
            return Seen::All;
        }
        if remote.is_empty() {
            return Seen::Causal;
        }
        // Keys: the device's own positions, then the remote ones; visible when at or before the query.
        let pos: Vec<i64> = mine
            .iter()
            .map(|&i| i as i64)
            .chain(remote.iter().map(|&(q, _)| q as i64))
            .collect();
        let (queries, keys) = (upload(&pos[..mine.len()], device), upload(&pos, device));
        Seen::Mask(keys.view([1, -1]).le_tensor(&queries.view([-1, 1])))
    }

    /// Attention of queries `q` [B, H, S, hd] over keys/values [B, H, S + T', hd] (the S full
    /// keys, then the T' quantized ones), device by device; [B, H, S, hd] in sequence order.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let row_lens: Vec<i64> = self.rows.iter().map(|r| r.0).collect();
        let key_lens: Vec<i64> = self.keys.iter().map(|r| r.0).collect();
        let qs = q.split_with_sizes(&row_lens, 2);
        let (ks, vs) = (
            k.split_with_sizes(&key_lens, 2),
            v.split_with_sizes(&key_lens, 2),
        );
        let mut out: Vec<Option<Tensor>> = (0..self.rows.len()).map(|_| None).collect();
        for d in 0..self.devices {
            let mine: Vec<usize> = (0..self.rows.len())
                .filter(|&i| self.rows[i].1 == d)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let theirs: Vec<usize> = (0..self.keys.len())
                .filter(|&i| self.keys[i].1[d])
                .collect();
            let (mask, causal) = match &self.seen[d] {
                Seen::All => (None, false),
                Seen::Causal => (None, true),
                Seen::Mask(m) => (Some(m), false),
            };
            let o = Tensor::scaled_dot_product_attention(
                &joined(&qs, &mine),
                &joined(&ks, &theirs),
                &joined(&vs, &theirs),
                mask,
                0.0,
                causal,
                None::<f64>,
                false,
            );
            let lens: Vec<i64> = mine.iter().map(|&i| self.rows[i].0).collect();
            for (i, piece) in mine.into_iter().zip(o.split_with_sizes(&lens, 2)) {
                out[i] = Some(piece);
            }
        }
        let out: Vec<Tensor> = out
            .into_iter()
            .map(|o| o.expect("every run has an owner"))
            .collect();
        joined(&out, &(0..out.len()).collect::<Vec<_>>())
    }
}

/// Maximal runs of equal items: (length, item).
fn runs<T: PartialEq>(items: &[T]) -> Vec<(i64, &T)> {
    let mut out: Vec<(i64, &T)> = Vec::new();
    for x in items {
        match out.last_mut() {
            Some((len, y)) if *y == x => *len += 1,
            _ => out.push((1, x)),
        }
    }
    out
}

/// The parts `which` of `parts` joined along the sequence axis (no copy for one part).
fn joined(parts: &[Tensor], which: &[usize]) -> Tensor {
    match which {
        [one] => parts[*one].shallow_clone(),
        _ => Tensor::cat(&which.iter().map(|&i| &parts[i]).collect::<Vec<_>>(), 2),
    }
}

fn upload(v: &[i64], device: Device) -> Tensor {
    crate::libtorch::upload(&Tensor::from_slice(v), device)
}

/// The keys of the masked formulation's attention, built once per forward pass: the
/// [S, S + T'] mask, or the per-device groups with `ASTRA_MPA=devices`. The mask is the default
/// because it measured faster on the GPU (H200, ViT-B batch 128: attention fwd+bwd 1.74 ms under
/// the mask, 5.26 ms device by device; GPT-2 1.06 vs 1.93 ms): the gathers' backward passes are
/// index_adds with bf16 atomics. A layout whose devices' tokens are contiguous would need no
/// gathers (results/gpu-throughput.md).
#[derive(Debug)]
pub enum MpaKeys {
    Mask(Tensor),
    Devices(DeviceGroups),
}

impl MpaKeys {
    pub fn new(layout: &Layout, device: Device) -> Self {
        if std::env::var("ASTRA_MPA").is_ok_and(|v| v == "devices") {
            MpaKeys::Devices(DeviceGroups::new(layout, device))
        } else {
            MpaKeys::Mask(layout.mask(device))
        }
    }

    pub fn sight(&self) -> Sight<'_> {
        match self {
            MpaKeys::Mask(m) => Sight::Mask(m),
            MpaKeys::Devices(g) => Sight::Devices(g),
        }
    }
}

impl Layout<'_> {
    /// The boolean mask [S, S + T'] of this layout (key columns restricted to `sent`).
    pub fn mask(&self, device: Device) -> Tensor {
        let p = self.partition;
        let mask = mixed_precision_mask_with_loss(p, self.cls, self.causal, self.loss, device);
        let Some(sent) = self.sent else {
            return mask;
        };
        let s = (self.cls + p.tokens()) as i64;
        let idx: Vec<i64> = sent.iter().map(|&i| i as i64).collect();
        let cols = mask
            .narrow(1, s, p.tokens() as i64)
            .index_select(1, &upload(&idx, device));
        Tensor::cat(&[mask.narrow(1, 0, s), cols], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ClsMode;
    use tch::Kind;

    /// The masked attention over [S full | T' quantized] keys, the reference.
    fn masked(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, None::<f64>, false)
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).abs().max().double_value(&[]);
        d / b.abs().max().double_value(&[]).max(1e-30)
    }

    /// Values and the gradients of q, k, v agree with the mask for one layout.
    fn check(layout: &Layout, what: &str) {
        let s = (layout.cls + layout.partition.tokens()) as i64;
        let mask = layout.mask(Device::Cpu);
        let keys = mask.size()[1];
        let opts = (Kind::Double, Device::Cpu);
        let q = Tensor::randn([2, 3, s, 8], opts).set_requires_grad(true);
        let k = Tensor::randn([2, 3, keys, 8], opts).set_requires_grad(true);
        let v = Tensor::randn([2, 3, keys, 8], opts).set_requires_grad(true);
        let w = Tensor::randn([2, 3, s, 8], opts);
        let groups = DeviceGroups::new(layout, Device::Cpu);
        let grads = |out: Tensor| {
            let g = Tensor::run_backward(
                &[(&out * &w).sum(Kind::Double)],
                &[&q, &k, &v],
                false,
                false,
            );
            (out.detach(), g)
        };
        let (want, want_g) = grads(masked(&q, &k, &v, &mask));
        let (got, got_g) = grads(groups.attend(&q, &k, &v));
        assert!(
            rel(&got, &want) < 1e-12,
            "{what}: values differ by {}",
            rel(&got, &want)
        );
        for (i, (a, b)) in got_g.iter().zip(&want_g).enumerate() {
            assert!(
                rel(a, b) < 1e-12,
                "{what}: gradient {i} differs by {}",
                rel(a, b)
            );
        }
    }

    #[test]
    fn per_device_attention_equals_the_mask() {
        for seed in 0..12u64 {
            let n = 1 + seed as usize % 4;
            let partitions = [
                DevicePartition::contiguous(13, n).unwrap(),
                DevicePartition::random_allocation(13, n, seed).unwrap(),
                DevicePartition::sizes(&[3, 0, 5, 5][..n.max(2)]).unwrap(),
            ];
            for (i, p) in partitions.iter().enumerate() {
                for cls in [ClsMode::Distributed, ClsMode::Single] {
                    for loss in [None, Some(LinkLoss { p: 0.4, seed })] {
                        let layout = Layout {
                            partition: p,
                            cls: cls.copies(p.devices()),
                            causal: false,
                            sent: None,
                            loss,
                        };
                        check(
                            &layout,
                            &format!("seed {seed}, partition {i}, {cls:?}, {loss:?}"),
                        );
                    }
                }
                for loss in [None, Some(LinkLoss { p: 0.4, seed })] {
                    let sent = p.sent_tokens(true);
                    for sent in [None, Some(&sent[..])] {
                        let layout = Layout {
                            partition: p,
                            cls: 0,
                            causal: true,
                            sent,
                            loss,
                        };
                        let what = format!(
                            "causal, seed {seed}, partition {i}, {loss:?}, sent {}",
                            sent.is_some()
                        );
                        check(&layout, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn contiguous_shares_cut_few_runs_and_only_causal_devices_with_remote_keys_mask() {
        let p = DevicePartition::contiguous(12, 3).unwrap();
        let sent = p.sent_tokens(true);
        let g = DeviceGroups::new(
            &Layout {
                partition: &p,
                cls: 0,
                causal: true,
                sent: Some(&sent),
                loss: None,
            },
            Device::Cpu,
        );
        assert_eq!(
            (0..3).map(|d| g.keys_of(d)).collect::<Vec<_>>(),
            vec![4, 8, 12]
        );
        // Rows: one run per device; keys: 3 full runs, quantized tokens [0, 4) (seen by devices
        // 1 and 2) and [4, 8) (by device 2).
        assert_eq!(g.runs(), 3 + 3 + 2);
        assert!(matches!(g.seen[0], Seen::Causal));
        assert!(matches!(g.seen[1], Seen::Mask(_)));
        // Bidirectional with CLS copies: no device needs a mask.
        let g = DeviceGroups::new(
            &Layout {
                partition: &p,
                cls: 3,
                causal: false,
                sent: None,
                loss: None,
            },
            Device::Cpu,
        );
        assert_eq!(
            (0..3).map(|d| g.keys_of(d)).collect::<Vec<_>>(),
            vec![13, 13, 13]
        );
        assert_eq!(g.runs(), 6 + 6 + 3);
        assert!(g.seen.iter().all(|s| matches!(s, Seen::All)));
    }
}
