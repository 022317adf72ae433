//! `replicas`: a replicated shard under load (docs/replicas.md).
//!
//! - `read`: closed-loop clients read member counts and member pages of many
//!   chats, with some joins; the share of reads each kind of member served
//!   (`Chatshard-Served-By`) and the CPU of the writer's `mariadbd`, of the
//!   replicas' and of the service.
//! - `switchover`: joins at a fixed rate (open loop) while the admin route
//!   switches the shard over to a replica mid-run: `writePauseMs`, the
//!   longest gap between successful joins, and the reads' answers during it.
//! - `failover`: the same joins while the tool, as an orchestrator would,
//!   kills the writer's `mariadbd`, promotes the most advanced replica over
//!   SQL and points the others at it; chatshard follows by itself. The time
//!   from the promotion to the first successful join.
//!
//! Every mode ends by reading each chat's member count and comparing it with
//! the joins acknowledged to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection, Row};

use super::mixed::paced;
use crate::client::{Target, run_id};
use crate::procfs::process_usage;
use crate::report::Recorder;

/// What the run does to the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Read,
    Switchover,
    Failover,
}

/// The options of a `replicas` run.
pub struct Options {
    pub mode: Mode,
    pub chats: usize,
    /// Closed-loop clients (`read`), or readers beside the joins (the others).
    pub clients: usize,
    /// Joins per second (`switchover`, `failover`).
    pub rate: f64,
    pub duration: Duration,
    pub service_pid: Option<u32>,
}

/// Reads served, by `Chatshard-Served-By`.
#[derive(Default)]
struct Served {
    writer: AtomicU64,
    replica: AtomicU64,
    unmarked: AtomicU64,
}

/// The joins of a run: per chat, those acknowledged and those whose outcome
/// is unknown (no answer); the moments successful joins were answered.
struct Joins {
    acked: DashMap<String, u64>,
    unknown: DashMap<String, u64>,
    done_at: std::sync::Mutex<Vec<Instant>>,
    /// Set once the new writer is promoted (failover): the first success
    /// after it ends the gap.
    promoted: AtomicBool,
    promoted_at: std::sync::Mutex<Option<Instant>>,
    first_after_promotion: std::sync::Mutex<Option<Instant>>,
    /// 0 before the event, 1 during it, 2 after it: the reads' kind.
    phase: AtomicU8,
}

/// 0 before the event, 1 during it, 2 after it: the reads' kind.
const READ_KINDS: [&str; 3] = ["read_before", "read_during", "read_after"];

