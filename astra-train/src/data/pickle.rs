//! A small unpickler for the data CIFAR's "python version" ships: dicts of byte strings, lists of
//! ints and NumPy uint8 arrays, as written by Python 2's cPickle (protocol 2) and by Python 3
//! (protocols 2–5). Nothing is ever imported or called: a global is a name, and `REDUCE`/`BUILD`
//! build an inert [`Value::Object`] that [`ndarray_u8`] knows how to read; the one call evaluated
//! is `_codecs.encode(str, "latin1")`, Python 3's spelling of bytes under protocol 2.
//!
//! Why it is kept although the binary archives hold the same images: the CIFAR folders users
//! already have are the python version, because that is what torchvision's `CIFAR10`/`CIFAR100`
//! download (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`); reading them in place spares a
//! second 160 MB download and keeps our split identical to the one the PyTorch peers train on.

use std::rc::Rc;

/// An unpickled value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Bytes(Rc<Vec<u8>>),
    Str(Rc<str>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    /// `func(*args)` then, if BUILD followed, `__setstate__(state)`.
    Object {
        func: Box<Value>,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
    Mark,
}

impl Value {
    /// The value under `key` in a dict, whether the key was pickled as str or as bytes.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let Value::Dict(items) = self else {
            return None;
        };
        items.iter().find_map(|(k, v)| match k {
            Value::Str(s) if &**s == key => Some(v),
            Value::Bytes(b) if b.as_slice() == key.as_bytes() => Some(v),
            _ => None,
        })
    }

    fn text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn u64(&mut self) -> Result<usize, String> {
        let v = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
        usize::try_from(v).map_err(|_| format!("length {v} too large"))
    }
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("unterminated line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
}

