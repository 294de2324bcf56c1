//! The workspace's one NumPy `.npy` codec, on the maintained `ndarray-npy` crate. Reading checks
//! the header, the dtype and the data length against the shape (a truncated or padded file is an
//! error naming the file, and a header that claims more data than the file holds allocates
//! nothing); writing is atomic ([`crate::atomic`]).

use std::path::Path;

use ndarray::{Array2, ArrayD, ArrayViewD, Dimension};
use ndarray_npy::{ViewNpyError, ViewNpyExt, WritableElement, WriteNpyExt};

use crate::error::{QuantError, Result};

/// A numeric array read from a .npy file: floats as f32, integers as i64.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyArray {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

impl NpyArray {
    pub fn shape(&self) -> &[usize] {
        match self {
            NpyArray::F32(a) => a.shape(),
            NpyArray::I64(a) => a.shape(),
        }
    }
}

fn describe(e: &ViewNpyError) -> String {
    match e {
        ViewNpyError::MissingBytes(n) => {
            format!("truncated: the data is {n} bytes shorter than the header's shape needs")
        }
        ViewNpyError::ExtraBytes(n) => {
            format!("{n} bytes follow the data the header describes (corrupt file)")
        }
        ViewNpyError::ParseHeader(e) => format!("not a valid .npy file: {e}"),
        ViewNpyError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "not a valid .npy file: it ends inside the header".into()
        }
        ViewNpyError::LengthOverflow => "the header's shape is too large".into(),
        ViewNpyError::NonNativeEndian => "big-endian arrays are not supported".into(),
        ViewNpyError::WrongDescriptor(d) => format!("dtype {d} is not a supported number type"),
        other => format!("not a readable .npy file: {other}"),
    }
}

/// Views `bytes` as an array of `A`; `Ok(None)` when the file holds another dtype.
fn view<'a, A: ndarray_npy::ViewElement>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<Option<ArrayViewD<'a, A>>> {
    match ArrayViewD::<A>::view_npy(bytes) {
        Ok(v) => Ok(Some(v)),
        Err(ViewNpyError::WrongDescriptor(_)) => Ok(None),
        Err(e) => Err(QuantError::file(path, describe(&e))),
    }
}

/// The file's bytes, at an address aligned for any element type (a view needs alignment).
fn read_aligned(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| QuantError::io(path, e))?;
    if (bytes.as_ptr() as usize).is_multiple_of(16) {
        return Ok(bytes);
    }
    let mut copy = Vec::with_capacity(bytes.len() + 16);
    copy.extend_from_slice(&bytes);
    Ok(copy)
}

/// Any numeric .npy array (C or Fortran order, any rank): floats as f32, integers as i64.
pub fn read_array(path: &Path) -> Result<NpyArray> {
    let bytes = read_aligned(path)?;
    macro_rules! try_as {
        ($t:ty, $variant:ident, $conv:expr) => {
            if let Some(v) = view::<$t>(path, &bytes)? {
                return Ok(NpyArray::$variant(v.mapv($conv)));
            }
        };
    }
    try_as!(f32, F32, |x| x);
    try_as!(f64, F32, |x| x as f32);
    try_as!(i64, I64, |x| x);
    try_as!(i32, I64, i64::from);
    try_as!(i16, I64, i64::from);
    try_as!(i8, I64, i64::from);
    try_as!(u8, I64, i64::from);
    try_as!(u16, I64, i64::from);
    try_as!(u32, I64, i64::from);
    if let Some(v) = view::<u64>(path, &bytes)? {
        let big = v.iter().position(|&x| x > i64::MAX as u64);
        if let Some(i) = big {
            return Err(QuantError::file(
                path,
                format!("value at position {i} does not fit int64"),
            ));
        }
        return Ok(NpyArray::I64(v.mapv(|x| x as i64)));
    }
    Err(QuantError::file(
        path,
        "dtype is not a float or integer type (bool, complex, strings and objects are not read)",
    ))
}

fn two_d<A>(path: &Path, a: ArrayD<A>) -> Result<Array2<A>> {
    let shape = a.shape().to_vec();
    a.into_dimensionality()
        .map_err(|_| QuantError::file(path, format!("expected a 2-D array, found shape {shape:?}")))
}

