//! `chatshard-load`: drives a running chatshard over HTTP (and, for the
//! baselines, a shard directly over SQL) and reports what it measured.
//!
//! Bounded by time and clients, and sent only to the addresses given. A live
//! progress line on stderr, HDR latency histograms, a final table on stdout,
//! and `--json FILE` with every figure (per-second throughput and p99
//! timelines included, with the moments of injected events).
//!
//! ```sh
//! chatshard-load --url http://127.0.0.1:8080 --admin-token $TOKEN join-spike --clients 64 --seconds 10
//! chatshard-load --url http://127.0.0.1:8080 quiet --shard-url mysql://root@127.0.0.1:3307/chatshard
//! chatshard-load direct-sql --shard-url mysql://root@127.0.0.1:3307/chatshard --clients 16
//! chatshard-load tls-cost --rounds 3 --clients 16 --seconds 10
//! chatshard-load capacity docs/capacity/*.json --set streams=100000
//! ```
//!
//! # Files
//!
//! - `main.rs`: the command line, its checks, and the run of one scenario.
//! - `scenarios/`: one file per scenario, named after it (`move` is
//!   `move_chat.rs`); `mod.rs` lists them.
//! - `client.rs`: [`Target`], the chatshard instances and the requests the
//!   scenarios make of them; run names.
//! - `traffic.rs`: reads and joins on a shard's quiet chats, recorded phase
//!   by phase (before, during, after a purge or a move).
//! - `sql.rs`: the shard over SQL without chatshard: connections, chatshard's
//!   join transaction, member rows, SQL errors as answers.
//! - `seed.rs`: rows written straight to a shard (an old log, many small
//!   chats).
//! - `procfs.rs`: a process's memory and CPU time from `/proc`.
//! - `prom.rs`: histograms read off the service's `/metrics`: a phase's
//!   buckets and their quantiles.
//! - `sse.rs`: whole SSE messages off a buffer, and an event's commit time.
//! - `zipf.rs`: Zipf-distributed picks of a chat.
//! - `report.rs`: the [`Recorder`]: histograms, answers, throughput, the
//!   progress line, the table and the JSON report.
//! - `plot.rs`: `--plot`, the SVG chart drawn from the JSON report.
//! - `proxy.rs`: `proxy`, a TCP proxy that delays what it forwards.
//! - `capacity.rs`: `capacity`, the sizing model fed by the reports' per-unit
//!   costs (docs/capacity.md).
#![forbid(unsafe_code)]

mod capacity;
mod client;
mod plot;
mod procfs;
mod prom;
mod proxy;
mod report;
mod scenarios;
mod seed;
mod sql;
mod sse;
mod traffic;
mod zipf;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use client::Target;
use report::Recorder;

