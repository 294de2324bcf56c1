//! Mixed-Precision Attention (ASTRA.md §3): which device holds each token, and the attention mask
//! over [full keys of all tokens | quantized keys of all content tokens].

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// Which device holds each content token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePartition {
    devices: usize,
    /// Device of content token t.
    owner: Vec<usize>,
}

/// Concentration of the Dirichlet that draws uneven device shares ([`DevicePartition::random_allocation`]).
pub const ALLOCATION_ALPHA: f64 = 1.6;

impl DevicePartition {
    /// Contiguous chunks; the first T mod N devices hold one token more (ASTRA.md: our default).
    /// The rule everywhere (masked, per-device, runtime): 1 ≤ N ≤ T, so every device holds a
    /// token; checked before anything is allocated.
    pub fn contiguous(tokens: usize, devices: usize) -> Result<Self> {
        Self::check(tokens, devices)?;
        let sizes: Vec<usize> = (0..devices)
            .map(|d| tokens / devices + usize::from(d < tokens % devices))
            .collect();
        Self::sizes(&sizes)
    }

    /// Explicit (possibly uneven) contiguous chunk sizes, one per device.
    pub fn sizes(sizes: &[usize]) -> Result<Self> {
        if sizes.is_empty() {
            return Err(TrainError::invalid(
                "partition",
                "needs at least one device",
            ));
        }
        let owner = sizes
            .iter()
            .enumerate()
            .flat_map(|(d, &s)| std::iter::repeat_n(d, s))
            .collect();
        Ok(DevicePartition {
            devices: sizes.len(),
            owner,
        })
    }

    /// Tokens dealt to devices at random (equal shares as in `contiguous`), from `seed`: the
    /// paper's training for heterogeneous allocations.
    pub fn random(tokens: usize, devices: usize, seed: u64) -> Result<Self> {
        let mut p = Self::contiguous(tokens, devices)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        p.owner.shuffle(&mut rng);
        Ok(p)
    }

