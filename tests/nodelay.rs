//! Every shard connection has `TCP_NODELAY` set.
//!
//! Without it, Nagle's algorithm holds back small protocol writes until the
//! server's delayed ACK arrives, and shard operations stall 40-200 ms now and
//! then (sqlx 0.9.0 stopped setting it; 0.9.1 sets it again, upstream #4336,
//! and this test is what says the release really does). This
//! test opens shard connections the way the service does, over TCP, then reads
//! the option back from each of the process's sockets connected to the shard.
//!
//! Its own test binary: it inspects every socket of the process.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;

use chatshard::app::build_shards;
use chatshard::localdb::cluster::Location;
use common::servers;
use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

/// `TCP_NODELAY` of every socket of this process whose peer is `port` on
/// loopback.
fn nodelay_of_sockets_to(port: u16) -> Vec<bool> {
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("pidfd_open");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let entry = entry.expect("fd entry");
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // A duplicate of our own descriptor, owned, so no unsafe borrow.
        let Ok(dup) = pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let peer = rustix::net::getpeername(&dup)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        if peer.is_some_and(|p| p.port() == port && p.ip().is_loopback()) {
            found.push(rustix::net::sockopt::tcp_nodelay(&dup).expect("getsockopt TCP_NODELAY"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_connection_has_tcp_nodelay() {
    let cluster = servers::cluster(1, Location::Temp).await;
    let mut settings = cluster.settings().expect("settings");
    settings.pool.max_concurrent = 4;
    let shards = build_shards(&settings).expect("shards");
    let shard = &shards.all()[0];
    // Several operations at once, so the pool opens several connections.
    let pings = (0..4).map(|_| shard.ping());
    for ping in futures::future::join_all(pings).await {
        ping.expect("ping");
    }
    let port = cluster.server(0).port();
    let sockets = nodelay_of_sockets_to(port);
    assert!(
        !sockets.is_empty(),
        "no socket of this process is connected to the shard on port {port}"
    );
    assert!(
        sockets.iter().all(|&on| on),
        "{} of {} shard connections have TCP_NODELAY off",
        sockets.iter().filter(|&&on| !on).count(),
        sockets.len()
    );
    eprintln!("{} shard connections, all with TCP_NODELAY", sockets.len());
}
