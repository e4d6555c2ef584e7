//! A change record: the mutations one request made to the replicated keyspace, as stored
//! (ciphertext stays ciphertext: nothing is decrypted to replicate it).
//!
//! Format v1, big-endian: `u8 version (1) ‖ u16 event order ‖ u64 time ms ‖ u32 op count ‖
//! ops`, an op being `u8 tag (1 set, 2 clear, 3 clear range) ‖ bytes ‖ [bytes]` with bytes
//! = `u32 length ‖ data`. Decoding is strict: unknown versions and tags, lengths past the
//! end, over-long keys or values and trailing bytes are errors, never panics.
//!
//! A record is stored at `("changes", versionstamp)` in the batch that made it; its event
//! order is the user order of the request's audit event in that batch, so the write's audit
//! position is the record's 10-byte transaction stamp with that order.

use arca_store::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};

pub const FORMAT_V1: u8 = 1;
/// Most ops in one record (a request's writes).
pub const MAX_OPS: usize = 100_000;

/// One mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Set { key: Vec<u8>, value: Vec<u8> },
    Clear { key: Vec<u8> },
    ClearRange { begin: Vec<u8>, end: Vec<u8> },
}

impl Op {
    /// The key (or range start) it touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Set { key, .. } | Op::Clear { key } => key,
            Op::ClearRange { begin, .. } => begin,
        }
    }
}

/// The mutations of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// User order of the request's audit event in its batch.
    pub event_order: u16,
    /// When the primary committed it (its clock), ms since the epoch.
    pub time_unix_ms: u64,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown change record version {0}")]
    Version(u8),
    #[error("truncated change record")]
    Truncated,
    #[error("unknown op tag {0}")]
    Tag(u8),
    #[error("field too long")]
    TooLong,
    #[error("trailing bytes after the change record")]
    Trailing,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

impl ChangeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.ops.iter().map(|o| o.key().len() + 16).sum::<usize>());
        out.push(FORMAT_V1);
        out.extend_from_slice(&self.event_order.to_be_bytes());
        out.extend_from_slice(&self.time_unix_ms.to_be_bytes());
        out.extend_from_slice(&(self.ops.len() as u32).to_be_bytes());
        for op in &self.ops {
            match op {
                Op::Set { key, value } => {
                    out.push(1);
                    put_bytes(&mut out, key);
                    put_bytes(&mut out, value);
                }
                Op::Clear { key } => {
                    out.push(2);
                    put_bytes(&mut out, key);
                }
                Op::ClearRange { begin, end } => {
                    out.push(3);
                    put_bytes(&mut out, begin);
                    put_bytes(&mut out, end);
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ChangeRecord, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != FORMAT_V1 {
            return Err(DecodeError::Version(version));
        }
        let event_order = u16::from_be_bytes(r.take(2)?.try_into().map_err(|_| DecodeError::Truncated)?);
        let time_unix_ms = u64::from_be_bytes(r.take(8)?.try_into().map_err(|_| DecodeError::Truncated)?);
        let count = u32::from_be_bytes(r.take(4)?.try_into().map_err(|_| DecodeError::Truncated)?) as usize;
        if count > MAX_OPS {
            return Err(DecodeError::TooLong);
        }
        let mut ops = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let op = match r.u8()? {
                1 => Op::Set { key: r.bytes(MAX_KEY_BYTES)?, value: r.bytes(MAX_VALUE_BYTES)? },
                2 => Op::Clear { key: r.bytes(MAX_KEY_BYTES)? },
                3 => Op::ClearRange { begin: r.bytes(MAX_KEY_BYTES + 1)?, end: r.bytes(MAX_KEY_BYTES + 1)? },
                tag => return Err(DecodeError::Tag(tag)),
            };
            ops.push(op);
        }
        if r.at != bytes.len() {
            return Err(DecodeError::Trailing);
        }
        Ok(ChangeRecord { event_order, time_unix_ms, ops })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let out = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn bytes(&mut self, max: usize) -> Result<Vec<u8>, DecodeError> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| DecodeError::Truncated)?) as usize;
        if len > max {
            return Err(DecodeError::TooLong);
        }
        Ok(self.take(len)?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChangeRecord {
        ChangeRecord {
            event_order: 7,
            time_unix_ms: 1_700_000_000_000,
            ops: vec![
                Op::Set { key: b"\x02kv\x00k".to_vec(), value: vec![1, 2, 3] },
                Op::Clear { key: b"\x02sys\x00x".to_vec() },
                Op::ClearRange { begin: b"\x02kv\x00a".to_vec(), end: b"\x02kv\x00b".to_vec() },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(ChangeRecord::decode(&r.encode()), Ok(r));
        let empty = ChangeRecord { event_order: 0, time_unix_ms: 0, ops: vec![] };
        assert_eq!(ChangeRecord::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn rejects_garbage() {
        let good = sample().encode();
        assert_eq!(ChangeRecord::decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(ChangeRecord::decode(&[9]), Err(DecodeError::Version(9)));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(ChangeRecord::decode(&trailing), Err(DecodeError::Trailing));
        for cut in 0..good.len() {
            assert!(ChangeRecord::decode(&good[..cut]).is_err(), "prefix {cut} decoded");
        }
        let mut bad_tag = good.clone();
        bad_tag[15] = 9;
        assert_eq!(ChangeRecord::decode(&bad_tag), Err(DecodeError::Tag(9)));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = ChangeRecord::decode(&bytes);
        }
    }
}
