//! Frame codec benches: decode+verify and encode of the two hot frame kinds, Send (client
//! to gateway) and Deliver (gateway to client), each with a 100-byte payload.
//!
//! What is measured:
//! - `decode/*`: `Decoder::decode` on a receive buffer holding `FRAMES_PER_BATCH` copies of
//!   one frame, back to back, until the buffer is empty: header parse, limit check,
//!   `split_to`/`freeze` of the frame, flatbuffers verification and reading of the meta
//!   into `Meta`, and dropping the decoded `Frame` (two `Bytes` refcount decrements). The
//!   buffer is a fresh copy for every batch, made in `iter_batched`'s untimed setup, so
//!   neither the copy nor freeing the batch's allocation is timed; the first `split_to` of
//!   each batch promotes the buffer to shared storage (one small allocation per batch,
//!   timed, amortised over the batch). Throughput is `FRAMES_PER_BATCH` elements, so the
//!   reported time per element is ns per frame.
//! - `decode_parts/*`: the pieces of a decode, to see where the time goes: the header
//!   alone, and `Meta::read` (verify + read) on the meta bytes alone.
//! - `encode/*`: `Encoder::encode` of header and meta into a reused `BytesMut` (cleared each
//!   time), with the payload handed back untouched (one `Bytes` clone in, dropped after).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use imgate_proto::meta::{Deliver, Priority, Send};
use imgate_proto::{
    ClientMsgId, ConvId, Decoder, DeviceId, Encoder, Header, Meta, Seq, UserId, HEADER_LEN,
};
use std::hint::black_box;

/// Bytes of app payload in every benched frame.
const PAYLOAD_LEN: usize = 100;
/// Frames decoded per timed batch.
const FRAMES_PER_BATCH: usize = 1024;
/// The gateway's default frame limit.
const MAX_FRAME_BYTES: u32 = 64 * 1024;

fn send_meta() -> Meta {
    Meta::Send(Send {
        req: 12_345,
        client_msg_id: ClientMsgId(*b"0123456789abcdef"),
        conv: ConvId {
            hi: 1_000_001,
            lo: 1_000_002,
        },
        priority: Priority::Normal,
    })
}

fn deliver_meta() -> Meta {
    Meta::Deliver(Deliver {
        conv: ConvId {
            hi: 1_000_001,
            lo: 1_000_002,
        },
        seq: Seq(987_654),
        sender: UserId(1_000_001),
        sender_device: DeviceId(3),
        client_msg_id: ClientMsgId(*b"0123456789abcdef"),
        priority: Priority::Normal,
        ts_ms: 0,
    })
}

fn payload() -> Bytes {
    Bytes::from(vec![0xa5u8; PAYLOAD_LEN])
}

/// One whole frame (header, meta, payload) as it arrives on the wire.
fn wire_frame(meta: &Meta) -> Bytes {
    Encoder::new().encode_to_bytes(meta, &payload())
}

fn bench_decode(c: &mut Criterion) {
    let decoder = Decoder::new(MAX_FRAME_BYTES);
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(FRAMES_PER_BATCH as u64));
    for (name, meta) in [("send_100B", send_meta()), ("deliver_100B", deliver_meta())] {
        let frame = wire_frame(&meta);
        let mut batch = BytesMut::with_capacity(frame.len() * FRAMES_PER_BATCH);
        for _ in 0..FRAMES_PER_BATCH {
            batch.extend_from_slice(&frame);
        }
        // Check once, outside the timing, that the batch decodes to what was encoded.
        let mut check = batch.clone();
        for _ in 0..FRAMES_PER_BATCH {
            let decoded = decoder.decode(&mut check).unwrap().unwrap();
            assert_eq!(decoded.meta, meta);
            assert_eq!(decoded.payload.len(), PAYLOAD_LEN);
        }
        assert!(check.is_empty());

        group.bench_function(name, |b| {
            b.iter_batched(
                || batch.clone(),
                |mut buf| {
                    while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                        black_box(frame);
                    }
                    // Returned so that freeing the batch's allocation is not timed.
                    buf
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

fn bench_decode_parts(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_parts");
    group.throughput(Throughput::Elements(1));
    for (name, meta) in [("send", send_meta()), ("deliver", deliver_meta())] {
        let frame = wire_frame(&meta);
        let head: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
        let header = Header::parse(&head, MAX_FRAME_BYTES).unwrap();
        let meta_bytes = frame.slice(HEADER_LEN..HEADER_LEN + header.meta_len as usize);
        group.bench_function(format!("header_parse_{name}"), |b| {
            b.iter(|| Header::parse(black_box(&head), MAX_FRAME_BYTES))
        });
        group.bench_function(format!("meta_read_{name}"), |b| {
            b.iter(|| Meta::read(header.kind, black_box(&meta_bytes)))
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    for (name, meta) in [("send", send_meta()), ("deliver", deliver_meta())] {
        let mut encoder = Encoder::new();
        let mut dst = BytesMut::with_capacity(4096);
        let payload = payload();
        group.bench_function(name, |b| {
            b.iter(|| {
                dst.clear();
                let back = encoder.encode(black_box(&meta), payload.clone(), &mut dst);
                black_box(&dst);
                black_box(back)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_decode, bench_decode_parts, bench_encode);
criterion_main!(benches);
