//! Properties of the frame codec: round trips for every kind, decoding that does not depend
//! on how the stream is split, no panic on arbitrary bytes, and zero copy.

use bytes::{BufMut, Bytes, BytesMut};
use imgate_proto::meta::*;
use imgate_proto::{
    ClientMsgId, ConvId, DecodeError, Decoder, DeviceId, Encoder, ErrorCode, Seq, UserId,
    HEADER_LEN,
};
use proptest::prelude::*;

/// The frame limit the properties run under; payloads go up to the largest that fits.
const MAX_FRAME: u32 = 64 * 1024;

fn conv() -> impl Strategy<Value = ConvId> {
    (any::<u64>(), any::<u64>()).prop_map(|(hi, lo)| ConvId { hi, lo })
}

fn seq() -> impl Strategy<Value = Seq> {
    any::<u64>().prop_map(Seq)
}

fn msg_id() -> impl Strategy<Value = ClientMsgId> {
    any::<[u8; 16]>().prop_map(ClientMsgId)
}

fn code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(&ErrorCode::ALL[..])
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Normal), Just(Priority::High)]
}

fn text() -> impl Strategy<Value = String> {
    ".{0,64}"
}

fn cursor() -> impl Strategy<Value = Cursor> {
    (conv(), seq()).prop_map(|(conv, seq)| Cursor { conv, seq })
}

/// Any meta of any kind, with random fields.
fn meta() -> impl Strategy<Value = Meta> {
    prop_oneof![
        "[ -~]{0,512}".prop_map(|token| Meta::Auth(Auth { token })),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(u, d, h, f, p)| Meta::AuthOk(AuthOk {
                user: UserId(u),
                device: DeviceId(d),
                heartbeat_ms: h,
                max_frame_bytes: f,
                max_payload_bytes: p,
            })),
        (any::<u32>(), msg_id(), conv(), priority()).prop_map(|(req, id, conv, priority)| {
            Meta::Send(Send {
                req,
                client_msg_id: id,
                conv,
                priority,
            })
        }),
        (any::<u32>(), msg_id(), conv(), seq()).prop_map(|(req, id, conv, seq)| Meta::Ack(Ack {
            req,
            client_msg_id: id,
            conv,
            seq,
        })),
        (any::<u32>(), msg_id(), conv(), code(), text()).prop_map(
            |(req, id, conv, code, message)| Meta::Nack(Nack {
                req,
                client_msg_id: id,
                conv,
                code,
                message,
            })
        ),
        (
            conv(),
            seq(),
            any::<u64>(),
            any::<u32>(),
            msg_id(),
            priority(),
            any::<u64>()
        )
            .prop_map(
                |(conv, seq, s, d, id, priority, ts_ms)| Meta::Deliver(Deliver {
                    conv,
                    seq,
                    sender: UserId(s),
                    sender_device: DeviceId(d),
                    client_msg_id: id,
                    priority,
                    ts_ms,
                })
            ),
        (conv(), seq()).prop_map(|(conv, seq)| Meta::DeliveryAck(DeliveryAck { conv, seq })),
        (any::<u32>(), proptest::collection::vec(cursor(), 0..40))
            .prop_map(|(req, cursors)| Meta::Sync(Sync { req, cursors })),
        (
            any::<u32>(),
            proptest::collection::vec((conv(), seq(), seq()), 0..20),
            proptest::collection::vec(cursor(), 0..20),
            proptest::collection::vec((conv(), seq(), code()), 0..20)
        )
            .prop_map(|(req, gaps, more, refused)| Meta::SyncDone(SyncDone {
                req,
                gaps: gaps
                    .into_iter()
                    .map(|(conv, from_seq, to_seq)| Gap {
                        conv,
                        from_seq,
                        to_seq
                    })
                    .collect(),
                more,
                refused: refused
                    .into_iter()
                    .map(|(conv, latest_seq, code)| CursorRefusal {
                        conv,
                        latest_seq,
                        code
                    })
                    .collect(),
            })),
        (any::<u32>(), conv(), seq(), any::<u32>(), any::<bool>()).prop_map(
            |(req, conv, from_seq, limit, backward)| {
                Meta::Pull(Pull {
                    req,
                    conv,
                    from_seq,
                    limit,
                    backward,
                })
            }
        ),
        (any::<u32>(), proptest::option::of(conv()), any::<u32>())
            .prop_map(|(req, after, limit)| Meta::ListInbox(ListInbox { req, after, limit })),
        (
            any::<u32>(),
            proptest::collection::vec(
                (conv(), seq(), any::<u64>(), seq(), any::<u64>()).prop_map(
                    |(conv, latest_seq, latest_ts_ms, read_seq, unread)| InboxEntry {
                        conv,
                        latest_seq,
                        latest_ts_ms,
                        read_seq,
                        unread,
                    }
                ),
                0..4
            ),
            any::<bool>()
        )
            .prop_map(|(req, entries, more)| Meta::InboxPage(InboxPage {
                req,
                entries,
                more
            })),
        (any::<u32>(), conv(), seq(), seq(), seq(), seq()).prop_map(
            |(req, conv, from_seq, to_seq, latest_seq, available_from)| {
                Meta::PullResult(PullResult {
                    req,
                    conv,
                    from_seq,
                    to_seq,
                    latest_seq,
                    available_from,
                })
            }
        ),
        (conv(), seq()).prop_map(|(conv, latest_seq)| Meta::Notify(Notify { conv, latest_seq })),
        (
            conv(),
            prop_oneof![
                Just(SignalKind::Typing),
                Just(SignalKind::StoppedTyping),
                Just(SignalKind::Presence)
            ],
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(conv, kind, s, d)| Meta::Signal(Signal {
                conv,
                kind,
                sender: UserId(s),
                sender_device: DeviceId(d),
            })),
        any::<u64>().prop_map(|nonce| Meta::Ping(Ping { nonce })),
        any::<u64>().prop_map(|nonce| Meta::Pong(Pong { nonce })),
        (code(), text(), any::<u32>()).prop_map(|(code, message, ms)| Meta::GoAway(GoAway {
            code,
            message,
            reconnect_after_ms: ms,
        })),
        (code(), text(), any::<u32>()).prop_map(|(code, message, req)| Meta::Error(Error {
            code,
            message,
            req
        })),
    ]
}

