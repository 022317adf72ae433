//! The write path, measured side by side in one run:
//!
//! - `spike_400_joins/{group_commit,one_commit_per_join}`: 400 concurrent joins
//!   to one chat against a real local MariaDB shard, with group commit
//!   (`max_batch = 256`) and with one transaction per join (`max_batch = 1`);
//! - `route`: chatId -> shard;
//! - `plan_256_joins`: the in-memory planning of one 256-write batch.
//!
//! Run with `cargo bench --bench write_path`; docs/benchmarks.md has results.

// The tests' one place that starts local servers.
#[path = "../tests/common/servers.rs"]
mod servers;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chatshard::app::{build_shards, service_settings};
use chatshard::config::GroupCommitSettings;
use chatshard::domain::{ChatId, UserId};
use chatshard::live::{Live, LiveConfig};
use chatshard::localdb::cluster::Location;
use chatshard::routing::bucket_of;
use chatshard::service::ChatService;
use chatshard::service::plan::{ChatBefore, WriteOp, plan};
use chatshard::throttle::{SystemClock, Throttle};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const JOINS: usize = 400;

fn spike(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cluster = rt.block_on(servers::cluster(1, Location::Temp));
    let mut settings = cluster.settings().expect("settings");
    settings.pool.max_waiting = JOINS;
    settings.pool.max_wait_ms = 10_000;
    settings.pool.operation_timeout_ms = 30_000;

    let mut group = c.benchmark_group("spike_400_joins");
    group.sample_size(10);
    static CHAT: AtomicU64 = AtomicU64::new(0);
    for (name, max_batch) in [("group_commit", 256), ("one_commit_per_join", 1)] {
        let shards = build_shards(&settings).expect("shards");
        // Join throttling off: this measures the write path itself.
        let mut live = LiveConfig::default();
        live.join_throttle.enabled = false;
        settings.group_commit = GroupCommitSettings {
            max_batch,
            max_pending_per_chat: JOINS * 2,
        };
        settings.defaults.max_members = 100_000;
        let service = Arc::new(ChatService::new(
            shards,
            service_settings(&settings).expect("service settings"),
            Live::new(live),
            Throttle::new(Arc::new(SystemClock::default()), &settings.throttle),
            None,
        ));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&rt).iter(|| {
                let service = service.clone();
                async move {
                    let chat =
                        ChatId::parse(&format!("bench-{}", CHAT.fetch_add(1, Ordering::Relaxed)))
                            .expect("id");
                    service.create_chat(&chat, None).await.expect("create");
                    let joins = (0..JOINS).map(|i| {
                        let (service, chat) = (service.clone(), chat.clone());
                        tokio::spawn(async move {
                            let user = UserId::parse(&format!("u{i}")).expect("id");
                            service.join(&chat, &user).await.expect("join");
                        })
                    });
                    for j in futures::future::join_all(joins).await {
                        j.expect("task");
                    }
                }
            });
        });
    }
    group.finish();
    drop(cluster);
}

fn cpu(c: &mut Criterion) {
    let chat = ChatId::parse("celebrity-chat-0042").expect("id");
    c.bench_function("route", |b| {
        b.iter(|| bucket_of(std::hint::black_box(&chat)))
    });
    let ops: Vec<WriteOp> = (0..256)
        .map(|i| WriteOp::Join {
            user: UserId::parse(&format!("user-{i}")).expect("id"),
        })
        .collect();
    let before = ChatBefore {
        revision: 1000,
        max_members: 100_000,
        member_count: 500,
    };
    let now = chrono::Utc::now().naive_utc();
    c.bench_function("plan_256_joins", |b| {
        b.iter(|| {
            plan(
                Some(&before),
                &HashMap::new(),
                &HashMap::new(),
                std::hint::black_box(&ops),
                now,
            )
        })
    });
}

criterion_group!(benches, cpu, spike);
criterion_main!(benches);
