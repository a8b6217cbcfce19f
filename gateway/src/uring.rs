//! The Reactor's one unsafe module: a shard's io_uring, and every buffer lent to the
//! kernel while an operation on it is in flight.
//!
//! Everything above this module is safe code. The rules it keeps, each with a test below:
//! - **Ownership until completion.** An operation's memory (a send's chunks, iovecs and
//!   header; a file write's or read's buffer; an eventfd read's word) moves into the
//!   operation's slot when it is submitted and comes back to the caller only with the
//!   operation's last completion ([`Done::owned`]). Nothing can drop or touch it while the
//!   kernel may read or write it.
//! - **Ids cannot be confused.** An operation's `user_data` is its slot index and the
//!   slot's generation ([`OpId`]); a slot reused for a later operation has a new
//!   generation, so a late completion can never be taken for another operation's.
//! - **Provided receive buffers.** Multishot receives take buffers from one ring shared by
//!   the shard ([`RECV_BUFFERS`] of [`RECV_BUFFER_BYTES`]). A buffer the kernel filled is
//!   ours until [`Ring::recycle`] gives it back; the caller copies what it needs first. An
//!   idle connection holds none.
//! - **Teardown.** Dropping the ring cancels what is in flight and waits (bounded) for it;
//!   memory of operations that still did not complete is leaked rather than freed under the
//!   kernel.
//!
//! It decides nothing: which operations to submit, and what a completion means, is the
//! Reactor's (`reactor.rs`) and the storage executor's (`storage.rs`).

use bytes::Bytes;
use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::alloc::Layout;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

/// Submission queue entries: 4,096. A loop turn's submissions beyond it are submitted in
/// more than one `io_uring_enter` (it never fails, it costs a syscall).
pub const SUBMISSION_ENTRIES: u32 = 4096;
/// Completion queue entries: 16,384 (the kernel keeps overflow on top, IORING_FEAT_NODROP;
/// this bounds how many completions one turn takes without that slower path).
pub const COMPLETION_ENTRIES: u32 = 16384;
/// Provided receive buffers per shard: 256. They are recycled as soon as their bytes are
/// copied, within the loop turn that took them, so they only need to cover the receives
/// completing between two turns. More would add resident memory (every buffer gets
/// touched as the ring cycles), fewer would make ENOBUFS common under load.
pub const RECV_BUFFERS: u16 = 256;
/// Bytes per provided receive buffer: 4 KiB, a page. Chat frames are far smaller; a larger
/// frame arrives over several buffers and is assembled by the connection.
pub const RECV_BUFFER_BYTES: usize = 4096;
/// The buffer group id of the shard's receive buffers.
const RECV_GROUP: u16 = 0;
/// Chunks handed to one `sendmsg` at most (the kernel's IOV_MAX is 1024).
pub const SEND_IOV_MAX: usize = 64;
/// `user_data` of a wake-up another shard's ring posted on this one (IORING_OP_MSG_RING).
/// It names no slot: nothing of ours is in flight for it.
const WAKE_POSTED: u64 = u64::MAX - 1;
/// `user_data` of this ring's own wake-up posts. They complete here only if they fail
/// (IOSQE_CQE_SKIP_SUCCESS), and hold no slot either.
const WAKE_SENT: u64 = u64::MAX - 2;
/// `user_data` of the cancel-everything a dropped ring submits.
const TEARDOWN: u64 = u64::MAX;
/// The tag of a [`Done`] for a wake-up another ring posted on this one.
pub const TAG_WOKEN: u64 = 0xfe << 56;
/// The tag of a [`Done`] for a wake-up this ring failed to post (`result` says why).
pub const TAG_WAKE_FAILED: u64 = 0xfd << 56;
/// How long dropping a ring waits for its operations to finish after cancelling them.
const TEARDOWN_WAIT: Duration = Duration::from_secs(1);

/// An operation in flight: its slot and that slot's generation (never 0, so that an
/// `Option<OpId>` costs nothing over an `OpId`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(std::num::NonZeroU64);

