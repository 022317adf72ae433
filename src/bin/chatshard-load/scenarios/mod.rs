//! The scenarios, one file each, named after the scenario (`move` is
//! `move_chat`). Each is bounded by a duration (and the clients it runs),
//! sends traffic only to the addresses it is given, records into a
//! [`Recorder`](crate::report::Recorder), and returns its own figures as
//! JSON.

mod autoinc;
mod direct_sql;
pub(crate) mod fanout;
mod fetch_spike;
mod isolation;
mod join_spike;
mod lifecycle;
mod mixed;
mod move_buckets;
mod move_chat;
mod quiet;
mod refusals;
mod replicas;
mod tls_cost;

pub use autoinc::autoinc;
pub use direct_sql::direct_sql;
pub use fanout::{Fanout, StreamProtocol, fanout};
pub use fetch_spike::fetch_spike;
pub use isolation::isolation;
pub use join_spike::join_spike;
pub use lifecycle::lifecycle;
pub use mixed::mixed;
pub use move_buckets::move_buckets;
pub use move_chat::{MoveLoad, move_chat};
pub use quiet::quiet;
pub use refusals::refusals;
pub use replicas::{Mode as ReplicasMode, Options as ReplicasOptions, replicas};
pub use tls_cost::tls_cost;

/// The processes a scenario reads from `/proc` (same machine), when given:
/// the service's and its Redis's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pids {
    pub service: Option<u32>,
    pub redis: Option<u32>,
}
