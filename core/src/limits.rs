//! Every bound in imgate, in one place, with the reason for its default.
//!
//! Over a bound means backpressure or rejection, never growth. The values are fields of
//! [`Limits`] so that a deployment (and a test) can set them; the defaults are sized for
//! one shard of a gateway on a small machine holding tens of thousands of connections.

use std::time::Duration;

/// The bounds one shard enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (header + meta + payload) accepted from a client. 256 KiB: IM
    /// messages are small (media goes to object storage), and this caps the receive buffer
    /// a connection can make the gateway hold.
    pub frame_bytes_max: u32,
    /// Largest message payload. 64 KiB: a long text with rich formatting fits; larger
    /// bodies belong in object storage. Sends over it are Nacked `PayloadTooLarge`.
    pub payload_bytes_max: u32,
    /// Largest token in an Auth frame. 4 KiB: generous for a JWT with a few claims.
    pub token_bytes_max: usize,
    /// Largest frame accepted before the connection has authenticated, when only an Auth
    /// is valid. 8 KiB: the largest token and the frame around it, with room. An
    /// unauthenticated peer can make the gateway hold no more than this.
    pub auth_frame_bytes_max: u32,
    /// Outbound bytes queued for a connection (not yet written to its socket) above which
    /// it is degraded: signals are dropped and pushes become Notify. 256 KiB is about a
    /// thousand 200-byte deliveries, seconds of traffic for a busy group member.
    pub outbound_soft_bytes: usize,
    /// Outbound bytes at which the connection is closed as a slow consumer at once.
    /// 1 MiB: four times the soft budget, room for replies to its own Pulls.
    pub outbound_hard_bytes: usize,
    /// How long a connection may stay over the soft budget before it is closed as a slow
    /// consumer. 10 s: a phone switching networks recovers within this.
    pub slow_consumer_grace: Duration,
    /// Sends a connection may have awaiting their Ack. 256: pipelining beyond this buys
    /// no throughput (group commit already batches) and bounds per-connection state.
    pub inflight_sends_max: usize,
    /// (sender, client_msg_id) pairs remembered per shard for dedupe. 262,144 entries
    /// (about 25 MiB) cover several minutes of retries at thousands of messages per second.
    pub dedupe_window_entries: usize,
    /// Messages of each conversation kept in memory to serve Sync and Pull. 256 covers
    /// the typical reconnect gap of a chat.
    pub hot_messages_per_conv: usize,
    /// Payload bytes of the hot tier per shard. 64 MiB; the oldest messages go first.
    pub hot_bytes_per_shard: usize,
    /// Messages of the hot tier per shard. 262,144: with the byte budget, this bounds the
    /// per-message bookkeeping of many tiny messages too.
    pub hot_messages_per_shard: usize,
    /// Conversations a shard keeps in memory (seq counter, members, hot tier). Beyond,
    /// the least recently used direct conversation with nothing in flight leaves memory,
    /// and comes back from the log when touched. 100,000: about 30 MB of conversation
    /// state, whatever number of conversations clients write to.
    pub conversations_max: usize,
    /// Conversations being loaded back from the log at once; a Send or replay for another
    /// one is refused `RateLimited` beyond. 1024.
    pub loads_inflight_max: usize,
    /// Requests for one conversation held while it loads; beyond, refused `RateLimited`.
    /// 256, the in-flight Sends of one connection.
    pub load_waiters_max: usize,
    /// Members of one group. 100,000: a large chat room; above this, use a broadcast channel.
    pub group_members_max: usize,
    /// Member count above which a group switches to read diffusion (Notify + Pull). 500,
    /// as in the large-group designs of production IM systems: pushing to more members per
    /// message costs more than letting them pull.
    pub read_diffusion_threshold: usize,
    /// Messages sent for one Pull at most. 200: one screen of history several times over.
    pub pull_limit_max: u32,
    /// Payload bytes of one page of a Sync, Pull or catch-up reply (at least one message
    /// always fits). Replies are produced a page at a time as the connection drains, so a
    /// client that reads can catch up any history whatever the message sizes. 128 KiB.
    pub replay_page_bytes: usize,
    /// A connection's next reply page is asked for only once its outbound backlog is at
    /// most this. 128 KiB, half the soft budget: a page on top of it stays under the soft
    /// budget, so replies never make a reading client look slow.
    pub replay_resume_bytes: usize,
    /// Pulls one connection may have waiting to be served; beyond, a Pull gets Error
    /// `RateLimited`. 16: a client pages one conversation at a time, a few at most.
    pub pulls_queued_max: usize,
    /// Frames per second one connection may send, on average (token bucket). 1,000: far
    /// above a person typing, enough for a bot; one client cannot monopolise a shard.
    pub frames_per_sec: u32,
    /// Frames one connection may send in a burst above the rate. 2,000: a reconnect's
    /// outbox re-send and Sync fit.
    pub frames_burst: u32,
    /// Bytes per second one connection may send, on average. 4 MiB/s.
    pub bytes_per_sec: u32,
    /// Bytes one connection may send in a burst above the rate. 16 MiB: a full outbox of
    /// large messages re-sent after a reconnect fits.
    pub bytes_burst: u32,
    /// Devices of one user logged in at once; a further login is closed with
    /// `TooManyDevices`. 16: phones, tablets, desktops and browsers of one person.
    pub devices_per_user_max: usize,
    /// How long before its token expires a session gets GoAway `TokenExpired`, so that
    /// the client re-authenticates on a new connection before it is closed at expiry.
    /// 60 s (at most half the session's remaining life).
    pub token_renew_margin: Duration,
    /// Messages replayed per conversation for one Sync before the rest is left to Pull
    /// (listed in SyncDone.more). 100: a reconnect should not flood a phone.
    pub sync_batch_per_conv: u32,
    /// Cursors in one Sync. 4096 conversations per device.
    pub sync_cursors_max: usize,
    /// Push cursors one connection keeps (one per conversation pushed to it or named in
    /// its Sync); past this, settled ones are dropped. At least `sync_cursors_max`.
    /// 8192: under 1 MiB a connection.
    pub cursors_per_conn_max: usize,
    /// Time from connect to a valid Auth. 10 s: a slow mobile TLS handshake and login fit.
    pub auth_timeout: Duration,
    /// The interval at which a client must send something (Ping when idle). A peer is
    /// declared dead after two intervals of silence. 30 s: mobile NAT timeouts.
    pub heartbeat_interval: Duration,
    /// Clock skew allowed when checking a token's `exp`. 30 s.
    pub token_leeway: Duration,
    /// Ephemeral signals waiting to be written to one connection; latest wins per
    /// (sender, conversation), and beyond this many the newest are dropped. 64.
    pub pending_signals_max: usize,
    /// Largest payload of an ephemeral signal. 1 KiB: typing and presence carry little.
    pub signal_bytes_max: usize,
    /// Log reads (Sync, Pull or catch-up of history older than the hot tier) in flight per
    /// shard; beyond, replays wait for a read in a FIFO queue at the owner (bounded by the
    /// gateway's connections, each of which has at most one replay page in flight). 1024:
    /// the reads a disk serves at once with room; more only lengthen its queue.
    pub fetches_inflight_max: usize,
    /// Connections one shard holds; beyond, new ones get `TooManyConnections`. 100,000:
    /// above what one core serves well; the process-wide file limit usually binds first.
    pub connections_max: usize,
    /// Conversations in one user's inbox. A direct conversation joins with its first
    /// message, so anyone can add to someone's inbox; past this the first message of a
    /// new conversation with the user is refused (`InboxFull`). 10,000.
    pub inbox_entries_per_user_max: usize,
    /// Entries of one InboxPage. 100.
    pub inbox_page_max: u32,
    /// Inbox listings a home shard gathers at once (each waits for its conversations'
    /// owners); beyond, a ListInbox gets `RateLimited`. 1024.
    pub inbox_listings_max: usize,
    /// Messages a device new to a conversation gets first: the conversation's latest page
    /// (older history is Pulled backwards on demand). 50.
    pub newest_page: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: 256 * 1024,
            payload_bytes_max: 64 * 1024,
            token_bytes_max: 4096,
            auth_frame_bytes_max: 8 * 1024,
            outbound_soft_bytes: 256 * 1024,
            outbound_hard_bytes: 1024 * 1024,
            slow_consumer_grace: Duration::from_secs(10),
            inflight_sends_max: 256,
            dedupe_window_entries: 256 * 1024,
            hot_messages_per_conv: 256,
            hot_bytes_per_shard: 64 * 1024 * 1024,
            hot_messages_per_shard: 256 * 1024,
            conversations_max: 100_000,
            loads_inflight_max: 1024,
            load_waiters_max: 256,
            group_members_max: 100_000,
            read_diffusion_threshold: 500,
            pull_limit_max: 200,
            sync_batch_per_conv: 100,
            replay_page_bytes: 128 * 1024,
            replay_resume_bytes: 128 * 1024,
            pulls_queued_max: 16,
            frames_per_sec: 1000,
            frames_burst: 2000,
            bytes_per_sec: 4 * 1024 * 1024,
            bytes_burst: 16 * 1024 * 1024,
            devices_per_user_max: 16,
            token_renew_margin: Duration::from_secs(60),
            sync_cursors_max: 4096,
            cursors_per_conn_max: 8192,
            auth_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            token_leeway: Duration::from_secs(30),
            pending_signals_max: 64,
            signal_bytes_max: 1024,
            fetches_inflight_max: 1024,
            connections_max: 100_000,
            inbox_entries_per_user_max: 10_000,
            inbox_page_max: 100,
            inbox_listings_max: 1024,
            newest_page: 50,
        }
    }
}