pub async fn replicas(target: &Target, recorder: &Recorder, o: Options) -> anyhow::Result<Value> {
    let run = run_id("repl");
    let chats: Arc<Vec<String>> = Arc::new((0..o.chats).map(|i| format!("{run}-{i}")).collect());
    for chat in chats.iter() {
        target.create_chat(chat).await?;
    }
    let view = shard_view(target).await?;
    let members = members(&view);
    let writer = members
        .iter()
        .find(|(_, role)| role == "writer")
        .map(|(a, _)| a.clone())
        // A shard without replicas lists no members: its address is the
        // writer's.
        .or_else(|| view["address"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("shard-0 has no writer in the admin view"))?;
    let replicas: Vec<String> = members
        .iter()
        .filter(|(_, role)| role == "replica")
        .map(|(a, _)| a.clone())
        .collect();
    let writer_pid = pid_of_port(&writer);
    let replica_pids: Vec<u32> = replicas.iter().filter_map(|a| pid_of_port(a)).collect();

    let served = Arc::new(Served::default());
    let joins = Arc::new(Joins {
        acked: DashMap::new(),
        unknown: DashMap::new(),
        done_at: std::sync::Mutex::new(Vec::new()),
        promoted: AtomicBool::new(false),
        promoted_at: std::sync::Mutex::new(None),
        first_after_promotion: std::sync::Mutex::new(None),
        phase: AtomicU8::new(0),
    });
    let start = Instant::now();
    // The report's timeline starts with the recorder, before the chats were
    // made.
    let origin = recorder.elapsed();
    let until = start + o.duration;
    let cpu_before = cpu(o.service_pid, writer_pid, &replica_pids);

    // Readers (and, in `read`, their joins), closed loop.
    let readers: Vec<_> = (0..o.clients)
        .map(|c| {
            let (target, recorder, chats, served, joins) = (
                target.clone(),
                recorder.clone(),
                chats.clone(),
                served.clone(),
                joins.clone(),
            );
            let mode = o.mode;
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    n += 1;
                    let chat = &chats[(c * 7919 + n as usize * 31) % chats.len()];
                    let roll = n % 20;
                    if mode == Mode::Read && roll >= 18 {
                        join(&target, &recorder, &joins, chat, &format!("r{c}-{n}")).await;
                        continue;
                    }
                    let path = if roll.is_multiple_of(2) {
                        format!("{}/v1/chats/{chat}/member-count", target.base)
                    } else {
                        format!("{}/v1/chats/{chat}/members?limit=20", target.base)
                    };
                    let kind = READ_KINDS[usize::from(joins.phase.load(Ordering::Relaxed)).min(2)];
                    read(&target, &recorder, &served, kind, &path).await;
                }
            })
        })
        .collect();

    // Joins at a fixed rate, open loop.
    let writers = if o.mode == Mode::Read {
        Vec::new()
    } else {
        let tasks = (o.rate / 100.0).ceil().max(1.0) as usize;
        let (target, rec, chats, joins) = (
            target.clone(),
            recorder.clone(),
            chats.clone(),
            joins.clone(),
        );
        paced(
            recorder,
            "join",
            tasks,
            o.rate / tasks as f64,
            until,
            move |t, n| {
                let (target, recorder, chats, joins) =
                    (target.clone(), rec.clone(), chats.clone(), joins.clone());
                async move {
                    let chat = &chats[(t + n as usize * 13) % chats.len()];
                    join(&target, &recorder, &joins, chat, &format!("w{t}-{n}")).await;
                }
            },
        )
    };

    // The event, mid-run.
    let mut event = Value::Null;
    if o.mode != Mode::Read {
        tokio::time::sleep_until((start + o.duration / 2).into()).await;
        event = match o.mode {
            Mode::Switchover => {
                let to = replicas
                    .first()
                    .ok_or_else(|| anyhow::anyhow!("no replica to switch over to"))?;
                switchover(target, recorder, &joins.phase, to).await?
            }
            Mode::Failover => failover(recorder, &joins, &writer, writer_pid, &replicas).await?,
            Mode::Read => Value::Null,
        };
    }
    for t in writers {
        let _ = t.await;
    }
    for t in readers {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let cpu_after = cpu(o.service_pid, writer_pid, &replica_pids);
    let cores = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => json!((b - a) / elapsed.as_secs_f64()),
        _ => Value::Null,
    };

    // The gaps between successful joins.
    let mut done_at = joins.done_at.lock().map(|v| v.clone()).unwrap_or_default();
    done_at.sort();
    let longest_gap = done_at
        .windows(2)
        .map(|w| (w[1] - w[0], w[0] - start))
        .max_by_key(|(gap, _)| *gap);
    let promoted_at = joins.promoted_at.lock().ok().and_then(|p| *p);
    let first = joins.first_after_promotion.lock().ok().and_then(|f| *f);
    if let (Some(promoted_at), Some(first)) = (promoted_at, first) {
        event["promotionToFirstWriteMs"] = json!((first - promoted_at).as_secs_f64() * 1000.0);
    }

    // Every acknowledged join present once: the chats' counts, read after
    // the replicas had time to catch up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut lost, mut doubled, mut unknown_applied, mut checked) = (0u64, 0u64, 0u64, 0u64);
    let mut count_failures = 0u64;
    for chat in chats.iter() {
        let acked = joins.acked.get(chat).map_or(0, |v| *v);
        let unknown = joins.unknown.get(chat).map_or(0, |v| *v);
        let Some(count) = member_count(target, chat).await else {
            count_failures += 1;
            continue;
        };
        checked += 1;
        if count < acked {
            lost += acked - count;
        } else if count > acked + unknown {
            doubled += count - acked - unknown;
        } else {
            unknown_applied += count - acked;
        }
    }
    let replica_reads = served.replica.load(Ordering::Relaxed);
    let writer_reads = served.writer.load(Ordering::Relaxed);
    let all_reads = replica_reads + writer_reads + served.unmarked.load(Ordering::Relaxed);
    let acked_total: u64 = joins.acked.iter().map(|e| *e.value()).sum();
    let unknown_total: u64 = joins.unknown.iter().map(|e| *e.value()).sum();
    Ok(json!({
        "name": "replicas",
        "mode": format!("{:?}", o.mode).to_lowercase(),
        "replicas": replicas.len(),
        "chats": o.chats,
        "clients": o.clients,
        "joinRate": if o.mode == Mode::Read { Value::Null } else { json!(o.rate) },
        "durationSeconds": elapsed.as_secs_f64(),
        "reads": {
            "servedByWriter": writer_reads,
            "servedByReplica": replica_reads,
            "replicaShare": if all_reads > 0 { json!(replica_reads as f64 / all_reads as f64) } else { Value::Null },
        },
        "cpuCores": {
            "writerMariadbd": cores(cpu_before.1, cpu_after.1),
            "replicasMariadbd": cores(cpu_before.2, cpu_after.2),
            "service": cores(cpu_before.0, cpu_after.0),
        },
        "writerPid": writer_pid,
        "joins": {
            "acknowledged": acked_total,
            "unknownOutcome": unknown_total,
            "perSecond": acked_total as f64 / o.duration.as_secs_f64(),
            "longestGapMs": longest_gap.map(|(g, _)| g.as_secs_f64() * 1000.0),
            "longestGapAtSeconds": longest_gap.map(|(_, at)| (origin + at).as_secs_f64()),
        },
        "event": event,
        "check": {
            "chatsChecked": checked,
            "countReadsFailed": count_failures,
            "lost": lost,
            "doubled": doubled,
            "unknownOutcomeApplied": unknown_applied,
        },
    }))
}

