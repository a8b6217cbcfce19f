//! The shard log's record format, its recovery scan, and an in-memory log for tests.
//!
//! A segment of the log is a sequence of framed records:
//!
//! ```text
//! [body_len: u32 LE][crc32c(body): u32 LE][body: postcard-encoded Record]
//! ```
//!
//! This module owns that format: [`encode_record`] produces frames, [`decode_record`] reads
//! one frame from the front of a buffer, and [`Scanner`] / [`scan`] walk a whole segment the
//! way recovery does. It does no I/O: the gateway reads and writes segment files with
//! io_uring, the sim with `turmoil::fs`, and both hand the bytes to these functions. What is
//! left to them: segment files, rotation, the `(conv, seq)` index, group commit, and the
//! decision of what to do when a scan stops early (truncate to [`Scan::valid_len`], and how
//! loudly to report a corrupt record that is not at the tail).
//!
//! Invariants:
//! - Every frame this module produces has `1 <= body_len <= RECORD_BODY_MAX` and decodes to
//!   the record it was made from. Producing anything else is our bug, so it is asserted.
//! - The scan never panics and never allocates by a length it has not checked: its input is
//!   whatever was on disk. A frame is accepted only if its length is in bounds, its body is
//!   complete, its CRC matches and postcard decodes the body exactly (no trailing bytes).
//! - A scan returns every record before the first frame it cannot accept, and
//!   `valid_len` = the offset of that frame: the length to truncate the segment to.
//! - An all-zero header (`body_len == 0`, `crc == 0`) marks the end of written data:
//!   preallocated or O_DIRECT-padded space. An empty body is never a valid record (every
//!   record starts with its variant byte), so no real frame looks like that.
//!
//! Architecture invariant: a segment is fresh or zero-filled past its written end. The
//! scan cannot tell a stale record left by an earlier use of the file from a new one, so a
//! driver must never reuse a segment file without zeroing it (or creating it anew).

use crate::proto::ids::{ClientMsgId, ConvId, ConvKind, DeviceId, Seq, UserId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::iter::FusedIterator;

/// One chat message as stored in the log: what the owner shard assigned (conv, seq) and
/// what it needs after a restart to rebuild dedupe (sender, client_msg_id) and to serve
/// Sync and Pull (the rest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The conversation the message belongs to.
    pub conv: ConvId,
    /// Its place in the conversation's order (never `Seq::ZERO`).
    pub seq: Seq,
    /// The user who sent it.
    pub sender: UserId,
    /// The device it was sent from.
    pub sender_device: DeviceId,
    /// The sender's id for it, the dedupe key together with `sender`.
    pub client_msg_id: ClientMsgId,
    /// Pushed even to members of a read-diffusion group.
    pub high_priority: bool,
    /// The app's message body, opaque to the gateway.
    pub payload: Bytes,
    /// When its owner sequenced it: milliseconds since the Unix epoch by the gateway's
    /// clock, never decreasing within a conversation (0: stored before messages were
    /// stamped, in a [`Record::MessageV1`]).
    pub ts_ms: u64,
}

/// A message as the first log format stored it, before server timestamps. Only read:
/// [`decode_record`] turns it into a [`Record::Message`] stamped 0, so nothing past the
/// decoder ever sees one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessageV1 {
    /// See [`StoredMessage`].
    pub conv: ConvId,
    /// See [`StoredMessage`].
    pub seq: Seq,
    /// See [`StoredMessage`].
    pub sender: UserId,
    /// See [`StoredMessage`].
    pub sender_device: DeviceId,
    /// See [`StoredMessage`].
    pub client_msg_id: ClientMsgId,
    /// See [`StoredMessage`].
    pub high_priority: bool,
    /// See [`StoredMessage`].
    pub payload: Bytes,
}

impl From<StoredMessageV1> for StoredMessage {
    fn from(m: StoredMessageV1) -> StoredMessage {
        StoredMessage {
            conv: m.conv,
            seq: m.seq,
            sender: m.sender,
            sender_device: m.sender_device,
            client_msg_id: m.client_msg_id,
            high_priority: m.high_priority,
            payload: m.payload,
            ts_ms: 0,
        }
    }
}

/// One conversation in one user's inbox as a checkpoint records it: `user` (homed on the
/// shard) is in `conv`, and has read it up to `read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InboxHead {
    /// The user.
    pub user: UserId,
    /// The conversation.
    pub conv: ConvId,
    /// The user's read cursor there.
    pub read: Seq,
}

/// One entry of the log.
///
/// The postcard encoding of an enum is its variant index, so the order of the variants is
/// part of the on-disk format. Never reorder, remove or insert variants: add new ones at
/// the end only. The same holds for the fields of each variant and of [`StoredMessage`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A message of the first format, without a timestamp: read from old logs only, and
    /// turned into a [`Record::Message`] by [`decode_record`]; never written.
    MessageV1(StoredMessageV1),
    /// A group came into being with these members.
    GroupCreated {
        /// The group (a [`ConvId`] of kind group).
        group: ConvId,
        /// Its first members.
        members: Vec<UserId>,
    },
    /// Members joined a group.
    MembersAdded {
        /// The group (a [`ConvId`] of kind group).
        group: ConvId,
        /// The users who joined.
        members: Vec<UserId>,
    },
    /// Members left or were removed from a group.
    MembersRemoved {
        /// The group (a [`ConvId`] of kind group).
        group: ConvId,
        /// The users who left.
        members: Vec<UserId>,
    },
    /// Part of a checkpoint: the state recovery rebuilds that the records after it do not
    /// carry, as of every record before it in the log: the owner's groups (members, last
    /// seq) and its dedupe window, so that recovery can start here instead of at the log's
    /// beginning and still answer every retry in the window (I2).
    ///
    /// A checkpoint is a run of one or more consecutive `Checkpoint` records (see
    /// [`checkpoint_records`]) numbered by `part` from 0: groups in ascending id order
    /// across the run, then the window's entries oldest first, each record's body within
    /// [`RECORD_BODY_MAX`] (one group always fits in one), and only the final record with
    /// `last: true`. A run that does not go on part after part to its `last` was cut by a
    /// crash and means nothing; a record of part 0 always starts a new run.
    Checkpoint {
        /// This record's place in its checkpoint, from 0.
        part: u32,
        /// The groups of this part, in ascending id order.
        groups: Vec<GroupHead>,
        /// Entries of the dedupe window in this part, oldest first.
        dedupe: Vec<DedupeEntry>,
        /// Whether this record ends the checkpoint.
        last: bool,
    },
    /// A message, durable once this record is.
    Message(StoredMessage),
    /// Users homed on this shard joined `conv`: it is in their inboxes from now on (I9).
    InboxJoined {
        /// The conversation.
        conv: ConvId,
        /// The users, sorted, without repeats.
        users: Vec<UserId>,
    },
    /// Users homed on this shard left `conv` (removed from the group).
    InboxLeft {
        /// The conversation.
        conv: ConvId,
        /// The users, sorted, without repeats.
        users: Vec<UserId>,
    },
    /// The final part of a checkpoint (numbered after its [`Record::Checkpoint`] parts,
    /// which then never say `last`), split like them when large: the inboxes of the users
    /// homed on the shard, and the shard's message clock.
    CheckpointInbox {
        /// This record's place in its checkpoint.
        part: u32,
        /// The largest timestamp the shard had given a message: stamps after recovery
        /// never go below it.
        clock_ms: u64,
        /// Inbox entries of this part, in ascending (user, conv) order.
        entries: Vec<InboxHead>,
        /// Whether this record ends the checkpoint.
        last: bool,
    },
}