impl OpId {
    fn new(index: u32, generation: u32) -> OpId {
        assert_ne!(generation, 0, "generations skip 0");
        let raw = u64::from(generation) << 32 | u64::from(index);
        OpId(std::num::NonZeroU64::new(raw).expect("a non-zero generation"))
    }
    fn from_user_data(raw: u64) -> OpId {
        OpId(std::num::NonZeroU64::new(raw).expect("every operation's user_data is non-zero"))
    }
    fn user_data(self) -> u64 {
        self.0.get()
    }
    fn index(self) -> usize {
        (self.0.get() & 0xffff_ffff) as usize
    }
    fn generation(self) -> u32 {
        (self.0.get() >> 32) as u32
    }
}

/// Memory an operation lends the kernel, held by its slot until its last completion.
pub enum Owned {
    /// The operation lends nothing.
    Nothing,
    /// A vectored send's chunks (with the iovecs and header pointing into them).
    Send(Box<SendBufs>),
    /// A file write's or read's buffer.
    Buf(AlignedBuf),
    /// An 8-byte word (an eventfd read). Only the kernel writes it; nobody reads it back.
    Word(#[allow(dead_code)] Box<u64>),
}

/// A `sendmsg`'s memory. Boxed so that the header's pointer to the iovecs, and the iovecs'
/// pointers into the chunks, stay valid while the box moves around.
pub struct SendBufs {
    header: libc::msghdr,
    iov: Vec<libc::iovec>,
    chunks: Vec<Bytes>,
}

impl SendBufs {
    /// The chunks that were being sent, in order.
    pub fn into_chunks(self) -> Vec<Bytes> {
        self.chunks
    }
}

/// A heap buffer with a chosen alignment (O_DIRECT needs 4 KiB), zeroed when made.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read it, like &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two).
    pub fn zeroed(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .expect("buffer sizes and alignments are ours and valid");
        // SAFETY: the layout's size is at least 1.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// Its length in bytes.
    #[allow(clippy::len_without_is_empty)] // nothing asks; a zero-length buffer is valid
    pub fn len(&self) -> usize {
        self.len
    }

    /// Its bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed) bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Its bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The first `n` bytes as `Bytes`, without a copy.
    pub fn into_bytes(self, n: usize) -> Bytes {
        let n = n.min(self.len);
        Bytes::from_owner(Prefix { buf: self, n })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The first `n` bytes of a buffer, as `Bytes`' owner.
struct Prefix {
    buf: AlignedBuf,
    n: usize,
}

impl AsRef<[u8]> for Prefix {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_slice()[..self.n]
    }
}

/// One completion, with what its operation lent back if it was the last.
pub struct Done {
    /// The operation.
    pub op: OpId,
    /// The caller's tag given at submission.
    pub tag: u64,
    /// The kernel's result: bytes or a descriptor, or a negated errno.
    pub result: i32,
    /// `IORING_CQE_F_*` flags.
    pub flags: u32,
    /// The operation's memory: given back with its last completion, else `Nothing`.
    pub owned: Owned,
}

impl Done {
    /// Whether more completions of this (multishot) operation follow.
    pub fn is_more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer this completion filled, if any.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// The result as `io::Result` of a count.
    pub fn io_result(&self) -> io::Result<usize> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as usize)
        }
    }
}

struct Slot {
    generation: u32,
    /// In flight: the caller's tag and the memory lent.
    busy: Option<(u64, Owned)>,
}

/// The provided buffer ring: `RECV_BUFFERS` entries (page aligned, registered with the
/// kernel) pointing into one region of `RECV_BUFFERS * RECV_BUFFER_BYTES`.
struct BufRing {
    entries: AlignedBuf,
    memory: AlignedBuf,
    /// Our copy of the ring's tail: buffers handed to the kernel so far.
    tail: u16,
    /// Which buffers the kernel filled and we have not given back.
    lent: Vec<bool>,
}

impl BufRing {
    fn entry(&mut self, i: u16) -> &mut BufRingEntry {
        let at = usize::from(i & (RECV_BUFFERS - 1));
        // SAFETY: `entries` holds RECV_BUFFERS entries of BufRingEntry's size and
        // alignment (page aligned); `at` is below RECV_BUFFERS.
        unsafe { &mut *(self.entries.ptr.as_ptr() as *mut BufRingEntry).add(at) }
    }

