//! Minimal reader and writer for NumPy `.npy` files (format 1.0–3.0): 2-D arrays of little-endian
//! f32/f64 (read as f32) and integer indices (read as u16), C order.

use std::io::Write;
use std::path::Path;

use ndarray::Array2;

use crate::error::{QuantError, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

struct Header {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
    data_offset: usize,
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let bad = |r: &str| QuantError::file(path, format!("not a valid .npy file: {r}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let major = bytes[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad(&format!("unsupported format version {major}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| bad("header is truncated"))?;
    let h = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    let field = |key: &str| -> Option<&str> {
        let i = h.find(&format!("'{key}'"))?;
        Some(
            h[i + key.len() + 2..]
                .trim_start()
                .strip_prefix(':')?
                .trim_start(),
        )
    };
    let descr = field("descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or_else(|| bad("no 'descr' in header"))?
        .to_string();
    let fortran = field("fortran_order")
        .map(|v| v.starts_with("True"))
        .ok_or_else(|| bad("no 'fortran_order' in header"))?;
    let shape_txt = field("shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| bad("no 'shape' in header"))?;
    let shape = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(&format!("bad shape entry '{s}'")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Header {
        descr,
        fortran,
        shape,
        data_offset: start + hlen,
    })
}

fn read_2d(path: &Path) -> Result<(Header, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| QuantError::io(path, e))?;
    let h = parse_header(path, &bytes)?;
    if h.fortran {
        return Err(QuantError::file(
            path,
            "Fortran-order arrays are not supported; save with np.ascontiguousarray",
        ));
    }
    if h.shape.len() != 2 {
        return Err(QuantError::file(
            path,
            format!("expected a 2-D array, found shape {:?}", h.shape),
        ));
    }
    Ok((h, bytes))
}

fn payload<'a>(path: &Path, h: &Header, bytes: &'a [u8], item: usize) -> Result<&'a [u8]> {
    let need = h.shape[0] * h.shape[1] * item;
    let have = bytes.len() - h.data_offset;
    if have < need {
        return Err(QuantError::file(
            path,
            format!(
                "truncated: shape {:?} of {} needs {need} data bytes, file has {have}",
                h.shape, h.descr
            ),
        ));
    }
    Ok(&bytes[h.data_offset..h.data_offset + need])
}

/// A 2-D float array (`<f4` or `<f8`) as f32.
pub fn read_f32(path: &Path) -> Result<Array2<f32>> {
    let (h, bytes) = read_2d(path)?;
    let shape = (h.shape[0], h.shape[1]);
    let data: Vec<f32> = match h.descr.as_str() {
        "<f4" => payload(path, &h, &bytes, 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        "<f8" => payload(path, &h, &bytes, 8)?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(QuantError::file(
                path,
                format!("dtype {other} is not float32/float64"),
            ));
        }
    };
    Ok(Array2::from_shape_vec(shape, data).expect("sized by payload"))
}

/// A 2-D integer array (any of u1/u2/u4/u8/i1/i2/i4/i8) as u16 indices; values outside 0..=65535
/// are an error naming the position.
pub fn read_indices(path: &Path) -> Result<Array2<u16>> {
    let (h, bytes) = read_2d(path)?;
    let shape = (h.shape[0], h.shape[1]);
    let d = h.descr.trim_start_matches(['<', '|', '=']);
    let (signed, size) = match d {
        "u1" => (false, 1),
        "u2" => (false, 2),
        "u4" => (false, 4),
        "u8" => (false, 8),
        "i1" => (true, 1),
        "i2" => (true, 2),
        "i4" => (true, 4),
        "i8" => (true, 8),
        other => {
            return Err(QuantError::file(
                path,
                format!("dtype {other} is not an integer type"),
            ))
        }
    };
    if h.descr.starts_with('>') {
        return Err(QuantError::file(
            path,
            "big-endian arrays are not supported",
        ));
    }
    let raw = payload(path, &h, &bytes, size)?;
    let mut out = Vec::with_capacity(shape.0 * shape.1);
    for (i, c) in raw.chunks_exact(size).enumerate() {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(c);
        let v: i128 = if signed {
            let shift = 64 - 8 * size as u32;
            ((i64::from_le_bytes(b) << shift) >> shift) as i128
        } else {
            u64::from_le_bytes(b) as i128
        };
        if !(0..=u16::MAX as i128).contains(&v) {
            return Err(QuantError::file(
                path,
                format!("index {v} at position {i} does not fit 0..=65535"),
            ));
        }
        out.push(v as u16);
    }
    Ok(Array2::from_shape_vec(shape, out).expect("sized by payload"))
}

fn write(path: &Path, descr: &str, shape: (usize, usize), data: &[u8]) -> Result<()> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}), }}",
        shape.0, shape.1
    );
    // Pad so that magic + version + length + header + '\n' is a multiple of 64 (NumPy's alignment).
    let total = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut buf = Vec::with_capacity(10 + header.len() + data.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&[1, 0]);
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    buf.extend_from_slice(data);
    write_atomic(path, &buf)
}

pub fn write_f32(path: &Path, a: &Array2<f32>) -> Result<()> {
    let data: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(path, "<f4", a.dim(), &data)
}

pub fn write_u16(path: &Path, a: &Array2<u16>) -> Result<()> {
    let data: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(path, "<u2", a.dim(), &data)
}

/// Writes through a temporary file in the same directory and renames it into place, so a reader
/// (or a crash) never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| QuantError::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| QuantError::file(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        QuantError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let a = Array2::from_shape_fn((3, 5), |(i, j)| (i * 10 + j) as f32 * 0.5);
        write_f32(&p, &a).unwrap();
        assert_eq!(read_f32(&p).unwrap(), a);
        let q = dir.path().join("i.npy");
        let b = Array2::from_shape_fn((4, 2), |(i, j)| (i * 1000 + j) as u16);
        write_u16(&q, &b).unwrap();
        assert_eq!(read_indices(&q).unwrap(), b);
        // Truncated file.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&p, b"hello").unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("magic"));
        assert!(read_f32(&dir.path().join("missing.npy")).is_err());
        // Float file read as indices.
        write_f32(&p, &a).unwrap();
        assert!(read_indices(&p)
            .unwrap_err()
            .to_string()
            .contains("integer"));
    }
}