/// One group as a checkpoint records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHead {
    /// The group (a [`ConvId`] of kind group).
    pub group: ConvId,
    /// Its members, sorted and without repeats.
    pub members: Vec<UserId>,
    /// The last seq of the group in the log before the checkpoint (`Seq::ZERO` if none).
    pub last_seq: Seq,
}

/// One entry of the dedupe window as a checkpoint records it: message `seq` of `conv` was
/// sent by `sender` as `client_msg_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupeEntry {
    /// The sender.
    pub sender: UserId,
    /// The sender's id for the message.
    pub client_msg_id: ClientMsgId,
    /// Its conversation.
    pub conv: ConvId,
    /// Its seq there.
    pub seq: Seq,
}

/// Bytes of a frame header: `body_len` and `crc32c(body)`, each a little-endian u32.
pub const RECORD_HEADER_LEN: usize = 8;

/// Largest body a frame may have: 1 MiB.
///
/// The largest records are group records. In postcard their worst case is 1 variant byte,
/// 11 for the group's [`ConvId`] (`hi` is 0, 1 byte; `lo` a u64 varint of at most 10), 3
/// for the member count (a varint; any count that fits is under 2^21), and 10 per member
/// (a u64 varint). A checkpoint record holding a single group adds 5 for its part, 1 for
/// the group count, 10 for its `last_seq`, 1 for the (empty) window entries and 1 for
/// `last`: 33 bytes besides the members at worst. So `Limits::default().group_members_max`
/// = 100,000 members take at most 1,000,033 bytes, and 1 MiB (1,048,576) covers that with
/// 48,543 bytes to spare; a message record
/// (payloads are at most 64 KiB) it covers 16 times over. A checkpoint of many groups is
/// split over several records ([`checkpoint_records`]). The bound exists so that the scan
/// rejects a garbage length at once, before reading a body, and so that a driver reading a
/// segment in chunks knows the largest frame it must buffer.
pub const RECORD_BODY_MAX: usize = 1024 * 1024;

/// Most members one group record can carry, whatever their ids:
/// `(RECORD_BODY_MAX - 33) / 10` = 104,854 (10 bytes per member at worst, 33 for the rest
/// of the largest record that carries one group: a checkpoint record of that group alone).
/// A membership change larger than this must be split over several records, and
/// `Limits::group_members_max` must not exceed it for `GroupCreated`, and a checkpoint's
/// record of that group, to fit in one.
pub const GROUP_MEMBERS_PER_RECORD_MAX: usize = (RECORD_BODY_MAX - GROUP_RECORD_OVERHEAD_MAX) / 10;

/// Largest payload one message record can carry: `RECORD_BODY_MAX` less the worst case of
/// everything else in it (66 bytes), so 1,048,510 bytes. `Limits::payload_bytes_max` must
/// not exceed it.
pub const PAYLOAD_BYTES_PER_RECORD_MAX: usize = RECORD_BODY_MAX - MESSAGE_RECORD_OVERHEAD_MAX;

/// Worst-case postcard bytes of a record carrying one group besides its members: the
/// larger of a membership record, variant (1), group id (`hi` = 0 in 1 byte, `lo` in at
/// most 10; [`encode_record`] asserts the id is a group) and member count (3), and a
/// checkpoint record of one group and no window entries, which adds the part (5), the
/// group count (1), `last_seq` (10), the entry count (1) and `last` (1).
const GROUP_RECORD_OVERHEAD_MAX: usize = 1 + 5 + 1 + GROUP_HEAD_OVERHEAD_MAX + 1 + 1;

/// Worst-case postcard bytes of a [`GroupHead`] besides its members: group id (11), member
/// count (3), `last_seq` (10).
const GROUP_HEAD_OVERHEAD_MAX: usize = 11 + 3 + 10;

/// Worst-case postcard bytes of a checkpoint record besides its groups and window entries:
/// variant (1), part (a u32 varint, 5), group count and entry count (3 each: every group
/// and every entry takes at least 4 bytes, so fewer than 2^21 fit in a body) and `last`
/// (1).
const CHECKPOINT_RECORD_OVERHEAD_MAX: usize = 1 + 5 + 3 + 3 + 1;

/// Worst-case postcard bytes of a message record besides its payload: variant (1), conv
/// (two u64 varints, 20), seq (10), sender (10), sender_device (a u32 varint, 5),
/// client_msg_id (16 raw bytes), high_priority (1), payload length (a varint of 3 bytes:
/// any length that fits is under 2^21).
const MESSAGE_RECORD_OVERHEAD_MAX: usize = 1 + 20 + 10 + 10 + 5 + 16 + 1 + 3 + 10;

// The length field is a u32; the bound must fit in it with room for the header.
const _: () = assert!(RECORD_BODY_MAX + RECORD_HEADER_LEN <= u32::MAX as usize);

impl Record {
    /// The part number and `last` flag of a checkpoint record ([`Record::Checkpoint`] or
    /// [`Record::CheckpointInbox`]), `None` for any other record.
    pub fn checkpoint_part(&self) -> Option<(u32, bool)> {
        match self {
            Record::Checkpoint { part, last, .. } | Record::CheckpointInbox { part, last, .. } => {
                Some((*part, *last))
            }
            _ => None,
        }
    }

    /// Asserts what every record we write must satisfy. A violation is a bug in the code
    /// that built the record, never bad input, so it panics.
    fn assert_well_formed(&self) {
        match self {
            Record::Message(m) => {
                assert!(
                    m.conv.kind().is_some(),
                    "message in invalid conv {}",
                    m.conv
                );
                assert!(m.seq != Seq::ZERO, "message in {} with seq 0", m.conv);
                assert!(m.sender.0 != 0, "message in {} from user 0", m.conv);
            }
            Record::GroupCreated { group, .. }
            | Record::MembersAdded { group, .. }
            | Record::MembersRemoved { group, .. } => assert_group(*group),
            Record::Checkpoint { groups, .. } => {
                for head in groups {
                    assert_group(head.group);
                }
                assert!(
                    groups.windows(2).all(|w| w[0].group < w[1].group),
                    "checkpoint groups out of ascending order"
                );
            }
            Record::MessageV1(_) => panic!("a MessageV1 record is never written"),
            Record::InboxJoined { conv, users } | Record::InboxLeft { conv, users } => {
                assert!(
                    conv.kind().is_some(),
                    "inbox record for invalid conv {conv}"
                );
                assert!(
                    users.windows(2).all(|w| w[0] < w[1]) && users.iter().all(|u| u.0 != 0),
                    "inbox record users not sorted and unique"
                );
            }
            Record::CheckpointInbox { entries, .. } => assert!(
                entries
                    .windows(2)
                    .all(|w| (w[0].user, w[0].conv) < (w[1].user, w[1].conv)),
                "checkpoint inbox entries out of ascending order"
            ),
        }
    }
}

fn assert_group(group: ConvId) {
    assert!(
        matches!(group.kind(), Some(ConvKind::Group(_))),
        "group record for {group}, which is not a group"
    );
}

