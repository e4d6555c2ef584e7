//! Order-preserving tuple encoding for keys: FoundationDB's tuple layer, byte for byte,
//! for the element types arca needs.
//!
//! Packed tuples sort the way their elements do (element by element, shorter first), so a
//! key prefix is a tuple prefix and ranges mean the same on every backend — and keys written
//! by arca can be read by FoundationDB's own tools.
//!
//! | type | code | body |
//! | --- | --- | --- |
//! | null | `0x00` | — |
//! | bytes | `0x01` | bytes with `0x00` escaped as `0x00 0xFF`, then `0x00` |
//! | string | `0x02` | UTF-8, escaped like bytes |
//! | integer | `0x0C`–`0x1C` | `0x14 ± n`, then n big-endian bytes (ones' complement if negative) |
//! | false / true | `0x26` / `0x27` | — |
//! | versionstamp | `0x33` | 12 bytes |
//!
//! Decoding is strict: unknown codes, non-canonical integers, bad escapes, invalid UTF-8 and
//! truncated input are errors, never panics (the parser is fuzzed by property tests).

use std::fmt;

use crate::Versionstamp;

const NULL: u8 = 0x00;
const BYTES: u8 = 0x01;
const STRING: u8 = 0x02;
const INT_ZERO: u8 = 0x14;
const FALSE: u8 = 0x26;
const TRUE: u8 = 0x27;
const VERSIONSTAMP: u8 = 0x33;
const ESCAPE: u8 = 0xFF;

/// An integer element: any value in `-(2^64 - 1) ..= 2^64 - 1`, the range FoundationDB's
/// tuple layer encodes in at most eight bytes. Built from `i64` or `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Int(i128);

impl Int {
    pub fn as_i64(self) -> Option<i64> {
        i64::try_from(self.0).ok()
    }

    pub fn as_u64(self) -> Option<u64> {
        u64::try_from(self.0).ok()
    }
}

impl From<i64> for Int {
    fn from(value: i64) -> Self {
        Int(value.into())
    }
}

impl From<u64> for Int {
    fn from(value: u64) -> Self {
        Int(value.into())
    }
}

/// One element of a tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Element {
    Null,
    Bytes(Vec<u8>),
    String(String),
    Int(Int),
    Bool(bool),
    Versionstamp(Versionstamp),
}

impl From<&str> for Element {
    fn from(value: &str) -> Self {
        Element::String(value.to_owned())
    }
}
impl From<String> for Element {
    fn from(value: String) -> Self {
        Element::String(value)
    }
}
impl From<&[u8]> for Element {
    fn from(value: &[u8]) -> Self {
        Element::Bytes(value.to_vec())
    }
}
impl From<Vec<u8>> for Element {
    fn from(value: Vec<u8>) -> Self {
        Element::Bytes(value)
    }
}
impl From<i64> for Element {
    fn from(value: i64) -> Self {
        Element::Int(value.into())
    }
}
impl From<u64> for Element {
    fn from(value: u64) -> Self {
        Element::Int(value.into())
    }
}
impl From<u32> for Element {
    fn from(value: u32) -> Self {
        Element::Int(u64::from(value).into())
    }
}
impl From<bool> for Element {
    fn from(value: bool) -> Self {
        Element::Bool(value)
    }
}
impl From<Versionstamp> for Element {
    fn from(value: Versionstamp) -> Self {
        Element::Versionstamp(value)
    }
}