#[derive(Debug, Parser)]
#[command(name = "chatshard-load", about = "Load scenarios against chatshard")]
struct Cli {
    /// The chatshard instance.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// Other instances of the same fleet (repeatable): join-spike spreads its
    /// clients over all of them, fanout opens its streams on them and posts
    /// through --url.
    #[arg(long, global = true)]
    also: Vec<String>,
    /// The admin token (lets a scenario set a chat's throttle).
    #[arg(long, env = "CHATSHARD_ADMIN_TOKEN", global = true)]
    admin_token: Option<String>,
    /// Write every figure to this file as JSON.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Draw throughput and p50/p99 over time, with the run's marks, to this
    /// SVG file.
    #[arg(long, global = true)]
    plot: Option<PathBuf>,
    /// No progress line.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// C clients join new users to one chat as fast as they are admitted.
    JoinSpike {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Leave the chat's join throttle on (off by default: this measures
        /// the write path; needs --admin-token to take effect).
        #[arg(long)]
        throttle: bool,
        /// The service's pid, to report its CPU per committed join (same
        /// machine).
        #[arg(long)]
        service_pid: Option<u32>,
    },
    /// One client, sequential joins and count reads on quiet chats; then the
    /// same directly with sqlx when --shard-url is given.
    Quiet {
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// A shard to run the direct baseline against.
        #[arg(long)]
        shard_url: Option<String>,
    },
    /// S subscribers (SSE) of one chat while messages are posted at a fixed
    /// rate: delivery lag, shard reads per event, memory and CPU.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Make each subscriber a multiplexed stream (`/v1/streams`) following
        /// the posted chat and this many chats in all (the others quiet).
        #[arg(long, default_value_t = 0)]
        mux_chats: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The service's pid, to report its memory and CPU (same machine).
        #[arg(long)]
        service_pid: Option<u32>,
        /// Open the streams over HTTP/2 (prior knowledge; plain HTTP only).
        #[arg(long)]
        http2: bool,
        /// With --http2, the streams that share one connection (at most the
        /// service's 200 concurrent streams per connection).
        #[arg(long, default_value_t = 1, requires = "http2")]
        streams_per_connection: usize,
        /// Posts outstanding at most: 1 (the default) waits for each answer
        /// before the next post; more keep the rate while answers are slow.
        #[arg(long, default_value_t = 1)]
        posts_in_flight: usize,
        /// The pid of the service's Redis, to report its CPU per notice
        /// (same machine).
        #[arg(long)]
        redis_pid: Option<u32>,
    },
    /// P pollers of one chat while messages are posted at a fixed rate: shard
    /// event queries per published event, and how polls were answered.
    FetchSpike {
        #[arg(long, default_value_t = 256)]
        pollers: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// 0: plain polls as fast as answered; above 0: long-polls.
        #[arg(long, default_value_t = 0)]
        wait_ms: u64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The service's pid, to report its CPU per answered poll (same
        /// machine).
        #[arg(long)]
        service_pid: Option<u32>,
    },
    /// Steady traffic on a chat of shard B alone, then during a join spike on
    /// a chat of shard A: B's p50 and p99 during the spike over alone, end to
    /// end and split (from the service's `/metrics`) between chatshard's own
    /// part, its waits, and the database's.
    Isolation {
        /// Clients of the spike on shard A.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Clients of the steady traffic on shard B.
        #[arg(long, default_value_t = 4)]
        steady_clients: usize,
        /// Both halves together.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// The service's pid, to report its cores and its threads' wait for
        /// a CPU in each half (same machine).
        #[arg(long)]
        service_pid: Option<u32>,
    },
    /// The answer time of refused requests (join_throttled, fetch_throttled)
    /// while the refusing condition holds.
    Refusals {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// A day in a minute: Zipf-popular background traffic over many chats, and
    /// a celebrity chat spiking to the reference incident's load in the
    /// middle third of the run.
    Mixed {
        #[arg(long, default_value_t = 100_000)]
        chats: usize,
        /// Background clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// The celebrity's joins per second during the spike.
        #[arg(long, default_value_t = 2000.0)]
        celebrity_joins: f64,
        /// The celebrity's reads per second during the spike (200K/min).
        #[arg(long, default_value_t = 3333.0)]
        celebrity_reads: f64,
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// The service's pid, to report its memory per chat in use and its
        /// CPU per background request (same machine).
        #[arg(long)]
        service_pid: Option<u32>,
        /// The pid of the service's Redis, to report its CPU per notice
        /// published (same machine).
        #[arg(long)]
        redis_pid: Option<u32>,
    },
    /// The incident's database lesson: two local shards started by the tool,
    /// innodb_autoinc_lock_mode=1 and =2, each with W writers inserting
    /// members with plain INSERT ... VALUES, then with INSERT ... SELECT.
    Autoinc {
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Per statement and mode.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// The event log's upkeep on a local shard the tool starts itself, with
    /// a chatshard instance in this process: a purge's rows/s and the p99 of
    /// the shard's other requests before and during it (paced and unpaced),
    /// the time the digest check takes to repair an injected drift, and its
    /// cost per 100,000 chats.
    Lifecycle {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Events of the chat that is purged.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// `purge.rows_per_second` of the paced run.
        #[arg(long, default_value_t = 5000)]
        paced: u32,
        /// Seconds of traffic measured before the purge starts.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Chats the digest's cost is measured over.
        #[arg(long, default_value_t = 100_000)]
        digest_chats: u64,
    },
    /// A chat under C clients' posts is moved to another shard mid-run: the
    /// move's time, the longest pause a client saw, and every answer.
    Move {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Members the chat has before the run.
        #[arg(long, default_value_t = 10_000)]
        members: u64,
        /// The shard to move it to (default: another one).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Clients reading and joining 16 other chats of the source shard
        /// throughout (their p99 before the move, during it, and after it
        /// to the end of the run); 0: none.
        #[arg(long, default_value_t = 8)]
        others: usize,
        /// New users joining the chat a second, throughout (0: none).
        #[arg(long, default_value_t = 0)]
        join_rate: u32,
        /// Readers long-polling the chat throughout, each checking it misses
        /// no revision.
        #[arg(long, default_value_t = 0)]
        pollers: usize,
        /// Purge the chat's log down to its last N revisions before the run
        /// (a retention override; the server's purge round must come soon,
        /// e.g. `purge.interval_ms = 1000`), so the move copies a snapshot.
        #[arg(long)]
        purged: Option<u64>,
    },
    /// A bucket range of --chats chats moves to another shard (the upper half
    /// of the first shard's first range; by default to a shard with no
    /// buckets) under posts into its chats and creations of new ones: the
    /// move's time, the longest pauses, every answer, and the p99 of the
    /// source's other chats before the move, during it, and in the 10 s
    /// after it (the range on its new shard, the same traffic).
    MoveBuckets {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 1000)]
        chats: usize,
        /// Members each chat has before the move.
        #[arg(long, default_value_t = 20)]
        members: u64,
        /// Messages each chat has before the move.
        #[arg(long, default_value_t = 0)]
        messages: u64,
        #[arg(long)]
        to: Option<String>,
        /// Clients reading and joining 16 chats of the source outside the
        /// range throughout; 0: none.
        #[arg(long, default_value_t = 8)]
        others: usize,
        /// New chats of the range created a second throughout (each joined
        /// by one member); 0: none.
        #[arg(long, default_value_t = 2.0)]
        create_rate: f64,
    },
    /// A TCP proxy that delays every chunk by --delay-ms in each direction
    /// (a slow Redis, say), for --seconds; it records nothing.
    Proxy {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
    },
    /// What TLS costs a join: one local shard the tool starts with TLS, and
    /// a `chatshard serve` per run, the shard over plain TCP and over TLS,
    /// the API over HTTP and over HTTPS, in turn for --rounds rounds; the
    /// medians of p50, p99, joins/s and the service's CPU per join, and their
    /// ratios to the plain runs.
    TlsCost {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Per run.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The `chatshard` binary (default: the one beside this tool).
        #[arg(long)]
        chatshard_bin: Option<PathBuf>,
    },
    /// Not a scenario: sizes a deployment for a workload from the per-unit
    /// costs in the given reports (the median where several measure the
    /// same cost), and prints it as markdown with the limit reached first
    /// (docs/capacity.md).
    Capacity {
        /// Reports of the load tool (`--json` files) holding the costs.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// The workload: a TOML (`.toml`) or JSON file of fields to change
        /// from the defaults.
        #[arg(long)]
        workload: Option<PathBuf>,
        /// One field to change, `key=value` (repeatable; after --workload).
        #[arg(long)]
        set: Vec<String>,
    },
    /// A replicated shard (docs/replicas.md): `read` measures the share of
    /// reads replicas serve and the writer's CPU; `switchover` and
    /// `failover` join at --rate while the shard is reparented mid-run (by
    /// the admin route, or by this tool over SQL as an orchestrator would:
    /// the writer's mariadbd killed, the most advanced replica promoted).
    /// Each run ends by checking every acknowledged join is there once.
    Replicas {
        #[arg(long, value_enum, default_value = "read")]
        mode: scenarios::ReplicasMode,
        #[arg(long, default_value_t = 200)]
        chats: usize,
        /// Closed-loop readers (with some joins in `read`).
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Joins per second, open loop (`switchover`, `failover`).
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// The service's pid, to report its CPU (same machine).
        #[arg(long)]
        service_pid: Option<u32>,
    },
    /// The shard without chatshard: one transaction per join on one chat with
    /// C connections, then `--batch` joins per transaction.
    DirectSql {
        #[arg(long)]
        shard_url: String,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Chats joined: 1, every connection on one chat (its row lock sets
        /// the pace); more, connection c on chat c % N (the shard's commits
        /// set it).
        #[arg(long, default_value_t = 1)]
        chats: usize,
    },
}