/// The service's, the writer's and the replicas' CPU seconds so far.
fn cpu(
    service: Option<u32>,
    writer: Option<u32>,
    replicas: &[u32],
) -> (Option<f64>, Option<f64>, Option<f64>) {
    let of = |pid: Option<u32>| pid.and_then(process_usage).map(|(_, s)| s);
    let replicas = if replicas.is_empty() {
        None
    } else {
        replicas
            .iter()
            .map(|&p| process_usage(p).map(|(_, s)| s))
            .sum::<Option<f64>>()
    };
    (of(service), of(writer), replicas)
}

/// One join; recorded under `join` and counted for its chat.
async fn join(target: &Target, recorder: &Recorder, joins: &Joins, chat: &str, user: &str) {
    let (answer, ok) = target.join(recorder, "join", chat, user).await;
    if ok {
        let now = Instant::now();
        *joins.acked.entry(chat.to_owned()).or_default() += 1;
        if let Ok(mut v) = joins.done_at.lock() {
            v.push(now);
        }
        if joins.promoted.load(Ordering::Relaxed)
            && let Ok(mut first) = joins.first_after_promotion.lock()
            && first.is_none()
        {
            *first = Some(now);
            joins.phase.store(2, Ordering::Relaxed);
        }
    } else if answer.starts_with("error/") || answer.ends_with("/outcome_unknown") {
        // Never answered, or answered that its outcome is unknown: it may
        // have been applied.
        *joins.unknown.entry(chat.to_owned()).or_default() += 1;
    }
}

/// One read; recorded under `kind` and counted by the member that served it.
async fn read(
    target: &Target,
    recorder: &Recorder,
    served: &Served,
    kind: &'static str,
    url: &str,
) {
    let started = Instant::now();
    match target.http.get(url).send().await {
        Ok(r) => {
            let status = r.status();
            let by = r
                .headers()
                .get("chatshard-served-by")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if status.is_success() {
                let _ = r.bytes().await;
                match by.as_str() {
                    "writer" => &served.writer,
                    "replica" => &served.replica,
                    _ => &served.unmarked,
                }
                .fetch_add(1, Ordering::Relaxed);
                recorder.record(kind, started.elapsed(), status.as_str(), true);
            } else {
                let code = crate::client::problem_code(r).await;
                recorder.record(
                    kind,
                    started.elapsed(),
                    &format!("{}/{code}", status.as_u16()),
                    false,
                );
            }
        }
        Err(e) if e.is_timeout() => {
            recorder.record(kind, started.elapsed(), "error/timeout", false)
        }
        Err(_) => recorder.record(kind, started.elapsed(), "error/other", false),
    }
}

