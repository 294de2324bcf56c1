//! The wire format of ASTRA's indices: b = ceil(log2 K) bits per index, packed into a little-endian
//! bitstream (index i occupies stream bits [i·b, (i+1)·b), stream bit j is bit j % 8 of byte j / 8),
//! exactly ceil(count · b / 8) bytes, the unused high bits of the last byte zero.

use crate::error::{QuantError, Result};

/// Bits needed to address K codewords: ceil(log2 K), at least 1 (K = 1 still sends a bit so that a
/// frame's size says how many indices it holds).
pub fn bits_for(k: usize) -> u32 {
    if k <= 2 {
        1
    } else {
        usize::BITS - (k - 1).leading_zeros()
    }
}

/// Exact byte length of `count` indices at `bits` bits each.
pub fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

fn check_bits(bits: u32) -> Result<()> {
    if !(1..=16).contains(&bits) {
        return Err(QuantError::param(
            "bits",
            format!("must be in 1..=16, got {bits}"),
        ));
    }
    Ok(())
}

/// Packs indices that must each be below 2^bits.
pub fn pack(indices: &[u16], bits: u32) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(packed_len(indices.len(), bits));
    pack_into(indices, bits, &mut out)?;
    Ok(out)
}

/// Appends the packed indices to `out` (reusing a frame buffer avoids an allocation per block).
pub fn pack_into(indices: &[u16], bits: u32, out: &mut Vec<u8>) -> Result<()> {
    check_bits(bits)?;
    let limit = 1u32 << bits;
    let mut acc: u64 = 0;
    let mut filled: u32 = 0;
    for (position, &ix) in indices.iter().enumerate() {
        if ix as u32 >= limit {
            return Err(QuantError::IndexOutOfRange {
                index: ix as usize,
                position,
                k: limit as usize,
            });
        }
        acc |= (ix as u64) << filled;
        filled += bits;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
    Ok(())
}

/// Unpacks `count` indices; the byte length must be exactly `packed_len(count, bits)`.
pub fn unpack(bytes: &[u8], count: usize, bits: u32) -> Result<Vec<u16>> {
    check_bits(bits)?;
    let expected = packed_len(count, bits);
    if bytes.len() != expected {
        return Err(QuantError::Shape {
            what: format!("packed stream of {count} indices at {bits} bits"),
            expected: format!("{expected} bytes"),
            found: format!("{} bytes", bytes.len()),
        });
    }
    let mask = (1u64 << bits) - 1;
    let mut out = Vec::with_capacity(count);
    let mut acc: u64 = 0;
    let mut filled: u32 = 0;
    let mut src = bytes.iter();
    for _ in 0..count {
        while filled < bits {
            acc |= (*src.next().expect("length checked above") as u64) << filled;
            filled += 8;
        }
        out.push((acc & mask) as u16);
        acc >>= bits;
        filled -= bits;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bits_for_k() {
        assert_eq!(bits_for(1), 1);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(1024), 10);
        assert_eq!(bits_for(1025), 11);
        assert_eq!(bits_for(65536), 16);
    }

    #[test]
    fn known_layout() {
        // 3-bit indices 5 (101), 3 (011), 7 (111): stream bits LSB first = 101 110 111 -> bytes.
        let p = pack(&[5, 3, 7], 3).unwrap();
        assert_eq!(p, vec![0b1101_1101, 0b0000_0001]);
        assert_eq!(unpack(&p, 3, 3).unwrap(), vec![5, 3, 7]);
    }

    #[test]
    fn errors() {
        assert!(pack(&[8], 3).is_err());
        assert!(pack(&[0], 0).is_err());
        assert!(pack(&[0], 17).is_err());
        assert!(unpack(&[0, 0, 0], 3, 3).is_err());
        assert!(unpack(&[], 1, 3).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(k in 1usize..=65536, groups in 1usize..40, n in 0usize..60, seed in any::<u64>()) {
            let bits = bits_for(k);
            let count = n * groups;
            let mut s = seed;
            let idx: Vec<u16> = (0..count).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) % k as u64) as u16
            }).collect();
            let p = pack(&idx, bits).unwrap();
            prop_assert_eq!(p.len(), (count * bits as usize).div_ceil(8));
            prop_assert_eq!(unpack(&p, count, bits).unwrap(), idx);
        }
    }
}