/// Parses one pickle. Errors name the opcode or byte offset that is wrong.
pub fn load(bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { b: bytes, pos: 0 };
    // Each stack entry remembers the memo slot it was stored in, so mutations after a PUT (a list
    // memoised empty, then appended to) reach the memo too.
    let mut stack: Vec<(Value, Option<usize>)> = Vec::new();
    let mut memo: Vec<Option<Value>> = Vec::new();
    fn pop(stack: &mut Vec<(Value, Option<usize>)>) -> Result<Value, String> {
        stack
            .pop()
            .map(|v| v.0)
            .ok_or_else(|| "stack underflow".into())
    }
    fn pop_mark(stack: &mut Vec<(Value, Option<usize>)>) -> Result<Vec<Value>, String> {
        let m = stack
            .iter()
            .rposition(|v| v.0 == Value::Mark)
            .ok_or("no MARK on the stack")?;
        let items = stack.drain(m + 1..).map(|v| v.0).collect();
        stack.pop();
        Ok(items)
    }
    fn put(
        memo: &mut Vec<Option<Value>>,
        stack: &mut [(Value, Option<usize>)],
        i: usize,
    ) -> Result<(), String> {
        let top = stack.last_mut().ok_or("PUT on an empty stack")?;
        if memo.len() <= i {
            memo.resize(i + 1, None);
        }
        memo[i] = Some(top.0.clone());
        top.1 = Some(i);
        Ok(())
    }
    // After mutating the top of the stack, refresh its memo copy.
    fn sync(memo: &mut [Option<Value>], stack: &[(Value, Option<usize>)]) {
        if let Some((v, Some(i))) = stack.last() {
            memo[*i] = Some(v.clone());
        }
    }
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let p = r.u8()?;
                if p > 5 {
                    return Err(format!("pickle protocol {p} is not supported (0-5)"));
                }
            }
            0x95 => {
                r.take(8)?;
            }
            b'.' => return pop(&mut stack),
            b'(' => stack.push((Value::Mark, None)),
            b'N' => stack.push((Value::None, None)),
            0x88 => stack.push((Value::Bool(true), None)),
            0x89 => stack.push((Value::Bool(false), None)),
            b'J' => {
                let v = i32::from_le_bytes(r.take(4)?.try_into().expect("4")) as i64;
                stack.push((Value::Int(v), None))
            }
            b'K' => stack.push((Value::Int(r.u8()? as i64), None)),
            b'M' => {
                let v = u16::from_le_bytes(r.take(2)?.try_into().expect("2")) as i64;
                stack.push((Value::Int(v), None))
            }
            0x8a => {
                let n = r.u8()? as usize;
                let b = r.take(n)?;
                if n > 8 {
                    return Err(format!("LONG1 of {n} bytes at byte {at} exceeds 64 bits"));
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push((Value::Int(v), None))
            }
            b'G' => {
                let v = f64::from_be_bytes(r.take(8)?.try_into().expect("8"));
                stack.push((Value::Float(v), None))
            }
            // Python 2 str (SHORT_BINSTRING, BINSTRING) is bytes; so are the BINBYTES family.
            b'U' | b'C' => {
                let n = r.u8()? as usize;
                stack.push((Value::Bytes(Rc::new(r.take(n)?.to_vec())), None))
            }
            b'T' | b'B' => {
                let n = r.u32()?;
                stack.push((Value::Bytes(Rc::new(r.take(n)?.to_vec())), None))
            }
            0x8e | 0x96 => {
                let n = r.u64()?;
                stack.push((Value::Bytes(Rc::new(r.take(n)?.to_vec())), None))
            }
            0x8c | b'X' | 0x8d => {
                let n = match op {
                    0x8c => r.u8()? as usize,
                    b'X' => r.u32()?,
                    _ => r.u64()?,
                };
                let s = std::str::from_utf8(r.take(n)?)
                    .map_err(|e| format!("bad UTF-8 at byte {at}: {e}"))?;
                stack.push((Value::Str(s.into()), None))
            }
            b')' => stack.push((Value::Tuple(vec![]), None)),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.drain(stack.len() - n..).map(|v| v.0).collect();
                stack.push((Value::Tuple(items), None))
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push((Value::Tuple(items), None))
            }
            b']' => stack.push((Value::List(vec![]), None)),
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push((Value::List(items), None))
            }
            b'}' => stack.push((Value::Dict(vec![]), None)),
            b'd' => {
                let items = pop_mark(&mut stack)?;
                stack.push((Value::Dict(pairs(items)?), None))
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack)?
                };
                match stack.last_mut() {
                    Some((Value::List(l), _)) => l.extend(items),
                    _ => return Err(format!("APPEND at byte {at} onto a non-list")),
                }
                sync(&mut memo, &stack);
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                match stack.last_mut() {
                    Some((Value::Dict(d), _)) => d.extend(pairs(items)?),
                    _ => return Err(format!("SETITEM at byte {at} onto a non-dict")),
                }
                sync(&mut memo, &stack);
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push((Value::Global(module, name), None))
            }
            0x93 => {
                let name = pop(&mut stack)?.text().ok_or("STACK_GLOBAL name")?;
                let module = pop(&mut stack)?.text().ok_or("STACK_GLOBAL module")?;
                stack.push((Value::Global(module, name), None))
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push((call(func, args), None))
            }
            b'b' => {
                let state = pop(&mut stack)?;
                match stack.last_mut() {
                    Some((Value::Object { state: s, .. }, _)) => *s = Some(Box::new(state)),
                    _ => return Err(format!("BUILD at byte {at} on a non-object")),
                }
                sync(&mut memo, &stack);
            }
            b'q' => put(&mut memo, &mut stack, r.u8()? as usize)?,
            b'r' => {
                let i = r.u32()?;
                put(&mut memo, &mut stack, i)?
            }
            0x94 => {
                let i = memo.len();
                put(&mut memo, &mut stack, i)?
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    r.u8()? as usize
                } else {
                    r.u32()?
                };
                let v = memo
                    .get(i)
                    .and_then(|v| v.clone())
                    .ok_or_else(|| format!("memo slot {i} read at byte {at} was never written"))?;
                stack.push((v, None))
            }
            other => {
                return Err(format!(
                    "opcode 0x{other:02x} at byte {at} is not supported (not a data pickle?)"
                ))
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of dict items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn call(func: Value, args: Value) -> Value {
    if let (Value::Global(m, n), Value::Tuple(a)) = (&func, &args) {
        if m == "_codecs" && n == "encode" && a.len() == 2 {
            if let (Value::Str(s), Some(enc)) = (&a[0], a[1].text()) {
                if enc == "latin1" || enc == "latin-1" {
                    let b: Option<Vec<u8>> =
                        s.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                    if let Some(b) = b {
                        return Value::Bytes(Rc::new(b));
                    }
                }
            }
        }
    }
    Value::Object {
        func: Box::new(func),
        args: Box::new(args),
        state: None,
    }
}

fn global_name(v: &Value) -> Option<&str> {
    match v {
        Value::Global(_, n) => Some(n),
        _ => None,
    }
}

fn dtype_is_u8(dtype: &Value) -> bool {
    match dtype {
        Value::Object { func, args, .. } if global_name(func) == Some("dtype") => match &**args {
            Value::Tuple(a) => a
                .first()
                .and_then(|t| t.text())
                .is_some_and(|t| t == "u1" || t == "|u1" || t == "uint8"),
            _ => false,
        },
        _ => false,
    }
}

fn shape_of(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(d) | Value::List(d) => d
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Some(*i as usize),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// A NumPy uint8 array (C order) as its bytes and shape: `_reconstruct` + `__setstate__` (protocols
/// 2–4) or `_frombuffer` (protocol 5).
pub fn ndarray_u8(v: &Value) -> Result<(Rc<Vec<u8>>, Vec<usize>), String> {
    let Value::Object { func, args, state } = v else {
        return Err("not a NumPy array".into());
    };
    let (raw, dtype, shape, fortran) = match (global_name(func), state.as_deref()) {
        (Some("_reconstruct"), Some(Value::Tuple(s))) if s.len() == 5 => (
            &s[4],
            &s[2],
            &s[1],
            s[3] == Value::Bool(true) || s[3] == Value::Int(1),
        ),
        (Some("_frombuffer"), _) => match &**args {
            Value::Tuple(a) if a.len() == 4 => {
                let order = a[3].text().unwrap_or_default();
                (&a[0], &a[1], &a[2], order == "F")
            }
            _ => return Err("malformed _frombuffer call".into()),
        },
        _ => return Err("not a NumPy array (no _reconstruct state or _frombuffer)".into()),
    };
    if !dtype_is_u8(dtype) {
        return Err("array dtype is not uint8".into());
    }
    let shape = shape_of(shape).ok_or("array shape is not a tuple of sizes")?;
    let Value::Bytes(raw) = raw else {
        return Err("array data is not a byte string".into());
    };
    if fortran && shape.len() > 1 {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let n: usize = shape.iter().product();
    if raw.len() != n {
        return Err(format!(
            "array of shape {shape:?} holds {} bytes, expected {n}",
            raw.len()
        ));
    }
    Ok((raw.clone(), shape))
}

/// A list (or 1-D integer array) of labels.
pub fn int_list(v: &Value) -> Result<Vec<i64>, String> {
    match v {
        Value::List(l) | Value::Tuple(l) => l
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                _ => Err("label list holds a non-integer".to_string()),
            })
            .collect(),
        other => ndarray_u8(other).map(|(b, _)| b.iter().map(|&x| x as i64).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python2_style_cifar_dict() {
        // {'data': array(uint8, (2, 3)), 'labels': [1, 300]} as Python 2 cPickle protocol 2 writes it.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'U', 4];
        p.extend_from_slice(b"data");
        p.extend_from_slice(b"q\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85U\x01b\x87R(K\x01K\x02K\x03\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x06");
        p.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        p.extend_from_slice(b"tbU\x06labels]q\x04(K\x01M,\x01eu.");
        let v = load(&p).unwrap();
        let (raw, shape) = ndarray_u8(v.get("data").unwrap()).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(raw.as_slice(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(int_list(v.get("labels").unwrap()).unwrap(), vec![1, 300]);
    }

    #[test]
    fn memo_sees_later_appends_and_errors_are_named() {
        // l = []; PUT 0; APPEND 7; then a tuple (l, GET 0).
        let p = b"\x80\x02]q\x00K\x07ah\x00\x86.";
        let v = load(p).unwrap();
        let Value::Tuple(t) = v else { panic!() };
        assert_eq!(t[0], t[1]);
        assert_eq!(t[1], Value::List(vec![Value::Int(7)]));
        assert!(load(b"\x80\x02]K").unwrap_err().contains("truncated"));
        assert!(load(b"\x80\x02\xff").unwrap_err().contains("0xff"));
    }
}
