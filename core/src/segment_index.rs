//! The read index of one sealed log segment: its file format, the small summary memory
//! keeps of it, and the lookups that read one or two blocks of the file.
//!
//! A sealed segment's `(conv, seq) -> offset` index lives in a file of its own, so that the
//! gateway's memory does not grow with every conversation ever written. Memory keeps a
//! [`SegmentSummary`]: a bloom filter of the segment's conversations and the first key of
//! every [`BLOCK_BYTES`] block of the file (its "fence"). A lookup asks the bloom filter
//! first, then reads the block whose fence is the last at or before the key it wants, and
//! the blocks after it while they can still hold what it wants.
//!
//! File format (all integers little-endian):
//!
//! ```text
//! header, HEADER_BYTES = 32:
//!   magic b"IGIX" | version u32 = 1 | entry count u64 | crc32c(entries) u32 | 12 zero bytes
//! entries, ENTRY_BYTES = 32 each, sorted strictly ascending by (conv, seq):
//!   conv.hi u64 | conv.lo u64 | seq u64 | offset u64
//! ```
//!
//! Entry `i` belongs to block `i / ENTRIES_PER_BLOCK`; block `b` is the file's bytes
//! `HEADER_BYTES + b * BLOCK_BYTES ..` up to [`BLOCK_BYTES`] long (the last block may be
//! shorter).
//!
//! Invariants:
//! - [`encode`] writes only files [`SegmentSummary::decode`] accepts, and
//!   `decode(&encode(e))` equals [`SegmentSummary::of_sorted`] of the sorted entries.
//! - `decode` checks the whole file (magic, version, reserved bytes, length, CRC and strict
//!   order) and never panics: its input is whatever is on disk.
//! - The bloom filter has no false negatives: `may_contain(conv)` is true for every
//!   conversation with an entry in the file.
//! - The entry at or after a key `k` is in block [`SegmentSummary::block_for`]`(k)` or is
//!   the first entry of the next block, because fences are sorted like the entries.
//!
//! - The summary keeps each block's crc32c: a block read later is used only if
//!   [`SegmentSummary::check_block`] accepts it, so a damaged index file makes a lookup
//!   fail (and be retried, then reported failed), never answer a wrong seq.
//!
//! Left to others: reading and writing the files (the log engine's operations), and
//! rebuilding an index file from its segment when it is damaged. A driver must hand
//! [`Find::feed`] the whole block it asked for, checked.

use crate::proto::{ConvId, Seq};
use siphasher::sip128::SipHasher13;
use std::mem;

/// Bytes of the file's header.
pub const HEADER_BYTES: usize = 32;

/// Bytes of one entry.
pub const ENTRY_BYTES: usize = 32;

/// Entries in one block, the unit a lookup reads.
pub const ENTRIES_PER_BLOCK: usize = 128;

/// Bytes of one block: 4 KiB, one page and one O_DIRECT-aligned read.
pub const BLOCK_BYTES: usize = ENTRY_BYTES * ENTRIES_PER_BLOCK;

/// The first four bytes of every index file.
const MAGIC: [u8; 4] = *b"IGIX";

/// The format version this module writes and reads.
const VERSION: u32 = 1;

/// Bloom filter bits per distinct conversation: with [`BLOOM_HASHES`] hashes, about 1% of
/// absent conversations pass the filter and cost one block read.
const BLOOM_BITS_PER_CONV: u64 = 10;

/// Bloom filter hashes per conversation: the optimum for 10 bits per conversation
/// (10 * ln 2 ~ 6.9).
const BLOOM_HASHES: u32 = 7;

/// SipHash keys of the bloom filter. They are fixed, not drawn per process, so that a
/// summary is the same wherever and whenever a file is decoded (the sim replays exactly).
/// A client that picks conversation ids to collide in the filter only makes lookups of its
/// own absent conversations read a block, which the bloom filter exists to save, not to
/// guard.
const BLOOM_KEYS: (u64, u64) = (0x6967_6174_652d_6978, 0x626c_6f6f_6d2d_7631);

/// Message `seq` of `conv` starts at byte `offset` of the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IndexEntry {
    /// The message's conversation.
    pub conv: ConvId,
    /// The message's place in its conversation.
    pub seq: Seq,
    /// Where the message's record starts in the segment file.
    pub offset: u64,
}

impl IndexEntry {
    /// The key the file is sorted by.
    fn key(&self) -> (ConvId, Seq) {
        (self.conv, self.seq)
    }
}

/// Why an index file cannot be used (the caller rebuilds it from the segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IndexDamage {
    /// The file is shorter than its header.
    #[error("index file is {len} bytes, shorter than its {HEADER_BYTES}-byte header")]
    TooShort {
        /// The file's length.
        len: usize,
    },
    /// The file does not start with the magic bytes.
    #[error("index file does not start with the magic bytes \"IGIX\"")]
    Magic,
    /// The header names a format version this code does not read.
    #[error("index file has version {found}, this code reads version {VERSION}")]
    Version {
        /// The version in the header.
        found: u32,
    },
    /// The header's reserved bytes are not all zero.
    #[error("index file has nonzero reserved header bytes")]
    Reserved,
    /// The file's length does not match the header's entry count (a torn write, or a
    /// corrupt count).
    #[error("index file is {found} bytes, its header's entry count needs {expected}")]
    Length {
        /// The length the count needs (saturated at `u64::MAX` for an absurd count).
        expected: u64,
        /// The file's length.
        found: u64,
    },
    /// The entries' CRC does not match the header's.
    #[error("crc32c of the index entries is {computed:#010x}, the header says {stored:#010x}")]
    Crc {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the entries as read.
        computed: u32,
    },
    /// An entry's key is not strictly after the key before it (the CRC matched, so the
    /// writer was wrong).
    #[error("index entry {at} is not after the entry before it")]
    Unsorted {
        /// The number of the first entry out of order.
        at: u64,
    },
}

