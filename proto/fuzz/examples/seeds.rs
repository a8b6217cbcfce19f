//! Writes a seed corpus for the `decoder` target: one valid frame of every kind, a few
//! multi-frame streams, and truncated and corrupted variants, each prefixed with a
//! chunking byte (see `fuzz_targets/decoder.rs`).
//!
//! Usage: `cargo run --example seeds -- <dir>` (run.sh does this when the corpus is empty).

use imgate_proto::meta::{
    Ack, Auth, AuthOk, Cursor, Deliver, DeliveryAck, Error, Gap, GoAway, Nack, Notify, Ping, Pong,
    Priority, Pull, PullResult, Send, Signal, SignalKind, Sync, SyncDone,
};
use imgate_proto::{ClientMsgId, ConvId, DeviceId, Encoder, ErrorCode, Meta, Seq, UserId};
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/decoder".to_owned()),
    );
    std::fs::create_dir_all(&dir)?;

    let conv = ConvId { hi: 7, lo: 42 };
    let msg_id = ClientMsgId(*b"0123456789abcdef");
    let cursor = Cursor { conv, seq: Seq(9) };
    let metas: Vec<(Meta, &[u8])> = vec![
        (
            Meta::Auth(Auth {
                token: "eyJhbGciOi.x.y".to_owned(),
            }),
            b"",
        ),
        (
            Meta::AuthOk(AuthOk {
                user: UserId(7),
                device: DeviceId(2),
                heartbeat_ms: 30_000,
                max_frame_bytes: 65_536,
                max_payload_bytes: 32_768,
            }),
            b"",
        ),
        (
            Meta::Send(Send {
                req: 1,
                client_msg_id: msg_id,
                conv,
                priority: Priority::High,
            }),
            b"hello",
        ),
        (
            Meta::Ack(Ack {
                req: 1,
                client_msg_id: msg_id,
                conv,
                seq: Seq(3),
            }),
            b"",
        ),
        (
            Meta::Nack(Nack {
                req: 1,
                client_msg_id: msg_id,
                conv,
                code: ErrorCode::MalformedFrame,
                message: "no".to_owned(),
            }),
            b"",
        ),
        (
            Meta::Deliver(Deliver {
                conv,
                seq: Seq(3),
                sender: UserId(7),
                sender_device: DeviceId(1),
                client_msg_id: msg_id,
                priority: Priority::Normal,
            }),
            b"hello",
        ),
        (Meta::DeliveryAck(DeliveryAck { conv, seq: Seq(3) }), b""),
        (
            Meta::Sync(Sync {
                req: 2,
                cursors: vec![cursor, cursor],
            }),
            b"",
        ),
        (
            Meta::SyncDone(SyncDone {
                req: 2,
                gaps: vec![Gap {
                    conv,
                    from_seq: Seq(1),
                    to_seq: Seq(2),
                }],
                more: vec![cursor],
            }),
            b"",
        ),
        (
            Meta::Pull(Pull {
                req: 3,
                conv,
                from_seq: Seq(1),
                limit: 50,
            }),
            b"",
        ),
        (
            Meta::PullResult(PullResult {
                req: 3,
                conv,
                from_seq: Seq(1),
                to_seq: Seq(3),
                latest_seq: Seq(3),
                available_from: Seq(1),
            }),
            b"",
        ),
        (
            Meta::Notify(Notify {
                conv,
                latest_seq: Seq(3),
            }),
            b"",
        ),
        (
            Meta::Signal(Signal {
                conv,
                kind: SignalKind::Presence,
                sender: UserId(7),
                sender_device: DeviceId(1),
            }),
            b"away",
        ),
        (Meta::Ping(Ping { nonce: 99 }), b""),
        (Meta::Pong(Pong { nonce: 99 }), b""),
        (
            Meta::GoAway(GoAway {
                code: ErrorCode::Unspecified,
                message: "bye".to_owned(),
                reconnect_after_ms: 1000,
            }),
            b"",
        ),
        (
            Meta::Error(Error {
                code: ErrorCode::BadMagic,
                message: "bad".to_owned(),
                req: 0,
            }),
            b"",
        ),
    ];

    let mut encoder = Encoder::new();
    let frames: Vec<Vec<u8>> = metas
        .iter()
        .map(|(meta, payload)| encoder.encode_to_bytes(meta, payload).to_vec())
        .collect();
    let mut n = 0;
    let mut write = |chunking: u8, stream: &[u8]| -> std::io::Result<()> {
        let mut input = vec![chunking];
        input.extend_from_slice(stream);
        std::fs::write(dir.join(format!("seed-{n:03}")), input)?;
        n += 1;
        Ok(())
    };
    for (i, frame) in frames.iter().enumerate() {
        write(0, frame)?;
        write((i as u8).wrapping_mul(37) | 1, frame)?;
        write(0, &frame[..frame.len() - 1])?;
    }
    let all: Vec<u8> = frames.concat();
    write(0, &all)?;
    write(1, &all)?;
    write(13, &all)?;
    write(255, &all)?;
    Ok(())
}
