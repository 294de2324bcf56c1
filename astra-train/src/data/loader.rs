//! Batches prepared ahead of the training loop: a producer thread reads (decodes, augments) the
//! images of each batch in parallel with rayon and hands finished u8 batches over a bounded
//! channel, so the device does not wait on JPEG decoding. Every image's augmentation draws from a
//! generator seeded by (seed, position in the epoch), so a batch is the same whatever the thread
//! count, and a resumed epoch repeats exactly.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::SeedableRng;
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use super::augment::Augment;
use super::ImageSet;
use crate::error::Result;

/// A batch of u8 images [b, c, h, w] and labels, still on the host.
pub struct RawBatch {
    pub pixels: Vec<u8>,
    pub labels: Vec<i64>,
    pub shape: [i64; 4],
}

impl RawBatch {
    /// Float [B, C, size, size] on `device`: scaled to [0, 1], resized (bilinear) when the images
    /// are not `size` already, normalised per channel; labels [B]. The u8 data crosses to the
    /// device before conversion (4× less to copy).
    pub fn to_tensors(
        &self,
        mean: &[f64],
        std: &[f64],
        size: usize,
        device: Device,
    ) -> (Tensor, Tensor) {
        let mut x =
            crate::libtorch::upload(&Tensor::from_slice(&self.pixels).view(self.shape), device)
                .to_kind(Kind::Float)
                / 255.0;
        let (h, w) = (self.shape[2], self.shape[3]);
        if h != size as i64 || w != size as i64 {
            x = x.upsample_bilinear2d([size as i64, size as i64], false, None, None);
        }
        let c = self.shape[1];
        let col = |v: &[f64]| {
            crate::libtorch::upload(
                &Tensor::from_slice(&v.iter().map(|&v| v as f32).collect::<Vec<_>>())
                    .view([1, c, 1, 1]),
                device,
            )
        };
        let labels = crate::libtorch::upload(&Tensor::from_slice(&self.labels), device);
        ((x - col(mean)) / col(std), labels)
    }
}

fn image_rng(seed: u64, position: usize) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(
        seed ^ (position as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

/// Reads `indices` of `set` into one batch; with `augment`, image k of the batch uses the
/// generator for (seed, `first_position` + k).
pub fn read_batch(
    set: &(impl ImageSet + ?Sized),
    indices: &[usize],
    augment: Option<(&Augment, u64, usize)>,
) -> Result<RawBatch> {
    let (c, h, w) = set.shape();
    let il = c * h * w;
    let mut pixels = vec![0u8; indices.len() * il];
    pixels
        .par_chunks_mut(il)
        .zip(indices.par_iter())
        .enumerate()
        .try_for_each_init(Vec::new, |scratch, (k, (out, &i))| -> Result<()> {
            set.read_into(i, out)?;
            if let Some((a, seed, first)) = augment {
                a.apply(out, (c, h, w), &mut image_rng(seed, first + k), scratch);
            }
            Ok(())
        })?;
    Ok(RawBatch {
        pixels,
        labels: indices.iter().map(|&i| set.label(i)).collect(),
        shape: [indices.len() as i64, c as i64, h as i64, w as i64],
    })
}

/// Iterates the batches of one epoch (`order` cut into `batch`-sized chunks), `ahead` batches
/// prepared in advance on a background thread. Data parallel: each rank reads only its slice of
/// every batch ([`crate::train::parallel::shard`]), with the augmentation each example gets in
/// the whole batch; a batch smaller than the ranks is left out on all of them.
pub struct BatchLoader {
    rx: Option<Receiver<Result<RawBatch>>>,
    handle: Option<JoinHandle<()>>,
}

impl BatchLoader {
    pub fn start(
        set: Arc<dyn ImageSet>,
        order: Vec<usize>,
        batch: usize,
        augment: Option<(Augment, u64)>,
        ahead: usize,
        (rank, world): (usize, usize),
    ) -> Self {
        let (tx, rx) = sync_channel(ahead.max(1));
        let handle = std::thread::spawn(move || {
            for (b, chunk) in order.chunks(batch.max(1)).enumerate() {
                if chunk.len() < world {
                    continue;
                }
                let (lo, len) = crate::train::parallel::shard(chunk.len() as i64, rank, world);
                let (lo, len) = (lo as usize, len as usize);
                let aug = augment.as_ref().map(|(a, s)| (a, *s, b * batch + lo));
                let r = read_batch(&*set, &chunk[lo..lo + len], aug);
                let failed = r.is_err();
                // A closed channel means the consumer stopped early: nothing left to do.
                if tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        BatchLoader {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

impl Iterator for BatchLoader {
    type Item = Result<RawBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Closing the channel first unblocks a producer waiting to send.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageDataset;

    fn set(n: usize) -> ImageDataset {
        ImageDataset {
            images: (0..n * 2 * 4 * 4).map(|i| (i % 250) as u8 + 1).collect(),
            labels: (0..n as i64).collect(),
            channels: 2,
            height: 4,
            width: 4,
            classes: n,
        }
    }

    #[test]
    fn loader_yields_the_order_in_batches_and_repeats_augmentation() {
        let s: Arc<dyn ImageSet> = Arc::new(set(10));
        let order = vec![3, 1, 4, 0, 5, 9, 2];
        let aug = Augment { pad: 1, flip: true };
        let run = || -> Vec<RawBatch> {
            BatchLoader::start(
                s.clone(),
                order.clone(),
                3,
                Some((aug.clone(), 7)),
                2,
                (0, 1),
            )
            .map(|b| b.unwrap())
            .collect()
        };
        let a = run();
        assert_eq!(
            a.iter().map(|b| b.labels.len()).collect::<Vec<_>>(),
            [3, 3, 1]
        );
        assert_eq!(a[1].labels, vec![0, 5, 9]);
        let b = run();
        assert!(a.iter().zip(&b).all(|(x, y)| x.pixels == y.pixels));
        // Without augmentation the pixels are the stored ones.
        let plain: Vec<RawBatch> = BatchLoader::start(s.clone(), order.clone(), 3, None, 1, (0, 1))
            .map(|b| b.unwrap())
            .collect();
        assert_eq!(&plain[0].pixels[..32], &set(10).images[3 * 32..4 * 32]);
        // Stopping early does not hang.
        let mut l = BatchLoader::start(s, order, 1, None, 1, (0, 1));
        l.next();
        drop(l);
    }

    #[test]
    fn to_tensors_resizes_and_normalises() {
        let b = read_batch(&set(2), &[0, 1], None).unwrap();
        let (x, y) = b.to_tensors(&[0.0, 0.5], &[1.0, 0.5], 8, Device::Cpu);
        assert_eq!(x.size(), vec![2, 2, 8, 8]);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![0, 1]);
        let (x, _) = b.to_tensors(&[0.0, 0.0], &[1.0, 1.0], 4, Device::Cpu);
        assert!((x.double_value(&[0, 0, 0, 0]) - 1.0 / 255.0).abs() < 1e-6);
    }
}