/// Sorts `entries` by (conv, seq) and encodes the index file.
///
/// # Panics
///
/// If two entries share (conv, seq): a segment holds each message once, so that would be
/// the caller's bug.
pub fn encode(entries: &mut [IndexEntry]) -> Vec<u8> {
    entries.sort_unstable_by_key(IndexEntry::key);
    // Sorted, the only disorder left is a repeated key.
    let repeated = first_disorder(entries.iter().copied()).map(|at| entries[at].key());
    assert!(
        repeated.is_none(),
        "two index entries share (conv, seq) = {repeated:?}"
    );
    let mut file = Vec::with_capacity(HEADER_BYTES + entries.len() * ENTRY_BYTES);
    file.resize(HEADER_BYTES, 0);
    for entry in entries.iter() {
        file.extend_from_slice(&encode_entry(entry));
    }
    let crc = crc32c::crc32c(&file[HEADER_BYTES..]);
    file[0..4].copy_from_slice(&MAGIC);
    file[4..8].copy_from_slice(&VERSION.to_le_bytes());
    file[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    file[16..20].copy_from_slice(&crc.to_le_bytes());
    // Bytes 20..32 are reserved and stay zero.
    file
}

/// A block of an index file to read: `len` bytes at `pos`; `index` is the block number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// The block's number, from 0.
    pub index: u64,
    /// The block's first byte in the file.
    pub pos: u64,
    /// The block's length: [`BLOCK_BYTES`], or less for the file's last block.
    pub len: usize,
}

/// What memory keeps of one sealed segment's index file. Serializable, so that the log
/// engine can keep it in a summary file next to the index file and start without reading
/// every index file whole.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSummary {
    /// Entries in the file.
    entries: u64,
    /// The bloom filter's bits; empty only for a file of no entries.
    bloom: Vec<u64>,
    /// Bits of the bloom filter each conversation sets.
    hashes: u32,
    /// The key of the first entry of each block, ascending.
    fences: Vec<(ConvId, Seq)>,
    /// The crc32c of each block's bytes: a block read later is checked against it
    /// ([`SegmentSummary::check_block`]), so that a damaged index file is never believed.
    block_crcs: Vec<u32>,
}

impl SegmentSummary {
    /// Verifies a whole index file (magic, version, reserved, length, crc, strict order)
    /// and summarizes it.
    pub fn decode(file: &[u8]) -> Result<SegmentSummary, IndexDamage> {
        let Some((header, body)) = file.split_first_chunk::<HEADER_BYTES>() else {
            return Err(IndexDamage::TooShort { len: file.len() });
        };
        if header[0..4] != MAGIC {
            return Err(IndexDamage::Magic);
        }
        let version = u32_at(header, 4);
        if version != VERSION {
            return Err(IndexDamage::Version { found: version });
        }
        if header[20..].iter().any(|&byte| byte != 0) {
            return Err(IndexDamage::Reserved);
        }
        let count = u64_at(header, 8);
        let expected = count
            .saturating_mul(ENTRY_BYTES as u64)
            .saturating_add(HEADER_BYTES as u64);
        let found = file.len() as u64;
        if expected != found {
            return Err(IndexDamage::Length { expected, found });
        }
        let stored = u32_at(header, 16);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(IndexDamage::Crc { stored, computed });
        }
        if let Some(at) = first_disorder(block_entries(body)) {
            return Err(IndexDamage::Unsorted { at: at as u64 });
        }
        Ok(summarize(count, entries_of(body)))
    }

    /// The summary of `entries`, which must be sorted strictly by (conv, seq) (as
    /// [`encode`] leaves them). Equal to `decode(&encode(..))` of the same entries.
    ///
    /// # Panics
    ///
    /// If `entries` are not sorted strictly by (conv, seq).
    pub fn of_sorted(entries: &[IndexEntry]) -> SegmentSummary {
        let disorder = first_disorder(entries.iter().copied());
        assert!(
            disorder.is_none(),
            "index entries are not sorted strictly by (conv, seq) at entry {disorder:?}"
        );
        summarize(entries.len() as u64, entries.iter().copied())
    }

    /// Whether this summary could have come from [`SegmentSummary::of_sorted`]: one fence
    /// per block, sorted, a bloom filter that is empty exactly when there are no entries,
    /// and the hash count this module uses. A summary read back from a file (the log
    /// engine's summary files, CRC-checked) is checked with this before any lookup relies
    /// on it, so that lookups never index past the fences.
    pub fn is_consistent(&self) -> bool {
        let blocks = self.entries.div_ceil(ENTRIES_PER_BLOCK as u64);
        self.fences.len() as u64 == blocks
            && self.block_crcs.len() as u64 == blocks
            && self.fences.windows(2).all(|w| w[0] < w[1])
            && self.bloom.is_empty() == (self.entries == 0)
            && self.hashes == BLOOM_HASHES
    }

    /// Whether `bytes`, read at `block`, are that block as the file was written (its
    /// length and its crc32c). A lookup uses only blocks that pass.
    pub fn check_block(&self, block: BlockRef, bytes: &[u8]) -> bool {
        let expected = usize::try_from(block.index)
            .ok()
            .and_then(|i| self.block_crcs.get(i));
        bytes.len() == block.len && expected == Some(&crc32c::crc32c(bytes))
    }

    /// Entries in the file.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// False only if the segment surely holds no message of `conv` (a bloom filter with
    /// about 1% false positives). A summary of 0 entries contains nothing.
    pub fn may_contain(&self, conv: ConvId) -> bool {
        if self.bloom.is_empty() {
            return false;
        }
        bloom_bits(conv, self.hashes, bloom_len(&self.bloom))
            .all(|bit| self.bloom[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// The last block whose first key is at or before (conv, from), or block 0 if
    /// (conv, from) is before every key; `None` only for a file of no entries.
    ///
    /// The first entry at or after (conv, from) is in this block or is the first entry of
    /// the next one: a lookup scans this block and follows [`SegmentSummary::next_block`].
    pub fn block_for(&self, conv: ConvId, from: Seq) -> Option<BlockRef> {
        if self.fences.is_empty() {
            return None;
        }
        let after = self.fences.partition_point(|&fence| fence <= (conv, from));
        Some(self.block(after.saturating_sub(1)))
    }

    /// The block after `block`, if the file has one.
    pub fn next_block(&self, block: BlockRef) -> Option<BlockRef> {
        let next = usize::try_from(block.index).ok()?.checked_add(1)?;
        (next < self.fences.len()).then(|| self.block(next))
    }

    /// Heap bytes this summary holds (bloom + fences capacities).
    pub fn heap_bytes(&self) -> usize {
        self.bloom.capacity() * mem::size_of::<u64>()
            + self.fences.capacity() * mem::size_of::<(ConvId, Seq)>()
            + self.block_crcs.capacity() * mem::size_of::<u32>()
    }

    /// Block `index`, which must be one of the file's.
    fn block(&self, index: usize) -> BlockRef {
        assert!(index < self.fences.len(), "block {index} is past the file");
        let pos = HEADER_BYTES as u64 + index as u64 * BLOCK_BYTES as u64;
        let end = HEADER_BYTES as u64 + self.entries * ENTRY_BYTES as u64;
        BlockRef {
            index: index as u64,
            pos,
            len: (end - pos).min(BLOCK_BYTES as u64) as usize,
        }
    }

    /// The key of the first entry of `block`, which must be one of the file's.
    fn fence(&self, block: BlockRef) -> (ConvId, Seq) {
        self.fences[block.index as usize]
    }
}

/// The entries of a block read from an index file (the bytes at a [`BlockRef`]'s `pos`,
/// `len` long). Bytes past the last whole entry are ignored.
pub fn block_entries(block: &[u8]) -> impl Iterator<Item = IndexEntry> + '_ {
    entries_of(block)
}

/// [`block_entries`], cloneable, for the two passes of [`summarize`].
fn entries_of(bytes: &[u8]) -> impl Iterator<Item = IndexEntry> + Clone + '_ {
    bytes.chunks_exact(ENTRY_BYTES).map(decode_entry)
}

