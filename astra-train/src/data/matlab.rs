//! A reader for MATLAB's Level 5 MAT-files (MATLAB 5 to 7, what `save` writes by default and
//! scipy's `loadmat` reads), enough for data set metadata such as ImageNet's devkit `meta.mat`:
//! numeric, character, cell and struct arrays, zlib-compressed variables (v7) included.
//! Little-endian files only; sparse and object arrays and v7.3 (HDF5) files are refused.
//!
//! Layout (MathWorks, "MAT-File Format"): a 128-byte header, then data elements, each a tag (type,
//! byte count; or both packed in 4 bytes for payloads of at most 4 bytes) and a payload padded to
//! 8 bytes. A variable is a miMATRIX element whose sub-elements are its flags, dimensions, name
//! and data; miCOMPRESSED wraps one element in a zlib stream.

use std::io::Read;
use std::path::Path;

use crate::error::{Result, TrainError};

/// One array; arrays are column-major, as in MATLAB.
#[derive(Clone, Debug, PartialEq)]
pub enum MatArray {
    Numeric {
        dims: Vec<usize>,
        values: Vec<f64>,
    },
    Char {
        dims: Vec<usize>,
        text: String,
    },
    Cell {
        dims: Vec<usize>,
        cells: Vec<MatArray>,
    },
    /// `elements[i][f]` is field `fields[f]` of element `i`.
    Struct {
        dims: Vec<usize>,
        fields: Vec<String>,
        elements: Vec<Vec<MatArray>>,
    },
}

impl MatArray {
    /// The one number of a scalar numeric array.
    pub fn scalar(&self) -> Option<f64> {
        match self {
            MatArray::Numeric { values, .. } if values.len() == 1 => Some(values[0]),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            MatArray::Char { text, .. } => Some(text),
            _ => None,
        }
    }

    /// Field `name` of struct element `i`.
    pub fn field(&self, i: usize, name: &str) -> Option<&MatArray> {
        match self {
            MatArray::Struct {
                fields, elements, ..
            } => {
                let f = fields.iter().position(|n| n == name)?;
                elements.get(i).map(|e| &e[f])
            }
            _ => None,
        }
    }