    /// Hands buffer `bid` to the kernel.
    fn provide(&mut self, bid: u16) {
        let addr = self.memory.ptr.as_ptr() as u64 + u64::from(bid) * RECV_BUFFER_BYTES as u64;
        let tail = self.tail;
        let entry = self.entry(tail);
        entry.set_addr(addr);
        entry.set_len(RECV_BUFFER_BYTES as u32);
        entry.set_bid(bid);
        self.tail = tail.wrapping_add(1);
        // SAFETY: the tail field overlays entry 0's reserved field (io_uring's buf ring
        // layout); the kernel reads it concurrently, hence the atomic Release store,
        // which publishes the entry written above.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.ptr.as_ptr() as *const BufRingEntry);
            (*(tail as *const AtomicU16)).store(self.tail, Ordering::Release);
        }
    }
}

/// A shard's io_uring: submissions, completions, and the memory lent meanwhile.
pub struct Ring {
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    bufs: BufRing,
}

impl Ring {
    /// A ring for the calling thread (it must be the only thread that submits to it), with
    /// its provided receive buffers registered.
    pub fn new() -> io::Result<Ring> {
        let uring = IoUring::builder()
            .setup_cqsize(COMPLETION_ENTRIES)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(SUBMISSION_ENTRIES)?;
        if !uring.params().is_feature_ext_arg() || !uring.params().is_feature_nodrop() {
            return Err(io::Error::other(
                "this kernel's io_uring lacks EXT_ARG or NODROP (Linux 5.11 or newer needed)",
            ));
        }
        let entries = AlignedBuf::zeroed(
            usize::from(RECV_BUFFERS) * std::mem::size_of::<BufRingEntry>(),
            4096,
        );
        let memory = AlignedBuf::zeroed(usize::from(RECV_BUFFERS) * RECV_BUFFER_BYTES, 4096);
        // SAFETY: `entries` is page aligned, holds RECV_BUFFERS entries and lives as long
        // as the ring (it is dropped after the ring is torn down, see Drop).
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                entries.ptr.as_ptr() as u64,
                RECV_BUFFERS,
                RECV_GROUP,
                0,
            )?;
        }
        let mut bufs = BufRing {
            entries,
            memory,
            tail: 0,
            lent: vec![false; usize::from(RECV_BUFFERS)],
        };
        for bid in 0..RECV_BUFFERS {
            bufs.provide(bid);
        }
        Ok(Ring {
            uring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            bufs,
        })
    }

    /// Operations in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Takes a slot for an operation, tags it and lends it `owned`.
    fn slot(&mut self, tag: u64, owned: Owned) -> OpId {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    busy: None,
                });
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 operations")
            }
        };
        let slot = &mut self.slots[index as usize];
        assert!(slot.busy.is_none(), "a free slot is not in flight");
        slot.generation = slot.generation.wrapping_add(1).max(1);
        slot.busy = Some((tag, owned));
        self.in_flight += 1;
        OpId::new(index, slot.generation)
    }

    /// Queues `entry` for the next submit. A full submission queue is submitted at once.
    ///
    /// # Safety
    /// Every pointer in `entry` must point into memory owned by the operation's slot (or
    /// the ring itself) and stay valid until its last completion.
    unsafe fn push(&mut self, entry: squeue::Entry, op: OpId) {
        self.push_entry(entry.user_data(op.user_data()));
    }

    /// Queues an entry that carries no pointer (or whose memory the caller keeps alive).
    fn push_entry(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: `push`'s callers keep the entry's memory alive until its completion;
            // the other entries pushed here carry no pointer.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full: hand what is queued to the kernel and try again. A failure here is
            // retried (EINTR/EBUSY are transient); anything else shows in the completions.
            if let Err(e) = self.uring.submit() {
                tracing::warn!(error = %e, "io_uring submit with a full queue");
            }
        }
    }

    /// This ring's descriptor, for other shards to post wake-ups to ([`Ring::post_wake`]).
    pub fn fd(&self) -> RawFd {
        self.uring.as_raw_fd()
    }

    /// Posts a wake-up completion ([`TAG_WOKEN`]) on the ring `target` at this ring's next
    /// submit: no syscall of its own, and it ends the target's wait. A failure comes back
    /// here as [`TAG_WAKE_FAILED`].
    pub fn post_wake(&mut self, target: RawFd) {
        let entry = opcode::MsgRingData::new(Fd(target), 0, WAKE_POSTED, None)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(WAKE_SENT);
        self.push_entry(entry);
    }

    /// Multishot accept on a listening socket: one completion per connection (its
    /// descriptor), until one arrives without `IORING_CQE_F_MORE`.
    pub fn accept_multi(&mut self, fd: RawFd, tag: u64) -> OpId {
        let op = self.slot(tag, Owned::Nothing);
        let entry = opcode::AcceptMulti::new(Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        // SAFETY: the entry carries no pointer.
        unsafe { self.push(entry, op) };
        op
    }

    /// Multishot receive into the shard's provided buffers: one completion per filled
    /// buffer ([`Ring::received`], then [`Ring::recycle`]), until one without
    /// `IORING_CQE_F_MORE` (EOF, an error, or ENOBUFS when the buffers ran out).
    pub fn recv_multi(&mut self, fd: RawFd, tag: u64) -> OpId {
        let op = self.slot(tag, Owned::Nothing);
        let entry = opcode::RecvMulti::new(Fd(fd), RECV_GROUP).build();
        // SAFETY: the buffers it selects belong to the ring and live as long as it.
        unsafe { self.push(entry, op) };
        op
    }

    /// The bytes a receive completion left in provided buffer `bid`.
    pub fn received(&self, bid: u16, len: usize) -> &[u8] {
        let i = usize::from(bid);
        assert!(self.bufs.lent[i], "buffer {bid} is not ours to read");
        assert!(len <= RECV_BUFFER_BYTES);
        &self.bufs.memory.as_slice()[i * RECV_BUFFER_BYTES..i * RECV_BUFFER_BYTES + len]
    }

    /// Gives provided buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        let i = usize::from(bid);
        assert!(self.bufs.lent[i], "buffer {bid} recycled twice");
        self.bufs.lent[i] = false;
        self.bufs.provide(bid);
    }

    /// One `sendmsg` of up to [`SEND_IOV_MAX`] of `chunks` (the rest are not sent and come
    /// back with the completion). The chunks come back with the completion
    /// ([`SendBufs::into_chunks`]).
    pub fn send(&mut self, fd: RawFd, chunks: Vec<Bytes>, tag: u64) -> OpId {
        let iov: Vec<libc::iovec> = chunks
            .iter()
            .take(SEND_IOV_MAX)
            .map(|c| libc::iovec {
                iov_base: c.as_ptr() as *mut libc::c_void,
                iov_len: c.len(),
            })
            .collect();
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let header: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut bufs = Box::new(SendBufs {
            header,
            iov,
            chunks,
        });
        bufs.header.msg_iov = bufs.iov.as_mut_ptr();
        bufs.header.msg_iovlen = bufs.iov.len() as _;
        let header: *const libc::msghdr = &bufs.header;
        let op = self.slot(tag, Owned::Send(bufs));
        let entry = opcode::SendMsg::new(Fd(fd), header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        // SAFETY: the header, iovecs and chunks are in the box the slot now owns; moving a
        // Box does not move its heap contents, and Bytes' data does not move either.
        unsafe { self.push(entry, op) };
        op
    }

    /// Writes all of `buf` at `at` (one `write`; a short count is the caller's to handle).
    pub fn write_at(&mut self, fd: RawFd, buf: AlignedBuf, at: u64, tag: u64) -> OpId {
        let (ptr, len) = (buf.ptr.as_ptr(), buf.len);
        let op = self.slot(tag, Owned::Buf(buf));
        let entry = opcode::Write::new(Fd(fd), ptr, len as u32)
            .offset(at)
            .build();
        // SAFETY: the buffer is owned by the slot until the completion.
        unsafe { self.push(entry, op) };
        op
    }

    /// Reads into `buf` from `at`; the completion's result is the count read.
    pub fn read_at(&mut self, fd: RawFd, buf: AlignedBuf, at: u64, tag: u64) -> OpId {
        let (ptr, len) = (buf.ptr.as_ptr(), buf.len);
        let op = self.slot(tag, Owned::Buf(buf));
        let entry = opcode::Read::new(Fd(fd), ptr, len as u32)
            .offset(at)
            .build();
        // SAFETY: the buffer is owned by the slot until the completion.
        unsafe { self.push(entry, op) };
        op
    }

    /// fdatasync (`data_only`) or fsync of `fd`.
    pub fn fsync(&mut self, fd: RawFd, data_only: bool, tag: u64) -> OpId {
        let op = self.slot(tag, Owned::Nothing);
        let mut fsync = opcode::Fsync::new(Fd(fd));
        if data_only {
            fsync = fsync.flags(io_uring::types::FsyncFlags::DATASYNC);
        }
        // SAFETY: the entry carries no pointer.
        unsafe { self.push(fsync.build(), op) };
        op
    }

    /// ftruncate of `fd` to `len`.
    pub fn truncate(&mut self, fd: RawFd, len: u64, tag: u64) -> OpId {
        let op = self.slot(tag, Owned::Nothing);
        // SAFETY: the entry carries no pointer.
        unsafe { self.push(opcode::Ftruncate::new(Fd(fd), len).build(), op) };
        op
    }

    /// Reads the 8-byte counter of an eventfd (a wake-up).
    pub fn read_eventfd(&mut self, fd: RawFd, tag: u64) -> OpId {
        let mut word = Box::new(0u64);
        let ptr: *mut u64 = &mut *word;
        let op = self.slot(tag, Owned::Word(word));
        let entry = opcode::Read::new(Fd(fd), ptr as *mut u8, 8).build();
        // SAFETY: the word is boxed and owned by the slot until the completion.
        unsafe { self.push(entry, op) };
        op
    }

    /// Asks the kernel to cancel `target` (its completion then comes with ECANCELED, or it
    /// completes normally if it was done already). The cancel itself completes with `tag`.
    pub fn cancel(&mut self, target: OpId, tag: u64) -> OpId {
        let op = self.slot(tag, Owned::Nothing);
        let entry = opcode::AsyncCancel::new(target.user_data()).build();
        // SAFETY: the entry carries no pointer.
        unsafe { self.push(entry, op) };
        op
    }

    /// An operation that does nothing and completes at once: a result computed without
    /// I/O reaches its caller through the ring like every other.
    pub fn nop(&mut self, tag: u64) -> OpId {
        let op = self.slot(tag, Owned::Nothing);
        // SAFETY: the entry carries no pointer.
        unsafe { self.push(opcode::Nop::new().build(), op) };
        op
    }

    /// Asks the kernel to cancel every operation on `fd` (a socket being shut down).
    pub fn cancel_fd(&mut self, fd: RawFd, tag: u64) -> OpId {
        let op = self.slot(tag, Owned::Nothing);
        let entry =
            opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::fd(Fd(fd)).all()).build();
        // SAFETY: the entry carries no pointer.
        unsafe { self.push(entry, op) };
        op
    }

    /// Submits what is queued and waits for at least one completion, at most `timeout`
    /// (`None`: no limit; zero: do not wait). One `io_uring_enter`.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            Some(t) if t.is_zero() => self.uring.submitter().submit_and_wait(0),
            Some(t) => {
                let ts = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
            None => self.uring.submitter().submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // Timed out, interrupted by a signal, or completions to reap first.
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    /// Takes every completion waiting, in order, into `out`.
    pub fn complete(&mut self, out: &mut Vec<Done>) {
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in &mut cq {
            let (user_data, flags) = (cqe.user_data(), cqe.flags());
            if user_data == WAKE_POSTED || user_data == WAKE_SENT {
                out.push(Done {
                    op: OpId::from_user_data(user_data),
                    tag: if user_data == WAKE_POSTED {
                        TAG_WOKEN
                    } else {
                        TAG_WAKE_FAILED
                    },
                    result: cqe.result(),
                    flags,
                    owned: Owned::Nothing,
                });
                continue;
            }
            let op = OpId::from_user_data(user_data);
            let slot = &mut self.slots[op.index()];
            assert_eq!(
                slot.generation,
                op.generation(),
                "a completion names a live operation"
            );
            let more = cqueue::more(flags);
            let (tag, owned) = if more {
                let (tag, _) = slot
                    .busy
                    .as_ref()
                    .expect("a completion names a live operation");
                (*tag, Owned::Nothing)
            } else {
                let busy = slot
                    .busy
                    .take()
                    .expect("a completion names a live operation");
                self.free.push(op.index() as u32);
                self.in_flight -= 1;
                busy
            };
            if let Some(bid) = cqueue::buffer_select(flags) {
                let lent = &mut self.bufs.lent[usize::from(bid)];
                assert!(!*lent, "the kernel lent buffer {bid} twice");
                *lent = true;
            }
            out.push(Done {
                op,
                tag,
                result: cqe.result(),
                flags,
                owned,
            });
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            let cancel_all = opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any())
                .build()
                .user_data(TEARDOWN);
            // SAFETY: the entry carries no pointer.
            let _ = unsafe { self.uring.submission().push(&cancel_all) };
            let started = std::time::Instant::now();
            let mut done = Vec::new();
            while self.in_flight > 0 && started.elapsed() < TEARDOWN_WAIT {
                let _ = self.submit_and_wait(Some(Duration::from_millis(50)));
                let mut cq = self.uring.completion();
                cq.sync();
                for cqe in &mut cq {
                    if [TEARDOWN, WAKE_POSTED, WAKE_SENT].contains(&cqe.user_data()) {
                        continue;
                    }
                    let op = OpId::from_user_data(cqe.user_data());
                    if !cqueue::more(cqe.flags()) {
                        if let Some(busy) = self.slots[op.index()].busy.take() {
                            self.in_flight -= 1;
                            done.push(busy);
                        }
                    }
                }
            }
        }
        if self.in_flight > 0 {
            // The kernel may still use this memory: leak it rather than free it.
            for slot in &mut self.slots {
                if let Some(busy) = slot.busy.take() {
                    std::mem::forget(busy);
                }
            }
            let bufs = std::mem::replace(
                &mut self.bufs,
                BufRing {
                    entries: AlignedBuf::zeroed(0, 1),
                    memory: AlignedBuf::zeroed(0, 1),
                    tail: 0,
                    lent: Vec::new(),
                },
            );
            std::mem::forget(bufs);
        } else {
            let _ = self.uring.submitter().unregister_buf_ring(RECV_GROUP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn wait_for(ring: &mut Ring, n: usize) -> Vec<Done> {
        let mut out = Vec::new();
        let started = std::time::Instant::now();
        while out.len() < n {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "completions never came"
            );
            ring.submit_and_wait(Some(Duration::from_millis(100)))
                .unwrap();
            ring.complete(&mut out);
        }
        out
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn a_send_keeps_its_chunks_until_the_completion_and_gives_them_back() {
        let mut ring = Ring::new().unwrap();
        let (a, mut b) = pair();
        let chunks = vec![Bytes::from_static(b"head"), Bytes::from(vec![7u8; 1000])];
        let op = ring.send(a.as_raw_fd(), chunks, 42);
        assert_eq!(ring.in_flight(), 1);
        let done = wait_for(&mut ring, 1);
        assert_eq!((done[0].op, done[0].tag, done[0].result), (op, 42, 1004));
        let Owned::Send(bufs) = std::mem::replace(&mut { done }[0].owned, Owned::Nothing) else {
            panic!("a send gives back its chunks");
        };
        let chunks = bufs.into_chunks();
        assert_eq!(chunks[0], Bytes::from_static(b"head"));
        assert_eq!(ring.in_flight(), 0);
        let mut got = vec![0u8; 1004];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|&x| x == 7));
    }

    #[test]
    fn a_multishot_receive_fills_provided_buffers_that_are_recycled() {
        let mut ring = Ring::new().unwrap();
        let (mut a, b) = pair();
        let op = ring.recv_multi(b.as_raw_fd(), 7);
        let mut total = Vec::new();
        // More rounds than there are buffers: each is recycled after its bytes are taken.
        for round in 0..(usize::from(RECV_BUFFERS) * 2) {
            a.write_all(&[round as u8; 10]).unwrap();
            let mut got = 0;
            while got < 10 {
                for d in wait_for(&mut ring, 1) {
                    assert_eq!((d.op, d.tag), (op, 7));
                    assert!(d.is_more(), "the receive stays armed");
                    let bid = d.buffer().expect("a receive names its buffer");
                    total.extend_from_slice(ring.received(bid, d.result as usize));
                    got += d.result as usize;
                    ring.recycle(bid);
                }
            }
        }
        assert_eq!(total.len(), usize::from(RECV_BUFFERS) * 20);
        drop(a);
        let end = wait_for(&mut ring, 1);
        assert_eq!(end[0].result, 0, "EOF ends the receive");
        assert!(!end[0].is_more());
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn receives_beyond_the_buffer_ring_end_in_enobufs_and_lose_nothing_when_armed_again() {
        let mut ring = Ring::new().unwrap();
        let sockets = usize::from(RECV_BUFFERS) + 44;
        let pairs: Vec<(TcpStream, TcpStream)> = (0..sockets).map(|_| pair()).collect();
        for (i, (_, b)) in pairs.iter().enumerate() {
            ring.recv_multi(b.as_raw_fd(), i as u64);
        }
        ring.submit_and_wait(Some(Duration::ZERO)).unwrap();
        for (a, _) in &pairs {
            (&*a).write_all(b"x").unwrap();
        }
        // Nothing is recycled: the ring runs dry after RECV_BUFFERS receives.
        let mut filled = Vec::new();
        let mut starved = Vec::new();
        while filled.len() + starved.len() < sockets {
            for d in wait_for(&mut ring, 1) {
                if d.result == -libc::ENOBUFS {
                    assert!(!d.is_more(), "ENOBUFS ends the receive");
                    starved.push(d.tag);
                } else {
                    assert_eq!(d.result, 1);
                    filled.push(d.buffer().unwrap());
                }
            }
        }
        assert_eq!(filled.len(), usize::from(RECV_BUFFERS));
        assert_eq!(starved.len(), 44);
        for bid in filled {
            ring.recycle(bid);
        }
        // Armed again, each starved receive finds its byte still in its socket.
        for &tag in &starved {
            ring.recv_multi(pairs[tag as usize].1.as_raw_fd(), tag);
        }
        let mut got = 0;
        while got < starved.len() {
            for d in wait_for(&mut ring, 1) {
                assert_eq!(d.result, 1, "the byte waited in the socket");
                ring.recycle(d.buffer().unwrap());
                got += 1;
            }
        }
    }

    #[test]
    #[should_panic(expected = "recycled twice")]
    fn a_buffer_cannot_be_recycled_twice() {
        let mut ring = Ring::new().unwrap();
        let (mut a, b) = pair();
        ring.recv_multi(b.as_raw_fd(), 1);
        a.write_all(b"x").unwrap();
        let d = wait_for(&mut ring, 1);
        let bid = d[0].buffer().unwrap();
        ring.recycle(bid);
        ring.recycle(bid);
    }

    #[test]
    fn a_reused_slot_gets_a_new_generation() {
        let mut ring = Ring::new().unwrap();
        let (a, _b) = pair();
        let first = ring.send(a.as_raw_fd(), vec![Bytes::from_static(b"1")], 1);
        wait_for(&mut ring, 1);
        let second = ring.send(a.as_raw_fd(), vec![Bytes::from_static(b"2")], 2);
        assert_eq!(first.index(), second.index(), "the slot is reused");
        assert_ne!(first, second, "under another id");
    }

    #[test]
    fn file_writes_reads_and_syncs_go_through_aligned_buffers() {
        let dir = std::env::temp_dir().join(format!("imgate-uring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("f"))
            .unwrap();
        let mut ring = Ring::new().unwrap();
        let mut buf = AlignedBuf::zeroed(4096, 4096);
        buf.as_mut_slice()[..5].copy_from_slice(b"hello");
        ring.write_at(file.as_raw_fd(), buf, 4096, 1);
        assert_eq!(wait_for(&mut ring, 1)[0].result, 4096);
        ring.fsync(file.as_raw_fd(), true, 2);
        assert_eq!(wait_for(&mut ring, 1)[0].result, 0);
        ring.read_at(file.as_raw_fd(), AlignedBuf::zeroed(8192, 4096), 4096, 3);
        let mut d = wait_for(&mut ring, 1);
        assert_eq!(d[0].result, 4096, "a read stops at the end of the file");
        let Owned::Buf(buf) = std::mem::replace(&mut d[0].owned, Owned::Nothing) else {
            panic!("a read gives back its buffer");
        };
        assert_eq!(&buf.into_bytes(5)[..], b"hello");
        ring.truncate(file.as_raw_fd(), 10, 4);
        assert_eq!(wait_for(&mut ring, 1)[0].result, 0);
        assert_eq!(file.metadata().unwrap().len(), 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cancelled_receive_completes_and_gives_its_slot_back() {
        let mut ring = Ring::new().unwrap();
        let (_a, b) = pair();
        let recv = ring.recv_multi(b.as_raw_fd(), 1);
        ring.cancel(recv, 2);
        let done = wait_for(&mut ring, 2);
        let r = done.iter().find(|d| d.tag == 1).unwrap();
        assert_eq!(r.result, -libc::ECANCELED);
        assert!(!r.is_more());
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn dropping_a_ring_with_operations_in_flight_waits_for_them() {
        let mut ring = Ring::new().unwrap();
        let (_a, b) = pair();
        ring.recv_multi(b.as_raw_fd(), 1);
        ring.submit_and_wait(Some(Duration::ZERO)).unwrap();
        drop(ring); // cancels the receive; must not hang or free buffers under the kernel
    }

    #[test]
    fn a_wake_up_posted_by_another_ring_ends_its_wait() {
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let mut ring = Ring::new().unwrap();
            tx.send(ring.fd()).unwrap();
            // Nothing else is in flight: only the posted wake-up can end this wait early.
            let started = std::time::Instant::now();
            let mut out = Vec::new();
            while out.is_empty() {
                assert!(started.elapsed() < Duration::from_secs(10), "never woken");
                ring.submit_and_wait(Some(Duration::from_secs(10))).unwrap();
                ring.complete(&mut out);
            }
            assert_eq!((out[0].tag, out[0].result), (TAG_WOKEN, 0));
            assert_eq!(ring.in_flight(), 0, "a wake-up holds no slot");
        });
        let target = rx.recv().unwrap();
        let mut ring = Ring::new().unwrap();
        ring.post_wake(target);
        ring.submit_and_wait(Some(Duration::ZERO)).unwrap();
        waiter.join().unwrap();
        let mut out = Vec::new();
        ring.complete(&mut out);
        assert!(
            out.is_empty(),
            "a wake-up that succeeded posts nothing to its sender"
        );
    }

    #[test]
    fn a_wake_up_that_cannot_be_posted_comes_back_as_failed() {
        let mut ring = Ring::new().unwrap();
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let not_a_ring = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        ring.post_wake(not_a_ring);
        let d = wait_for(&mut ring, 1);
        assert_eq!(d[0].tag, TAG_WAKE_FAILED);
        assert!(d[0].result < 0);
        // SAFETY: closes the descriptor made above, once.
        unsafe { libc::close(not_a_ring) };
    }

    #[test]
    fn an_eventfd_read_completes_when_it_is_written() {
        let mut ring = Ring::new().unwrap();
        // SAFETY: eventfd(2) returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(efd >= 0);
        ring.read_eventfd(efd, 9);
        ring.submit_and_wait(Some(Duration::ZERO)).unwrap();
        let mut out = Vec::new();
        ring.complete(&mut out);
        assert!(out.is_empty(), "nothing was written yet");
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to the eventfd.
        assert_eq!(unsafe { libc::write(efd, one.as_ptr().cast(), 8) }, 8);
        let d = wait_for(&mut ring, 1);
        assert_eq!((d[0].tag, d[0].result), (9, 8));
        // SAFETY: closes the descriptor made above, once.
        unsafe { libc::close(efd) };
    }
}