/// A payload size anywhere from 0 to the largest that fits the frame limit with its meta,
/// with the edges drawn often.
fn payload(meta: &Meta) -> impl Strategy<Value = Vec<u8>> {
    let room = if meta.kind().has_payload() {
        MAX_FRAME as usize - encoded_len(meta, 0)
    } else {
        0
    };
    prop_oneof![Just(0usize), Just(room), 0..=room.min(256), 0..=room]
        .prop_map(|n| (0..n).map(|i| (i * 31 % 251) as u8).collect())
}

fn encoded_len(meta: &Meta, payload_len: usize) -> usize {
    let mut dst = BytesMut::new();
    Encoder::new().encode(meta, Bytes::new(), &mut dst);
    dst.len() + payload_len
}

fn frame_with_payload() -> impl Strategy<Value = (Meta, Vec<u8>)> {
    meta().prop_flat_map(|m| {
        let p = payload(&m);
        (Just(m), p)
    })
}

/// Decodes every whole frame in `buf`, as a driver does after each read.
fn drain(decoder: &Decoder, buf: &mut BytesMut) -> Result<Vec<(Meta, Bytes)>, DecodeError> {
    let mut out = Vec::new();
    while let Some(frame) = decoder.decode(buf)? {
        out.push((frame.meta, frame.payload));
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_kind_round_trips((meta, payload) in frame_with_payload()) {
        let mut encoder = Encoder::new();
        let wire = encoder.encode_to_bytes(&meta, &payload);
        prop_assert!(wire.len() <= MAX_FRAME as usize);
        let mut buf = BytesMut::from(&wire[..]);
        let frame = Decoder::new(MAX_FRAME).decode(&mut buf).unwrap().expect("a whole frame");
        prop_assert_eq!(&frame.meta, &meta);
        prop_assert_eq!(&frame.payload[..], &payload[..]);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_stream_decodes_the_same_however_it_is_split(
        frames in proptest::collection::vec(
            (meta(), proptest::collection::vec(any::<u8>(), 0..64)), 1..6),
    ) {
        let mut encoder = Encoder::new();
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (meta, payload) in frames {
            let payload = if meta.kind().has_payload() { payload } else { Vec::new() };
            stream.extend_from_slice(&encoder.encode_to_bytes(&meta, &payload));
            expected.push((meta, Bytes::from(payload)));
        }
        let decoder = Decoder::new(MAX_FRAME);
        for split in 0..=stream.len() {
            let mut buf = BytesMut::from(&stream[..split]);
            let mut got = drain(&decoder, &mut buf).unwrap();
            buf.put_slice(&stream[split..]);
            got.extend(drain(&decoder, &mut buf).unwrap());
            prop_assert_eq!(&got, &expected, "split at {}", split);
            prop_assert!(buf.is_empty());
        }
        // And one byte at a time, as from a very slow peer.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &stream {
            buf.put_u8(*b);
            got.extend(drain(&decoder, &mut buf).unwrap());
        }
        prop_assert_eq!(&got, &expected);
    }

    #[test]
    fn arbitrary_bytes_end_in_frames_or_a_typed_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        check_garbage(&bytes)?;
    }

    #[test]
    fn garbage_behind_a_valid_header_prefix_ends_in_frames_or_a_typed_error(
        kind in 0u8..20,
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        // Random bytes rarely pass the magic; this reaches the length checks and verifier.
        let mut bytes = vec![b'I', b'G', 1, kind, 0, 0, 0, 0];
        let meta_len = (rest.len() as u32).saturating_sub(8).min(rest.len() as u32 / 2);
        bytes.extend_from_slice(&meta_len.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&rest);
        check_garbage(&bytes)?;
    }
}