impl Element {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Element::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Element::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<Int> {
        match self {
            Element::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_versionstamp(&self) -> Option<Versionstamp> {
        match self {
            Element::Versionstamp(v) => Some(*v),
            _ => None,
        }
    }
}

/// Why bytes did not decode as a tuple.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TupleError {
    #[error("unknown type code {code:#04x} at byte {at}")]
    UnknownCode { code: u8, at: usize },
    #[error("input ends inside an element starting at byte {at}")]
    Truncated { at: usize },
    #[error("integer at byte {at} is not canonically encoded")]
    NonCanonicalInt { at: usize },
    #[error("string at byte {at} is not valid UTF-8")]
    InvalidUtf8 { at: usize },
    #[error("key does not start with the expected prefix")]
    WrongPrefix,
}

/// Appends the encoding of `element` to `out`.
pub fn encode_into(out: &mut Vec<u8>, element: &Element) {
    match element {
        Element::Null => out.push(NULL),
        Element::Bytes(bytes) => encode_escaped(out, BYTES, bytes),
        Element::String(s) => encode_escaped(out, STRING, s.as_bytes()),
        Element::Int(Int(value)) => encode_int(out, *value),
        Element::Bool(false) => out.push(FALSE),
        Element::Bool(true) => out.push(TRUE),
        Element::Versionstamp(stamp) => {
            out.push(VERSIONSTAMP);
            out.extend_from_slice(stamp.as_bytes());
        }
    }
}

/// Packs a tuple.
pub fn pack(elements: &[Element]) -> Vec<u8> {
    let mut out = Vec::new();
    for element in elements {
        encode_into(&mut out, element);
    }
    out
}

/// An element borrowed for packing: [`pack_parts`] encodes it exactly as [`pack`] encodes
/// the owned [`Element`], without allocating it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part<'a> {
    Str(&'a str),
    Bytes(&'a [u8]),
    UInt(u64),
}

impl Part<'_> {
    /// Bytes the part takes when it holds no zero byte (each zero adds one).
    fn len(&self) -> usize {
        match self {
            Part::Str(s) => s.len() + 2,
            Part::Bytes(b) => b.len() + 2,
            Part::UInt(_) => 9,
        }
    }
}

/// [`pack`] for borrowed parts, into one allocation of the right size (the request path
/// builds a few keys per request).
pub fn pack_parts(parts: &[Part<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(Part::len).sum());
    for part in parts {
        match part {
            Part::Str(s) => encode_escaped(&mut out, STRING, s.as_bytes()),
            Part::Bytes(b) => encode_escaped(&mut out, BYTES, b),
            Part::UInt(v) => encode_int(&mut out, i128::from(*v)),
        }
    }
    out
}

/// Unpacks a whole tuple; every byte must belong to an element.
pub fn unpack(bytes: &[u8]) -> Result<Vec<Element>, TupleError> {
    let mut elements = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (element, next) = decode_one(bytes, at)?;
        elements.push(element);
        at = next;
    }
    Ok(elements)
}

fn encode_escaped(out: &mut Vec<u8>, code: u8, bytes: &[u8]) {
    out.push(code);
    // Whole runs between zero bytes at once; each zero is followed by the escape.
    let mut rest = bytes;
    while let Some(zero) = rest.iter().position(|&b| b == 0) {
        out.extend_from_slice(&rest[..=zero]);
        out.push(ESCAPE);
        rest = &rest[zero + 1..];
    }
    out.extend_from_slice(rest);
    out.push(0);
}

fn encode_int(out: &mut Vec<u8>, value: i128) {
    let magnitude = value.unsigned_abs();
    // Int's constructors keep |value| < 2^64, so at most eight bytes.
    let len = (16 - magnitude.leading_zeros() as usize / 8).min(8);
    let len = if magnitude == 0 { 0 } else { len };
    if value >= 0 {
        out.push(INT_ZERO + len as u8);
        out.extend_from_slice(&magnitude.to_be_bytes()[16 - len..]);
    } else {
        out.push(INT_ZERO - len as u8);
        let complement = !magnitude;
        out.extend_from_slice(&complement.to_be_bytes()[16 - len..]);
    }
}

fn decode_one(bytes: &[u8], at: usize) -> Result<(Element, usize), TupleError> {
    let code = bytes[at];
    let body = at + 1;
    match code {
        NULL => Ok((Element::Null, body)),
        BYTES => {
            let (raw, next) = decode_escaped(bytes, body, at)?;
            Ok((Element::Bytes(raw), next))
        }
        STRING => {
            let (raw, next) = decode_escaped(bytes, body, at)?;
            let s = String::from_utf8(raw).map_err(|_| TupleError::InvalidUtf8 { at })?;
            Ok((Element::String(s), next))
        }
        0x0C..=0x1C => {
            let len = usize::from(code.abs_diff(INT_ZERO));
            let raw = bytes.get(body..body + len).ok_or(TupleError::Truncated { at })?;
            let mut wide = [0u8; 16];
            wide[16 - len..].copy_from_slice(raw);
            let value = if code >= INT_ZERO {
                if raw.first() == Some(&0) {
                    return Err(TupleError::NonCanonicalInt { at });
                }
                i128::from_be_bytes(wide)
            } else {
                if raw.first() == Some(&0xFF) {
                    return Err(TupleError::NonCanonicalInt { at });
                }
                let ones = u128::from_be_bytes(wide) ^ (u128::MAX >> (128 - 8 * len));
                -(ones as i128)
            };
            Ok((Element::Int(Int(value)), body + len))
        }
        FALSE => Ok((Element::Bool(false), body)),
        TRUE => Ok((Element::Bool(true), body)),
        VERSIONSTAMP => {
            let raw = bytes.get(body..body + Versionstamp::LEN).ok_or(TupleError::Truncated { at })?;
            let stamp = Versionstamp::from_slice(raw).ok_or(TupleError::Truncated { at })?;
            Ok((Element::Versionstamp(stamp), body + Versionstamp::LEN))
        }
        _ => Err(TupleError::UnknownCode { code, at }),
    }
}