/// The entry in `bytes`, which are [`ENTRY_BYTES`] long.
fn decode_entry(bytes: &[u8]) -> IndexEntry {
    IndexEntry {
        conv: ConvId {
            hi: u64_at(bytes, 0),
            lo: u64_at(bytes, 8),
        },
        seq: Seq(u64_at(bytes, 16)),
        offset: u64_at(bytes, 24),
    }
}

/// What a lookup wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step<T> {
    /// Read this block of the index file and feed its bytes to the lookup.
    Read(BlockRef),
    /// The lookup is over, with this result.
    Done(T),
}

/// A lookup of `conv`'s entries in `from..=to`, at most `limit`: call [`Find::start`],
/// then feed each block read with [`Find::feed`] until [`Step::Done`].
///
/// Drivers feed it the blocks they read (its tests drive it through `find`). It reads at
/// most the blocks from `block_for(conv, from)` to the one holding (conv, to), in order.
#[derive(Clone, Debug)]
pub struct Find {
    /// The conversation looked up.
    conv: ConvId,
    /// The lowest seq wanted.
    from: Seq,
    /// The highest seq wanted.
    to: Seq,
    /// The most entries wanted.
    limit: usize,
    /// The entries found so far, in order.
    found: Vec<IndexEntry>,
    /// The block asked for last; `None` once the lookup is done.
    reading: Option<BlockRef>,
}

impl Find {
    /// Starts a lookup in the file `summary` summarizes. It is done at once, reading
    /// nothing, if `limit` is 0, `from > to`, or the bloom filter rules `conv` out.
    pub fn start(
        summary: &SegmentSummary,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: usize,
    ) -> (Find, Step<Vec<IndexEntry>>) {
        let mut find = Find {
            conv,
            from,
            to,
            limit,
            found: Vec::new(),
            reading: None,
        };
        let wanted = limit > 0 && from <= to && summary.may_contain(conv);
        let step = match summary.block_for(conv, from).filter(|_| wanted) {
            Some(block) => {
                find.reading = Some(block);
                Step::Read(block)
            }
            None => Step::Done(Vec::new()),
        };
        (find, step)
    }

    /// Takes the bytes of the block the last step asked for (the same `summary` as
    /// [`Find::start`]'s) and says what to do next.
    ///
    /// # Panics
    ///
    /// If called after the lookup returned [`Step::Done`]: the driver's bug.
    pub fn feed(&mut self, summary: &SegmentSummary, block: &[u8]) -> Step<Vec<IndexEntry>> {
        let Some(reading) = self.reading.take() else {
            panic!("Find::feed called after the lookup was done");
        };
        let low = (self.conv, self.from);
        let high = (self.conv, self.to);
        for entry in block_entries(block) {
            if entry.key() < low {
                continue;
            }
            if entry.key() > high {
                return self.done();
            }
            self.found.push(entry);
            if self.found.len() >= self.limit {
                return self.done();
            }
        }
        // The next block is worth reading only if its first entry can be in the range; its
        // fence is never before `low`, as `block_for` chose the last fence at or before it.
        match summary.next_block(reading) {
            Some(next) if summary.fence(next) <= high => {
                self.reading = Some(next);
                Step::Read(next)
            }
            _ => self.done(),
        }
    }

    /// Ends the lookup with what it found.
    fn done(&mut self) -> Step<Vec<IndexEntry>> {
        self.reading = None;
        Step::Done(mem::take(&mut self.found))
    }
}