    /// Elements of a struct array (0 for other arrays).
    pub fn len(&self) -> usize {
        match self {
            MatArray::Struct { elements, .. } => elements.len(),
            MatArray::Cell { cells, .. } => cells.len(),
            MatArray::Numeric { values, .. } => values.len(),
            MatArray::Char { text, .. } => text.chars().count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// Data types of element tags.
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
// Array classes.
const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;

/// The variables of the MAT-file at `path`, by name, in file order.
pub fn read(path: &Path) -> Result<Vec<(String, MatArray)>> {
    let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
    parse(&bytes).map_err(|reason| TrainError::File {
        path: path.into(),
        reason,
    })
}

/// The variable `name` of the MAT-file at `path`.
pub fn variable(path: &Path, name: &str) -> Result<MatArray> {
    let vars = read(path)?;
    let names: Vec<&str> = vars.iter().map(|v| v.0.as_str()).collect();
    let missing = format!("has no variable '{name}' (it holds: {})", names.join(", "));
    vars.into_iter()
        .find(|v| v.0 == name)
        .map(|v| v.1)
        .ok_or_else(|| TrainError::File {
            path: path.into(),
            reason: missing,
        })
}

type Parsed<T> = std::result::Result<T, String>;

pub fn parse(bytes: &[u8]) -> Parsed<Vec<(String, MatArray)>> {
    if bytes.len() < 128 {
        return Err("not a MAT-file (shorter than its 128-byte header)".into());
    }
    if bytes.starts_with(b"MATLAB 7.3") {
        return Err("a MATLAB 7.3 (HDF5) file: save it with -v7 to read it here".into());
    }
    if !bytes.starts_with(b"MATLAB 5.0 MAT-file") {
        return Err("not a MATLAB 5/7 MAT-file (header text)".into());
    }
    match &bytes[126..128] {
        b"IM" => {}
        b"MI" => return Err("a big-endian MAT-file; only little-endian files are read".into()),
        _ => return Err("not a MAT-file (endian indicator)".into()),
    }
    let mut vars = Vec::new();
    let mut p = 128;
    while p + 8 <= bytes.len() {
        let (kind, data, next) = element(bytes, p)?;
        vars.push(variable_of(kind, data)?);
        p = next;
    }
    Ok(vars)
}

/// (type, payload, offset of the next element) of the element at `p`.
fn element(b: &[u8], p: usize) -> Parsed<(u32, &[u8], usize)> {
    let word = |at: usize| -> Parsed<u32> {
        b.get(at..at + 4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
            .ok_or_else(|| format!("truncated at byte {at}"))
    };
    let first = word(p)?;
    if first >> 16 != 0 {
        // Small element: byte count in the upper half, payload in the tag's second word.
        let n = (first >> 16) as usize;
        if n > 4 {
            return Err(format!("bad small element at byte {p}"));
        }
        return Ok((first & 0xFFFF, &b[p + 4..p + 4 + n], p + 8));
    }
    let n = word(p + 4)? as usize;
    let data = b
        .get(p + 8..p + 8 + n)
        .ok_or_else(|| format!("element at byte {p} claims {n} bytes; the data ends first"))?;
    // Compressed elements are not padded.
    let next = if first == MI_COMPRESSED {
        p + 8 + n
    } else {
        p + 8 + n.div_ceil(8) * 8
    };
    Ok((first, data, next))
}

/// A top-level element: a (possibly compressed) named matrix.
fn variable_of(kind: u32, data: &[u8]) -> Parsed<(String, MatArray)> {
    match kind {
        MI_COMPRESSED => {
            let mut raw = Vec::new();
            flate2::read::ZlibDecoder::new(data)
                .read_to_end(&mut raw)
                .map_err(|e| format!("a compressed variable does not inflate: {e}"))?;
            let (kind, inner, _) = element(&raw, 0)?;
            variable_of(kind, inner)
        }
        MI_MATRIX => matrix(data),
        other => Err(format!("top-level element of type {other}, not a variable")),
    }
}

/// A miMATRIX payload: (name, array).
fn matrix(data: &[u8]) -> Parsed<(String, MatArray)> {
    if data.is_empty() {
        let empty = MatArray::Numeric {
            dims: vec![0, 0],
            values: vec![],
        };
        return Ok((String::new(), empty));
    }
    let mut sub = Subelements { data, p: 0 };
    let flags = sub.next("array flags")?;
    let class = *flags.1.first().ok_or("empty array flags")?;
    let complex = flags.1.get(1).is_some_and(|f| f & 0x08 != 0);
    let dims: Vec<usize> = numbers(sub.next("dimensions")?)?
        .into_iter()
        .map(|d| d as usize)
        .collect();
    let name = String::from_utf8_lossy(sub.next("array name")?.1).into_owned();
    let count: usize = dims.iter().product();
    let array = match class {
        MX_CELL => MatArray::Cell {
            cells: (0..count)
                .map(|_| sub.matrix().map(|m| m.1))
                .collect::<Parsed<_>>()?,
            dims,
        },
        MX_STRUCT => {
            let width = numbers(sub.next("field name length")?)?
                .first()
                .copied()
                .unwrap_or(0.0) as usize;
            let names = sub.next("field names")?.1;
            let fields: Vec<String> = names
                .chunks(width.max(1))
                .map(|c| {
                    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
                    String::from_utf8_lossy(&c[..end]).into_owned()
                })
                .collect();
            let elements = (0..count)
                .map(|_| {
                    (0..fields.len())
                        .map(|_| sub.matrix().map(|m| m.1))
                        .collect::<Parsed<Vec<_>>>()
                })
                .collect::<Parsed<_>>()?;
            MatArray::Struct {
                dims,
                fields,
                elements,
            }
        }
        MX_CHAR => MatArray::Char {
            text: chars(sub.next("characters")?)?,
            dims,
        },
        6..=15 => {
            let values = numbers(sub.next("real part")?)?;
            if complex {
                sub.next("imaginary part")?;
            }
            MatArray::Numeric { dims, values }
        }
        other => {
            return Err(format!(
                "array '{name}' is of class {other} (sparse or object), not read here"
            ))
        }
    };
    Ok((name, array))
}

/// Walks the sub-elements of a miMATRIX payload.
struct Subelements<'a> {
    data: &'a [u8],
    p: usize,
}

impl<'a> Subelements<'a> {
    fn next(&mut self, what: &str) -> Parsed<(u32, &'a [u8])> {
        if self.p + 8 > self.data.len() {
            return Err(format!("an array ends before its {what}"));
        }
        let (kind, data, next) = element(self.data, self.p)?;
        self.p = next;
        Ok((kind, data))
    }

    fn matrix(&mut self) -> Parsed<(String, MatArray)> {
        match self.next("element")? {
            (MI_MATRIX, data) => matrix(data),
            (kind, _) => Err(format!("a cell or field of type {kind}, not an array")),
        }
    }
}

/// The numbers of a numeric sub-element of any storage type (MATLAB stores doubles compactly,
/// e.g. small integers as miUINT8).
fn numbers((kind, b): (u32, &[u8])) -> Parsed<Vec<f64>> {
    macro_rules! le {
        ($t:ty) => {
            b.chunks_exact(std::mem::size_of::<$t>())
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("sized")) as f64)
                .collect()
        };
    }
    Ok(match kind {
        MI_INT8 => b.iter().map(|&v| v as i8 as f64).collect(),
        MI_UINT8 => b.iter().map(|&v| v as f64).collect(),
        MI_INT16 => le!(i16),
        MI_UINT16 => le!(u16),
        MI_INT32 => le!(i32),
        MI_UINT32 => le!(u32),
        MI_SINGLE => le!(f32),
        MI_DOUBLE => le!(f64),
        MI_INT64 => le!(i64),
        MI_UINT64 => le!(u64),
        other => return Err(format!("numbers stored as type {other}")),
    })
}

/// The text of a character sub-element (UTF-16 code units, UTF-8 or bytes).
fn chars((kind, b): (u32, &[u8])) -> Parsed<String> {
    match kind {
        MI_UINT16 | MI_UTF16 => {
            let units: Vec<u16> = b
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            Ok(String::from_utf16_lossy(&units))
        }
        MI_UTF8 | MI_UINT8 | MI_INT8 => Ok(String::from_utf8_lossy(b).into_owned()),
        other => Err(format!("characters stored as type {other}")),
    }
}