/// A 2-D float array (`<f4` or `<f8`) as f32.
pub fn read_f32(path: &Path) -> Result<Array2<f32>> {
    match read_array(path)? {
        NpyArray::F32(a) => two_d(path, a),
        NpyArray::I64(_) => Err(QuantError::file(
            path,
            "dtype is an integer type; expected float32/float64",
        )),
    }
}

/// A 2-D integer array as u16 indices; values outside 0..=65535 are an error naming the position.
pub fn read_indices(path: &Path) -> Result<Array2<u16>> {
    let a = match read_array(path)? {
        NpyArray::I64(a) => two_d(path, a)?,
        NpyArray::F32(_) => {
            return Err(QuantError::file(
                path,
                "dtype is a float type; expected an integer type",
            ))
        }
    };
    if let Some((i, v)) = a
        .iter()
        .enumerate()
        .find(|(_, &v)| !(0..=u16::MAX as i64).contains(&v))
    {
        return Err(QuantError::file(
            path,
            format!("index {v} at position {i} does not fit 0..=65535"),
        ));
    }
    Ok(a.mapv(|v| v as u16))
}

/// Writes any array atomically (C order, little-endian).
pub fn write<A, S, D>(path: &Path, a: &ndarray::ArrayBase<S, D>) -> Result<()>
where
    A: WritableElement,
    S: ndarray::Data<Elem = A>,
    D: Dimension,
{
    crate::atomic::write_via(path, |tmp| -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(tmp)?;
        a.write_npy(std::io::BufWriter::new(f))
            .map_err(std::io::Error::other)
    })
    .map_err(|e| QuantError::io(path, e))
}

pub fn write_f32(path: &Path, a: &Array2<f32>) -> Result<()> {
    write(path, a)
}

pub fn write_u16(path: &Path, a: &Array2<u16>) -> Result<()> {
    write(path, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        let total = 10 + header.len() + 1;
        header.push_str(&" ".repeat((64 - total % 64) % 64));
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

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
        // Truncated inside the data, and cut to the header only.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&p, &bytes[..bytes.len() - 15 * 4]).unwrap(); // the header only
        assert!(read_f32(&p).unwrap_err().to_string().contains("truncated"));
        std::fs::write(&p, &bytes[..20]).unwrap(); // cut inside the header
        let e = read_f32(&p).unwrap_err().to_string();
        assert!(e.contains("not a valid .npy"), "{e}");
        std::fs::write(&p, [&bytes[..], &[0u8; 4]].concat()).unwrap();
        assert!(read_f32(&p)
            .unwrap_err()
            .to_string()
            .contains("follow the data"));
        std::fs::write(&p, b"hello").unwrap();
        let e = read_f32(&p).unwrap_err().to_string();
        assert!(e.contains("not a valid .npy"), "{e}");
        assert!(read_f32(&dir.path().join("missing.npy")).is_err());
        // Float file read as indices, and the reverse.
        write_f32(&p, &a).unwrap();
        assert!(read_indices(&p)
            .unwrap_err()
            .to_string()
            .contains("integer"));
        assert!(read_f32(&q).unwrap_err().to_string().contains("float"));
    }

    #[test]
    fn a_header_claiming_terabytes_is_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.npy");
        std::fs::write(&p, npy_bytes("<f4", "(100000000000, 4)", &[0; 16])).unwrap();
        assert!(read_array(&p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn integer_and_float_dtypes_widen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i4.npy");
        let data: Vec<u8> = [7i32, -2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, npy_bytes("<i4", "(1, 3)", &data)).unwrap();
        assert_eq!(
            read_array(&p).unwrap(),
            NpyArray::I64(ndarray::arr2(&[[7i64, -2, 3]]).into_dyn())
        );
        assert!(read_indices(&p).unwrap_err().to_string().contains("-2"));
        let data: Vec<u8> = [1.5f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&p, npy_bytes("<f8", "(2,)", &data)).unwrap();
        assert_eq!(
            read_array(&p).unwrap(),
            NpyArray::F32(ndarray::arr1(&[1.5f32, 2.0]).into_dyn())
        );
        std::fs::write(&p, npy_bytes("|b1", "(2,)", &[1, 0])).unwrap();
        assert!(read_array(&p).unwrap_err().to_string().contains("dtype"));
    }
}