/// The entries of `conv` with seq in `from..=to` found in a segment, in seq order, at most
/// `limit`, by reading blocks through `read` (which returns the bytes of a [`BlockRef`], or
/// an error the caller chose): starts at `block_for(conv, from)` and follows `next_block`
/// while entries are <= (conv, to). Returns `Ok(empty)` without calling `read` if
/// `!may_contain(conv)`. The form a driver whose reads return at once uses; an async
/// one drives [`Find`] itself.
#[cfg(test)]
pub fn find<E>(
    summary: &SegmentSummary,
    conv: ConvId,
    from: Seq,
    to: Seq,
    limit: usize,
    mut read: impl FnMut(BlockRef) -> Result<Vec<u8>, E>,
) -> Result<Vec<IndexEntry>, E> {
    let (mut lookup, mut step) = Find::start(summary, conv, from, to, limit);
    loop {
        match step {
            Step::Read(block) => step = lookup.feed(summary, &read(block)?),
            Step::Done(found) => return Ok(found),
        }
    }
}

/// The last seq of `conv` in the segment (`None` if it has no message of it): reads the
/// block [`last_block`] names, and nothing if it names none. The form a driver whose reads
/// return at once uses; an async one calls [`last_block`] and [`last_seq_in`] itself.
#[cfg(test)]
pub fn last_of<E>(
    summary: &SegmentSummary,
    conv: ConvId,
    mut read: impl FnMut(BlockRef) -> Result<Vec<u8>, E>,
) -> Result<Option<Seq>, E> {
    match last_block(summary, conv) {
        Some(block) => Ok(last_seq_in(&read(block)?, conv)),
        None => Ok(None),
    }
}

/// The one block that holds `conv`'s last entry if the segment has any, or `None` if
/// the summary rules `conv` out. One block is enough: it is the block of the last entry
/// at or before (conv, `u64::MAX`), which is `conv`'s last entry if it has one.
pub fn last_block(summary: &SegmentSummary, conv: ConvId) -> Option<BlockRef> {
    if !summary.may_contain(conv) {
        return None;
    }
    summary.block_for(conv, Seq(u64::MAX))
}

/// The greatest seq of `conv` among the entries of `block` (read from [`last_block`]).
pub fn last_seq_in(block: &[u8], conv: ConvId) -> Option<Seq> {
    block_entries(block)
        .filter(|entry| entry.conv == conv)
        .map(|entry| entry.seq)
        .max()
}

/// The summary of `count` entries sorted strictly by (conv, seq). `entries` is walked
/// twice: once to size the bloom filter, once to fill it and the fences.
fn summarize(count: u64, entries: impl Iterator<Item = IndexEntry> + Clone) -> SegmentSummary {
    let mut convs = 0u64;
    let mut last = None;
    for entry in entries.clone() {
        if last != Some(entry.conv) {
            convs += 1;
            last = Some(entry.conv);
        }
    }
    let mut bloom = vec![0u64; (convs * BLOOM_BITS_PER_CONV).div_ceil(64) as usize];
    let blocks = count.div_ceil(ENTRIES_PER_BLOCK as u64) as usize;
    let mut fences = Vec::with_capacity(blocks);
    let mut block_crcs = Vec::with_capacity(blocks);
    let mut crc = 0;
    let mut last = None;
    let mut seen = 0u64;
    for (i, entry) in entries.enumerate() {
        if i % ENTRIES_PER_BLOCK == 0 {
            fences.push(entry.key());
            if i > 0 {
                block_crcs.push(crc);
            }
            crc = 0;
        }
        crc = crc32c::crc32c_append(crc, &encode_entry(&entry));
        if last != Some(entry.conv) {
            for bit in bloom_bits(entry.conv, BLOOM_HASHES, bloom_len(&bloom)) {
                bloom[(bit / 64) as usize] |= 1 << (bit % 64);
            }
            last = Some(entry.conv);
        }
        seen += 1;
    }
    if count > 0 {
        block_crcs.push(crc);
    }
    assert_eq!(seen, count, "the entry count does not match the entries");
    assert_eq!(fences.len(), blocks);
    assert_eq!(block_crcs.len(), blocks);
    fences.shrink_to_fit();
    SegmentSummary {
        entries: count,
        bloom,
        hashes: BLOOM_HASHES,
        fences,
        block_crcs,
    }
}

/// The file bytes of one entry.
fn encode_entry(entry: &IndexEntry) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    out[0..8].copy_from_slice(&entry.conv.hi.to_le_bytes());
    out[8..16].copy_from_slice(&entry.conv.lo.to_le_bytes());
    out[16..24].copy_from_slice(&entry.seq.0.to_le_bytes());
    out[24..32].copy_from_slice(&entry.offset.to_le_bytes());
    out
}

/// Bits in a bloom filter of these words.
fn bloom_len(bloom: &[u64]) -> u64 {
    bloom.len() as u64 * 64
}

/// The `hashes` bits, each below `len`, that `conv` sets in a bloom filter of `len` bits:
/// double hashing (`h1 + i * h2`) from one 128-bit SipHash-1-3 of the id. `h2` is made odd
/// so the `hashes` values differ; each is mapped to `0..len` by its high bits
/// (multiply-shift), which spreads them evenly for any `len`.
fn bloom_bits(conv: ConvId, hashes: u32, len: u64) -> impl Iterator<Item = u64> {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&conv.hi.to_le_bytes());
    id[8..].copy_from_slice(&conv.lo.to_le_bytes());
    let hash = SipHasher13::new_with_keys(BLOOM_KEYS.0, BLOOM_KEYS.1).hash(&id);
    let step = hash.h2 | 1;
    (0..u64::from(hashes)).map(move |i| {
        let h = hash.h1.wrapping_add(i.wrapping_mul(step));
        ((u128::from(h) * u128::from(len)) >> 64) as u64
    })
}

/// The position of the first entry whose key is not strictly after the one before it.
fn first_disorder(entries: impl Iterator<Item = IndexEntry>) -> Option<usize> {
    let mut last = None;
    for (i, entry) in entries.enumerate() {
        if last.is_some_and(|key| key >= entry.key()) {
            return Some(i);
        }
        last = Some(entry.key());
    }
    None
}