/// Splits a checkpoint of `groups` (in ascending id order, asserted) and the dedupe
/// window's `dedupe` entries (oldest first) into the records that make it up, in order:
/// each as full as [`RECORD_BODY_MAX`] allows, a group never split (one always fits in a
/// record, see [`GROUP_MEMBERS_PER_RECORD_MAX`]), parts numbered from 0, only the last one
/// with `last: true`, and one empty record for an empty checkpoint. Nothing is encoded;
/// the caller appends them in this order with [`encode_record`].
pub fn checkpoint_records(
    groups: Vec<GroupHead>,
    dedupe: Vec<DedupeEntry>,
    inbox: Vec<InboxHead>,
    clock_ms: u64,
) -> Vec<Record> {
    assert!(
        groups.windows(2).all(|w| w[0].group < w[1].group),
        "checkpoint groups out of ascending order"
    );
    let mut records = Vec::new();
    let mut part_groups = Vec::new();
    let mut part_dedupe = Vec::new();
    let mut part_len = 0;
    let mut flush = |groups: &mut Vec<GroupHead>, dedupe: &mut Vec<DedupeEntry>, last| {
        let part = u32::try_from(records.len()).expect("a checkpoint has fewer than 2^32 parts");
        records.push(Record::Checkpoint {
            part,
            groups: std::mem::take(groups),
            dedupe: std::mem::take(dedupe),
            last,
        });
    };
    let is_empty = |g: &Vec<GroupHead>, d: &Vec<DedupeEntry>| g.is_empty() && d.is_empty();
    for head in groups {
        let len = postcard_len(&head);
        if !is_empty(&part_groups, &part_dedupe)
            && CHECKPOINT_RECORD_OVERHEAD_MAX + part_len + len > RECORD_BODY_MAX
        {
            flush(&mut part_groups, &mut part_dedupe, false);
            part_len = 0;
        }
        part_len += len;
        part_groups.push(head);
    }
    for entry in dedupe {
        let len = postcard_len(&entry);
        if !is_empty(&part_groups, &part_dedupe)
            && CHECKPOINT_RECORD_OVERHEAD_MAX + part_len + len > RECORD_BODY_MAX
        {
            flush(&mut part_groups, &mut part_dedupe, false);
            part_len = 0;
        }
        part_len += len;
        part_dedupe.push(entry);
    }
    if !is_empty(&part_groups, &part_dedupe) {
        flush(&mut part_groups, &mut part_dedupe, false);
    }
    // The inbox parts end the checkpoint; there is always at least one (it carries the
    // clock).
    let mut part_inbox = Vec::new();
    let mut part_len = 0;
    let mut push_inbox = |entries: &mut Vec<InboxHead>, last: bool| {
        let part = u32::try_from(records.len()).expect("a checkpoint has fewer than 2^32 parts");
        records.push(Record::CheckpointInbox {
            part,
            clock_ms,
            entries: std::mem::take(entries),
            last,
        });
    };
    for head in inbox {
        let len = postcard_len(&head);
        if !part_inbox.is_empty()
            && CHECKPOINT_INBOX_OVERHEAD_MAX + part_len + len > RECORD_BODY_MAX
        {
            push_inbox(&mut part_inbox, false);
            part_len = 0;
        }
        part_len += len;
        part_inbox.push(head);
    }
    push_inbox(&mut part_inbox, true);
    records
}

/// Worst-case postcard bytes of a [`Record::CheckpointInbox`] besides its entries: variant
/// (1), part (5), clock (10), entry count (3), `last` (1).
const CHECKPOINT_INBOX_OVERHEAD_MAX: usize = 1 + 5 + 10 + 3 + 1;

/// Length of the postcard encoding of `value`.
fn postcard_len<T: Serialize>(value: &T) -> usize {
    // Cannot fail: as in `body_len`.
    postcard::serialize_with_flavor::<T, postcard::ser_flavors::Size, usize>(
        value,
        postcard::ser_flavors::Size::default(),
    )
    .expect("postcard cannot fail to size a record's part")
}

/// Length of the postcard body of `record`.
fn body_len(record: &Record) -> usize {
    // Cannot fail: postcard's serializer only fails on sequences or maps of unknown length
    // and `collect_str`, none of which `Record` uses, and the size flavor never runs out.
    postcard_len(record)
}

/// Bytes [`encode_record`] appends for `record`: the header and the body.
pub fn encoded_len(record: &Record) -> usize {
    RECORD_HEADER_LEN + body_len(record)
}

/// Appends one framed record to `dst`.
///
/// Panics if the record is malformed (an invalid conversation id, seq 0, user 0, a group
/// record for a non-group, a checkpoint's groups out of ascending order) or if its body is
/// over [`RECORD_BODY_MAX`]: the callers bound payloads and membership changes (see
/// [`PAYLOAD_BYTES_PER_RECORD_MAX`] and [`GROUP_MEMBERS_PER_RECORD_MAX`]) and split
/// checkpoints ([`checkpoint_records`]), so either is our bug.
pub fn encode_record(record: &Record, dst: &mut Vec<u8>) {
    record.assert_well_formed();
    let start = dst.len();
    let mut buf = std::mem::take(dst);
    buf.extend_from_slice(&[0; RECORD_HEADER_LEN]);
    // Cannot fail: as in `body_len`, and extending a Vec never runs out of room.
    *dst = postcard::to_extend(record, buf).expect("postcard cannot fail to encode a Record");
    let body_start = start + RECORD_HEADER_LEN;
    let body_len = dst.len() - body_start;
    assert!(
        (1..=RECORD_BODY_MAX).contains(&body_len),
        "record body of {body_len} bytes is outside 1..={RECORD_BODY_MAX}"
    );
    let crc = crc32c::crc32c(&dst[body_start..]);
    // The cast is lossless: body_len <= RECORD_BODY_MAX < u32::MAX, asserted above.
    dst[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    dst[start + 4..body_start].copy_from_slice(&crc.to_le_bytes());
}

/// Why a frame was rejected as corrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CorruptReason {
    /// The header's length is over [`RECORD_BODY_MAX`]; nothing was read past the header.
    #[error("body length {body_len} is over the maximum {RECORD_BODY_MAX}")]
    BodyTooLong {
        /// The length the header claims.
        body_len: u32,
    },
    /// The body's CRC does not match the header's.
    #[error("crc32c of the body is {actual:#010x}, the header says {stored:#010x}")]
    CrcMismatch {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the body as read.
        actual: u32,
    },
    /// The CRC matches but postcard cannot decode the body as a [`Record`] (a record from
    /// a newer format, or a bug in the writer).
    #[error("the body does not decode as a record")]
    Undecodable,
    /// The body decodes as a [`Record`] with bytes left over: the writer never does that.
    #[error("{count} bytes left over after the record in its body")]
    TrailingBytes {
        /// How many bytes of the body were not used.
        count: usize,
    },
    /// An all-zero header (which marks the end of written data) is followed by nonzero
    /// bytes: data was written past a hole, or a written region was zeroed.
    #[error("zero-filled region followed by data at offset {data_offset}")]
    ZeroedRegion {
        /// Offset of the first nonzero byte after the zero header.
        data_offset: u64,
    },
}

/// What [`decode_record`] found at the front of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, valid frame.
    Record {
        /// The record it holds.
        record: Record,
        /// Bytes the frame takes, header included.
        len: usize,
    },
    /// The buffer holds only part of a frame. With more bytes the frame may decode; at the
    /// end of a segment it is a torn write.
    Incomplete {
        /// Bytes the whole frame takes (the header, or the header and the body), at most
        /// `RECORD_HEADER_LEN + RECORD_BODY_MAX`.
        len: usize,
    },
    /// An all-zero header: the end of written data, if everything after it is zero too
    /// (the caller checks: [`Scanner`] does).
    ZeroHeader,
    /// A frame that can never be valid.
    Corrupt(CorruptReason),
}

