//! Little-endian primitive reads with the bytes left tracked, so every length read
//! from the file is checked before anything is allocated.

use std::io::{self, Read};

use super::{GgufError, GgufType, GgufValue, MAX_ARRAY_DEPTH};

/// A reader that knows how many bytes are left, so lengths can be checked up front.
pub(super) struct Reader<R> {
    pub(super) inner: R,
    pub(super) pos: u64,
    pub(super) len: u64,
}

impl<R: Read> Reader<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fails unless `count` items of at least `min_size` bytes each can still fit.
    pub(super) fn check_len(
        &self,
        what: &'static str,
        count: u64,
        min_size: u64,
    ) -> Result<(), GgufError> {
        if count.saturating_mul(min_size) > self.left() {
            return Err(GgufError::TooLarge {
                what,
                len: count,
                left: self.left(),
            });
        }
        Ok(())
    }

    pub(super) fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        self.inner.read_exact(buf).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                GgufError::Truncated { what }
            } else {
                GgufError::Io { what, source }
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(super) fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        self.check_len(what, n, 1)?;
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| GgufError::Truncated { what })?];
        self.fill(&mut buf, what)?;
        String::from_utf8(buf).map_err(|_| GgufError::InvalidUtf8 { what })
    }

    pub(super) fn value(&mut self, ty: GgufType, depth: u32) -> Result<GgufValue, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            GgufType::U8 => GgufValue::U8(u8::from_le_bytes(self.array(W)?)),
            GgufType::I8 => GgufValue::I8(i8::from_le_bytes(self.array(W)?)),
            GgufType::U16 => GgufValue::U16(u16::from_le_bytes(self.array(W)?)),
            GgufType::I16 => GgufValue::I16(i16::from_le_bytes(self.array(W)?)),
            GgufType::U32 => GgufValue::U32(u32::from_le_bytes(self.array(W)?)),
            GgufType::I32 => GgufValue::I32(i32::from_le_bytes(self.array(W)?)),
            GgufType::F32 => GgufValue::F32(f32::from_le_bytes(self.array(W)?)),
            GgufType::U64 => GgufValue::U64(u64::from_le_bytes(self.array(W)?)),
            GgufType::I64 => GgufValue::I64(i64::from_le_bytes(self.array(W)?)),
            GgufType::F64 => GgufValue::F64(f64::from_le_bytes(self.array(W)?)),
            GgufType::Bool => GgufValue::Bool(self.array::<1>(W)?[0] != 0),
            GgufType::String => GgufValue::String(self.string("metadata string")?),
            GgufType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::TooDeep);
                }
                let elem = GgufType::from_u32(self.u32("array element type")?)?;
                let n = self.u64("array length")?;
                self.check_len("metadata array length", n, elem.min_size())?;
                let mut values = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
                for _ in 0..n {
                    values.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array { elem, values }
            }
        })
    }
}