fn check_garbage(bytes: &[u8]) -> Result<(), TestCaseError> {
    let decoder = Decoder::new(1024);
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                // A frame only comes out of the bytes it was made of.
                prop_assert_eq!(
                    before - buf.len(),
                    HEADER_LEN + frame.meta_bytes.len() + frame.payload.len()
                );
            }
            Ok(None) => {
                prop_assert!(
                    buf.len() < 1024,
                    "the decoder waits only for a frame under the limit"
                );
                return Ok(());
            }
            Err(e) => {
                prop_assert_ne!(e.code(), ErrorCode::Unspecified);
                return Ok(());
            }
        }
    }
}

fn send(payload_len: usize) -> (Meta, Vec<u8>) {
    (
        Meta::Send(Send {
            req: 7,
            client_msg_id: ClientMsgId([9; 16]),
            conv: ConvId::direct(UserId(1), UserId(2)),
            priority: Priority::Normal,
        }),
        vec![0xab; payload_len],
    )
}

#[test]
fn decoded_payload_and_meta_point_into_the_receive_buffer() {
    let (meta, payload) = send(100);
    let wire = Encoder::new().encode_to_bytes(&meta, &payload);
    let mut buf = BytesMut::with_capacity(4096);
    buf.put_slice(&wire);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let frame = Decoder::new(MAX_FRAME).decode(&mut buf).unwrap().unwrap();
    for part in [&frame.payload, &frame.meta_bytes] {
        let start = part.as_ptr() as usize;
        assert!(range.contains(&start), "slice starts outside the buffer");
        assert!(
            start + part.len() <= range.end,
            "slice ends outside the buffer"
        );
    }
    // The payload is the last 100 bytes of the frame, exactly where it was received.
    assert_eq!(frame.payload.as_ptr() as usize, range.end - 100);
}

