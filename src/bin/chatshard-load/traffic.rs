//! Traffic on a shard's quiet chats while something else happens to the
//! shard (a purge, a move): clients reading and joining, recorded under one
//! kind per phase, to compare the p99 before, during and after.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use serde_json::json;
use tokio::task::JoinHandle;

use crate::client::Target;
use crate::report::Recorder;

/// The kinds [`others`] records under, phase by phase.
const OTHER_KINDS: [&str; 3] = ["other_before", "other_during", "other_after"];

/// [`quiet_traffic`] of `clients` clients on `chats`, the other chats of a
/// move's source, under [`OTHER_KINDS`]; none without chats.
pub fn others(
    target: &Target,
    recorder: &Recorder,
    chats: &[String],
    clients: usize,
    phase: &Arc<AtomicU8>,
) -> Vec<JoinHandle<()>> {
    if chats.is_empty() {
        return Vec::new();
    }
    quiet_traffic(target, recorder, chats, clients, &OTHER_KINDS, phase)
}

/// The p99 of [`others`] before, during and after (0 for a phase without
/// requests), in ms.
pub fn others_p99(recorder: &Recorder) -> [f64; 3] {
    OTHER_KINDS.map(|kind| recorder.quantile_ms(kind, 0.99).unwrap_or(0.0))
}

/// `clients` clients that read member counts of `chats` and join them (3:1),
/// recording as `kinds[k]` while `phase` is k; they stop once it is past the
/// last kind.
pub fn quiet_traffic(
    target: &Target,
    recorder: &Recorder,
    chats: &[String],
    clients: usize,
    kinds: &'static [&'static str],
    phase: &Arc<AtomicU8>,
) -> Vec<JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (target, recorder, chats, phase) = (
                target.clone(),
                recorder.clone(),
                chats.to_vec(),
                phase.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let Some(&kind) = kinds.get(usize::from(phase.load(Ordering::Relaxed))) else {
                        return;
                    };
                    n += 1;
                    let chat = &chats[(c + n as usize) % chats.len()];
                    let started = Instant::now();
                    let r = if n.is_multiple_of(4) {
                        target
                            .http
                            .post(format!("{}/v1/chats/{chat}/members", target.base))
                            .json(&json!({ "userId": format!("c{c}-{n}") }))
                            .send()
                            .await
                    } else {
                        target
                            .http
                            .get(format!("{}/v1/chats/{chat}/member-count", target.base))
                            .send()
                            .await
                    };
                    let took = started.elapsed();
                    match r {
                        Ok(r) => {
                            let ok = r.status().is_success();
                            recorder.record(kind, took, r.status().as_str(), ok);
                        }
                        Err(_) => recorder.record(kind, took, "error", false),
                    }
                }
            })
        })
        .collect()
}
