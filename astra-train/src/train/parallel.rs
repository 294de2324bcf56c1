//! Data-parallel training: the ranks of one run and the collectives they need.
//!
//! Every rank holds the whole model and sees every global batch; it computes the loss of its
//! slice of the batch (rank r of W: examples [r·B/W, (r+1)·B/W)), scaled by its share of the
//! batch's targets, so the summed gradients are the full batch's gradient and a run's numbers do
//! not depend on W beyond the order of floating-point sums. What must stay identical across ranks
//! is summed or sent from rank 0: the gradients (one all-reduce of the flat gradient buffer after
//! backward), the codebooks' EMA statistics (counts and sums per code, and rank 0's rows for a
//! dead code's restart), the epoch's running sums, and at the start the state rank 0 restored.
//!
//! [`Collective`] has three members: [`Solo`] (one rank: every call is a no-op, so `--gpus 1`
//! and a plain run do the same arithmetic), [`LocalGroup`] (ranks as threads of one process:
//! the same path on the CPU, for tests) and NCCL across GPU processes
//! ([`crate::cuda::nccl::NcclGroup`]).

use std::sync::{Arc, Condvar, Mutex};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// What ranks exchange. Tensors are dense, contiguous and on the rank's device; results land in
/// place.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// False for [`Solo`]: a group, even of one rank, runs every collective (so `--gpus 1`
    /// exercises the path that `--gpus N` takes).
    fn is_group(&self) -> bool {
        true
    }
    /// `t` ← the sum of every rank's `t`.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()>;
    /// `t` ← rank 0's `t`.
    fn broadcast(&self, t: &Tensor) -> Result<()>;
}

/// One rank: nothing to exchange.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn is_group(&self) -> bool {
        false
    }
    fn all_reduce_sum(&self, _: &Tensor) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Ranks as threads of one process, meeting at a barrier: every rank puts a copy of its tensor
/// in its slot, then each sums the slots in rank order (so all ranks get the same bits). A rank
/// that leaves (its training returned, or failed) releases the others with an error instead of
/// leaving them waiting.
pub struct LocalGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<Meeting>,
    turn: Condvar,
}

struct Meeting {
    slots: Vec<Option<Tensor>>,
    arrived: usize,
    generation: u64,
    left: bool,
}

impl LocalGroup {
    /// The `world` members of one group, by rank.
    pub fn group(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Meeting {
                slots: (0..world).map(|_| None).collect(),
                arrived: 0,
                generation: 0,
                left: false,
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Meeting> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until every rank has arrived; an error if one left instead.
    fn meet(&self) -> Result<()> {
        let mut m = self.lock();
        if m.left {
            return Err(gone());
        }
        m.arrived += 1;
        if m.arrived == self.world {
            m.arrived = 0;
            m.generation += 1;
            self.shared.turn.notify_all();
            return Ok(());
        }
        let g = m.generation;
        while m.generation == g && !m.left {
            m = self.shared.turn.wait(m).unwrap_or_else(|p| p.into_inner());
        }
        if m.generation == g {
            return Err(gone());
        }
        Ok(())
    }

    /// Puts `t` (or nothing) in this rank's slot, waits for all, applies `read` to the slots,
    /// and waits again so no slot is overwritten while another rank still reads it.
    fn exchange(&self, t: Option<&Tensor>, read: impl FnOnce(&[Option<Tensor>])) -> Result<()> {
        let slot = t.map(|t| t.to_device(Device::Cpu).copy());
        self.lock().slots[self.rank] = slot;
        self.meet()?;
        read(&self.lock().slots);
        self.meet()
    }
}

fn gone() -> TrainError {
    TrainError::invalid("data parallel", "another rank stopped")
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        self.lock().left = true;
        self.shared.turn.notify_all();
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        self.exchange(Some(t), |slots| {
            let mut sum = slots[0].as_ref().expect("every rank puts").copy();
            for s in &slots[1..] {
                sum += s.as_ref().expect("every rank puts");
            }
            t.shallow_clone().copy_(&sum);
        })
    }
    fn broadcast(&self, t: &Tensor) -> Result<()> {
        let mine = (self.rank == 0).then_some(t);
        self.exchange(mine, |slots| {
            if self.rank != 0 {
                t.shallow_clone()
                    .copy_(slots[0].as_ref().expect("rank 0 puts"));
            }
        })
    }
}

/// Rank `rank` of `world`'s slice [lo, lo + len) of `n` examples.
pub fn shard(n: i64, rank: usize, world: usize) -> (i64, i64) {
    let (r, w) = (rank as i64, world as i64);
    let lo = n * r / w;
    (lo, n * (r + 1) / w - lo)
}

/// Broadcasts every tensor of `tensors` from rank 0 (no-op for one rank).
pub fn broadcast_all(comm: &dyn Collective, tensors: &[Tensor]) -> Result<()> {
    if !comm.is_group() {
        return Ok(());
    }
    for t in tensors {
        if !t.is_contiguous() {
            return Err(TrainError::invalid(
                "data parallel",
                "a state tensor is not contiguous",
            ));
        }
        tch::no_grad(|| comm.broadcast(t))?;
    }
    Ok(())
}

/// A scalar that every rank agrees on: rank 0's `value`.
pub fn agree_u64(comm: &dyn Collective, value: u64, device: Device) -> Result<u64> {
    if !comm.is_group() {
        return Ok(value);
    }
    let t = Tensor::from_slice(&[value as f64]).to_device(device);
    comm.broadcast(&t)?;
    Ok(t.double_value(&[0]) as u64)
}

/// The kinds the collectives carry.
pub fn check_kind(t: &Tensor) -> Result<()> {
    match t.kind() {
        Kind::Float | Kind::Double | Kind::Int64 | Kind::BFloat16 | Kind::Half => Ok(()),
        k => Err(TrainError::invalid(
            "data parallel",
            format!("cannot exchange {k:?} tensors"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        let parts: Vec<_> = (0..3).map(|r| shard(10, r, 3)).collect();
        assert_eq!(parts, vec![(0, 3), (3, 3), (6, 4)]);
        assert_eq!(shard(8, 0, 1), (0, 8));
    }

    #[test]
    fn a_local_group_sums_and_broadcasts_the_same_bits_on_every_rank() {
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::group(3)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let t = Tensor::from_slice(&[r, 10.0 * r]);
                        g.all_reduce_sum(&t).unwrap();
                        let b = Tensor::from_slice(&[r + 1.0]);
                        g.broadcast(&b).unwrap();
                        (
                            Vec::<f32>::try_from(&t).unwrap(),
                            Vec::<f32>::try_from(&b).unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, b) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(b, vec![1.0]);
        }
    }
}