#[test]
fn encoder_hands_back_the_same_payload_buffer() {
    let (meta, payload) = send(100);
    let payload = Bytes::from(payload);
    let ptr = payload.as_ptr();
    let mut dst = BytesMut::new();
    let out = Encoder::new().encode(&meta, payload, &mut dst);
    assert_eq!(out.as_ptr(), ptr);
    assert_eq!(out.len(), 100);
    // Header and meta went into dst; the payload did not.
    assert_eq!(
        u32::from_le_bytes(dst[12..16].try_into().unwrap()),
        100,
        "payload length in the header"
    );
    assert_eq!(
        dst.len(),
        HEADER_LEN + u32::from_le_bytes(dst[8..12].try_into().unwrap()) as usize
    );
}

#[test]
fn a_header_declaring_a_huge_frame_is_rejected_before_its_body_arrives() {
    let mut buf = BytesMut::new();
    buf.put_slice(b"IG");
    buf.put_u8(1);
    buf.put_u8(FrameKind::Send as u8);
    buf.put_u32_le(0);
    buf.put_u32_le(64);
    buf.put_u32_le(1 << 30);
    let err = Decoder::new(MAX_FRAME).decode(&mut buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::FrameTooLarge {
            declared: 16 + 64 + (1 << 30),
            max: MAX_FRAME
        }
    );
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert!(buf.capacity() < 4096, "nothing was reserved for the body");
}

#[test]
fn a_frame_of_exactly_the_limit_decodes_and_one_byte_more_does_not() {
    let (meta, _) = send(0);
    let room = MAX_FRAME as usize - encoded_len(&meta, 0);
    let decoder = Decoder::new(MAX_FRAME);
    let wire = Encoder::new().encode_to_bytes(&meta, &vec![1; room]);
    assert_eq!(wire.len(), MAX_FRAME as usize);
    assert!(decoder
        .decode(&mut BytesMut::from(&wire[..]))
        .unwrap()
        .is_some());
    let wire = Encoder::new().encode_to_bytes(&meta, &vec![1; room + 1]);
    assert!(matches!(
        decoder.decode(&mut BytesMut::from(&wire[..])),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn each_header_fault_has_its_own_error_and_code() {
    let (meta, payload) = send(4);
    let good = Encoder::new().encode_to_bytes(&meta, &payload).to_vec();
    let decoder = Decoder::new(MAX_FRAME);
    let mut cases: Vec<(Vec<u8>, ErrorCode)> = Vec::new();
    let mut bad = good.clone();
    bad[0] = b'X';
    cases.push((bad, ErrorCode::BadMagic));
    let mut bad = good.clone();
    bad[2] = 9;
    cases.push((bad, ErrorCode::UnsupportedVersion));
    let mut bad = good.clone();
    bad[3] = 0;
    cases.push((bad, ErrorCode::UnknownKind));
    let mut bad = good.clone();
    bad[3] = 200;
    cases.push((bad, ErrorCode::UnknownKind));
    let mut bad = good.clone();
    bad[4] = 1;
    cases.push((bad, ErrorCode::MalformedFrame));
    // A Ping declaring a payload.
    let mut bad = good.clone();
    bad[3] = FrameKind::Ping as u8;
    cases.push((bad, ErrorCode::MalformedFrame));
    // Meta that is not a Send table: point the root offset past the end.
    let mut bad = good.clone();
    bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    cases.push((bad, ErrorCode::MalformedFrame));
    for (bytes, code) in cases {
        let err = decoder.decode(&mut BytesMut::from(&bytes[..])).unwrap_err();
        assert_eq!(err.code(), code, "{err}");
    }
}

#[test]
fn send_without_its_required_conversation_fails_verification() {
    // An empty Send table: flatc marks `conv` and `client_msg_id` required.
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let start = fbb.start_table();
    let root = fbb.end_table(start);
    fbb.finish_minimal(root);
    let meta = fbb.finished_data();
    let mut buf = BytesMut::new();
    buf.put_slice(b"IG");
    buf.put_u8(1);
    buf.put_u8(FrameKind::Send as u8);
    buf.put_u32_le(0);
    buf.put_u32_le(meta.len() as u32);
    buf.put_u32_le(0);
    buf.put_slice(meta);
    let err = Decoder::new(MAX_FRAME).decode(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Malformed {
                kind: FrameKind::Send,
                ..
            }
        ),
        "{err}"
    );
}