/// The little-endian `u64` at `at` in `bytes`, which must hold it.
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

/// The little-endian `u32` at `at` in `bytes`, which must hold it.
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(le)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::convert::Infallible;

    fn conv(lo: u64) -> ConvId {
        ConvId { hi: 0, lo }
    }

    fn entry(conv: ConvId, seq: u64) -> IndexEntry {
        // Offsets are made up but distinct, so a wrong entry cannot pass for a right one.
        IndexEntry {
            conv,
            seq: Seq(seq),
            offset: conv.hi ^ conv.lo.rotate_left(32) ^ seq.wrapping_mul(0x9e37_79b9),
        }
    }

    /// Asserts two summaries are the same, field by field.
    fn assert_same(a: &SegmentSummary, b: &SegmentSummary) {
        assert_eq!(a.entries, b.entries);
        assert_eq!(a.bloom, b.bloom);
        assert_eq!(a.hashes, b.hashes);
        assert_eq!(a.fences, b.fences);
    }

    /// Encodes `entries` and returns the file, its summary and the sorted entries.
    fn index(mut entries: Vec<IndexEntry>) -> (Vec<u8>, SegmentSummary, Vec<IndexEntry>) {
        let file = encode(&mut entries);
        let summary = SegmentSummary::decode(&file).expect("encode writes valid files");
        (file, summary, entries)
    }

    /// A `read` that serves blocks of `file`, checks each is a whole block of it, and
    /// records the block numbers read.
    fn reader<'a>(
        file: &'a [u8],
        reads: &'a mut Vec<u64>,
    ) -> impl FnMut(BlockRef) -> Result<Vec<u8>, Infallible> + 'a {
        move |block| {
            let pos = block.pos as usize;
            assert_eq!(pos, HEADER_BYTES + block.index as usize * BLOCK_BYTES);
            assert!(block.len == BLOCK_BYTES || pos + block.len == file.len());
            reads.push(block.index);
            Ok(file[pos..pos + block.len].to_vec())
        }
    }

    fn find_in(
        file: &[u8],
        summary: &SegmentSummary,
        conv: ConvId,
        seqs: (u64, u64),
        limit: usize,
    ) -> (Vec<u64>, Vec<u64>) {
        let mut reads = Vec::new();
        let Ok(found) = find(
            summary,
            conv,
            Seq(seqs.0),
            Seq(seqs.1),
            limit,
            reader(file, &mut reads),
        );
        assert!(found
            .iter()
            .all(|e| e.conv == conv && *e == entry(conv, e.seq.0)));
        (found.iter().map(|e| e.seq.0).collect(), reads)
    }

    fn last_in(file: &[u8], summary: &SegmentSummary, conv: ConvId) -> (Option<u64>, Vec<u64>) {
        let mut reads = Vec::new();
        let Ok(last) = last_of(summary, conv, reader(file, &mut reads));
        (last.map(|seq| seq.0), reads)
    }

    /// Four blocks: A (lo 10) seqs 1..=100 are entries 0..100; B (lo 20) seqs 2, 4, ..,
    /// 400 are entries 100..300 and span blocks 0, 1 and 2; C (lo 30) seqs 1..=100 are
    /// entries 300..400, and block 3 holds its last 16.
    fn fixture() -> (Vec<u8>, SegmentSummary) {
        let mut entries = Vec::new();
        entries.extend((1..=100).map(|seq| entry(conv(30), seq)));
        entries.extend((1..=200).map(|i| entry(conv(20), 2 * i)));
        entries.extend((1..=100).rev().map(|seq| entry(conv(10), seq)));
        let (file, summary, _) = index(entries);
        assert_eq!(summary.entries(), 400);
        assert_eq!(summary.fences.len(), 4);
        (file, summary)
    }

    const A: u64 = 10;
    const B: u64 = 20;
    const C: u64 = 30;

    /// A conversation not in `summary` that its bloom filter lets through.
    fn false_positive(summary: &SegmentSummary, present: &BTreeSet<ConvId>) -> ConvId {
        (1..1_000_000)
            .map(|i| ConvId { hi: 7, lo: i })
            .find(|c| !present.contains(c) && summary.may_contain(*c))
            .expect("a 1% filter lets one of a million absent conversations through")
    }

    #[test]
    fn decode_of_encode_equals_of_sorted() {
        for count in [0usize, 1, 2, 127, 128, 129, 256, 1000] {
            // Built in descending order, so encode has to sort.
            let entries: Vec<_> = (0..count as u64)
                .rev()
                .map(|i| entry(conv(i / 3), i % 3 + 1))
                .collect();
            let (file, summary, sorted) = index(entries);
            assert_eq!(file.len(), HEADER_BYTES + count * ENTRY_BYTES);
            assert!(sorted.windows(2).all(|w| w[0].key() < w[1].key()));
            assert_eq!(
                block_entries(&file[HEADER_BYTES..]).collect::<Vec<_>>(),
                sorted
            );
            assert_same(&summary, &SegmentSummary::of_sorted(&sorted));
            assert_eq!(summary.entries(), count as u64);
            assert_eq!(summary.fences.len(), count.div_ceil(ENTRIES_PER_BLOCK));
        }
    }

    #[test]
    #[should_panic(expected = "share (conv, seq)")]
    fn encode_panics_on_two_entries_with_the_same_key() {
        let mut entries = vec![entry(conv(1), 5), entry(conv(2), 1), entry(conv(1), 5)];
        entries[2].offset = 99;
        encode(&mut entries);
    }

    #[test]
    #[should_panic(expected = "not sorted strictly")]
    fn of_sorted_panics_on_unsorted_entries() {
        SegmentSummary::of_sorted(&[entry(conv(1), 2), entry(conv(1), 1)]);
    }

    #[test]
    fn block_entries_ignores_a_partial_entry() {
        let (file, _, sorted) = index(vec![entry(conv(1), 1), entry(conv(1), 2)]);
        let cut = &file[HEADER_BYTES..file.len() - 1];
        assert_eq!(block_entries(cut).collect::<Vec<_>>(), sorted[..1]);
    }

    fn valid_file() -> Vec<u8> {
        index((1..=300).map(|seq| entry(conv(seq % 7), seq)).collect()).0
    }

    #[test]
    fn a_truncated_or_extended_file_is_damaged() {
        let file = valid_file();
        for len in [0, 1, HEADER_BYTES - 1] {
            assert_eq!(
                SegmentSummary::decode(&file[..len]).unwrap_err(),
                IndexDamage::TooShort { len }
            );
        }
        let expected = file.len() as u64;
        for len in [HEADER_BYTES, file.len() - ENTRY_BYTES, file.len() - 1] {
            assert_eq!(
                SegmentSummary::decode(&file[..len]).unwrap_err(),
                IndexDamage::Length {
                    expected,
                    found: len as u64
                }
            );
        }
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(
            SegmentSummary::decode(&longer).unwrap_err(),
            IndexDamage::Length {
                expected,
                found: expected + 1
            }
        );
    }

    #[test]
    fn an_absurd_entry_count_is_a_length_damage() {
        let mut file = valid_file();
        file[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            SegmentSummary::decode(&file).unwrap_err(),
            IndexDamage::Length {
                expected: u64::MAX,
                found: file.len() as u64
            }
        );
    }

    #[test]
    fn a_flipped_bit_in_the_entries_or_the_stored_crc_fails_the_crc() {
        let file = valid_file();
        for at in [HEADER_BYTES, HEADER_BYTES + 17, file.len() - 1, 16, 19] {
            let mut damaged = file.clone();
            damaged[at] ^= 0x10;
            assert!(
                matches!(
                    SegmentSummary::decode(&damaged),
                    Err(IndexDamage::Crc { stored, computed }) if stored != computed
                ),
                "byte {at}"
            );
        }
    }

    #[test]
    fn a_wrong_magic_version_or_reserved_byte_is_damage() {
        let file = valid_file();
        let mut magic = file.clone();
        magic[0] = b'X';
        assert_eq!(
            SegmentSummary::decode(&magic).unwrap_err(),
            IndexDamage::Magic
        );

        let mut version = file.clone();
        version[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            SegmentSummary::decode(&version).unwrap_err(),
            IndexDamage::Version { found: 2 }
        );

        for at in 20..HEADER_BYTES {
            let mut reserved = file.clone();
            reserved[at] = 1;
            assert_eq!(
                SegmentSummary::decode(&reserved).unwrap_err(),
                IndexDamage::Reserved
            );
        }
    }

    /// Rewrites entry `i` of `file` as `e` and fixes the CRC.
    fn put(file: &mut [u8], i: usize, e: IndexEntry) {
        let at = HEADER_BYTES + i * ENTRY_BYTES;
        file[at..at + 8].copy_from_slice(&e.conv.hi.to_le_bytes());
        file[at + 8..at + 16].copy_from_slice(&e.conv.lo.to_le_bytes());
        file[at + 16..at + 24].copy_from_slice(&e.seq.0.to_le_bytes());
        file[at + 24..at + 32].copy_from_slice(&e.offset.to_le_bytes());
        let crc = crc32c::crc32c(&file[HEADER_BYTES..]);
        file[16..20].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn unsorted_or_repeated_entries_with_a_correct_crc_are_damage() {
        let file = valid_file();
        let entries: Vec<_> = block_entries(&file[HEADER_BYTES..]).collect();

        let mut swapped = file.clone();
        put(&mut swapped, 150, entries[151]);
        put(&mut swapped, 151, entries[150]);
        assert_eq!(
            SegmentSummary::decode(&swapped).unwrap_err(),
            IndexDamage::Unsorted { at: 151 }
        );

        let mut repeated = file.clone();
        put(&mut repeated, 1, entries[0]);
        assert_eq!(
            SegmentSummary::decode(&repeated).unwrap_err(),
            IndexDamage::Unsorted { at: 1 }
        );
    }

    #[test]
    fn an_empty_index_contains_nothing_and_reads_nothing() {
        let (file, summary, _) = index(Vec::new());
        assert_eq!(file.len(), HEADER_BYTES);
        assert_eq!(summary.entries(), 0);
        assert!(!summary.may_contain(conv(1)));
        assert_eq!(summary.block_for(conv(1), Seq(1)), None);
        assert_eq!(
            find_in(&file, &summary, conv(1), (0, u64::MAX), 10),
            (vec![], vec![])
        );
        assert_eq!(last_in(&file, &summary, conv(1)), (None, vec![]));
    }

    #[test]
    fn blocks_cover_the_file_and_only_the_last_is_short() {
        let (file, summary) = fixture();
        let mut block = summary.block_for(conv(0), Seq(0));
        let mut covered = HEADER_BYTES;
        let mut count = 0;
        while let Some(b) = block {
            assert_eq!((b.index, b.pos), (count, covered as u64));
            covered += b.len;
            count += 1;
            block = summary.next_block(b);
        }
        assert_eq!((count, covered), (4, file.len()));
        let last = summary.block_for(conv(u64::MAX), Seq(u64::MAX)).unwrap();
        assert_eq!((last.index, last.len), (3, 16 * ENTRY_BYTES));
        assert_eq!(summary.next_block(last), None);
    }

    #[test]
    fn find_returns_a_conversation_spanning_three_blocks() {
        let (file, summary) = fixture();
        let (seqs, reads) = find_in(&file, &summary, conv(B), (0, u64::MAX), usize::MAX);
        assert_eq!(seqs, (1..=200).map(|i| 2 * i).collect::<Vec<_>>());
        assert_eq!(reads, [0, 1, 2]);
        let (seqs, reads) = find_in(&file, &summary, conv(A), (1, 100), usize::MAX);
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        assert_eq!(reads, [0]);
        let (seqs, reads) = find_in(&file, &summary, conv(C), (1, 100), usize::MAX);
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        assert_eq!(reads, [2, 3]);
    }

    #[test]
    fn find_starts_mid_block_and_stops_at_to() {
        let (file, summary) = fixture();
        // B's seq 100 is entry 149, in block 1; seq 360 is entry 279, in block 2.
        let (seqs, reads) = find_in(&file, &summary, conv(B), (99, 360), usize::MAX);
        assert_eq!(seqs, (50..=180).map(|i| 2 * i).collect::<Vec<_>>());
        assert_eq!(reads, [1, 2]);
        // B's seq 58 is entry 128, the first of block 1: block 0 is not read.
        let (seqs, reads) = find_in(&file, &summary, conv(B), (58, 62), usize::MAX);
        assert_eq!((seqs, reads), (vec![58, 60, 62], vec![1]));
        // Seq 56 is the last entry of block 0 and block 1 starts past `to`: one read.
        let (seqs, reads) = find_in(&file, &summary, conv(B), (1, 56), usize::MAX);
        assert_eq!(seqs, (1..=28).map(|i| 2 * i).collect::<Vec<_>>());
        assert_eq!(reads, [0]);
    }

    #[test]
    fn find_follows_to_the_next_block_when_the_first_holds_nothing_in_range() {
        let (file, summary) = fixture();
        // 57 falls between block 0's last entry (B 56) and block 1's first (B 58).
        let (seqs, reads) = find_in(&file, &summary, conv(B), (57, 58), usize::MAX);
        assert_eq!((seqs, reads), (vec![58], vec![0, 1]));
        // Nothing in 57..=57, and block 1 starts past it: one read.
        let (seqs, reads) = find_in(&file, &summary, conv(B), (57, 57), usize::MAX);
        assert_eq!((seqs, reads), (vec![], vec![0]));
        // After C's last entry, the file's last: one read of the last block.
        let (seqs, reads) = find_in(&file, &summary, conv(C), (101, u64::MAX), usize::MAX);
        assert_eq!((seqs, reads), (vec![], vec![3]));
    }

    #[test]
    fn find_stops_at_the_limit() {
        let (file, summary) = fixture();
        let (seqs, reads) = find_in(&file, &summary, conv(B), (0, u64::MAX), 10);
        assert_eq!(seqs, (1..=10).map(|i| 2 * i).collect::<Vec<_>>());
        assert_eq!(reads, [0]);
        // The limit is met by block 0's last entry: block 1 is not read.
        let (seqs, reads) = find_in(&file, &summary, conv(B), (0, u64::MAX), 28);
        assert_eq!((seqs.len(), reads), (28, vec![0]));
        // From entry 149 (B's seq 100) the limit cuts in block 2, at entry 268.
        let (seqs, reads) = find_in(&file, &summary, conv(B), (100, u64::MAX), 120);
        assert_eq!(seqs, (50..170).map(|i| 2 * i).collect::<Vec<_>>());
        assert_eq!(reads, [1, 2]);
        assert_eq!(
            find_in(&file, &summary, conv(B), (0, u64::MAX), 0),
            (vec![], vec![])
        );
        assert_eq!(
            find_in(&file, &summary, conv(B), (9, 8), 10),
            (vec![], vec![])
        );
    }

    #[test]
    fn find_and_last_of_of_an_absent_conversation_read_nothing_unless_the_bloom_lets_it_through() {
        let (file, summary) = fixture();
        let absent = (1..)
            .map(|lo| ConvId { hi: 3, lo })
            .find(|c| !summary.may_contain(*c))
            .unwrap();
        assert_eq!(
            find_in(&file, &summary, absent, (0, u64::MAX), 10),
            (vec![], vec![])
        );
        assert_eq!(last_in(&file, &summary, absent), (None, vec![]));

        let present = BTreeSet::from([conv(A), conv(B), conv(C)]);
        let through = false_positive(&summary, &present);
        let (seqs, reads) = find_in(&file, &summary, through, (0, u64::MAX), 10);
        assert!(seqs.is_empty());
        assert!(!reads.is_empty(), "the lookup reads, then finds nothing");
        let (last, reads) = last_in(&file, &summary, through);
        assert_eq!((last, reads.len()), (None, 1));
    }

    #[test]
    fn last_of_reads_one_block_for_first_middle_and_last_conversations() {
        let (file, summary) = fixture();
        assert_eq!(last_in(&file, &summary, conv(A)), (Some(100), vec![0]));
        assert_eq!(last_in(&file, &summary, conv(B)), (Some(400), vec![2]));
        assert_eq!(last_in(&file, &summary, conv(C)), (Some(100), vec![3]));
    }

    #[test]
    fn last_of_finds_nothing_for_absent_conversations_between_and_around_present_ones() {
        let (file, mut summary) = fixture();
        // A saturated filter lets every conversation through, so the block scan is tested.
        summary.bloom.fill(u64::MAX);
        for absent in [0, 5, 15, 25, 35, u64::MAX] {
            let (last, reads) = last_in(&file, &summary, conv(absent));
            assert_eq!((last, reads.len()), (None, 1), "conv {absent}");
        }
    }

    #[test]
    fn the_sans_io_steps_read_one_block_and_finish() {
        let (file, summary) = fixture();
        let (mut lookup, step) = Find::start(&summary, conv(A), Seq(1), Seq(2), 5);
        let Step::Read(block) = step else {
            panic!("A is in the file")
        };
        assert_eq!(block, summary.block_for(conv(A), Seq(1)).unwrap());
        let bytes = &file[block.pos as usize..][..block.len];
        let step = lookup.feed(&summary, bytes);
        assert_eq!(step, Step::Done(vec![entry(conv(A), 1), entry(conv(A), 2)]));
    }

    #[test]
    #[should_panic(expected = "after the lookup was done")]
    fn feeding_a_finished_lookup_panics() {
        let (_, summary) = fixture();
        let (mut lookup, step) = Find::start(&summary, conv(A), Seq(2), Seq(1), 5);
        assert_eq!(step, Step::Done(vec![]));
        lookup.feed(&summary, &[]);
    }

    #[test]
    fn the_bloom_filter_has_no_false_negatives_and_few_false_positives() {
        let present: Vec<ConvId> = (1..=10_000u64)
            .map(|i| ConvId {
                hi: i % 97,
                lo: i * 7919,
            })
            .collect();
        let entries: Vec<_> = present.iter().map(|&c| entry(c, 1)).collect();
        let (_, summary, _) = index(entries);
        assert!(present.iter().all(|&c| summary.may_contain(c)));
        let set: BTreeSet<_> = present.iter().copied().collect();
        let absent = (1..=10_000u64).map(|i| ConvId {
            hi: i % 97,
            lo: i * 7919 + 1,
        });
        let passed = absent
            .inspect(|c| assert!(!set.contains(c)))
            .filter(|&c| summary.may_contain(c))
            .count();
        let rate = passed as f64 / 10_000.0;
        assert!(rate < 0.03, "false positive rate {rate}");
        // And the filter is about as tight as its sizing promises (about 1%).
        assert!(rate < 0.015, "false positive rate {rate}");
    }

    #[test]
    fn the_summary_is_a_small_part_of_the_file() {
        let entries: Vec<_> = (0..100_000u64)
            .map(|i| entry(conv(i % 1000), i / 1000 + 1))
            .collect();
        let (file, summary, _) = index(entries);
        let blocks = 100_000usize.div_ceil(ENTRIES_PER_BLOCK);
        let bloom_words = (1000 * BLOOM_BITS_PER_CONV as usize).div_ceil(64);
        // Per block: a fence (24 bytes) and a crc (4).
        assert_eq!(summary.heap_bytes(), bloom_words * 8 + blocks * (24 + 4));
        assert!(summary.heap_bytes() * 100 < file.len());
    }

    const POOL: [ConvId; 6] = [
        ConvId { hi: 0, lo: 1 },
        ConvId { hi: 0, lo: 2 },
        ConvId { hi: 1, lo: 2 },
        ConvId { hi: 5, lo: 9 },
        ConvId { hi: 0, lo: 1000 },
        ConvId { hi: 7, lo: 7 },
    ];

    /// Convs in the pool and two that never are (between and after pool convs).
    fn arb_query_conv() -> impl Strategy<Value = ConvId> {
        prop_oneof![
            prop::sample::select(POOL.to_vec()),
            Just(ConvId { hi: 0, lo: 3 }),
            Just(ConvId { hi: 9, lo: 9 }),
        ]
    }

    fn check_lookups(
        file: &[u8],
        summary: &SegmentSummary,
        entries: &[IndexEntry],
        conv: ConvId,
        (from, to, limit): (u64, u64, usize),
    ) -> Result<(), TestCaseError> {
        let mut reads = Vec::new();
        let Ok(found) = find(
            summary,
            conv,
            Seq(from),
            Seq(to),
            limit,
            reader(file, &mut reads),
        );
        let naive: Vec<_> = entries
            .iter()
            .filter(|e| e.conv == conv && (from..=to).contains(&e.seq.0))
            .take(limit)
            .copied()
            .collect();
        prop_assert_eq!(found, naive);
        // Blocks are read in order, each once, and no more of them than the range spans.
        prop_assert!(reads.windows(2).all(|w| w[1] == w[0] + 1));

        let mut reads = Vec::new();
        let Ok(last) = last_of(summary, conv, reader(file, &mut reads));
        let naive = entries
            .iter()
            .filter(|e| e.conv == conv)
            .map(|e| e.seq)
            .max();
        prop_assert_eq!(last, naive);
        prop_assert!(reads.len() <= 1);
        Ok(())
    }

    proptest! {
        #[test]
        fn find_and_last_of_agree_with_a_naive_filter(
            keys in prop::collection::btree_set(
                (prop::sample::select(POOL.to_vec()), 1u64..300),
                0..1000,
            ),
            queries in prop::collection::vec(
                (arb_query_conv(), 0u64..320, 0u64..320, 0usize..400),
                1..16,
            ),
        ) {
            let mut entries: Vec<_> = keys.iter().map(|&(c, seq)| entry(c, seq)).collect();
            entries.reverse();
            let (file, summary, sorted) = index(entries);
            assert_same(&summary, &SegmentSummary::of_sorted(&sorted));
            // The same lookups with a filter that lets everything through take the
            // block-scan path for absent conversations too.
            let mut saturated = summary.clone();
            saturated.bloom.fill(u64::MAX);
            for (conv, from, to, limit) in queries {
                check_lookups(&file, &summary, &sorted, conv, (from, to, limit))?;
                check_lookups(&file, &saturated, &sorted, conv, (from, to, limit))?;
            }
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            valid_header in any::<bool>(),
        ) {
            let mut bytes = bytes;
            if valid_header && bytes.len() >= HEADER_BYTES {
                // Give the body a real header, so decode gets as far as the order check.
                let count = ((bytes.len() - HEADER_BYTES) / ENTRY_BYTES) as u64;
                bytes.truncate(HEADER_BYTES + count as usize * ENTRY_BYTES);
                let crc = crc32c::crc32c(&bytes[HEADER_BYTES..]);
                bytes[..4].copy_from_slice(&MAGIC);
                bytes[4..8].copy_from_slice(&VERSION.to_le_bytes());
                bytes[8..16].copy_from_slice(&count.to_le_bytes());
                bytes[16..20].copy_from_slice(&crc.to_le_bytes());
                bytes[20..32].fill(0);
            }
            if let Ok(summary) = SegmentSummary::decode(&bytes) {
                let entries: Vec<_> = block_entries(&bytes[HEADER_BYTES..]).collect();
                assert_same(&summary, &SegmentSummary::of_sorted(&entries));
            }
        }
    }
}