impl Limits {
    /// Checks that the bounds are consistent with each other.
    pub fn validate(&self) -> Result<(), String> {
        let frame_overhead = 512; // header + the largest Send meta, with room to spare
        if (self.payload_bytes_max as usize + frame_overhead) > self.frame_bytes_max as usize {
            return Err(format!(
                "payload_bytes_max {} does not fit in frame_bytes_max {}",
                self.payload_bytes_max, self.frame_bytes_max
            ));
        }
        if self.payload_bytes_max as usize > crate::log::PAYLOAD_BYTES_PER_RECORD_MAX {
            return Err("payload_bytes_max does not fit in one log record".into());
        }
        if self.group_members_max > crate::log::GROUP_MEMBERS_PER_RECORD_MAX {
            return Err("group_members_max does not fit in one log record".into());
        }
        if self.outbound_soft_bytes >= self.outbound_hard_bytes {
            return Err("outbound_soft_bytes must be below outbound_hard_bytes".into());
        }
        if self.inflight_sends_max == 0 || self.dedupe_window_entries == 0 {
            return Err("inflight_sends_max and dedupe_window_entries must be positive".into());
        }
        if self.hot_messages_per_conv == 0 || self.pull_limit_max == 0 {
            return Err("hot_messages_per_conv and pull_limit_max must be positive".into());
        }
        if self.sync_batch_per_conv == 0 {
            return Err("sync_batch_per_conv must be positive".into());
        }
        if self.cursors_per_conn_max == 0 {
            return Err("cursors_per_conn_max must be positive".into());
        }
        if (self.auth_frame_bytes_max as usize) < self.token_bytes_max + frame_overhead
            || self.auth_frame_bytes_max > self.frame_bytes_max
        {
            return Err(format!(
                "auth_frame_bytes_max {} must hold a token of token_bytes_max {} and \
                 not exceed frame_bytes_max",
                self.auth_frame_bytes_max, self.token_bytes_max
            ));
        }
        // A reply page is asked for at `replay_resume_bytes` of backlog and may carry a
        // page plus one message over it: that must stay below the hard budget, or a
        // client reading at full speed could be closed for its own Sync.
        let page_peak = self.replay_resume_bytes
            + self.replay_page_bytes
            + self.payload_bytes_max as usize
            + frame_overhead;
        if self.replay_page_bytes == 0 || page_peak >= self.outbound_hard_bytes {
            return Err(format!(
                "replay_resume_bytes + replay_page_bytes + payload_bytes_max ({page_peak}) \
                 must be below outbound_hard_bytes {}",
                self.outbound_hard_bytes
            ));
        }
        if self.frames_per_sec == 0 || self.frames_burst == 0 || self.bytes_per_sec == 0 {
            return Err("frames_per_sec, frames_burst and bytes_per_sec must be positive".into());
        }
        if (self.bytes_burst as usize) < self.frame_bytes_max as usize {
            return Err("bytes_burst must hold at least one frame of frame_bytes_max".into());
        }
        if self.hot_messages_per_shard == 0
            || self.conversations_max == 0
            || self.loads_inflight_max == 0
            || self.load_waiters_max == 0
        {
            return Err(
                "hot_messages_per_shard, conversations_max, loads_inflight_max and \
                        load_waiters_max must be positive"
                    .into(),
            );
        }
        if self.devices_per_user_max == 0 || self.pulls_queued_max == 0 {
            return Err("devices_per_user_max and pulls_queued_max must be positive".into());
        }
        if self.inbox_entries_per_user_max == 0
            || self.inbox_page_max == 0
            || self.inbox_listings_max == 0
            || self.newest_page == 0
        {
            return Err(
                "inbox_entries_per_user_max, inbox_page_max, inbox_listings_max and \
                 newest_page must be positive"
                    .into(),
            );
        }
        if self.fetches_inflight_max == 0 {
            // History older than the hot tier would wait for a read forever.
            return Err("fetches_inflight_max must be positive".into());
        }
        Ok(())
    }
}
