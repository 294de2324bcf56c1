//! Training-time augmentation on u8 images [c, h, w]: random crop from a zero-padded image (the
//! CIFAR recipe) and horizontal flip. Resizing to the model's size happens on the device after
//! (see [`super::loader::RawBatch::to_tensors`]), and normalisation last.

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Zero padding on each side before a random crop back to the original size (0 = no crop).
    pub pad: usize,
    /// Flip horizontally with probability ½.
    pub flip: bool,
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        self.pad == 0 && !self.flip
    }

    /// Augments `img` ([c, h, w]) in place; `scratch` is reused between calls.
    pub fn apply(
        &self,
        img: &mut [u8],
        (c, h, w): (usize, usize, usize),
        rng: &mut impl Rng,
        scratch: &mut Vec<u8>,
    ) {
        if self.pad > 0 {
            let p = self.pad as i64;
            let dy = rng.random_range(-p..=p) as isize;
            let dx = rng.random_range(-p..=p) as isize;
            scratch.clear();
            scratch.extend_from_slice(img);
            for ch in 0..c {
                for y in 0..h {
                    let sy = y as isize + dy;
                    for x in 0..w {
                        let sx = x as isize + dx;
                        img[(ch * h + y) * w + x] =
                            if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                                scratch[(ch * h + sy as usize) * w + sx as usize]
                            } else {
                                0
                            };
                    }
                }
            }
        }
        if self.flip && rng.random_bool(0.5) {
            for row in img.chunks_exact_mut(w) {
                row.reverse();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crop_shifts_and_pads_with_zeros_and_flip_mirrors() {
        let (c, h, w) = (2, 5, 5);
        let src: Vec<u8> = (1..=(c * h * w) as u8).collect();
        let aug = Augment {
            pad: 2,
            flip: false,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut saw_zero = false;
        for _ in 0..20 {
            let mut img = src.clone();
            aug.apply(&mut img, (c, h, w), &mut rng, &mut Vec::new());
            // Every non-zero pixel is a source pixel of the same channel, shifted as a block.
            for (i, &v) in img.iter().enumerate() {
                if v == 0 {
                    saw_zero = true;
                } else {
                    assert_eq!((v as usize - 1) / (h * w), i / (h * w));
                }
            }
        }
        assert!(saw_zero, "padding never showed in 20 crops");
        let flip = Augment { pad: 0, flip: true };
        let (mut flipped, mut kept) = (0, 0);
        for _ in 0..40 {
            let mut img = src.clone();
            flip.apply(&mut img, (c, h, w), &mut rng, &mut Vec::new());
            if img == src {
                kept += 1;
            } else {
                assert_eq!(img[0], src[w - 1]);
                flipped += 1;
            }
        }
        assert!(flipped > 5 && kept > 5, "{flipped} flipped, {kept} kept");
        assert!(Augment::default().is_identity());
    }
}
