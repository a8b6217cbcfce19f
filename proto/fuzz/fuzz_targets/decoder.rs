//! Fuzz target for the frame decoder.
//!
//! Input layout: byte 0 picks how the rest is cut into chunks; bytes 1.. are the stream.
//! The stream is decoded twice, once whole and once fed chunk by chunk as a socket would
//! deliver it, and both runs must produce the same frames and the same final outcome.
//! Every decoded frame is re-encoded and must decode back to an equal meta and payload.
//!
//! Properties checked (a panic anywhere is a finding):
//! - `Decoder::decode` never panics on any bytes.
//! - Incremental decoding agrees with whole-buffer decoding, frame for frame and error for
//!   error.
//! - A decoded frame is within the configured limit, and `meta_bytes` and `payload` are
//!   exactly what the header declared.
//! - After `Ok(None)` with a whole header in hand, the buffer has capacity for the whole
//!   frame (the documented reserve).
//! - encode(decode(x)) decodes back to the same meta and payload, and encoding is
//!   canonical: encoding the re-decoded meta gives the same bytes again.

#![no_main]

use bytes::BytesMut;
use imgate_proto::{DecodeError, Decoder, Encoder, Frame, Header, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

/// The frame limit under test.
const MAX_FRAME_BYTES: u32 = 64 * 1024;
/// A bound on frames per input, so that a pathological input cannot loop for long.
/// Each frame takes at least HEADER_LEN bytes, so this is never reached by real input.
const FRAMES_MAX: usize = 1 << 20;

/// What decoding a stream produced: its frames, then how it ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Frame>,
    /// `None`: ran out of bytes (possibly inside a frame); `Some`: the stream's error.
    error: Option<DecodeError>,
    /// Bytes left undecoded in the buffer at the end, when the stream did not fail (after
    /// a failure the chunked run has not read the rest of the input).
    left_len: usize,
}

/// Chunk lengths from a seed: 0 means one chunk; otherwise lengths in 1..=seed from a small
/// xorshift generator, so seed 1 feeds byte by byte and larger seeds give ragged cuts.
struct Chunker {
    seed: u8,
    state: u32,
}

impl Chunker {
    fn new(seed: u8) -> Chunker {
        Chunker {
            seed,
            state: 0x9e37_79b9 ^ u32::from(seed),
        }
    }

    fn next_len(&mut self, left: usize) -> usize {
        if self.seed == 0 {
            return left;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        let len = 1 + (self.state % u32::from(self.seed)) as usize;
        len.min(left)
    }
}

/// Drains every whole frame from `buf`, recording them in `out`. Returns false once the
/// stream has failed.
fn drain(decoder: &Decoder, buf: &mut BytesMut, out: &mut Outcome) -> bool {
    loop {
        assert!(
            out.frames.len() < FRAMES_MAX,
            "decoder produced too many frames"
        );
        let len_before = buf.len();
        match decoder.decode(buf) {
            Ok(Some(frame)) => {
                check_frame(&frame, len_before - buf.len());
                out.frames.push(frame);
            }
            Ok(None) => {
                assert_eq!(buf.len(), len_before, "Ok(None) consumed bytes");
                if let Some(head) = buf.first_chunk::<HEADER_LEN>() {
                    let header = Header::parse(head, decoder.max_frame_bytes())
                        .expect("decode accepted a header that parse rejects");
                    assert!(
                        buf.len() < header.frame_len() as usize,
                        "Ok(None) with a whole frame in the buffer"
                    );
                    assert!(
                        buf.capacity() as u64 >= header.frame_len(),
                        "no capacity reserved for the rest of the frame"
                    );
                }
                return true;
            }
            Err(e) => {
                out.error = Some(e);
                return false;
            }
        }
    }
}

/// Checks one decoded frame that took `consumed` bytes off the buffer.
fn check_frame(frame: &Frame, consumed: usize) {
    assert_eq!(
        consumed,
        HEADER_LEN + frame.meta_bytes.len() + frame.payload.len(),
        "consumed bytes do not match the frame"
    );
    assert!(consumed as u64 <= u64::from(MAX_FRAME_BYTES));
    assert!(frame.payload.is_empty() || frame.kind().has_payload());
}

fn decode_stream(stream: &[u8], chunker: &mut Chunker) -> Outcome {
    let decoder = Decoder::new(MAX_FRAME_BYTES);
    let mut buf = BytesMut::new();
    let mut out = Outcome {
        frames: Vec::new(),
        error: None,
        left_len: 0,
    };
    let mut rest = stream;
    // An empty stream still gets one decode call on an empty buffer.
    loop {
        let len = chunker.next_len(rest.len());
        let (chunk, tail) = rest.split_at(len);
        buf.extend_from_slice(chunk);
        rest = tail;
        if !drain(&decoder, &mut buf, &mut out) || rest.is_empty() {
            break;
        }
    }
    if out.error.is_none() {
        out.left_len = buf.len();
    }
    out
}

fn check_round_trip(encoder: &mut Encoder, frame: &Frame) {
    // The re-encoded meta is canonical (minimal) flatbuffers, which may be a few bytes
    // longer than a hand-made original (an absent string or vector is written as an empty
    // one), so the round trip is decoded without the 64 KiB limit.
    let decoder = Decoder::new(u32::MAX);
    let encoded = encoder.encode_to_bytes(&frame.meta, &frame.payload);
    let mut buf = BytesMut::from(&encoded[..]);
    let again = match decoder.decode(&mut buf) {
        Ok(Some(again)) => again,
        other => panic!(
            "re-encoded frame does not decode: {other:?}\nmeta: {:?}\nencoded: {:02x?}",
            frame.meta,
            &encoded[..]
        ),
    };
    assert!(buf.is_empty(), "re-encoded frame left {} bytes", buf.len());
    assert_eq!(again.meta, frame.meta, "meta changed in the round trip");
    assert_eq!(
        again.payload, frame.payload,
        "payload changed in the round trip"
    );
    let encoded_again = encoder.encode_to_bytes(&again.meta, &again.payload);
    assert_eq!(encoded_again, encoded, "encoding is not canonical");
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_stream(stream, &mut Chunker::new(0));
    if seed != 0 {
        let chunked = decode_stream(stream, &mut Chunker::new(seed));
        assert_eq!(
            chunked, whole,
            "chunked decoding differs from whole decoding"
        );
    }
    let mut encoder = Encoder::new();
    for frame in &whole.frames {
        check_round_trip(&mut encoder, frame);
    }
});