    /// Uneven shares, as heterogeneous devices get them (the paper's random allocation, reported
    /// by FPAR): device weights drawn from a symmetric Dirichlet(α = [`ALLOCATION_ALPHA`]), turned
    /// into token counts of at least one each (largest remainder), the tokens dealt at random.
    /// α = 1.6 gives FPAR mean 0.35 and std 0.075 at N = 4, the spread of the paper's Table 9
    /// (mean 0.352, std 0.073, max 0.746); dealing every token to a uniformly random device
    /// instead gives mean 0.25, max 0.28.
    pub fn random_allocation(tokens: usize, devices: usize, seed: u64) -> Result<Self> {
        use rand::seq::SliceRandom;
        use rand_distr::Distribution;
        Self::check(tokens, devices)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let gamma = rand_distr::Gamma::new(ALLOCATION_ALPHA, 1.0).expect("α > 0");
        let w: Vec<f64> = (0..devices).map(|_| gamma.sample(&mut rng)).collect();
        let total: f64 = w.iter().sum();
        // One token each, the rest by weight (largest remainder keeps the sum exact).
        let spare = (tokens - devices) as f64;
        let exact: Vec<f64> = w.iter().map(|x| x / total * spare).collect();
        let mut sizes: Vec<usize> = exact.iter().map(|e| 1 + e.floor() as usize).collect();
        let mut order: Vec<usize> = (0..devices).collect();
        order.sort_by(|&a, &b| {
            (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor()))
        });
        let short = tokens - sizes.iter().sum::<usize>();
        for &d in order.iter().take(short) {
            sizes[d] += 1;
        }
        let mut p = Self::sizes(&sizes)?;
        p.owner.shuffle(&mut rng);
        Ok(p)
    }

    /// Fraction of full-precision attention: the share of (query, key) pairs of content tokens
    /// on the same device, Σ_d n_d² / T² (1/N for equal shares, 1 for one device).
    pub fn fpar(&self) -> f64 {
        let t = self.owner.len().max(1) as f64;
        let mut n = vec![0usize; self.devices];
        for &d in &self.owner {
            n[d] += 1;
        }
        n.iter().map(|&c| (c as f64 / t).powi(2)).sum()
    }

    fn check(tokens: usize, devices: usize) -> Result<()> {
        if devices == 0 {
            return Err(TrainError::invalid("devices", "must be at least 1"));
        }
        if devices > tokens {
            return Err(TrainError::invalid(
                "devices",
                format!(
                    "{devices} devices for {tokens} tokens: every device needs at least one token"
                ),
            ));
        }
        Ok(())
    }

    /// The per-device paths run one device per share: a device without tokens (an explicit or
    /// random allocation can make one) is refused there with this message.
    pub fn check_no_empty_share(&self) -> Result<()> {
        let mut held = vec![false; self.devices];
        for &d in &self.owner {
            held[d] = true;
        }
        match held.iter().position(|h| !h) {
            Some(d) => Err(TrainError::invalid(
                "partition",
                format!("device {d} holds no tokens; the per-device path needs every device to hold one"),
            )),
            None => Ok(()),
        }
    }

    pub fn devices(&self) -> usize {
        self.devices
    }
    pub fn tokens(&self) -> usize {
        self.owner.len()
    }
    pub fn owner(&self, token: usize) -> usize {
        self.owner[token]
    }
    /// Content tokens of device d, in sequence order.
    pub fn tokens_of(&self, d: usize) -> Vec<usize> {
        (0..self.owner.len())
            .filter(|&t| self.owner[t] == d)
            .collect()
    }

    /// The tokens some other device attends to, in sequence order: every token when attention
    /// is bidirectional (and N > 1); under a causal mask only those with a later token on
    /// another device (with contiguous shares, all but the last device's). The rest are never
    /// sent, so need no quantizing.
    pub fn sent_tokens(&self, causal: bool) -> Vec<usize> {
        let n = self.owner.len();
        if !causal {
            return if self.devices > 1 {
                (0..n).collect()
            } else {
                vec![]
            };
        }
        // Scanning from the end: the owners seen so far are the owners of later tokens.
        let mut later: Option<(usize, bool)> = None; // (some later owner, whether two differ)
        let mut sent = vec![false; n];
        for t in (0..n).rev() {
            sent[t] = match later {
                Some((o, mixed)) => mixed || o != self.owner[t],
                None => false,
            };
            later = Some(match later {
                None => (self.owner[t], false),
                Some((o, mixed)) => (o, mixed || o != self.owner[t]),
            });
        }
        (0..n).filter(|&t| sent[t]).collect()
    }
}

/// Where the CLS token lives: one copy per device (Distributed Class Tokens), or one on device 0.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum ClsMode {
    Distributed,
    Single,
}

impl ClsMode {
    pub fn copies(self, devices: usize) -> usize {
        match self {
            ClsMode::Distributed => devices,
            ClsMode::Single => 1,
        }
    }
}

/// A sequence under Mixed-Precision Attention: `cls` CLS slots (slot c on device min(c, N − 1))
/// followed by the partition's content tokens; quantized key column j belongs to content token
/// `sent[j]`.
pub struct Layout<'a> {
    pub partition: &'a DevicePartition,
    pub cls: usize,
    pub causal: bool,
    /// Content tokens with a quantized key column, in column order (all of them when None).
    pub sent: Option<&'a [usize]>,
    pub loss: Option<super::LinkLoss>,
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
        let cols = mask.narrow(1, s, p.tokens() as i64).index_select(
            1,
            &crate::libtorch::upload(&Tensor::from_slice(&idx), device),
        );
        Tensor::cat(&[mask.narrow(1, 0, s), cols], 1)
    }
}