/// A chat's member count, as the shard's writer holds it: a `minRevision`
/// no replica holds sends the read to the writer.
async fn member_count(target: &Target, chat: &str) -> Option<u64> {
    let r = target
        .http
        .get(format!(
            "{}/v1/chats/{chat}/member-count?minRevision={}",
            target.base,
            i64::MAX
        ))
        .send()
        .await
        .ok()?;
    let by_writer = r
        .headers()
        .get("chatshard-served-by")
        .is_some_and(|v| v.as_bytes() == b"writer");
    if !r.status().is_success() || !by_writer {
        return None;
    }
    r.json::<Value>().await.ok()?["memberCount"].as_u64()
}

/// `GET /v1/admin/shards`, its first shard.
async fn shard_view(target: &Target) -> anyhow::Result<Value> {
    let v = target
        .admin_json("/v1/admin/shards", "the shard's members")
        .await?;
    Ok(v["shards"][0].clone())
}

/// The members of a shard view: (`host:port`, role).
fn members(view: &Value) -> Vec<(String, String)> {
    view["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| {
                    (
                        m["address"].as_str().unwrap_or_default().to_owned(),
                        m["role"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The pid of the local `mariadbd` listening on the port of `address`
/// (`host:port`), from its command line's `--port=`.
fn pid_of_port(address: &str) -> Option<u32> {
    let port = address.rsplit_once(':')?.1;
    let want = format!("--port={port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        if comm.trim() != "mariadbd" {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == want.as_bytes())
            .then_some(pid)
    })
}

/// The switchover admin route, timed; its answer.
async fn switchover(
    target: &Target,
    recorder: &Recorder,
    phase: &AtomicU8,
    to: &str,
) -> anyhow::Result<Value> {
    let Some(token) = &target.admin_token else {
        anyhow::bail!("--admin-token is needed for the switchover");
    };
    recorder.mark("switchover");
    phase.store(1, Ordering::Relaxed);
    let started = Instant::now();
    let r = target
        .http
        .post(format!(
            "{}/v1/admin/shards/shard-0/switchover",
            target.base
        ))
        .bearer_auth(token)
        .json(&json!({ "to": to }))
        .send()
        .await?;
    let status = r.status().as_u16();
    let answer: Value = r.json().await.unwrap_or(Value::Null);
    let took = started.elapsed();
    phase.store(2, Ordering::Relaxed);
    recorder.mark("switched over");
    Ok(json!({
        "kind": "switchover",
        "to": to,
        "status": status,
        "answer": answer,
        "writePauseMs": answer["writePauseMs"],
        "callMs": took.as_secs_f64() * 1000.0,
    }))
}

/// A member over SQL, as root (the local shards' account).
async fn connect(address: &str) -> anyhow::Result<MySqlConnection> {
    Ok(MySqlConnection::connect(&format!("mysql://root@{address}/chatshard")).await?)
}

/// A text column of `SHOW SLAVE STATUS`, whatever type the server gives it.
fn column(row: &sqlx::mysql::MySqlRow, name: &str) -> String {
    row.try_get::<String, _>(name)
        .or_else(|_| row.try_get::<u64, _>(name).map(|v| v.to_string()))
        .or_else(|_| row.try_get::<i64, _>(name).map(|v| v.to_string()))
        .unwrap_or_default()
}

/// The sequence numbers of a GTID position (`0-1-42,1-2-7`), summed: the
/// replicas of one writer compare by it.
fn gtid_seq(pos: &str) -> u64 {
    pos.split(',')
        .filter_map(|g| g.trim().rsplit_once('-')?.1.parse::<u64>().ok())
        .sum()
}

/// The failover an orchestrator would run: the writer's `mariadbd` killed,
/// each replica left to apply what it received (at most 3 s), the most
/// advanced promoted, the others pointed at it. chatshard is not told.
async fn failover(
    recorder: &Recorder,
    joins: &Joins,
    writer: &str,
    writer_pid: Option<u32>,
    replicas: &[String],
) -> anyhow::Result<Value> {
    anyhow::ensure!(!replicas.is_empty(), "no replica to promote");
    let pid = writer_pid.ok_or_else(|| anyhow::anyhow!("the writer's mariadbd pid is unknown"))?;
    let started = recorder_seconds(recorder);
    let mut conns = Vec::new();
    for r in replicas {
        conns.push((r.clone(), connect(r).await?));
    }
    recorder.mark("writer killed");
    joins.phase.store(1, Ordering::Relaxed);
    let killed = Instant::now();
    let status = tokio::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(status.success(), "kill -KILL {pid} failed");
    // Each replica applies what it received: until its applied position
    // reaches the received one, or has not moved for 200 ms (a transaction
    // the old writer sent only in part is never applied), at most 3 s.
    let mut positions = Vec::new();
    for (address, conn) in conns.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = (String::new(), Instant::now());
        let (pos, why) = loop {
            let row = sqlx::query("SHOW SLAVE STATUS")
                .fetch_optional(&mut *conn)
                .await?;
            let io = row
                .as_ref()
                .map(|r| column(r, "Gtid_IO_Pos"))
                .unwrap_or_default();
            let applied: String = sqlx::query_scalar("SELECT @@gtid_slave_pos")
                .fetch_one(&mut *conn)
                .await?;
            if gtid_seq(&applied) >= gtid_seq(&io) {
                break (applied, "applied all received");
            }
            if applied != last.0 {
                last = (applied.clone(), Instant::now());
            } else if last.1.elapsed() >= Duration::from_millis(200) {
                break (applied, "stopped applying");
            }
            if Instant::now() > deadline {
                break (applied, "deadline");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        positions.push((address.clone(), gtid_seq(&pos), pos, why));
    }
    let applied_ms = killed.elapsed().as_secs_f64() * 1000.0;
    let best = positions
        .iter()
        .enumerate()
        .max_by_key(|(_, (_, seq, _, _))| *seq)
        .map(|(i, _)| i)
        .unwrap_or(0);
    let new_writer = positions[best].0.clone();
    let (_, promoted) = &mut conns[best];
    for statement in ["STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only = 0"] {
        sqlx::query(statement).execute(&mut *promoted).await?;
    }
    let promoted_at = recorder_seconds(recorder);
    if let Ok(mut at) = joins.promoted_at.lock() {
        *at = Some(Instant::now());
    }
    joins.promoted.store(true, Ordering::Relaxed);
    recorder.mark("replica promoted");
    // Semi-synchronous source like the old writer (best effort).
    let semi_sync = sqlx::query("SET GLOBAL rpl_semi_sync_master_enabled = ON")
        .execute(&mut *promoted)
        .await
        .is_ok();
    let (host, port) = new_writer
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("bad address {new_writer}"))?;
    let mut repointed = Vec::new();
    for (i, (address, conn)) in conns.iter_mut().enumerate() {
        if i == best {
            continue;
        }
        sqlx::query("STOP SLAVE").execute(&mut *conn).await?;
        let change = format!(
            "CHANGE MASTER TO MASTER_HOST='{host}', MASTER_PORT={port}, MASTER_USER='{}', \
             MASTER_PASSWORD='{}', MASTER_USE_GTID=slave_pos",
            chatshard::localdb::REPLICATION_USER,
            chatshard::localdb::REPLICATION_PASSWORD,
        );
        sqlx::query(sqlx::AssertSqlSafe(change))
            .execute(&mut *conn)
            .await?;
        sqlx::query("START SLAVE").execute(&mut *conn).await?;
        repointed.push(address.clone());
    }
    let done_ms = killed.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "kind": "failover",
        "killed": writer,
        "killedAtSeconds": started,
        "positions": positions.iter().map(|(a, _, p, why)| json!({"member": a, "gtid": p, "waitEnded": why})).collect::<Vec<_>>(),
        "promoted": new_writer,
        "promotedAtSeconds": promoted_at,
        "killToAppliedMs": applied_ms,
        "killToPromotedMs": (promoted_at - started) * 1000.0,
        "killToRepointedMs": done_ms,
        "semiSyncSource": semi_sync,
        "repointed": repointed,
    }))
}

/// Seconds since the recorder started (the timeline of the report).
fn recorder_seconds(recorder: &Recorder) -> f64 {
    recorder.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_positions_compare_by_their_sequence_numbers() {
        assert_eq!(gtid_seq("0-1-42"), 42);
        assert_eq!(gtid_seq("0-1-42,1-2-7"), 49);
        assert_eq!(gtid_seq(""), 0);
    }
}
