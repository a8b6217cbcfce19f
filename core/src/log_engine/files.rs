//! The files of one shard's log, their names, and the summary file of a sealed segment.
//!
//! A log directory holds, for each segment `n` (from 1):
//! - `<n:020>.seg`: the segment, a run of records framed by [`crate::log`];
//! - once sealed, `<n:020>.idx`: its read index ([`crate::segment_index`]), and
//!   `<n:020>.sum`: its summary file (below), written in that order before segment `n + 1`
//!   is created.
//!
//! Retention removes whole `.seg` files only. The `.idx` and `.sum` of a removed segment
//! stay: they are a few percent of its size, and they keep every conversation's last seq
//! answerable (a conversation whose messages were all removed must not start again at 1,
//! I3) and say which seqs retention removed (`available_from`).
//!
//! Summary file format (integers little-endian):
//!
//! ```text
//! magic b"IGSM" | version u32 = 1 | body length u32 | crc32c(body) u32 | body
//! body: postcard of SealedMeta
//! ```

use crate::segment_index::SegmentSummary;
use serde::{Deserialize, Serialize};

/// Digits of the zero-padded segment number in a file name: every u64 fits in 20.
const DIGITS: usize = 20;

/// A file of the log, as the engine names it to the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileId {
    /// Segment `n`: `<n:020>.seg`.
    Segment(u64),
    /// The read index of sealed segment `n`: `<n:020>.idx`.
    Index(u64),
    /// The summary of sealed segment `n`: `<n:020>.sum`.
    Summary(u64),
}

impl FileId {
    /// The file's name in the log directory.
    pub fn name(self) -> String {
        let (n, suffix) = match self {
            FileId::Segment(n) => (n, "seg"),
            FileId::Index(n) => (n, "idx"),
            FileId::Summary(n) => (n, "sum"),
        };
        format!("{n:0DIGITS$}.{suffix}")
    }

    /// The segment the file belongs to.
    pub fn segment(self) -> u64 {
        match self {
            FileId::Segment(n) | FileId::Index(n) | FileId::Summary(n) => n,
        }
    }

    /// What a directory entry named `name` is: `None` for a file that is not the log's
    /// (any other suffix), `Some(Err(()))` for a log file whose number is malformed (the
    /// engine refuses to guess), `Some(Ok(id))` otherwise.
    pub fn parse(name: &str) -> Option<Result<FileId, ()>> {
        let (digits, suffix) = name.rsplit_once('.')?;
        let make: fn(u64) -> FileId = match suffix {
            "seg" => FileId::Segment,
            "idx" => FileId::Index,
            "sum" => FileId::Summary,
            _ => return None,
        };
        let number = (digits.len() == DIGITS && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse::<u64>().ok())
            .flatten()
            .filter(|&n| n >= 1);
        Some(number.map(make).ok_or(()))
    }
}

/// What the engine keeps of a sealed segment, and what its summary file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedMeta {
    /// The segment's length in bytes (its records, no padding).
    pub bytes: u64,
    /// Message records in it.
    pub messages: u64,
    /// Where the last whole checkpoint in it starts, if it holds one.
    pub checkpoint_at: Option<u64>,
    /// When it was sealed (ms since the Unix epoch, by the driver's clock): what retention
    /// by age goes by.
    pub sealed_at_ms: u64,
    /// The length of its index file.
    pub index_len: u64,
    /// The summary of its index file.
    pub summary: SegmentSummary,
}

/// The first four bytes of a summary file.
const MAGIC: [u8; 4] = *b"IGSM";
/// The summary file format version.
const VERSION: u32 = 1;
/// Bytes before the body.
const HEADER_BYTES: usize = 16;

/// Encodes a summary file.
pub fn encode_summary(meta: &SealedMeta) -> Vec<u8> {
    // Cannot fail: postcard fails only on unsized sequences and `collect_str`, which
    // SealedMeta does not use.
    let body = postcard::to_allocvec(meta).expect("postcard encodes a SealedMeta");
    let mut file = Vec::with_capacity(HEADER_BYTES + body.len());
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&VERSION.to_le_bytes());
    // A summary is a few hundred KiB at most (about 10 bits per conversation and 32 bytes
    // per 128 messages of a segment), far below u32::MAX.
    let len = u32::try_from(body.len()).expect("a summary is below 4 GiB");
    file.extend_from_slice(&len.to_le_bytes());
    file.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    file.extend_from_slice(&body);
    file
}

/// Decodes a summary file, or `None` if it is damaged in any way (magic, version, length,
/// CRC, decoding, or a summary that is not self-consistent). Never panics.
pub fn decode_summary(file: &[u8]) -> Option<SealedMeta> {
    let (header, body) = file.split_first_chunk::<HEADER_BYTES>()?;
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if header[..4] != MAGIC || word(4) != VERSION {
        return None;
    }
    if usize::try_from(word(8)).ok()? != body.len() || crc32c::crc32c(body) != word(12) {
        return None;
    }
    let meta: SealedMeta = postcard::from_bytes(body).ok()?;
    (meta.summary.is_consistent() && meta.summary.entries() == meta.messages).then_some(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ConvId, Seq, UserId};
    use crate::segment_index::IndexEntry;

    #[test]
    fn names_round_trip_and_foreign_names_are_told_apart() {
        for id in [
            FileId::Segment(1),
            FileId::Index(42),
            FileId::Summary(u64::MAX),
        ] {
            assert_eq!(FileId::parse(&id.name()), Some(Ok(id)));
        }
        assert_eq!(FileId::parse("shards"), None);
        assert_eq!(FileId::parse("notes.txt"), None);
        assert_eq!(FileId::parse("1.seg"), Some(Err(())));
        assert_eq!(FileId::parse("00000000000000000000.seg"), Some(Err(())));
        assert_eq!(FileId::parse("0000000000000000000x.idx"), Some(Err(())));
    }

    fn meta() -> SealedMeta {
        let conv = ConvId::direct(UserId(1), UserId(2));
        let entries: Vec<IndexEntry> = (1..=300)
            .map(|s| IndexEntry {
                conv,
                seq: Seq(s),
                offset: s * 100,
            })
            .collect();
        SealedMeta {
            bytes: 30_100,
            messages: 300,
            checkpoint_at: Some(0),
            sealed_at_ms: 1_700_000_000_000,
            index_len: 9_632,
            summary: SegmentSummary::of_sorted(&entries),
        }
    }

    #[test]
    fn a_summary_file_round_trips() {
        let m = meta();
        assert_eq!(decode_summary(&encode_summary(&m)), Some(m));
    }

    #[test]
    fn every_truncation_and_bit_flip_of_a_summary_file_is_refused() {
        let file = encode_summary(&meta());
        for len in 0..file.len() {
            assert_eq!(decode_summary(&file[..len]), None, "cut at {len}");
        }
        for bit in 0..file.len() * 8 {
            let mut bad = file.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_summary(&bad), None, "bit {bit}");
        }
    }
}