/// Which index messages arrived under `loss`: entry d·T + j is true when content token j's
/// indices reached device d (always, for its own device). None when nothing is lost. One draw per
/// forward pass; every mask of one pass reads the same draws.
fn received_messages(
    partition: &DevicePartition,
    loss: Option<super::LinkLoss>,
) -> Option<Vec<bool>> {
    use rand::Rng;
    let l = loss.filter(|l| l.p > 0.0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(l.seed);
    let (n, t) = (partition.devices(), partition.tokens());
    Some(
        (0..n * t)
            .map(|i| partition.owner[i % t] == i / t || !rng.random_bool(l.p.min(1.0)))
            .collect(),
    )
}

/// Boolean mask [S, S + T] (true = may attend) for a sequence of `cls` CLS slots (slot c on device
/// c, or all on device 0 with one slot) followed by the T content tokens of `partition`. Keys are
/// the S full-precision keys, then the T quantized content keys. With `causal` (GPT-2, no CLS),
/// a query also sees only keys at or before its position.
pub fn mixed_precision_mask(
    partition: &DevicePartition,
    cls: usize,
    causal: bool,
    device: Device,
) -> Tensor {
    mixed_precision_mask_with_loss(partition, cls, causal, None, device)
}

/// The mask with lost messages: quantized key j is also hidden from the queries of device d when
/// j's indices did not reach d (see [`super::LinkLoss`]).
pub fn mixed_precision_mask_with_loss(
    partition: &DevicePartition,
    cls: usize,
    causal: bool,
    loss: Option<super::LinkLoss>,
    device: Device,
) -> Tensor {
    let t = partition.tokens();
    let s = cls + t;
    let mut owner: Vec<i64> = (0..cls)
        .map(|c| c.min(partition.devices() - 1) as i64)
        .collect();
    owner.extend(partition.owner.iter().map(|&d| d as i64));
    let seq = crate::libtorch::upload(&Tensor::from_slice(&owner), device);
    let content = seq.narrow(0, cls as i64, t as i64);
    let same = seq.view([s as i64, 1]).eq_tensor(&seq.view([1, s as i64]));
    let other = seq
        .view([s as i64, 1])
        .ne_tensor(&content.view([1, t as i64]));
    let mut other = other;
    if let Some(received) = received_messages(partition, loss) {
        let n = partition.devices();
        let received = crate::libtorch::upload(
            &Tensor::from_slice(&received).view([n as i64, t as i64]),
            device,
        );
        // Row i of the mask belongs to the device owning sequence position i.
        other = other.logical_and(&received.index_select(0, &seq));
    }
    let mut mask = Tensor::cat(&[same, other], 1);
    if causal {
        let pos = Tensor::arange(s as i64, (Kind::Int64, device));
        let content_pos = pos.narrow(0, cls as i64, t as i64);
        let keys = Tensor::cat(&[&pos, &content_pos], 0);
        let visible = keys
            .view([1, (s + t) as i64])
            .le_tensor(&pos.view([s as i64, 1]));
        mask = mask.logical_and(&visible);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_tokens_are_those_another_device_attends_to() {
        for seed in 0..50 {
            let p = DevicePartition::random_allocation(23, 1 + seed as usize % 5, seed).unwrap();
            let brute: Vec<usize> = (0..23)
                .filter(|&t| (t + 1..23).any(|q| p.owner(q) != p.owner(t)))
                .collect();
            assert_eq!(p.sent_tokens(true), brute, "seed {seed}");
            let all: Vec<usize> = if p.devices() > 1 {
                (0..23).collect()
            } else {
                vec![]
            };
            assert_eq!(p.sent_tokens(false), all);
        }
        // Contiguous shares: everything but the last device's tokens.
        let c = DevicePartition::contiguous(10, 3).unwrap();
        assert_eq!(
            c.sent_tokens(true),
            (0..c.tokens_of(2)[0]).collect::<Vec<_>>()
        );
    }

    #[test]
    fn partitions() {
        let p = DevicePartition::contiguous(10, 4).unwrap();
        assert_eq!(p.tokens_of(0), vec![0, 1, 2]);
        assert_eq!(p.tokens_of(3), vec![8, 9]);
        let u = DevicePartition::sizes(&[1, 0, 4]).unwrap();
        assert_eq!(u.tokens_of(2), vec![1, 2, 3, 4]);
        let r = DevicePartition::random(12, 3, 5).unwrap();
        assert_eq!(
            (0..3).map(|d| r.tokens_of(d).len()).collect::<Vec<_>>(),
            vec![4, 4, 4]
        );
        assert_ne!(r, DevicePartition::contiguous(12, 3).unwrap());
        assert!(DevicePartition::contiguous(4, 0).is_err());
    }

    #[test]
    fn mask_rules() {
        let p = DevicePartition::contiguous(4, 2).unwrap(); // tokens 0,1 on dev 0; 2,3 on dev 1
        let m = mixed_precision_mask(&p, 2, false, Device::Cpu);
        let v: Vec<Vec<bool>> = Vec::<Vec<bool>>::try_from(&m).unwrap();
        // CLS 0 (dev 0): full keys CLS0, tok0, tok1; quantized tok2, tok3.
        assert_eq!(
            v[0],
            [true, false, true, true, false, false, false, false, true, true]
        );
        // token 2 (dev 1, row 4): full CLS1, tok2, tok3; quantized tok0, tok1.
        assert_eq!(
            v[4],
            [false, true, false, false, true, true, true, true, false, false]
        );
        let c = mixed_precision_mask(&p, 0, true, Device::Cpu);
        // Lost messages hide remote quantized keys only; p = 1 hides them all.
        let all_lost = mixed_precision_mask_with_loss(
            &p,
            0,
            false,
            Some(super::super::LinkLoss { p: 1.0, seed: 3 }),
            Device::Cpu,
        );
        let t = p.tokens() as i64;
        assert_eq!(
            all_lost.narrow(1, t, t).sum(Kind::Int64).int64_value(&[]),
            0
        );
        let full = mixed_precision_mask(&p, 0, false, Device::Cpu);
        assert!(all_lost.narrow(1, 0, t).equal(&full.narrow(1, 0, t)));
        let half = mixed_precision_mask_with_loss(
            &p,
            0,
            false,
            Some(super::super::LinkLoss { p: 0.5, seed: 3 }),
            Device::Cpu,
        );
        let (kept, total) = (
            half.narrow(1, t, t).sum(Kind::Int64).int64_value(&[]),
            full.narrow(1, t, t).sum(Kind::Int64).int64_value(&[]),
        );
        assert!(kept > 0 && kept < total, "{kept} of {total}");
        let r = DevicePartition::random_allocation(100, 4, 1).unwrap();
        assert!(r.fpar() > 0.25 && r.fpar() < 1.0, "{}", r.fpar());
        assert!((DevicePartition::contiguous(8, 4).unwrap().fpar() - 0.25).abs() < 1e-12);
        let v: Vec<Vec<bool>> = Vec::<Vec<bool>>::try_from(&c).unwrap();
        // token 2 sees full tok2 only (tok3 is later) and quantized tok0, tok1.
        assert_eq!(v[2], [false, false, true, false, true, true, false, false]);
        // token 1 sees full tok0, tok1 and no quantized key (tok2, tok3 are later).
        assert_eq!(v[1], [true, true, false, false, false, false, false, false]);
    }

    #[test]
    fn random_allocations_spread_like_the_papers_table_9() {
        let f: Vec<f64> = (0..4000)
            .map(|seed| {
                let p = DevicePartition::random_allocation(196, 4, seed).unwrap();
                assert_eq!(p.tokens(), 196);
                assert!((0..4).all(|d| !p.tokens_of(d).is_empty()));
                p.fpar()
            })
            .collect();
        let mean = f.iter().sum::<f64>() / f.len() as f64;
        let std = (f.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / f.len() as f64).sqrt();
        let max = f.iter().cloned().fold(0.0, f64::max);
        assert!((0.33..0.37).contains(&mean), "FPAR mean {mean}");
        assert!((0.06..0.09).contains(&std), "FPAR std {std}");
        assert!(max > 0.6, "FPAR max {max}");
        assert_eq!(
            DevicePartition::random_allocation(196, 4, 7).unwrap(),
            DevicePartition::random_allocation(196, 4, 7).unwrap()
        );
        // As few tokens as devices: one each.
        let p = DevicePartition::random_allocation(4, 4, 3).unwrap();
        assert!((0..4).all(|d| p.tokens_of(d).len() == 1));
    }
}
