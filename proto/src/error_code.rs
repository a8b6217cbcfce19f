//! Stable numeric error codes carried by Nack, Error and GoAway frames.
//!
//! The values mirror `enum ErrorCode` in `schema/imgate.fbs`; a test checks every variant
//! against the generated code, so the two cannot drift apart.

use std::fmt;

/// Why a request failed or a connection is being closed. The numeric value is the wire
/// value and never changes meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Never sent; what an unset field reads as.
    Unspecified = 0,
    /// The first two header bytes are not "IG".
    BadMagic = 1,
    /// The header's version is not one this gateway speaks.
    UnsupportedVersion = 2,
    /// The header's kind byte names no frame kind.
    UnknownKind = 3,
    /// The header declares a frame over the configured maximum.
    FrameTooLarge = 4,
    /// The meta failed verification, or a reserved header field is not zero.
    MalformedFrame = 5,
    /// The frame kind is not one this side accepts.
    UnexpectedFrame = 6,
    /// A frame other than Auth arrived before authentication.
    NotAuthenticated = 10,
    /// No valid Auth arrived within the auth deadline.
    AuthTimeout = 11,
    /// The token is malformed, signed with another key or algorithm, or lacks a claim.
    BadToken = 12,
    /// The token's `exp` is in the past, beyond the leeway.
    TokenExpired = 13,
    /// A second Auth on an authenticated connection.
    AlreadyAuthenticated = 14,
    /// The same (user, device) logged in on another connection.
    SessionTakenOver = 15,
    /// No frame arrived within two heartbeat intervals.
    HeartbeatTimeout = 16,
    /// The user has the maximum number of devices logged in.
    TooManyDevices = 17,
    /// The sender is not a member of the conversation.
    NotMember = 20,
    /// The payload is over the message maximum.
    PayloadTooLarge = 21,
    /// The message could not be made durable; it was not stored.
    StorageFailed = 22,
    /// Too many Sends in flight on this connection.
    TooManyInflight = 23,
    /// The request is malformed in a way the verifier cannot see.
    BadRequest = 24,
    /// The requested range is no longer retained.
    HistoryUnavailable = 25,
    /// The client_msg_id was already used by this sender for another conversation.
    ClientMsgIdReused = 26,
    /// The connection is over its message or byte rate; the Send was not stored.
    RateLimited = 27,
    /// A Sync cursor was ahead of the conversation's latest seq.
    CursorAhead = 28,
    /// A member's inbox holds the most conversations it may; the first message of a new
    /// conversation with that user was not stored.
    InboxFull = 29,
    /// The connection could not drain its outbound queue within its budget.
    SlowConsumer = 30,
    /// The gateway is shutting down or draining.
    ShuttingDown = 31,
    /// The gateway holds its maximum number of connections.
    TooManyConnections = 32,
    /// An internal error.
    Internal = 40,
}

impl ErrorCode {
    /// Every code, for exhaustive tests.
    pub const ALL: [ErrorCode; 29] = [
        ErrorCode::Unspecified,
        ErrorCode::BadMagic,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownKind,
        ErrorCode::FrameTooLarge,
        ErrorCode::MalformedFrame,
        ErrorCode::UnexpectedFrame,
        ErrorCode::NotAuthenticated,
        ErrorCode::AuthTimeout,
        ErrorCode::BadToken,
        ErrorCode::TokenExpired,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::SessionTakenOver,
        ErrorCode::HeartbeatTimeout,
        ErrorCode::TooManyDevices,
        ErrorCode::NotMember,
        ErrorCode::PayloadTooLarge,
        ErrorCode::StorageFailed,
        ErrorCode::TooManyInflight,
        ErrorCode::BadRequest,
        ErrorCode::HistoryUnavailable,
        ErrorCode::ClientMsgIdReused,
        ErrorCode::RateLimited,
        ErrorCode::CursorAhead,
        ErrorCode::InboxFull,
        ErrorCode::SlowConsumer,
        ErrorCode::ShuttingDown,
        ErrorCode::TooManyConnections,
        ErrorCode::Internal,
    ];

    /// The wire value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a wire value. A value this build does not know (a newer peer) reads as
    /// `Unspecified` rather than failing the frame, so new codes stay compatible.
    pub fn from_u16(v: u16) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_u16() == v)
            .unwrap_or(ErrorCode::Unspecified)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self, self.as_u16())
    }
}