fn main() -> ExitCode {
    chatshard::cli::block_on_main(run(Cli::parse()))
}

/// `capacity`: the sizing of the workload (`workload` file, then `sets`) from
/// the costs in `reports`, as markdown.
fn capacity_table(
    reports: &[PathBuf],
    workload: Option<&std::path::Path>,
    sets: &[String],
) -> anyhow::Result<String> {
    let mut read = Vec::new();
    for path in reports {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        read.push((name, json));
    }
    let file = match workload {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let value: serde_json::Value = if path.extension().is_some_and(|e| e == "toml") {
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            } else {
                serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            };
            Some(value)
        }
        None => None,
    };
    let workload = capacity::Workload::build(file.as_ref(), sets).map_err(anyhow::Error::msg)?;
    let costs = capacity::Costs::from_reports(&read).map_err(anyhow::Error::msg)?;
    Ok(capacity::size(&workload, &costs).markdown())
}

/// `capacity` is answered before any scenario starts.
fn unreachable_capacity() -> anyhow::Result<serde_json::Value> {
    anyhow::bail!("capacity runs no scenario")
}

fn seconds(s: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        s > 0.0 && s <= 3600.0,
        "--seconds must be above 0 and at most 3600"
    );
    Ok(Duration::from_secs_f64(s))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Scenario::Capacity {
        reports,
        workload,
        set,
    } = &cli.scenario
    {
        print!("{}", capacity_table(reports, workload.as_deref(), set)?);
        return Ok(());
    }
    let target = Target {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build()?,
        base: cli.url.trim_end_matches('/').to_owned(),
        admin_token: cli.admin_token.clone(),
        others: cli
            .also
            .iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect(),
    };
    let recorder = Recorder::new();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let progress = tokio::spawn(report::progress(recorder.clone(), cli.quiet, done_rx));
    let result = match cli.scenario {
        Scenario::JoinSpike {
            clients,
            seconds: s,
            throttle,
            service_pid,
        } => {
            anyhow::ensure!((1..=4096).contains(&clients), "--clients must be 1 to 4096");
            scenarios::join_spike(
                &target,
                &recorder,
                clients,
                seconds(s)?,
                throttle,
                service_pid,
            )
            .await
        }
        Scenario::Quiet {
            seconds: s,
            shard_url,
        } => scenarios::quiet(&target, shard_url.as_deref(), &recorder, seconds(s)?).await,
        Scenario::Fanout {
            subscribers,
            mux_chats,
            rate,
            seconds: s,
            service_pid,
            http2,
            streams_per_connection,
            posts_in_flight,
            redis_pid,
        } => {
            anyhow::ensure!(
                (1..=64).contains(&posts_in_flight),
                "--posts-in-flight must be 1 to 64"
            );
            anyhow::ensure!(
                (1..=200).contains(&streams_per_connection),
                "--streams-per-connection must be 1 to 200"
            );
            let protocol = if http2 {
                scenarios::StreamProtocol::Http2 {
                    per_connection: streams_per_connection,
                }
            } else {
                scenarios::StreamProtocol::Http1
            };
            anyhow::ensure!(
                (1..=20_000).contains(&subscribers),
                "--subscribers must be 1 to 20000"
            );
            anyhow::ensure!(
                rate > 0.0 && rate <= 10_000.0,
                "--rate must be above 0 and at most 10000"
            );
            anyhow::ensure!(mux_chats <= 10_000, "--mux-chats must be at most 10000");
            let run = scenarios::Fanout {
                subscribers,
                mux_chats,
                rate,
                duration: seconds(s)?,
                pids: scenarios::Pids {
                    service: service_pid,
                    redis: redis_pid,
                },
                protocol,
                posts_in_flight,
            };
            let report = scenarios::fanout(&target, &recorder, run).await;
            if let Ok(r) = &report {
                eprintln!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
            }
            report
        }
        Scenario::FetchSpike {
            pollers,
            rate,
            wait_ms,
            seconds: s,
            service_pid,
        } => {
            anyhow::ensure!(
                (1..=10_000).contains(&pollers),
                "--pollers must be 1 to 10000"
            );
            anyhow::ensure!(
                rate > 0.0 && rate <= 10_000.0,
                "--rate must be above 0 and at most 10000"
            );
            anyhow::ensure!(wait_ms <= 30_000, "--wait-ms must be at most 30000");
            scenarios::fetch_spike(
                &target,
                &recorder,
                pollers,
                rate,
                wait_ms,
                seconds(s)?,
                service_pid,
            )
            .await
        }
        Scenario::Isolation {
            clients,
            steady_clients,
            seconds: s,
            service_pid,
        } => {
            anyhow::ensure!((1..=4096).contains(&clients), "--clients must be 1 to 4096");
            anyhow::ensure!(
                (1..=256).contains(&steady_clients),
                "--steady-clients must be 1 to 256"
            );
            let report = scenarios::isolation(
                &target,
                &recorder,
                clients,
                steady_clients,
                seconds(s)?,
                service_pid,
            )
            .await;
            if let Ok(r) = &report {
                eprintln!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
            }
            report
        }
        Scenario::Refusals {
            clients,
            seconds: s,
        } => {
            anyhow::ensure!((1..=4096).contains(&clients), "--clients must be 1 to 4096");
            scenarios::refusals(&target, &recorder, clients, seconds(s)?).await
        }
        Scenario::Mixed {
            chats,
            clients,
            celebrity_joins,
            celebrity_reads,
            seconds: s,
            service_pid,
            redis_pid,
        } => {
            anyhow::ensure!(
                (1..=10_000_000).contains(&chats),
                "--chats must be 1 to 10000000"
            );
            anyhow::ensure!((1..=4096).contains(&clients), "--clients must be 1 to 4096");
            for (name, rate) in [
                ("--celebrity-joins", celebrity_joins),
                ("--celebrity-reads", celebrity_reads),
            ] {
                anyhow::ensure!(
                    rate > 0.0 && rate <= 100_000.0,
                    "{name} must be above 0 and at most 100000"
                );
            }
            scenarios::mixed(
                &target,
                &recorder,
                chats,
                clients,
                (celebrity_joins, celebrity_reads),
                seconds(s)?,
                scenarios::Pids {
                    service: service_pid,
                    redis: redis_pid,
                },
            )
            .await
        }
        Scenario::Lifecycle {
            clients,
            events,
            paced,
            seconds: s,
            digest_chats,
        } => {
            anyhow::ensure!((1..=256).contains(&clients), "--clients must be 1 to 256");
            anyhow::ensure!(digest_chats > 0, "--digest-chats must be above 0");
            anyhow::ensure!(
                events > 1000,
                "--events must be above 1000 (the last 1000 stay)"
            );
            anyhow::ensure!(paced > 0, "--paced must be above 0");
            scenarios::lifecycle(&recorder, clients, events, paced, seconds(s)?, digest_chats).await
        }
        Scenario::TlsCost {
            rounds,
            clients,
            seconds: s,
            chatshard_bin,
        } => {
            anyhow::ensure!((1..=20).contains(&rounds), "--rounds must be 1 to 20");
            anyhow::ensure!((1..=4096).contains(&clients), "--clients must be 1 to 4096");
            let report = scenarios::tls_cost(rounds, clients, seconds(s)?, chatshard_bin).await;
            if let Ok(r) = &report {
                eprintln!(
                    "{}",
                    serde_json::to_string_pretty(&r["setups"]).unwrap_or_default()
                );
            }
            report
        }
        Scenario::Autoinc {
            writers,
            seconds: s,
        } => {
            anyhow::ensure!((1..=256).contains(&writers), "--writers must be 1 to 256");
            scenarios::autoinc(&recorder, writers, seconds(s)?).await
        }
        Scenario::Move {
            clients,
            members,
            to,
            seconds: s,
            others,
            join_rate,
            pollers,
            purged,
        } => {
            anyhow::ensure!((1..=1024).contains(&clients), "--clients must be 1 to 1024");
            anyhow::ensure!(others <= 1024, "--others must be at most 1024");
            anyhow::ensure!(members <= 99_000, "--members must be at most 99000");
            anyhow::ensure!(join_rate <= 100_000, "--join-rate must be at most 100000");
            anyhow::ensure!(pollers <= 1024, "--pollers must be at most 1024");
            let report = scenarios::move_chat(
                &target,
                &recorder,
                (clients, others),
                members,
                to,
                seconds(s)?,
                scenarios::MoveLoad {
                    join_rate,
                    pollers,
                    purged,
                },
            )
            .await;
            if let Ok(r) = &report {
                eprintln!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
            }
            report
        }
        Scenario::MoveBuckets {
            clients,
            chats,
            members,
            messages,
            to,
            others,
            create_rate,
        } => {
            anyhow::ensure!((1..=1024).contains(&clients), "--clients must be 1 to 1024");
            anyhow::ensure!(others <= 1024, "--others must be at most 1024");
            anyhow::ensure!(
                (1..=100_000).contains(&chats),
                "--chats must be 1 to 100000"
            );
            anyhow::ensure!(members <= 10_000, "--members must be at most 10000");
            anyhow::ensure!(messages <= 10_000, "--messages must be at most 10000");
            anyhow::ensure!(
                (0.0..=1000.0).contains(&create_rate),
                "--create-rate must be 0 to 1000"
            );
            let report = scenarios::move_buckets(
                &target,
                &recorder,
                (clients, others),
                (chats, members, messages),
                (to, create_rate),
            )
            .await;
            if let Ok(r) = &report {
                eprintln!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
            }
            report
        }
        Scenario::Proxy {
            listen,
            to,
            delay_ms,
            seconds: s,
        } => {
            anyhow::ensure!(
                listen.ip().is_loopback() && to.ip().is_loopback(),
                "the proxy only listens on and forwards to loopback addresses"
            );
            anyhow::ensure!(delay_ms <= 60_000, "--delay-ms must be at most 60000");
            proxy::run(listen, to, Duration::from_millis(delay_ms), seconds(s)?).await
        }
        Scenario::Capacity { .. } => unreachable_capacity(),
        Scenario::Replicas {
            mode,
            chats,
            clients,
            rate,
            seconds: s,
            service_pid,
        } => {
            anyhow::ensure!(
                (1..=100_000).contains(&chats),
                "--chats must be 1 to 100000"
            );
            anyhow::ensure!((0..=1024).contains(&clients), "--clients must be 0 to 1024");
            anyhow::ensure!(
                rate > 0.0 && rate <= 20_000.0,
                "--rate must be above 0 and at most 20000"
            );
            let report = scenarios::replicas(
                &target,
                &recorder,
                scenarios::ReplicasOptions {
                    mode,
                    chats,
                    clients,
                    rate,
                    duration: seconds(s)?,
                    service_pid,
                },
            )
            .await;
            if let Ok(r) = &report {
                eprintln!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
            }
            report
        }
        Scenario::DirectSql {
            shard_url,
            clients,
            seconds: s,
            batch,
            chats,
        } => {
            anyhow::ensure!((1..=512).contains(&clients), "--clients must be 1 to 512");
            anyhow::ensure!((1..=1000).contains(&batch), "--batch must be 1 to 1000");
            anyhow::ensure!((1..=512).contains(&chats), "--chats must be 1 to 512");
            scenarios::direct_sql(&shard_url, &recorder, clients, seconds(s)?, batch, chats).await
        }
    };
    let _ = done_tx.send(true);
    let _ = progress.await;
    let scenario = result?;
    print!("{}", recorder.table());
    let report = recorder.to_json(scenario);
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("figures written to {}", path.display());
    }
    if let Some(path) = cli.plot {
        std::fs::write(&path, plot::svg(&report))?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}
