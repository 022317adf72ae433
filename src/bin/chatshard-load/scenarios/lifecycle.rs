//! `lifecycle`: the event log's upkeep on a local shard the tool starts, with
//! a chatshard instance in this process: a purge's pace and its cost to
//! other requests, the digest check's time to repair a drift, and the
//! digest's cost per 100,000 chats.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use chatshard::localdb::cluster::{LocalCluster, Location};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::client::{Target, run_id};
use crate::report::Recorder;
use crate::seed::{seed_old_log, seed_small_chats};
use crate::traffic::quiet_traffic;

/// `lifecycle`: the event log's upkeep, on a local shard the tool starts
/// itself with a chatshard instance in this process.
///
/// 1. **Purge.** A chat with `events` events 40 days old is purged while
///    `clients` clients read and join 16 quiet chats of the same shard:
///    their p99 before the purge and during it, and the purge's rows/s, once
///    at `purge.rows_per_second` = `paced` and once unpaced.
/// 2. **Detect and repair.** A quiet chat's count is corrupted behind the
///    service's back and the chat written once: the time until the digest
///    check (every `digest.interval_ms` = 1000) repaired it, 5 times.
/// 3. **Digest cost.** `digest_chats` chats of 3 members and 3 events each: the
///    time of a full digest round, and of an incremental round with 1 % of
///    the chats changed.
pub async fn lifecycle(
    recorder: &Recorder,
    clients: usize,
    events: u64,
    paced: u32,
    window: Duration,
    digest_chats: u64,
) -> anyhow::Result<Value> {
    let mut cluster = LocalCluster::start(1, Location::Temp).await?;
    let result = lifecycle_on(
        &cluster,
        recorder,
        clients,
        events,
        paced,
        window,
        digest_chats,
    )
    .await;
    cluster.stop().await;
    result
}