fn decode_escaped(bytes: &[u8], mut i: usize, at: usize) -> Result<(Vec<u8>, usize), TupleError> {
    let mut raw = Vec::new();
    loop {
        match bytes.get(i) {
            None => return Err(TupleError::Truncated { at }),
            Some(0) if bytes.get(i + 1) == Some(&ESCAPE) => {
                raw.push(0);
                i += 2;
            }
            Some(0) => return Ok((raw, i + 1)),
            Some(&byte) => {
                raw.push(byte);
                i += 1;
            }
        }
    }
}

/// A key prefix made of a packed tuple: one concern of the keyspace (`kv/…`, `sys/…`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Subspace {
    prefix: Vec<u8>,
}

impl Subspace {
    /// The subspace of keys starting with the packed `elements`.
    pub fn new(elements: &[Element]) -> Self {
        Subspace { prefix: pack(elements) }
    }

    /// A nested subspace: this prefix followed by one more element.
    pub fn sub(&self, element: impl Into<Element>) -> Self {
        let mut prefix = self.prefix.clone();
        encode_into(&mut prefix, &element.into());
        Subspace { prefix }
    }

    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The key for `elements` inside this subspace.
    pub fn key(&self, elements: &[Element]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        for element in elements {
            encode_into(&mut key, element);
        }
        key
    }

    /// The elements after the prefix.
    pub fn unpack(&self, key: &[u8]) -> Result<Vec<Element>, TupleError> {
        let rest = key.strip_prefix(self.prefix.as_slice()).ok_or(TupleError::WrongPrefix)?;
        unpack(rest)
    }

    /// `[begin, end)` holding every key of this subspace that extends the prefix with at
    /// least one element (FoundationDB's `prefix ‖ 0x00 .. prefix ‖ 0xFF`).
    pub fn range(&self) -> (Vec<u8>, Vec<u8>) {
        let mut begin = self.prefix.clone();
        begin.push(0x00);
        let mut end = self.prefix.clone();
        end.push(0xFF);
        (begin, end)
    }
}

impl fmt::Debug for Subspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subspace({:?})", Printable(&self.prefix))
    }
}

