//! The data representations of section 1.5: integers, variable byte integers, strings,
//! binary data and string pairs, read from one packet's body and written into a `BytesMut`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::DecodeError;
use super::types::{MqttStr, PacketId};

/// The largest value a variable byte integer can hold (4 bytes).
pub const VARINT_MAX: u32 = 268_435_455;

/// Reads a variable byte integer from the start of `bytes` without consuming it.
/// `Ok(None)` means more bytes are needed.
pub fn peek_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        value |= ((b & 0x7F) as u32) << (7 * i);
        if b & 0x80 == 0 {
            // A longer encoding than needed (a trailing 0x00 continuation) is malformed.
            if i > 0 && b == 0 {
                return Err(DecodeError::MalformedVarInt);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(DecodeError::MalformedVarInt)
    } else {
        Ok(None)
    }
}

/// How many bytes `v` takes as a variable byte integer.
pub const fn varint_len(v: u32) -> usize {
    if v < 128 {
        1
    } else if v < 16_384 {
        2
    } else if v < 2_097_152 {
        3
    } else {
        4
    }
}

pub fn put_varint(buf: &mut BytesMut, mut v: u32) {
    debug_assert!(v <= VARINT_MAX);
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

pub fn put_str(buf: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

pub fn put_binary(buf: &mut BytesMut, b: &[u8]) {
    debug_assert!(b.len() <= u16::MAX as usize);
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

/// Length on the wire of a length-prefixed string or binary field.
pub const fn prefixed_len(n: usize) -> usize {
    2 + n
}

/// A cursor over one packet's body; every read is bounded by it, so no field can run past
/// the remaining length.
#[derive(Debug)]
pub struct Reader {
    bytes: Bytes,
}

impl Reader {
    pub fn new(bytes: Bytes) -> Reader {
        Reader { bytes }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.bytes.is_empty() {
            return Err(DecodeError::Truncated);
        }
        Ok(self.bytes.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.bytes.len() < 2 {
            return Err(DecodeError::Truncated);
        }
        Ok(self.bytes.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.bytes.len() < 4 {
            return Err(DecodeError::Truncated);
        }
        Ok(self.bytes.get_u32())
    }

    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        match peek_varint(&self.bytes)? {
            Some((v, n)) => {
                self.bytes.advance(n);
                Ok(v)
            }
            None => Err(DecodeError::Truncated),
        }
    }

    pub fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16()?).ok_or(DecodeError::PacketIdZero)
    }

    /// `n` bytes, sharing the packet's buffer.
    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated);
        }
        Ok(self.bytes.split_to(n))
    }

    /// Binary data: a two-byte length and that many bytes.
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    pub fn string(&mut self) -> Result<MqttStr, DecodeError> {
        MqttStr::from_bytes(self.binary()?)
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.bytes)
    }

    /// Splits off the next `n` bytes as a reader of their own (a property block).
    pub fn sub(&mut self, n: usize) -> Result<Reader, DecodeError> {
        Ok(Reader::new(self.take(n)?))
    }

    /// Fails if bytes are left over.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_from_table_1_1() {
        for (v, bytes) in [
            (0u32, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v);
            assert_eq!(&buf[..], bytes, "{v}");
            assert_eq!(varint_len(v), bytes.len());
            assert_eq!(peek_varint(bytes).unwrap(), Some((v, bytes.len())));
        }
    }

    #[test]
    fn varint_of_five_bytes_is_malformed() {
        assert_eq!(
            peek_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Err(DecodeError::MalformedVarInt)
        );
        assert_eq!(peek_varint(&[0xFF, 0xFF, 0xFF]), Ok(None));
        assert_eq!(
            peek_varint(&[0x80, 0x00]),
            Err(DecodeError::MalformedVarInt)
        );
    }
}