async fn lifecycle_on(
    cluster: &LocalCluster,
    recorder: &Recorder,
    clients: usize,
    events: u64,
    paced: u32,
    window: Duration,
    chats: u64,
) -> anyhow::Result<Value> {
    let mut settings = cluster.settings()?;
    settings.retention.enabled = false;
    settings.purge.interval_ms = 200;
    settings.digest.interval_ms = 1000;
    settings.join_throttle.enabled = false;
    settings.hot_chat.enabled = false;
    let url = settings.shards[0].url.clone();
    let mut db = MySqlConnection::connect(&url).await?;
    let mut purges = Vec::new();
    for rate in [paced, 1_000_000] {
        settings.purge.rows_per_second = rate;
        let app = chatshard::app::App::build(&settings).await?;
        let base = format!("http://{}", app.local_addr()?);
        let live = app.live().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        let target = Target {
            http: reqwest::Client::new(),
            base,
            admin_token: None,
            others: Vec::new(),
        };
        // The chat to purge: its log written straight to the shard, 40 days
        // old (what months of a busy chat leave).
        let big = run_id("purge");
        seed_old_log(&mut db, &big, events).await?;
        let quiet: Vec<String> = (0..16)
            .map(|i| format!("{}-q{i}", run_id("quiet")))
            .collect();
        for chat in &quiet {
            target.create_chat(chat).await?;
        }
        let kinds: &'static [&'static str] = if rate == paced {
            &["paced_before", "paced_during"]
        } else {
            &["unpaced_before", "unpaced_during"]
        };
        let (kind_before, kind_during) = (kinds[0], kinds[1]);
        let phase = Arc::new(AtomicU8::new(0));
        let traffic = quiet_traffic(&target, recorder, &quiet, clients, kinds, &phase);
        recorder.mark(&format!("{kind_before} start"));
        tokio::time::sleep(window).await;
        // The purge: retention on for the big chat only (live).
        let mut config = live.load().config.clone();
        config.retention.overrides.insert(
            big.clone(),
            serde_json::from_value(
                json!({ "enabled": true, "minDays": 30, "minRevisions": 1000 }),
            )?,
        );
        live.update(config, "load tool")
            .map_err(|e| anyhow::anyhow!("retention override refused: {e:?}"))?;
        phase.store(1, Ordering::Relaxed);
        recorder.mark(&format!("{kind_during} start"));
        let goal = events - 1000 + 1;
        let mut started = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let first: u64 =
                sqlx::query_scalar("SELECT first_revision FROM chat WHERE chat_id = ?")
                    .bind(&big)
                    .fetch_one(&mut db)
                    .await?;
            if first > 1 && started.is_none() {
                started = Some((Instant::now(), first));
            }
            if first >= goal || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ended = Instant::now();
        phase.store(2, Ordering::Relaxed);
        for t in traffic {
            let _ = t.await;
        }
        let (t0, first0) = started.unwrap_or((ended, 1));
        let seconds = ended.duration_since(t0).as_secs_f64().max(0.001);
        let rows = goal.saturating_sub(first0);
        let before = recorder.quantile_ms(kind_before, 0.99).unwrap_or(0.0);
        let during = recorder.quantile_ms(kind_during, 0.99).unwrap_or(0.0);
        purges.push(json!({
            "rowsPerSecondSetting": rate,
            "eventsPurged": goal - 1,
            "rowsPerSecond": (rows as f64 / seconds).round(),
            "otherRequestsP99BeforeMs": before,
            "otherRequestsP99DuringMs": during,
            "p99Ratio": if before > 0.0 { during / before } else { 0.0 },
            "otherRequestsP50BeforeMs": recorder.quantile_ms(kind_before, 0.5),
            "otherRequestsP50DuringMs": recorder.quantile_ms(kind_during, 0.5),
        }));

        // Detect and repair: a count corrupted behind the service's back,
        // then one write; the time until the digest check repaired it.
        let mut repairs = Vec::new();
        if rate == paced {
            for (i, chat) in quiet.iter().take(5).enumerate() {
                sqlx::query(
                    "UPDATE chat_member_count SET member_count = member_count + 7 WHERE chat_id = ?",
                )
                .bind(chat)
                .execute(&mut db)
                .await?;
                let injected = Instant::now();
                target
                    .http
                    .post(format!("{}/v1/chats/{chat}/members", target.base))
                    .json(&json!({ "userId": format!("repair-{i}") }))
                    .send()
                    .await?;
                loop {
                    let (count, rows): (i64, i64) = sqlx::query_as(
                        "SELECT CAST(n.member_count AS SIGNED), \
                         (SELECT COUNT(*) FROM chat_member m WHERE m.chat_id = n.chat_id AND m.state = 1) \
                         FROM chat_member_count n WHERE n.chat_id = ?",
                    )
                    .bind(chat)
                    .fetch_one(&mut db)
                    .await?;
                    if count == rows {
                        break;
                    }
                    anyhow::ensure!(
                        injected.elapsed() < Duration::from_secs(30),
                        "the digest check did not repair {chat}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                repairs.push(injected.elapsed().as_secs_f64() * 1000.0);
            }
            purges.push(json!({ "detectAndRepairMs": repairs }));
        }
        let _ = stop.send(());
        let _ = server.await;
    }

    // The digest's cost per 100,000 chats, measured on the shard alone.
    let prefix = run_id("digest");
    seed_small_chats(&mut db, &prefix, chats).await?;
    let shards = chatshard::app::build_shards(&settings)?;
    let shard = shards.all()[0].clone();
    let digest = chatshard::config::DigestSettings {
        chats_per_second: 1_000_000_000,
        ..chatshard::config::DigestSettings::default()
    };
    let started = Instant::now();
    let full = chatshard::service::lifecycle::digest_shard(&shard, &digest, true, None).await;
    let full_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        full.stopped.is_none(),
        "full round stopped: {:?}",
        full.stopped
    );
    // 1 % changed since their check.
    sqlx::query(
        "UPDATE chat SET checked_revision = revision - 1 WHERE chat_id LIKE ? AND MOD(CRC32(chat_id), 100) = 0",
    )
    .bind(format!("{prefix}-%"))
    .execute(&mut db)
    .await?;
    let started = Instant::now();
    let incremental =
        chatshard::service::lifecycle::digest_shard(&shard, &digest, false, None).await;
    let incremental_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let idle = chatshard::service::lifecycle::digest_shard(&shard, &digest, false, None).await;
    let idle_seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "purge": purges,
        "digest": {
            "chats": full.checked,
            "fullRoundSeconds": full_seconds,
            "fullRoundSecondsPer100kChats": full_seconds * 100_000.0 / full.checked.max(1) as f64,
            "incrementalRoundChecked": incremental.checked,
            "incrementalRoundSeconds": incremental_seconds,
            "unchangedRoundSeconds": idle_seconds,
            "repairs": full.repairs.len() + incremental.repairs.len() + idle.repairs.len(),
        }
    }))
}