/// Reads one frame from the front of `buf`. This is the step [`Scanner`] is built on, and
/// what a driver uses to scan a segment in chunks instead of holding it in memory whole.
/// It never panics, and reads no further than the header before the length is checked.
pub fn decode_record(buf: &[u8]) -> Decoded {
    let Some((header, rest)) = buf.split_first_chunk::<RECORD_HEADER_LEN>() else {
        return Decoded::Incomplete {
            len: RECORD_HEADER_LEN,
        };
    };
    let body_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if body_len == 0 && stored == 0 {
        return Decoded::ZeroHeader;
    }
    let len = match usize::try_from(body_len) {
        Ok(len) if len <= RECORD_BODY_MAX => len,
        _ => return Decoded::Corrupt(CorruptReason::BodyTooLong { body_len }),
    };
    let Some(body) = rest.get(..len) else {
        return Decoded::Incomplete {
            len: RECORD_HEADER_LEN + len,
        };
    };
    let actual = crc32c::crc32c(body);
    if actual != stored {
        return Decoded::Corrupt(CorruptReason::CrcMismatch { stored, actual });
    }
    match postcard::take_from_bytes::<Record>(body) {
        Ok((record, [])) => Decoded::Record {
            record: match record {
                Record::MessageV1(m) => Record::Message(m.into()),
                other => other,
            },
            len: RECORD_HEADER_LEN + len,
        },
        Ok((_, trailing)) => Decoded::Corrupt(CorruptReason::TrailingBytes {
            count: trailing.len(),
        }),
        Err(_) => Decoded::Corrupt(CorruptReason::Undecodable),
    }
}

/// Why a scan stopped. In every case but `Clean` the offset equals [`Scan::valid_len`].
///
/// Recovery truncates to `valid_len` whatever the reason. The reason says how loudly: a
/// torn tail or a zero tail is the normal result of a crash; a corrupt frame at the very
/// end of the last segment is most likely a torn write whose sectors landed out of order;
/// a corrupt frame with valid data after it (or in a sealed segment) means lost data and
/// is the driver's to report or refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// The input ended exactly after a whole frame (or was empty).
    Clean,
    /// From `offset` on, the input is all zeros: preallocated or padded space, or a crash
    /// before the data of an extended file was written. Nothing is lost.
    ZeroTail {
        /// Where the zeros start.
        offset: u64,
    },
    /// The input ends inside a frame that starts at `offset`: a crash mid-append.
    Torn {
        /// Where the incomplete frame starts.
        offset: u64,
    },
    /// The frame at `offset` can never be valid.
    Corrupt {
        /// Where the rejected frame starts.
        offset: u64,
        /// What is wrong with it.
        reason: CorruptReason,
    },
}

/// The result of scanning a whole segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    /// Every record before the first frame that was not accepted, with its offset.
    pub records: Vec<(u64, Record)>,
    /// The end of the last accepted frame (0 if none): the length to truncate to.
    pub valid_len: u64,
    /// Why the scan stopped.
    pub end: ScanEnd,
}

/// Walks a segment's bytes frame by frame, yielding `(offset, record)`. After it yields
/// `None`, [`Scanner::end`] says why and [`Scanner::valid_len`] where to truncate.
#[derive(Clone, Debug)]
pub struct Scanner<'a> {
    bytes: &'a [u8],
    /// The end of the last accepted frame. Invariant: `pos <= bytes.len()`.
    pos: usize,
    end: Option<ScanEnd>,
}

impl<'a> Scanner<'a> {
    /// A scanner at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Scanner {
            bytes,
            pos: 0,
            end: None,
        }
    }

    /// The end of the last record yielded so far; once the scan has ended, the length to
    /// truncate the segment to.
    pub fn valid_len(&self) -> u64 {
        self.pos as u64
    }

    /// Why the scan stopped, or `None` while it has not.
    pub fn end(&self) -> Option<ScanEnd> {
        self.end
    }

    /// The next record, or why there is none.
    fn step(&mut self) -> Result<(u64, Record), ScanEnd> {
        if let Some(end) = self.end {
            return Err(end);
        }
        let offset = self.pos as u64;
        // `pos` only advances by the length of a frame that lies inside `bytes`, so `get`
        // always succeeds; the fallback keeps the scan panic-free regardless.
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let end = if rest.is_empty() {
            ScanEnd::Clean
        } else {
            match decode_record(rest) {
                Decoded::Record { record, len } => {
                    assert!(len <= rest.len(), "decode_record overran its input");
                    self.pos += len;
                    return Ok((offset, record));
                }
                // A partial header of zeros is padding too: it holds no data.
                Decoded::ZeroHeader | Decoded::Incomplete { .. }
                    if rest.iter().all(|&b| b == 0) =>
                {
                    ScanEnd::ZeroTail { offset }
                }
                Decoded::ZeroHeader => {
                    let nonzero = rest.iter().position(|&b| b != 0).unwrap_or_default();
                    ScanEnd::Corrupt {
                        offset,
                        reason: CorruptReason::ZeroedRegion {
                            data_offset: offset + nonzero as u64,
                        },
                    }
                }
                Decoded::Incomplete { .. } => ScanEnd::Torn { offset },
                Decoded::Corrupt(reason) => ScanEnd::Corrupt { offset, reason },
            }
        };
        self.end = Some(end);
        Err(end)
    }
}

impl Iterator for Scanner<'_> {
    type Item = (u64, Record);

    fn next(&mut self) -> Option<Self::Item> {
        self.step().ok()
    }
}

impl FusedIterator for Scanner<'_> {}

/// Scans a whole segment: every record up to the first frame that is not valid, where to
/// truncate, and why it stopped. Never panics, whatever the bytes.
pub fn scan(bytes: &[u8]) -> Scan {
    let mut scanner = Scanner::new(bytes);
    let mut records = Vec::new();
    let end = loop {
        match scanner.step() {
            Ok(record) => records.push(record),
            Err(end) => break end,
        }
    };
    Scan {
        records,
        valid_len: scanner.valid_len(),
        end,
    }
}

/// An append-only log in memory with an explicit durable point, standing in for a segment
/// file in tests and the sim.
///
/// Bytes appended are volatile until [`MemLog::sync`]; [`MemLog::crash`] and
/// [`MemLog::crash_torn`] model a power loss that keeps none or part of the volatile tail.
/// After a crash everything left is on disk, so it all counts as durable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemLog {
    bytes: Vec<u8>,
    /// Invariant: `durable_len <= bytes.len()`.
    durable_len: usize,
}

impl MemLog {
    /// An empty log.
    pub fn new() -> Self {
        MemLog::default()
    }

    /// Appends `bytes` (volatile until the next sync) and returns the new end offset.
    pub fn append(&mut self, bytes: &[u8]) -> u64 {
        self.bytes.extend_from_slice(bytes);
        self.len()
    }

    /// Makes everything appended so far durable, as a returned fsync does.
    pub fn sync(&mut self) {
        self.durable_len = self.bytes.len();
    }

    /// Bytes in the log, durable or not.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the log holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes that survive a crash.
    pub fn durable_len(&self) -> u64 {
        self.durable_len as u64
    }

    /// The log's contents, durable or not.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Makes the first `len` bytes durable (clamped to what was appended): a sync that
    /// started when the log was `len` bytes long, while later appends stay volatile.
    pub fn sync_to(&mut self, len: u64) {
        let len = usize::try_from(len).map_or(self.bytes.len(), |l| l.min(self.bytes.len()));
        self.durable_len = self.durable_len.max(len);
    }

    /// Every durable message of `conv` with seq in `from..=to`, in log order.
    pub fn durable_messages(&self, conv: ConvId, from: Seq, to: Seq) -> Vec<StoredMessage> {
        scan(&self.bytes[..self.durable_len])
            .records
            .into_iter()
            .filter_map(|(_, r)| match r {
                Record::Message(m) if m.conv == conv && m.seq >= from && m.seq <= to => Some(m),
                _ => None,
            })
            .collect()
    }

