//! The frame codec: a fixed 16-byte header, the flatbuffers meta, the opaque payload.
//!
//! Sans-I/O: the [`Decoder`] works on a caller's `BytesMut` receive buffer and the
//! [`Encoder`] writes into a caller's `BytesMut` send buffer.
//!
//! Invariants:
//! - The decoder rejects a frame whose header declares more than `max_frame_bytes` as soon
//!   as the 16 header bytes are in, before any of the body is buffered.
//! - A decoded frame's meta and payload are `Bytes` slices of the receive buffer: the
//!   bytes are never copied (`split_to` + `freeze` hand out views of the same allocation).
//! - Meta is verified by the flatbuffers verifier before any field is read.
//! - The encoder writes header and meta only and hands the payload `Bytes` back untouched,
//!   so the driver sends it with a vectored write and every recipient of a fan-out shares
//!   one buffer.
//! - After a decode error the stream cannot be resynchronised: the caller sends an Error
//!   frame with [`DecodeError::code`] and closes the connection.

use crate::error_code::ErrorCode;
use crate::meta::{FrameKind, Meta, MetaError};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"IG";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;

/// A parsed and checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The frame kind.
    pub kind: FrameKind,
    /// Bytes of flatbuffers meta after the header.
    pub meta_len: u32,
    /// Bytes of payload after the meta.
    pub payload_len: u32,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of a frame and checks them against
    /// `max_frame_bytes`.
    pub fn parse(bytes: &[u8; HEADER_LEN], max_frame_bytes: u32) -> Result<Header, DecodeError> {
        // Fixed offsets into a fixed-size array: the compiler checks nothing at run time.
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let magic = [bytes[0], bytes[1]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = bytes[2];
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion { found: version });
        }
        let kind_byte = bytes[3];
        let kind =
            FrameKind::from_u8(kind_byte).ok_or(DecodeError::UnknownKind { found: kind_byte })?;
        let (flags, reserved) = (u16_at(4), u16_at(6));
        if flags != 0 || reserved != 0 {
            return Err(DecodeError::ReservedBitsSet { flags, reserved });
        }
        let meta_len = u32_at(8);
        let payload_len = u32_at(12);
        let header = Header {
            kind,
            meta_len,
            payload_len,
        };
        if header.frame_len() > u64::from(max_frame_bytes) {
            return Err(DecodeError::FrameTooLarge {
                declared: header.frame_len(),
                max: max_frame_bytes,
            });
        }
        if payload_len != 0 && !kind.has_payload() {
            return Err(DecodeError::UnexpectedPayload { kind });
        }
        Ok(header)
    }

    /// Bytes of the whole frame, header included.
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.meta_len) + u64::from(self.payload_len)
    }

    fn write(&self, dst: &mut BytesMut) {
        dst.put_slice(&MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(self.kind as u8);
        dst.put_u16_le(0);
        dst.put_u16_le(0);
        dst.put_u32_le(self.meta_len);
        dst.put_u32_le(self.payload_len);
    }
}

/// Why a byte stream is not a valid frame stream. Every variant closes the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The stream does not start with the imgate magic.
    #[error("bad magic {found:02x?}, expected \"IG\"")]
    BadMagic {
        /// The two bytes found.
        found: [u8; 2],
    },
    /// The header names a protocol version this build does not speak.
    #[error("unsupported protocol version {found}, this gateway speaks {VERSION}")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// The header's kind byte names no frame kind.
    #[error("unknown frame kind {found}")]
    UnknownKind {
        /// The kind byte found.
        found: u8,
    },
    /// The header's reserved fields are not zero.
    #[error("reserved header fields must be zero (flags {flags:#x}, reserved {reserved:#x})")]
    ReservedBitsSet {
        /// The flags field found.
        flags: u16,
        /// The reserved field found.
        reserved: u16,
    },
    /// The header declares a frame larger than the configured maximum.
    #[error("frame of {declared} bytes is over the maximum of {max}")]
    FrameTooLarge {
        /// The declared frame length, header included.
        declared: u64,
        /// The configured maximum.
        max: u32,
    },
    /// A kind that carries no payload declared one.
    #[error("{kind:?} frames carry no payload")]
    UnexpectedPayload {
        /// The frame kind.
        kind: FrameKind,
    },
    /// The meta is not a valid table of the frame's kind.
    #[error("malformed {kind:?} meta: {source}")]
    Malformed {
        /// The frame kind.
        kind: FrameKind,
        /// What the verifier or reader found.
        source: MetaError,
    },
}