/// Shows bytes FoundationDB-style: printable ASCII as is, everything else as `\xNN`.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Debug for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("b\"")?;
        for &byte in self.0 {
            if byte.is_ascii_graphic() && byte != b'\\' && byte != b'"' || byte == b' ' {
                write!(f, "{}", byte as char)?;
            } else {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Vectors from FoundationDB's tuple layer specification and its Python binding.
    #[test]
    fn matches_foundationdb_byte_for_byte() {
        let cases: Vec<(Element, &[u8])> = vec![
            (Element::Null, b"\x00"),
            (Element::from(&b"foo\x00bar"[..]), b"\x01foo\x00\xffbar\x00"),
            (Element::from("F\u{d4}O\u{0}bar"), b"\x02F\xc3\x94O\x00\xffbar\x00"),
            (Element::from(0i64), b"\x14"),
            (Element::from(5551212i64), b"\x17\x54\xb4\x6c"),
            (Element::from(-5551212i64), b"\x11\xab\x4b\x93"),
            (Element::from(-1i64), b"\x13\xfe"),
            (Element::from(255i64), b"\x15\xff"),
            (Element::from(256i64), b"\x16\x01\x00"),
            (Element::from(-255i64), b"\x13\x00"),
            (Element::from(u64::MAX), b"\x1c\xff\xff\xff\xff\xff\xff\xff\xff"),
            (Element::from(i64::MIN), b"\x0c\x7f\xff\xff\xff\xff\xff\xff\xff"),
            (Element::from(true), b"\x27"),
            (Element::from(false), b"\x26"),
        ];
        for (element, bytes) in cases {
            assert_eq!(pack(std::slice::from_ref(&element)), bytes, "{element:?}");
            assert_eq!(unpack(bytes).unwrap(), vec![element]);
        }
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        assert_eq!(unpack(b"\x01abc"), Err(TupleError::Truncated { at: 0 }));
        assert_eq!(unpack(b"\x16\x01"), Err(TupleError::Truncated { at: 0 }));
        assert_eq!(unpack(b"\x15\x00"), Err(TupleError::NonCanonicalInt { at: 0 }));
        assert_eq!(unpack(b"\x13\xff"), Err(TupleError::NonCanonicalInt { at: 0 }));
        assert_eq!(unpack(b"\x02\xff\x00"), Err(TupleError::InvalidUtf8 { at: 0 }));
        assert_eq!(unpack(b"\x40"), Err(TupleError::UnknownCode { code: 0x40, at: 0 }));
        assert_eq!(unpack(b"\x33\x00"), Err(TupleError::Truncated { at: 0 }));
    }

    #[test]
    fn subspace_range_holds_its_keys_only() {
        let kv = Subspace::new(&["kv".into()]);
        let (begin, end) = kv.range();
        let inside = kv.key(&["secret/a".into(), 3u64.into()]);
        assert!(begin <= inside && inside < end);
        let other = Subspace::new(&["kw".into()]).key(&["a".into()]);
        assert!(!(begin <= other && other < end));
        assert_eq!(kv.unpack(&inside).unwrap(), vec!["secret/a".into(), 3u64.into()]);
        assert_eq!(kv.unpack(&other), Err(TupleError::WrongPrefix));
    }

    fn element() -> impl Strategy<Value = Element> {
        prop_oneof![
            Just(Element::Null),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(Element::Bytes),
            "[a-c\u{0}\u{e9}]{0,6}".prop_map(Element::String),
            any::<i64>().prop_map(Element::from),
            any::<u64>().prop_map(Element::from),
            (-300i64..300).prop_map(Element::from),
            any::<bool>().prop_map(Element::Bool),
            any::<[u8; 12]>().prop_map(|b| Element::Versionstamp(Versionstamp::from_bytes(b))),
        ]
    }

    /// The order packed bytes must follow: FoundationDB's cross-type order is by type code.
    fn type_rank(e: &Element) -> u8 {
        match e {
            Element::Null => 0,
            Element::Bytes(_) => 1,
            Element::String(_) => 2,
            Element::Int(_) => 3,
            Element::Bool(_) => 4,
            Element::Versionstamp(_) => 5,
        }
    }

    fn compare(a: &Element, b: &Element) -> std::cmp::Ordering {
        match (a, b) {
            (Element::Bytes(x), Element::Bytes(y)) => x.cmp(y),
            (Element::String(x), Element::String(y)) => x.as_bytes().cmp(y.as_bytes()),
            (Element::Int(x), Element::Int(y)) => x.cmp(y),
            (Element::Bool(x), Element::Bool(y)) => x.cmp(y),
            (Element::Versionstamp(x), Element::Versionstamp(y)) => x.cmp(y),
            _ => type_rank(a).cmp(&type_rank(b)),
        }
    }

    proptest! {
        #[test]
        fn round_trips(tuple in proptest::collection::vec(element(), 0..5)) {
            prop_assert_eq!(unpack(&pack(&tuple)).unwrap(), tuple);
        }

        #[test]
        fn preserves_order(a in proptest::collection::vec(element(), 0..4),
                           b in proptest::collection::vec(element(), 0..4)) {
            let expected = a.iter().zip(&b)
                .map(|(x, y)| compare(x, y))
                .find(|o| o.is_ne())
                .unwrap_or(a.len().cmp(&b.len()));
            prop_assert_eq!(pack(&a).cmp(&pack(&b)), expected);
        }

        #[test]
        fn borrowed_parts_pack_exactly_as_elements(parts in proptest::collection::vec(
            prop_oneof![
                ".{0,12}".prop_map(Element::String),
                proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..12).prop_map(Element::Bytes),
                any::<u64>().prop_map(Element::from),
            ],
            0..6,
        )) {
            let borrowed: Vec<Part<'_>> = parts
                .iter()
                .map(|e| match e {
                    Element::String(s) => Part::Str(s),
                    Element::Bytes(b) => Part::Bytes(b),
                    Element::Int(i) => Part::UInt(i.as_u64().unwrap()),
                    _ => unreachable!(),
                })
                .collect();
            prop_assert_eq!(pack_parts(&borrowed), pack(&parts));
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(tuple) = unpack(&bytes) {
                // Whatever decodes is canonical: it packs back to the same bytes.
                prop_assert_eq!(pack(&tuple), bytes);
            }
        }
    }
}