    /// The answer to the engine's `Fetch` from this log: up to `limit` durable messages of
    /// `conv` with seqs in `from..=to`, in seq order. This log keeps everything (no
    /// retention), so they start at `from` itself.
    pub fn fetch(&self, conv: ConvId, from: Seq, to: Seq, limit: u32) -> Vec<StoredMessage> {
        let mut msgs = self.durable_messages(conv, from, to);
        msgs.sort_by_key(|m| m.seq);
        msgs.truncate(limit as usize);
        msgs
    }

    /// The last durable seq of `conv` (0 if it has none): how a driver built on this log
    /// answers the engine's `Load`.
    pub fn last_durable_seq(&self, conv: ConvId) -> Seq {
        scan(&self.bytes[..self.durable_len])
            .records
            .into_iter()
            .filter_map(|(_, r)| match r {
                Record::Message(m) if m.conv == conv => Some(m.seq),
                _ => None,
            })
            .max()
            .unwrap_or(Seq::ZERO)
    }

    /// A power loss that keeps none of the volatile tail.
    pub fn crash(&mut self) {
        self.crash_torn(0);
    }

    /// A power loss in the middle of writing the volatile tail: its first `keep` bytes
    /// (at most all of it) reached the disk, the rest did not.
    pub fn crash_torn(&mut self, keep: u64) {
        let tail = self.bytes.len() - self.durable_len;
        let keep = usize::try_from(keep).map_or(tail, |keep| keep.min(tail));
        self.bytes.truncate(self.durable_len + keep);
        self.durable_len = self.bytes.len();
    }

    /// Cuts the log to `len` bytes, as recovery does with [`Scan::valid_len`]. The cut is
    /// durable at once (a driver must fsync after truncating a file).
    ///
    /// `len` may be below the durable point: that is recovery discarding durable bytes it
    /// found corrupt (or a torn tail that a crash made durable), a decision taken by the
    /// caller, not a fault of this model. Panics if `len` is past the end.
    pub fn truncate(&mut self, len: u64) {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        assert!(
            len <= self.bytes.len(),
            "truncate to {len} past the end {}",
            self.bytes.len()
        );
        self.bytes.truncate(len);
        self.durable_len = self.durable_len.min(len);
    }

    /// Flips one bit of the log (bit `bit % 8` of byte `bit / 8`), as media corruption
    /// does. Panics if the bit is past the end.
    pub fn flip_bit(&mut self, bit: u64) {
        let byte = usize::try_from(bit / 8).unwrap_or(usize::MAX);
        assert!(
            byte < self.bytes.len(),
            "bit {bit} is past the end of the log"
        );
        self.bytes[byte] ^= 1 << (bit % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;
    use proptest::prelude::*;

    fn message(seq: u64, payload: &'static [u8]) -> Record {
        Record::Message(StoredMessage {
            conv: ConvId::direct(UserId(3), UserId(9)),
            seq: Seq(seq),
            sender: UserId(3),
            sender_device: DeviceId(2),
            client_msg_id: ClientMsgId([seq as u8; 16]),
            high_priority: seq.is_multiple_of(2),
            payload: Bytes::from_static(payload),
            ts_ms: 0,
        })
    }

    fn every_kind() -> Vec<Record> {
        vec![
            message(1, b"hello"),
            Record::GroupCreated {
                group: ConvId::group(77),
                members: vec![UserId(1), UserId(u64::MAX), UserId(300)],
            },
            Record::MembersAdded {
                group: ConvId::group(77),
                members: vec![UserId(5)],
            },
            Record::MembersRemoved {
                group: ConvId::group(u64::MAX),
                members: vec![],
            },
            message(2, b""),
            Record::Checkpoint {
                part: 0,
                groups: vec![
                    GroupHead {
                        group: ConvId::group(77),
                        members: vec![UserId(1), UserId(5)],
                        last_seq: Seq(0),
                    },
                    GroupHead {
                        group: ConvId::group(u64::MAX),
                        members: vec![],
                        last_seq: Seq::MAX,
                    },
                ],
                dedupe: vec![DedupeEntry {
                    sender: UserId(3),
                    client_msg_id: ClientMsgId([7; 16]),
                    conv: ConvId::direct(UserId(3), UserId(9)),
                    seq: Seq(2),
                }],
                last: false,
            },
            Record::Checkpoint {
                part: 1,
                groups: vec![],
                dedupe: vec![],
                last: true,
            },
        ]
    }

    /// Encodes `records` one after another; returns the bytes and each frame's start.
    fn encode_all(records: &[Record]) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for record in records {
            starts.push(bytes.len() as u64);
            encode_record(record, &mut bytes);
        }
        (bytes, starts)
    }

    /// How many of `records`, framed at `starts`, lie wholly in the first `len` bytes.
    fn whole_records(records: &[Record], starts: &[u64], len: usize) -> usize {
        records
            .iter()
            .zip(starts)
            .take_while(|(record, &start)| start as usize + encoded_len(record) <= len)
            .count()
    }

    fn with_offsets(records: &[Record], starts: &[u64]) -> Vec<(u64, Record)> {
        starts
            .iter()
            .copied()
            .zip(records.iter().cloned())
            .collect()
    }

    /// A frame with a correct CRC around an arbitrary body.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn every_record_kind_round_trips_through_encode_and_scan() {
        let records = every_kind();
        let (bytes, starts) = encode_all(&records);
        let scan = scan(&bytes);
        assert_eq!(scan.records, with_offsets(&records, &starts));
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert_eq!(scan.end, ScanEnd::Clean);
    }

    #[test]
    fn encoded_len_is_what_encode_appends() {
        let mut bytes = vec![0xAA; 3];
        for record in every_kind() {
            let before = bytes.len();
            encode_record(&record, &mut bytes);
            assert_eq!(bytes.len() - before, encoded_len(&record));
        }
        assert_eq!(bytes[..3], [0xAA; 3], "encode must only append");
    }

    #[test]
    fn empty_input_is_a_clean_end() {
        let scan = scan(&[]);
        assert!(scan.records.is_empty());
        assert_eq!((scan.valid_len, scan.end), (0, ScanEnd::Clean));
    }

    #[test]
    fn a_log_cut_inside_its_last_record_recovers_every_record_before_it() {
        let records = every_kind();
        let (bytes, starts) = encode_all(&records);
        let last = *starts.last().unwrap() as usize;
        // A partial header of zeros would be a zero tail, not a torn one.
        assert_ne!(bytes[last], 0);
        for cut in last + 1..bytes.len() {
            let scan = scan(&bytes[..cut]);
            assert_eq!(
                scan.records,
                with_offsets(&records[..records.len() - 1], &starts),
                "cut at {cut}"
            );
            assert_eq!(scan.valid_len, last as u64, "cut at {cut}");
            assert_eq!(
                scan.end,
                ScanEnd::Torn {
                    offset: last as u64
                },
                "cut at {cut}"
            );
        }
    }

    /// Flips every bit of the record at `victim` and checks that the scan stops there.
    fn assert_every_bit_flip_is_caught(records: &[Record], victim: usize) {
        let (bytes, starts) = encode_all(records);
        let start = starts[victim] as usize;
        let end = starts.get(victim + 1).map_or(bytes.len(), |&s| s as usize);
        for bit in start * 8..end * 8 {
            let mut log = MemLog::new();
            log.append(&bytes);
            log.flip_bit(bit as u64);
            let scan = scan(log.bytes());
            assert_eq!(
                scan.records,
                with_offsets(&records[..victim], &starts),
                "bit {bit}"
            );
            assert_eq!(scan.valid_len, start as u64, "bit {bit}");
            assert!(
                matches!(
                    scan.end,
                    ScanEnd::Torn { offset } | ScanEnd::Corrupt { offset, .. }
                        if offset == start as u64
                ),
                "bit {bit}: {:?}",
                scan.end
            );
        }
    }