impl DecodeError {
    /// The wire error code to send before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::BadMagic { .. } => ErrorCode::BadMagic,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownKind { .. } => ErrorCode::UnknownKind,
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::ReservedBitsSet { .. }
            | DecodeError::UnexpectedPayload { .. }
            | DecodeError::Malformed { .. } => ErrorCode::MalformedFrame,
        }
    }
}

/// A decoded frame. `meta_bytes` and `payload` share the receive buffer's allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The verified, typed meta.
    pub meta: Meta,
    /// The raw meta bytes, as received.
    pub meta_bytes: Bytes,
    /// The opaque payload, as received.
    pub payload: Bytes,
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        self.meta.kind()
    }
}

/// Incremental frame decoder over a receive buffer.
#[derive(Clone, Debug)]
pub struct Decoder {
    max_frame_bytes: u32,
}

impl Decoder {
    /// A decoder that rejects frames over `max_frame_bytes` (header included).
    pub fn new(max_frame_bytes: u32) -> Decoder {
        assert!(
            max_frame_bytes as usize >= HEADER_LEN,
            "a frame limit below the header size admits no frame"
        );
        Decoder { max_frame_bytes }
    }

    /// The configured frame limit.
    pub fn max_frame_bytes(&self) -> u32 {
        self.max_frame_bytes
    }

    /// Takes the next whole frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame; in that case, once the
    /// header is in and checked, `buf` has reserved capacity for the rest of the frame so
    /// that the next read can complete it. Returns an error as soon as the bytes in hand
    /// prove the stream invalid; the stream is then unusable.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::parse(head, self.max_frame_bytes)?;
        // Bounded by max_frame_bytes (a u32), so it fits in usize on every supported target.
        let frame_len = header.frame_len() as usize;
        if buf.len() < frame_len {
            buf.reserve(frame_len - buf.len());
            return Ok(None);
        }
        let mut body = buf.split_to(frame_len).freeze();
        body.advance(HEADER_LEN);
        let meta_bytes = body.split_to(header.meta_len as usize);
        let meta =
            Meta::read(header.kind, &meta_bytes).map_err(|source| DecodeError::Malformed {
                kind: header.kind,
                source,
            })?;
        Ok(Some(Frame {
            meta,
            meta_bytes,
            payload: body,
        }))
    }
}

/// Frame encoder. Holds one flatbuffers builder that every frame reuses.
pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    /// An encoder with a small builder that grows to the largest meta it has written.
    pub fn new() -> Encoder {
        Encoder {
            fbb: FlatBufferBuilder::with_capacity(256),
        }
    }

    /// Writes the header and meta of a frame into `dst` and hands `payload` back, for the
    /// caller to send right after them (vectored write). The payload is never copied.
    ///
    /// Panics if `payload` is non-empty for a kind without payload, or if the frame is
    /// over 4 GiB: both are bugs of the caller, which enforces its own limits first.
    pub fn encode(&mut self, meta: &Meta, payload: Bytes, dst: &mut BytesMut) -> Bytes {
        let kind = meta.kind();
        assert!(
            payload.is_empty() || kind.has_payload(),
            "{kind:?} frames carry no payload"
        );
        self.fbb.reset();
        meta.write(&mut self.fbb);
        let meta_bytes = self.fbb.finished_data();
        let header = Header {
            kind,
            meta_len: u32::try_from(meta_bytes.len()).expect("meta over 4 GiB"),
            payload_len: u32::try_from(payload.len()).expect("payload over 4 GiB"),
        };
        dst.reserve(HEADER_LEN + meta_bytes.len());
        header.write(dst);
        dst.put_slice(meta_bytes);
        payload
    }

    /// Encodes a whole frame, payload included, into one contiguous buffer. This copies
    /// the payload: for tests, tools and control frames, not for the fan-out path.
    pub fn encode_to_bytes(&mut self, meta: &Meta, payload: &[u8]) -> Bytes {
        let mut dst = BytesMut::new();
        let payload = self.encode(meta, Bytes::copy_from_slice(payload), &mut dst);
        dst.put_slice(&payload);
        dst.freeze()
    }
}
