//! What a use case can fail with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::plan::Rejection;
use crate::shard::ShardError;

/// Why a use case failed. Cloneable: one batch failure answers many callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("chat not found")]
    ChatNotFound,
    #[error("member not found")]
    MemberNotFound,
    #[error("chat is full ({max_members} members)")]
    ChatFull { max_members: u32 },
    #[error("sender is not a member of the chat")]
    NotAMember,
    #[error("clientMessageId was already used for a different text")]
    IdempotencyKeyReused,
    /// The chat's write queue on this instance is full (group commit).
    #[error("too many writes are queued for this chat")]
    ChatQueueFull,
    /// The chat holds its whole share of its shard (the per-chat share).
    #[error("the chat holds its whole share of shard {shard}")]
    ChatBusy { shard: String },
    /// Writers of the chat waited too long for each other's row locks.
    #[error("writes to this chat contend for its row locks on shard {shard}")]
    ChatContended { shard: String },
    #[error("too many joins to this chat")]
    JoinThrottled { retry_after_secs: u64 },
    #[error("this chat is hot: event fetches are throttled")]
    FetchThrottled { retry_after_secs: u64 },
    #[error("shard {shard} is busy")]
    ShardBusy { shard: String },
    #[error("shard {shard} did not answer in time")]
    ShardTimeout { shard: String },
    #[error("shard {shard} is unavailable")]
    ShardUnavailable {
        shard: String,
        retry_after_secs: u64,
    },
    #[error("shard {shard} is read-only")]
    ShardReadOnly { shard: String },
    /// Several members of the chat's shard are writable: writes wait until
    /// an operator demotes one (docs/replicas.md).
    #[error("shard {shard} has several writable members")]
    ShardSplitBrain { shard: String },
    /// `cause` says why, in words for the problem's detail.
    #[error("the outcome of the write on shard {shard} is unknown: {cause}")]
    OutcomeUnknown { shard: String, cause: String },
    /// A move of the chat is switching it to another shard: writes wait.
    #[error("the chat is moving to another shard")]
    ChatMoving { retry_after_secs: u64 },
    /// The events after the revision asked for were purged: the reader
    /// full-syncs (the snapshot) and goes on from its revision.
    #[error("the events after this revision were purged (the first stored is {first_revision})")]
    RevisionPurged { first_revision: u64 },
    /// A move names a shard this instance does not have.
    #[error("no shard is named {shard}")]
    UnknownShard { shard: String },
    /// A move that cannot start (the chat is there already, or moving).
    #[error("{reason}")]
    MoveRefused { reason: String },
    /// A switchover or failover cannot run (or failed and was rolled back).
    #[error("the reparent cannot run: {reason}")]
    ReparentRefused { reason: String },
    /// No shard records a move with this id.
    #[error("no move has the id {id:?}")]
    MoveNotFound { id: String },
    #[error("internal error")]
    Internal(#[source] Fault),
}

/// An internal error with its whole cause chain, shared by every caller it
/// answers (a failed batch answers all of its writes) and reported once.
#[derive(Debug, Clone)]
pub struct Fault(Arc<FaultInner>);

#[derive(Debug)]
struct FaultInner {
    error: Box<dyn std::error::Error + Send + Sync>,
    reported: AtomicBool,
}

impl Fault {
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(Arc::new(FaultInner {
            error: error.into(),
            reported: AtomicBool::new(false),
        }))
    }

    /// True for the first caller only: whoever logs the fault asks this
    /// first, so a fault shared by a whole batch is logged once.
    pub fn first_report(&self) -> bool {
        !self.0.reported.swap(true, Ordering::AcqRel)
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.error.fmt(f)
    }
}

impl std::error::Error for Fault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.error.source()
    }
}

impl ServiceError {
    pub(crate) fn internal(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(Fault::new(error))
    }
}

impl From<ShardError> for ServiceError {
    fn from(e: ShardError) -> Self {
        let shard = e.shard().to_owned();
        match e {
            ShardError::Open {
                retry_after_secs, ..
            } => Self::ShardUnavailable {
                shard,
                retry_after_secs,
            },
            ShardError::ChatBusy { .. } => Self::ChatBusy { shard },
            ShardError::Contended { .. } => Self::ChatContended { shard },
            ShardError::Busy { .. } => Self::ShardBusy { shard },
            ShardError::Timeout { .. } => Self::ShardTimeout { shard },
            ShardError::Unavailable { .. } => Self::ShardUnavailable {
                shard,
                retry_after_secs: 1,
            },
            ShardError::ReadOnly { .. } => Self::ShardReadOnly { shard },
            ShardError::NoWriter { .. } => Self::ShardUnavailable {
                shard,
                retry_after_secs: 1,
            },
            ShardError::SplitBrain { .. } => Self::ShardSplitBrain { shard },
            ShardError::OutcomeUnknown { cause, .. } => Self::OutcomeUnknown {
                shard,
                cause: cause.to_string(),
            },
            e @ (ShardError::Database { .. } | ShardError::BadData { .. }) => Self::internal(e),
        }
    }
}

impl From<Rejection> for ServiceError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::ChatNotFound => Self::ChatNotFound,
            Rejection::MemberNotFound => Self::MemberNotFound,
            Rejection::ChatFull { max_members } => Self::ChatFull { max_members },
            Rejection::NotAMember => Self::NotAMember,
            Rejection::IdempotencyKeyReused => Self::IdempotencyKeyReused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_keeps_its_chain_and_is_reported_once() {
        let shard_error = ShardError::Database {
            shard: "s".into(),
            source: sqlx::Error::RowNotFound,
        };
        let e = ServiceError::from(shard_error);
        let chain = crate::error::chain(&e);
        assert!(
            chain.starts_with("internal error: database error on shard s: "),
            "{chain}"
        );
        let ServiceError::Internal(fault) = e.clone() else {
            panic!("not internal: {e:?}");
        };
        let ServiceError::Internal(copy) = e else {
            panic!("not internal");
        };
        assert!(fault.first_report());
        assert!(!copy.first_report(), "a clone shares the report");
    }
}