    #[test]
    fn a_flipped_bit_in_the_last_record_stops_the_scan_before_it() {
        let records = every_kind();
        assert_every_bit_flip_is_caught(&records, records.len() - 1);
    }

    #[test]
    fn a_flipped_bit_in_a_middle_record_drops_it_and_everything_after() {
        assert_every_bit_flip_is_caught(&every_kind(), 1);
    }

    #[test]
    fn a_zero_filled_tail_is_the_end_of_written_data() {
        let records = every_kind();
        let (bytes, starts) = encode_all(&records);
        for zeros in [1, 7, 8, 9, 4096] {
            let mut padded = bytes.clone();
            padded.resize(bytes.len() + zeros, 0);
            let scan = scan(&padded);
            assert_eq!(scan.records, with_offsets(&records, &starts), "{zeros}");
            assert_eq!(scan.valid_len, bytes.len() as u64);
            assert_eq!(
                scan.end,
                ScanEnd::ZeroTail {
                    offset: bytes.len() as u64
                }
            );
        }
    }

    #[test]
    fn data_after_a_zero_header_is_a_zeroed_region() {
        let records = every_kind();
        let (bytes, _) = encode_all(&records);
        let mut holed = bytes.clone();
        holed.resize(bytes.len() + 100, 0);
        encode_record(&records[0], &mut holed);
        let scan = scan(&holed);
        assert_eq!(scan.records.len(), records.len());
        assert_eq!(scan.valid_len, bytes.len() as u64);
        assert_eq!(
            scan.end,
            ScanEnd::Corrupt {
                offset: bytes.len() as u64,
                reason: CorruptReason::ZeroedRegion {
                    data_offset: bytes.len() as u64 + 100
                }
            }
        );
    }

    #[test]
    fn a_body_len_over_the_max_is_corrupt_before_the_body_is_read() {
        for body_len in [RECORD_BODY_MAX as u32 + 1, u32::MAX] {
            let mut bytes = Vec::new();
            encode_record(&message(1, b"x"), &mut bytes);
            let first = bytes.len() as u64;
            bytes.extend_from_slice(&body_len.to_le_bytes());
            bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
            let scan = scan(&bytes);
            assert_eq!(scan.records.len(), 1);
            assert_eq!(scan.valid_len, first);
            assert_eq!(
                scan.end,
                ScanEnd::Corrupt {
                    offset: first,
                    reason: CorruptReason::BodyTooLong { body_len }
                }
            );
        }
    }

    #[test]
    fn a_body_len_at_the_max_with_its_body_missing_is_torn() {
        let mut bytes = (RECORD_BODY_MAX as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[9; 20]);
        assert_eq!(scan(&bytes).end, ScanEnd::Torn { offset: 0 });
        assert_eq!(
            decode_record(&bytes),
            Decoded::Incomplete {
                len: RECORD_HEADER_LEN + RECORD_BODY_MAX
            }
        );
    }

    #[test]
    fn an_empty_body_with_a_nonzero_crc_is_corrupt() {
        let bytes = [0, 0, 0, 0, 1, 0, 0, 0];
        assert_eq!(
            scan(&bytes).end,
            ScanEnd::Corrupt {
                offset: 0,
                reason: CorruptReason::CrcMismatch {
                    stored: 1,
                    actual: 0
                }
            }
        );
    }

    #[test]
    fn a_body_with_a_good_crc_that_postcard_rejects_is_corrupt() {
        // Variant 200 does not exist.
        let bytes = frame(&[200, 1]);
        assert_eq!(
            scan(&bytes).end,
            ScanEnd::Corrupt {
                offset: 0,
                reason: CorruptReason::Undecodable
            }
        );
    }

    #[test]
    fn a_body_with_bytes_after_its_record_is_corrupt() {
        let mut encoded = Vec::new();
        encode_record(&message(4, b"abc"), &mut encoded);
        let mut body = encoded[RECORD_HEADER_LEN..].to_vec();
        body.extend_from_slice(&[0, 0]);
        assert_eq!(
            scan(&frame(&body)).end,
            ScanEnd::Corrupt {
                offset: 0,
                reason: CorruptReason::TrailingBytes { count: 2 }
            }
        );
    }

    #[test]
    fn decode_record_asks_for_the_whole_frame_when_given_part_of_it() {
        let mut bytes = Vec::new();
        encode_record(&message(1, b"payload"), &mut bytes);
        assert_eq!(
            decode_record(&bytes[..3]),
            Decoded::Incomplete {
                len: RECORD_HEADER_LEN
            }
        );
        assert_eq!(
            decode_record(&bytes[..bytes.len() - 1]),
            Decoded::Incomplete { len: bytes.len() }
        );
        assert_eq!(
            decode_record(&bytes),
            Decoded::Record {
                record: message(1, b"payload"),
                len: bytes.len()
            }
        );
    }

    #[test]
    fn the_scanner_yields_what_scan_returns_and_then_stays_ended() {
        let records = every_kind();
        let (mut bytes, starts) = encode_all(&records);
        bytes.push(0x55);
        let mut scanner = Scanner::new(&bytes);
        assert_eq!(scanner.end(), None);
        let yielded: Vec<_> = scanner.by_ref().collect();
        assert_eq!(yielded, with_offsets(&records, &starts));
        let end = ScanEnd::Torn {
            offset: bytes.len() as u64 - 1,
        };
        assert_eq!(scanner.end(), Some(end));
        assert_eq!(scanner.valid_len(), bytes.len() as u64 - 1);
        assert_eq!(scanner.next(), None);
        assert_eq!(scan(&bytes).end, end);
    }

    fn biggest_group(members: usize) -> Record {
        Record::GroupCreated {
            group: ConvId::group(u64::MAX),
            members: vec![UserId(u64::MAX); members],
        }
    }

    /// The largest head of one group: every id and seq at its longest varint.
    fn biggest_head(group: u64, members: usize) -> GroupHead {
        GroupHead {
            group: ConvId::group(group),
            members: vec![UserId(u64::MAX); members],
            last_seq: Seq(u64::MAX),
        }
    }

    /// A checkpoint record of one group alone: the largest record that carries one group.
    fn biggest_checkpoint(members: usize) -> Record {
        Record::Checkpoint {
            part: u32::MAX,
            groups: vec![biggest_head(u64::MAX, members)],
            dedupe: vec![],
            last: true,
        }
    }

    #[test]
    fn the_largest_group_record_fits_the_body_bound_and_one_more_member_does_not() {
        let fits = encoded_len(&biggest_checkpoint(GROUP_MEMBERS_PER_RECORD_MAX));
        assert!(fits <= RECORD_HEADER_LEN + RECORD_BODY_MAX, "{fits}");
        let over = encoded_len(&biggest_checkpoint(GROUP_MEMBERS_PER_RECORD_MAX + 1));
        assert!(over > RECORD_HEADER_LEN + RECORD_BODY_MAX, "{over}");
        let group = encoded_len(&biggest_group(GROUP_MEMBERS_PER_RECORD_MAX));
        assert!(
            group < fits,
            "a membership record is smaller than a checkpoint's"
        );
        let mut bytes = Vec::new();
        encode_record(
            &biggest_checkpoint(GROUP_MEMBERS_PER_RECORD_MAX),
            &mut bytes,
        );
        encode_record(&biggest_group(GROUP_MEMBERS_PER_RECORD_MAX), &mut bytes);
        assert_eq!(scan(&bytes).records.len(), 2);
    }

    #[test]
    fn a_checkpoint_of_nothing_is_one_inbox_record_with_the_clock() {
        assert_eq!(
            checkpoint_records(Vec::new(), Vec::new(), Vec::new(), 42),
            vec![Record::CheckpointInbox {
                part: 0,
                clock_ms: 42,
                entries: vec![],
                last: true
            }]
        );
    }

    #[test]
    fn inbox_parts_follow_the_group_parts_and_end_the_checkpoint() {
        let head = |n: u64| InboxHead {
            user: UserId(u64::MAX - 1_000_000 + n),
            conv: ConvId::direct(UserId(u64::MAX - 1), UserId(u64::MAX)),
            read: Seq(Seq::MAX.0 - n),
        };
        // Worst-case entries are 50 bytes: 30,000 of them need two records.
        let inbox: Vec<_> = (0..30_000).map(head).collect();
        let records = checkpoint_records(vec![biggest_head(1, 3)], Vec::new(), inbox.clone(), 7);
        let parts: Vec<_> = records.iter().map(|r| r.checkpoint_part()).collect();
        assert_eq!(
            parts,
            vec![Some((0, false)), Some((1, false)), Some((2, true))]
        );
        assert!(matches!(records[0], Record::Checkpoint { .. }));
        let (bytes, _) = encode_all(&records);
        let back: Vec<_> = scan(&bytes).records.into_iter().map(|(_, r)| r).collect();
        assert_eq!(back, records);
        let again: Vec<InboxHead> = back
            .iter()
            .flat_map(|r| match r {
                Record::CheckpointInbox {
                    entries, clock_ms, ..
                } => {
                    assert_eq!(*clock_ms, 7);
                    entries.clone()
                }
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(again, inbox);
    }

    #[test]
    fn a_message_of_the_first_format_decodes_as_a_message_stamped_zero() {
        let old = StoredMessageV1 {
            conv: ConvId::direct(UserId(1), UserId(2)),
            seq: Seq(3),
            sender: UserId(1),
            sender_device: DeviceId(4),
            client_msg_id: ClientMsgId([5; 16]),
            high_priority: true,
            payload: Bytes::from_static(b"written by an older gateway"),
        };
        // Variant 0 is the first format's message: encode it by hand as that gateway did.
        let mut body = vec![0u8];
        body.extend(postcard::to_allocvec(&old).expect("encodes"));
        let mut frame = Vec::new();
        frame.extend((body.len() as u32).to_le_bytes());
        frame.extend(crc32c::crc32c(&body).to_le_bytes());
        frame.extend(&body);
        let Decoded::Record { record, len } = decode_record(&frame) else {
            panic!("the old record decodes");
        };
        assert_eq!(len, frame.len());
        assert_eq!(record, Record::Message(StoredMessage::from(old)));
        let Record::Message(m) = record else {
            unreachable!()
        };
        assert_eq!(m.ts_ms, 0);
    }

    #[test]
    fn a_large_dedupe_window_is_split_over_parts_in_order() {
        let entry = |n: u64| DedupeEntry {
            sender: UserId(u64::MAX - n),
            client_msg_id: ClientMsgId([n as u8; 16]),
            conv: ConvId::direct(UserId(u64::MAX - 1), UserId(u64::MAX)),
            seq: Seq(Seq::MAX.0 - n),
        };
        // Worst-case entries are 56 bytes: 50,000 of them need three records.
        let entries: Vec<_> = (0..50_000).map(entry).collect();
        let records = checkpoint_records(vec![biggest_head(1, 10)], entries.clone(), Vec::new(), 0);
        assert_eq!(records.len(), 4);
        let (bytes, _) = encode_all(&records);
        let back: Vec<_> = scan(&bytes).records.into_iter().map(|(_, r)| r).collect();
        assert_eq!(back, records);
        let mut parts = Vec::new();
        let mut again = Vec::new();
        for r in &back[..3] {
            let Record::Checkpoint {
                part, dedupe, last, ..
            } = r
            else {
                panic!("{r:?}")
            };
            parts.push((*part, *last));
            again.extend_from_slice(dedupe);
        }
        assert_eq!(parts, vec![(0, false), (1, false), (2, false)]);
        assert_eq!(back[3].checkpoint_part(), Some((3, true)));
        assert_eq!(again, entries);
    }

    #[test]
    fn a_large_checkpoint_is_split_into_full_records_only_the_last_marked_last() {
        // Three groups of 40% of a body each: two records, the first with two groups.
        let members = RECORD_BODY_MAX * 4 / 10 / 10;
        let heads: Vec<_> = (1..=3).map(|g| biggest_head(g, members)).collect();
        let records = checkpoint_records(heads.clone(), Vec::new(), Vec::new(), 9);
        assert_eq!(
            records,
            vec![
                Record::Checkpoint {
                    part: 0,
                    groups: heads[..2].to_vec(),
                    dedupe: vec![],
                    last: false
                },
                Record::Checkpoint {
                    part: 1,
                    groups: heads[2..].to_vec(),
                    dedupe: vec![],
                    last: false
                },
                Record::CheckpointInbox {
                    part: 2,
                    clock_ms: 9,
                    entries: vec![],
                    last: true
                },
            ]
        );
        // Each fits, and scans back in order.
        let (bytes, _) = encode_all(&records);
        let back: Vec<_> = scan(&bytes).records.into_iter().map(|(_, r)| r).collect();
        assert_eq!(back, records);
        // Groups of the largest size never share a record, and each still fits.
        let heads: Vec<_> = (1..=2)
            .map(|g| biggest_head(g, GROUP_MEMBERS_PER_RECORD_MAX))
            .collect();
        let records = checkpoint_records(heads, Vec::new(), Vec::new(), 0);
        assert_eq!(records.len(), 3);
        let (bytes, _) = encode_all(&records);
        assert_eq!(scan(&bytes).records.len(), 3);
    }

    #[test]
    #[should_panic(expected = "ascending order")]
    fn a_checkpoint_of_groups_out_of_order_panics() {
        checkpoint_records(
            vec![biggest_head(2, 0), biggest_head(1, 0)],
            Vec::new(),
            Vec::new(),
            0,
        );
    }

    #[test]
    fn the_largest_message_record_fits_the_body_bound() {
        let record = Record::Message(StoredMessage {
            conv: ConvId::direct(UserId(u64::MAX), UserId(u64::MAX)),
            seq: Seq(u64::MAX),
            sender: UserId(u64::MAX),
            sender_device: DeviceId(u32::MAX),
            client_msg_id: ClientMsgId([0xFF; 16]),
            high_priority: true,
            payload: Bytes::from(vec![7; PAYLOAD_BYTES_PER_RECORD_MAX]),
            ts_ms: u64::MAX,
        });
        assert_eq!(encoded_len(&record), RECORD_HEADER_LEN + RECORD_BODY_MAX);
    }

    #[test]
    fn the_default_limits_fit_in_one_record() {
        let limits = Limits::default();
        assert!(limits.group_members_max <= GROUP_MEMBERS_PER_RECORD_MAX);
        assert!(limits.payload_bytes_max as usize <= PAYLOAD_BYTES_PER_RECORD_MAX);
    }

    #[test]
    #[should_panic(expected = "outside 1..=")]
    fn encoding_a_record_over_the_body_bound_panics() {
        encode_record(
            &biggest_checkpoint(GROUP_MEMBERS_PER_RECORD_MAX + 1),
            &mut Vec::new(),
        );
    }

    #[test]
    #[should_panic(expected = "not a group")]
    fn encoding_a_group_record_for_a_direct_conversation_panics() {
        let record = Record::MembersAdded {
            group: ConvId::direct(UserId(1), UserId(2)),
            members: vec![UserId(3)],
        };
        encode_record(&record, &mut Vec::new());
    }

    #[test]
    #[should_panic(expected = "seq 0")]
    fn encoding_a_message_with_seq_zero_panics() {
        encode_record(&message(0, b""), &mut Vec::new());
    }

    #[test]
    fn a_crash_drops_exactly_the_bytes_appended_since_the_last_sync() {
        let mut log = MemLog::new();
        assert_eq!(log.append(b"abc"), 3);
        log.sync();
        assert_eq!(log.append(b"defg"), 7);
        assert_eq!((log.len(), log.durable_len()), (7, 3));
        log.crash();
        assert_eq!(log.bytes(), b"abc");
        assert_eq!((log.len(), log.durable_len()), (3, 3));
        log.crash();
        assert_eq!(log.bytes(), b"abc");
    }

    #[test]
    fn a_torn_crash_keeps_part_of_the_volatile_tail_and_clamps_to_it() {
        let mut log = MemLog::new();
        log.append(b"ab");
        log.sync();
        log.append(b"cdef");
        let mut torn = log.clone();
        torn.crash_torn(3);
        assert_eq!(torn.bytes(), b"abcde");
        assert_eq!(torn.durable_len(), 5);
        log.crash_torn(u64::MAX);
        assert_eq!(log.bytes(), b"abcdef");
    }

    #[test]
    fn truncate_may_cut_below_the_durable_point() {
        let mut log = MemLog::new();
        log.append(b"abcdef");
        log.sync();
        log.append(b"gh");
        log.truncate(4);
        assert_eq!((log.bytes(), log.durable_len()), (&b"abcd"[..], 4));
        log.append(b"xy");
        log.crash();
        assert_eq!(log.bytes(), b"abcd");
    }

    #[test]
    fn a_torn_crash_then_scan_recovers_the_durable_records_and_whole_kept_ones() {
        let records = every_kind();
        let (durable, _) = encode_all(&records[..2]);
        let (tail, tail_starts) = encode_all(&records[2..]);
        for keep in 0..=tail.len() {
            let mut log = MemLog::new();
            log.append(&durable);
            log.sync();
            log.append(&tail);
            log.crash_torn(keep as u64);
            let scan = scan(log.bytes());
            let whole = whole_records(&records[2..], &tail_starts, keep);
            let expected: Vec<_> = records[..2 + whole].to_vec();
            let got: Vec<_> = scan.records.iter().map(|(_, r)| r.clone()).collect();
            assert_eq!(got, expected, "keep {keep}");
            let valid_len =
                durable.len() as u64 + tail_starts.get(whole).map_or(tail.len() as u64, |&s| s);
            assert_eq!(scan.valid_len, valid_len, "keep {keep}");
            log.truncate(scan.valid_len);
            assert_eq!(self::scan(log.bytes()).end, ScanEnd::Clean);
        }
    }

    fn arb_user() -> impl Strategy<Value = UserId> {
        (1..=u64::MAX).prop_map(UserId)
    }

    fn arb_conv() -> impl Strategy<Value = ConvId> {
        prop_oneof![
            (1..=u64::MAX).prop_map(ConvId::group),
            (arb_user(), arb_user()).prop_map(|(a, b)| ConvId::direct(a, b)),
        ]
    }

    fn arb_group() -> impl Strategy<Value = ConvId> {
        (1..=u64::MAX).prop_map(ConvId::group)
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let members = || prop::collection::vec(arb_user(), 0..20);
        prop_oneof![
            (
                arb_conv(),
                1..=u64::MAX,
                arb_user(),
                any::<u32>(),
                any::<[u8; 16]>(),
                any::<bool>(),
                prop::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(conv, seq, sender, device, id, high, payload)| {
                    Record::Message(StoredMessage {
                        conv,
                        seq: Seq(seq),
                        sender,
                        sender_device: DeviceId(device),
                        client_msg_id: ClientMsgId(id),
                        high_priority: high,
                        payload: Bytes::from(payload),
                        ts_ms: 0,
                    })
                }),
            (arb_group(), members())
                .prop_map(|(group, members)| Record::GroupCreated { group, members }),
            (arb_group(), members())
                .prop_map(|(group, members)| Record::MembersAdded { group, members }),
            (arb_group(), members())
                .prop_map(|(group, members)| Record::MembersRemoved { group, members }),
        ]
    }

    /// Checks what must hold of any scan of any input.
    fn assert_scan_is_consistent(bytes: &[u8], scan: &Scan) {
        assert!(scan.valid_len <= bytes.len() as u64);
        // Each record starts where the previous frame (per its header) ended, and the
        // last one ends at valid_len.
        let mut expected_offset = 0u64;
        for (offset, _) in &scan.records {
            assert_eq!(*offset, expected_offset);
            let at = *offset as usize;
            let body_len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            expected_offset = offset + RECORD_HEADER_LEN as u64 + u64::from(body_len);
        }
        assert_eq!(scan.valid_len, expected_offset);
        match scan.end {
            ScanEnd::Clean => assert_eq!(scan.valid_len, bytes.len() as u64),
            ScanEnd::ZeroTail { offset }
            | ScanEnd::Torn { offset }
            | ScanEnd::Corrupt { offset, .. } => {
                assert_eq!(offset, scan.valid_len);
                assert!(offset < bytes.len() as u64);
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_scan(
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            let scan = scan(&bytes);
            assert_scan_is_consistent(&bytes, &scan);
        }

        #[test]
        fn a_valid_log_cut_anywhere_and_followed_by_garbage_keeps_the_whole_records(
            records in prop::collection::vec(arb_record(), 0..8),
            cut in any::<prop::sample::Index>(),
            garbage in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let (bytes, starts) = encode_all(&records);
            let cut = cut.index(bytes.len() + 1);
            let mut damaged = bytes[..cut].to_vec();
            damaged.extend_from_slice(&garbage);
            let scan = scan(&damaged);
            assert_scan_is_consistent(&damaged, &scan);
            // The garbage may happen to repeat the bytes it replaced (shrinking favours
            // zeros): what counts is how far the damaged log still equals the original.
            let same = bytes.iter().zip(&damaged).take_while(|(a, b)| a == b).count();
            let whole = whole_records(&records, &starts, same);
            // Exactly the whole records survive: garbage could only be read as another
            // record if it held a frame with a matching CRC (a 2^-32 chance).
            prop_assert_eq!(scan.records, with_offsets(&records[..whole], &starts));
        }

        #[test]
        fn a_flipped_bit_anywhere_leaves_a_prefix_of_the_original_records(
            records in prop::collection::vec(arb_record(), 1..8),
            bit in any::<prop::sample::Index>(),
        ) {
            let (bytes, starts) = encode_all(&records);
            let mut log = MemLog::new();
            log.append(&bytes);
            let bit = bit.index(bytes.len() * 8);
            log.flip_bit(bit as u64);
            let scan = scan(log.bytes());
            assert_scan_is_consistent(log.bytes(), &scan);
            let hit = starts.iter().rposition(|&s| s <= (bit / 8) as u64).unwrap();
            prop_assert_eq!(scan.records, with_offsets(&records[..hit], &starts));
            prop_assert_eq!(scan.valid_len, starts[hit]);
        }

        #[test]
        fn any_record_round_trips(record in arb_record()) {
            let mut bytes = Vec::new();
            encode_record(&record, &mut bytes);
            prop_assert_eq!(bytes.len(), encoded_len(&record));
            prop_assert_eq!(decode_record(&bytes), Decoded::Record { record, len: bytes.len() });
        }
    }
}
