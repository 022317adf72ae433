//! The command line: parse, set up logging, dispatch. Nothing else.
//!
//! - `chatshard serve [--config FILE] [--listen ADDR]`: run the service.
//! - `chatshard serve --dev [--shards N] [--replicas R] [--redis]`: start N local MariaDB
//!   shards (each with R replicas), migrate them, run the service; Ctrl-C or SIGTERM
//!   stops both.
//! - `chatshard migrate [--shard NAME] [--status | --print-sql | --mark-applied V |
//!   --mark-applied-through V | --repair-dirty V]`: apply, show, print, record or
//!   repair migrations on every shard (or one).
//! - `chatshard check [--instances N] [--for-migrate]`: is every shard fit for chatshard?
//! - `chatshard repair-counts [--chat ID]`: recompute member counts from rows.
//! - `chatshard move-chat CHAT --to SHARD`: move one chat to another shard online.
//! - `chatshard cancel-move MOVE_ID`: cancel a running move before its switch.
//! - `chatshard move-buckets FIRST-LAST --to SHARD`: move a bucket range online.
//! - `chatshard cancel-move-buckets MOVE_ID`: cancel a range move before its flip.
//! - `chatshard purge [--dry-run]`: purge (or report) events past retention.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{self, App};
use crate::config::Settings;
use crate::domain::ChatId;
use crate::localdb::cluster::{LocalCluster, Location};
use crate::localdb::redis::{LocalRedis, LocalRedisOptions};
use crate::migrate;
use crate::service::move_plan::{self, Phase};
use crate::service::repair;
use crate::telemetry::{self, TelemetrySettings};

#[derive(Debug, Parser)]
#[command(
    name = "chatshard",
    version,
    about = "Sharded chat store with per-shard isolation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the REST API.
    Serve(ServeArgs),
    /// Apply the schema migrations to every shard; or show, print, record or
    /// repair them for a DBA (docs/operations.md, "Schema changes").
    Migrate(MigrateArgs),
    /// Connect to every shard and report whether its settings, the account's
    /// grants and the schema suit chatshard; exits non-zero when something
    /// would break it.
    Check(CheckArgs),
    /// Recompute member counts from member rows and fix those that differ.
    RepairCounts(RepairArgs),
    /// Move one chat to another shard, online (docs/moving-chats.md); waits
    /// until the move ends and prints its phases.
    MoveChat(MoveChatArgs),
    /// Cancel a running chat move before its switch; whoever drives it rolls
    /// it back, and the chat stays on its source.
    CancelMove(CancelMoveArgs),
    /// Move every chat of a bucket range to another shard, online, then give
    /// the range to it (splits a shard; docs/operations.md); waits until the
    /// move ends and prints its progress.
    MoveBuckets(MoveBucketsArgs),
    /// Cancel a running bucket-range move before its flip; whoever drives it
    /// drops the copies it made, and the bucket table stays as it was.
    CancelMoveBuckets(CancelMoveBucketsArgs),
    /// Planned switchover of a replicated shard to one of its replicas
    /// (docs/replicas.md, "Reparents"): writes held for the pause, the old
    /// writer made read-only, the replica caught up and promoted, the other
    /// members pointed at it.
    Switchover(SwitchoverArgs),
    /// Emergency failover of a replicated shard whose writer is gone: the
    /// most advanced replica is promoted and the others pointed at it.
    Failover(FailoverArgs),
    /// Delete the events past the retention policy now, every shard, paced
    /// like the background purge; with --dry-run, report per shard what would
    /// go and delete nothing (docs/event-log.md).
    Purge(PurgeArgs),
}

#[derive(Debug, Args)]
struct PurgeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Report what would be purged, per shard; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
struct MoveChatArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The chat to move.
    chat: String,
    /// The shard to move it to, by its configured name.
    #[arg(long)]
    to: String,
}

#[derive(Debug, Args)]
struct MoveBucketsArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The range, `first-last` (e.g. `256-383`), owned by one shard.
    buckets: String,
    /// The shard to give it to, by its configured name.
    #[arg(long)]
    to: String,
}

#[derive(Debug, Args)]
struct SwitchoverArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The shard, by its configured name.
    #[arg(long)]
    shard: String,
    /// The replica to promote, `host:port` as `GET /v1/admin/shards` lists it.
    #[arg(long)]
    to: String,
}

#[derive(Debug, Args)]
struct FailoverArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The shard, by its configured name.
    #[arg(long)]
    shard: String,
    /// Promote the most advanced replica even if it lacks acknowledged writes.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct CancelMoveArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The move, as `GET /v1/admin/moves` names it (`<source shard>:<number>`).
    id: String,
}

#[derive(Debug, Args)]
struct CancelMoveBucketsArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The range move, as `GET /v1/admin/bucket-moves` numbers it.
    id: u64,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The TOML configuration file.
    #[arg(long, env = "CHATSHARD_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Start local MariaDB shards (data under --data-dir) instead of using the
    /// configured ones.
    #[arg(long)]
    dev: bool,
    /// Number of local shards with --dev.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// With --dev, replicas per shard (0 to 8): MariaDB GTID replication,
    /// semi-synchronous, listed in each shard's `replicas`.
    #[arg(
        long,
        default_value_t = 0,
        requires = "dev",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=8)
    )]
    replicas: usize,
    /// Where --dev keeps its shards' data.
    #[arg(long, default_value = ".chatshard")]
    data_dir: PathBuf,
    /// With --dev, also start a local `redis-server` (under --data-dir) and
    /// join the fleet through it, as an instance of a fleet would.
    #[arg(long, requires = "dev")]
    redis: bool,
    /// With --dev, each local server's InnoDB buffer pool
    /// (`--innodb-buffer-pool-size`): a size with K, M or G, 16M to 64G. A
    /// production shard's pool holds its working set; one smaller than the
    /// data reads pages back from disk on every pass of a move or a purge.
    #[arg(long, default_value = "512M", requires = "dev", value_parser = parse_pool_size)]
    shard_buffer_pool: String,
    /// Address to listen on (overrides the configuration).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Only this shard, by its configured name.
    #[arg(long)]
    shard: Option<String>,
    #[command(flatten)]
    action: MigrateAction,
}

/// What `migrate` does instead of applying; at most one.
#[derive(Debug, Args)]
#[group(multiple = false)]
struct MigrateAction {
    /// Show each shard's applied, pending, dirty and changed versions;
    /// change nothing.
    #[arg(long)]
    status: bool,
    /// Print each shard's pending migrations' SQL in order, with versions
    /// and checksums; change nothing.
    #[arg(long)]
    print_sql: bool,
    /// Record VERSION, applied by hand, as applied.
    #[arg(long, value_name = "VERSION")]
    mark_applied: Option<i64>,
    /// Record every pending version up to VERSION, applied by hand, as applied.
    #[arg(long, value_name = "VERSION")]
    mark_applied_through: Option<i64>,
    /// Clear VERSION's failed run so that the next `migrate` runs it again
    /// (after undoing what of it was applied).
    #[arg(long, value_name = "VERSION")]
    repair_dirty: Option<i64>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// How many `chatshard serve` instances will share the shards.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Also check what `migrate` needs (DDL grants); pending migrations are
    /// then expected.
    #[arg(long)]
    for_migrate: bool,
}

#[derive(Debug, Args)]
struct RepairArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Repair only this chat.
    #[arg(long)]
    chat: Option<String>,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    block_on_main(run(Cli::parse()))
}

/// Runs a command's future on a new multi-threaded runtime; an error is
/// printed with its causes and becomes a failing exit code.
pub fn block_on_main(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    // Before any TLS client (reqwest's takes the process default) is built.
    crate::crypto::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) if args.dev => serve_dev(args).await,
        Command::Serve(args) => {
            let path = config_path(&args.config)?;
            let mut settings = Settings::load(&path)?;
            if let Some(listen) = args.listen {
                settings.listen = listen;
            }
            let telemetry = telemetry::init(&settings.telemetry)?;
            let result = serve(&settings, Some(path)).await;
            telemetry.shutdown().await;
            result
        }
        Command::Migrate(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            run_migrate(&settings, args.shard.as_deref(), &args.action).await
        }
        Command::Check(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let needs = crate::check::Needs {
                instances: args.instances,
                pool_size: settings.pool.max_concurrent,
                for_migrate: args.for_migrate,
            };
            check(&settings, &needs).await
        }
        Command::RepairCounts(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let chat = args
                .chat
                .as_deref()
                .map(ChatId::parse)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--chat: {e}"))?;
            let shards = app::build_shards(&settings)?;
            let fixes = repair::repair_counts(&shards, chat.as_ref()).await?;
            for fix in &fixes {
                let stored = fix.stored.map_or("missing".to_owned(), |n| n.to_string());
                println!(
                    "{} {}: member_count {stored} -> {} (JOINED rows)",
                    fix.shard, fix.chat_id, fix.actual
                );
            }
            println!("{} count(s) fixed", fixes.len());
            Ok(())
        }
        Command::Purge(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            purge(&settings, args.dry_run).await
        }
        Command::MoveChat(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let chat = ChatId::parse(&args.chat).map_err(|e| anyhow::anyhow!("CHAT: {e}"))?;
            move_chat(&settings, &chat, &args.to).await
        }
        Command::MoveBuckets(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let range = crate::routing::BucketRange::parse(&args.buckets)
                .map_err(|e| anyhow::anyhow!("BUCKETS: {e}"))?;
            move_buckets(&settings, range, &args.to).await
        }
        Command::Switchover(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let service = mover(&settings)?;
            service.look_at_members().await;
            let done = service
                .switchover(&args.shard, &args.to)
                .await
                .map_err(|e| anyhow::anyhow!("{}", crate::error::chain(&e)))?;
            println!(
                "shard {}: writer {} -> {} (writes held {:.1} ms)",
                done.shard,
                done.from,
                done.to,
                done.write_pause.map_or(0.0, |d| d.as_secs_f64() * 1e3)
            );
            Ok(())
        }
        Command::Failover(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let service = mover(&settings)?;
            service.look_at_members().await;
            let done = service
                .failover(&args.shard, args.force)
                .await
                .map_err(|e| anyhow::anyhow!("{}", crate::error::chain(&e)))?;
            println!("shard {}: writer {} -> {}", done.shard, done.from, done.to);
            Ok(())
        }
        Command::CancelMove(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let view = mover(&settings)?
                .cancel_move(&args.id)
                .await
                .map_err(|e| anyhow::anyhow!("{}", crate::error::chain(&e)))?;
            println!(
                "move {} of chat {} ({}): cancel recorded; it rolls back at its next batch",
                view.id, view.chat_id, view.phase
            );
            Ok(())
        }
        Command::CancelMoveBuckets(args) => {
            telemetry::init(&TelemetrySettings::default())?;
            let settings = load(&args.config)?;
            let view = mover(&settings)?
                .cancel_bucket_move(args.id)
                .await
                .map_err(|e| anyhow::anyhow!("{}", crate::error::chain(&e)))?;
            println!(
                "range move {} of buckets {} ({}): cancel recorded; the chats it moved go back to {}",
                view.id, view.buckets, view.phase, view.source
            );
            Ok(())
        }
    }
}

/// `chatshard migrate` and its DBA actions, shard by shard; a shard that
/// fails is reported and the others still run.
async fn run_migrate(
    settings: &Settings,
    only: Option<&str>,
    action: &MigrateAction,
) -> anyhow::Result<()> {
    let shards: Vec<_> = settings
        .shards
        .iter()
        .filter(|s| only.is_none_or(|name| s.name == name))
        .collect();
    if shards.is_empty() {
        anyhow::bail!(
            "no shard named {:?} in the configuration",
            only.unwrap_or_default()
        );
    }
    let mut failed = false;
    for shard in shards {
        let result = if action.print_sql {
            migrate::pending(shard)
                .await
                .map(|(schema, pending)| migrate::script(&schema, &pending))
        } else if let Some(v) = action.mark_applied.or(action.mark_applied_through) {
            let mark = if action.mark_applied.is_some() {
                migrate::Mark::One(v)
            } else {
                migrate::Mark::Through(v)
            };
            migrate::mark_applied(shard, mark)
                .await
                .map(|(schema, marked)| format!("{schema}\n  recorded as applied: {marked:?}"))
        } else if let Some(v) = action.repair_dirty {
            migrate::repair_dirty(shard, v).await.map(|schema| {
                format!(
                    "{schema}\n  cleared the failed run of {v}: `chatshard migrate` runs it again"
                )
            })
        } else if action.status {
            migrate::shard_status(shard).await.map(|schema| {
                failed |= !schema.state.dirty.is_empty() || !schema.state.mismatched.is_empty();
                schema.to_string()
            })
        } else {
            migrate::migrate_shard(shard).await.map(|s| s.to_string())
        };
        match result {
            Ok(report) => println!("{report}"),
            Err(e) => {
                failed = true;
                println!("{}: error: {e:#}", shard.name);
            }
        }
    }
    if failed {
        anyhow::bail!("some shards failed");
    }
    Ok(())
}

/// `chatshard check`: one line per finding, every shard; fails when any
/// finding is an error or a shard cannot be read.
async fn check(settings: &Settings, needs: &crate::check::Needs) -> anyhow::Result<()> {
    use crate::check::{self, Level};
    let mut errors = 0;
    for shard in &settings.shards {
        match check::gather(shard).await {
            Ok(facts) => {
                for finding in check::evaluate(&facts, needs) {
                    errors += usize::from(finding.level == Level::Error);
                    println!(
                        "{}: {:<5} {}: {}",
                        shard.name, finding.level, finding.subject, finding.detail
                    );
                }
            }
            Err(e) => {
                errors += 1;
                println!("{}: ERROR connection: {e:#}", shard.name);
            }
        }
    }
    if errors > 0 {
        anyhow::bail!("{errors} finding(s) would break chatshard");
    }
    println!("every shard suits chatshard");
    Ok(())
}

/// One purge round of every shard (or its dry run), reported per shard.
async fn purge(settings: &Settings, dry_run: bool) -> anyhow::Result<()> {
    use crate::service::lifecycle::purge_shard;
    let shards = app::build_shards(settings)?;
    let live = crate::live::Live::new(settings.live());
    let retention = &settings.retention;
    println!(
        "retention: {} (keep {} days and the last {} revisions of each chat; {} override(s))",
        if retention.enabled { "on" } else { "off" },
        retention.min_days,
        retention.min_revisions,
        retention.overrides.len()
    );
    let verb = if dry_run { "would purge" } else { "purged" };
    let (mut chats, mut events, mut failed) = (0, 0, false);
    for shard in shards.all() {
        let report = purge_shard(shard, &live, &settings.purge, dry_run, None).await;
        println!(
            "{}: {verb} {} event(s) of {} chat(s){}",
            report.shard,
            report.events,
            report.chats,
            report
                .stopped
                .as_deref()
                .map(|why| format!(" (stopped: {why})"))
                .unwrap_or_default()
        );
        chats += report.chats;
        events += report.events;
        failed |= report.stopped.is_some();
    }
    println!("total: {verb} {events} event(s) of {chats} chat(s)");
    if failed {
        anyhow::bail!("the purge stopped on at least one shard");
    }
    Ok(())
}

/// A service of this process's own over the configured shards, for the
/// move commands.
fn mover(settings: &Settings) -> anyhow::Result<std::sync::Arc<crate::service::ChatService>> {
    let shards = app::build_shards(settings)?;
    let live = crate::live::Live::new(settings.live());
    let throttle = crate::throttle::Throttle::new(
        std::sync::Arc::new(crate::throttle::SystemClock::default()),
        &settings.throttle,
    );
    Ok(std::sync::Arc::new(crate::service::ChatService::new(
        shards,
        app::service_settings(settings)?,
        live,
        throttle,
        None,
    )))
}

/// Runs one move in this process and reports its phases until it ends.
async fn move_chat(settings: &Settings, chat: &ChatId, to: &str) -> anyhow::Result<()> {
    let service = mover(settings)?;
    service.refresh_bucket_map().await;
    let started = service
        .start_move(chat, to)
        .await
        .map_err(|e| anyhow::anyhow!("{}", crate::error::chain(&e)))?;
    println!(
        "move {} of chat {}: {} -> {}",
        started.id, chat, started.source, started.target
    );
    let mut last = String::new();
    loop {
        let current = service
            .moves()
            .await
            .into_iter()
            .find(|m| m.id == started.id);
        if let Some(m) = current {
            if m.phase != last {
                println!("  {} (revision {})", m.phase, m.copied_revision);
                last.clone_from(&m.phase);
            }
            match Phase::parse(move_plan::Unit::Chat, &m.phase) {
                Some(Phase::Done) => return Ok(()),
                Some(Phase::Cancelled) => anyhow::bail!("the move was cancelled"),
                Some(Phase::RolledBack) => {
                    anyhow::bail!("the move was rolled back: {}", m.error.unwrap_or_default())
                }
                _ => {}
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs one range move in this process and reports its progress until it
/// ends.
async fn move_buckets(
    settings: &Settings,
    range: crate::routing::BucketRange,
    to: &str,
) -> anyhow::Result<()> {
    let service = mover(settings)?;
    service.refresh_bucket_map().await;
    let started = service
        .start_bucket_move(range, to)
        .await
        .map_err(|e| anyhow::anyhow!("{}", crate::error::chain(&e)))?;
    println!(
        "bucket move {}: buckets {} {} -> {}",
        started.id, started.buckets, started.source, started.target
    );
    let mut last = (String::new(), u64::MAX);
    loop {
        if let Some(m) = service.get_bucket_move(started.id).await {
            if (m.phase.as_str(), m.chats_moved) != (last.0.as_str(), last.1) {
                println!(
                    "  {} ({} of {} chat(s) moved)",
                    m.phase, m.chats_moved, m.chats_total
                );
                last = (m.phase.clone(), m.chats_moved);
            }
            match Phase::parse(move_plan::Unit::Range, &m.phase) {
                Some(Phase::Done) => {
                    println!(
                        "buckets {} are on {} (bucket table version {})",
                        m.buckets,
                        m.target,
                        m.version.unwrap_or_default()
                    );
                    return Ok(());
                }
                Some(Phase::Failed) => {
                    anyhow::bail!("the range move failed: {}", m.error.unwrap_or_default())
                }
                Some(Phase::Cancelled) => match m.error {
                    Some(left) => anyhow::bail!("the range move was cancelled: {left}"),
                    None => anyhow::bail!(
                        "the range move was cancelled; its chats are back on {}",
                        m.source
                    ),
                },
                _ => {}
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The configuration file: `--config`, `CHATSHARD_CONFIG`, or
/// `config/chatshard.toml` when it exists.
fn config_path(arg: &ConfigArg) -> anyhow::Result<PathBuf> {
    if let Some(path) = &arg.config {
        return Ok(path.clone());
    }
    let default = Path::new("config/chatshard.toml");
    if default.exists() {
        return Ok(default.to_path_buf());
    }
    anyhow::bail!(
        "no configuration: pass --config FILE or set CHATSHARD_CONFIG \
         (start from config/chatshard.example.toml), or run `chatshard serve --dev`"
    )
}

fn load(arg: &ConfigArg) -> anyhow::Result<Settings> {
    Ok(Settings::load(&config_path(arg)?)?)
}

/// How often the configuration file is checked for changes.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(1);

async fn serve(settings: &Settings, config: Option<PathBuf>) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    // The live section follows the file: checked every second, and at once
    // on SIGHUP. SIGHUP also reloads the API listener's TLS certificate and client CAs.
    let tls = app.tls().cloned();
    if let Some(path) = &config {
        app.watch_config(path.clone(), CONFIG_POLL);
    }
    if config.is_some() || tls.is_some() {
        let live = app.live().clone();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        if let Some(path) = &config {
                            app::reload_live(&live, path);
                        }
                        if let Some(tls) = &tls {
                            // Logged there; the previous certificate stays.
                            let _ = tls.reload();
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGHUP; the file is still checked every second");
            }
        }
    }
    let addr = app.local_addr()?;
    let scheme = if settings.http.tls.enabled() {
        "https"
    } else {
        "http"
    };
    tracing::info!(%addr, shards = settings.shards.len(), scheme, "chatshard listening");
    println!("chatshard listening on {scheme}://{addr}");
    app.run(shutdown_signal()).await
}

async fn serve_dev(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = match &args.config.config {
        Some(path) => Settings::load_without_shards(path)?,
        None => Settings::from_toml_unvalidated("", std::env::vars())?,
    };
    if let Some(listen) = args.listen {
        settings.listen = listen;
    }
    let telemetry = telemetry::init(&settings.telemetry)?;
    if settings.admin.token.is_empty() {
        // Printed only when generated here: a token the operator configured
        // is theirs to know and must not end up in a terminal log.
        settings.admin.token = generate_token();
        println!(
            "admin token (Authorization: Bearer ...): {}",
            settings.admin.token
        );
    } else {
        println!("admin token: the one configured (admin.token or CHATSHARD_ADMIN_TOKEN)");
    }
    let replicas = match args.replicas {
        0 => String::new(),
        1 => " (1 replica each)".to_owned(),
        r => format!(" ({r} replicas each)"),
    };
    println!(
        "starting {} local MariaDB shards{replicas} under {} ...",
        args.shards,
        args.data_dir.display()
    );
    let mut shards = LocalCluster::start_replicated(
        args.shards,
        args.replicas,
        Location::Persistent(args.data_dir.clone()),
        &[format!(
            "--innodb-buffer-pool-size={}",
            args.shard_buffer_pool
        )],
    )
    .await?;
    for schema in shards.schemas() {
        println!("  {schema}");
    }
    for shard in shards.shard_settings() {
        for url in &shard.replicas {
            println!("  {} replica: {url}", shard.name);
        }
    }
    settings.shards = shards.shard_settings().to_vec();
    shards.fill_replication(&mut settings);
    let mut redis = None;
    if args.redis {
        let dir = args.data_dir.join("redis");
        println!("starting a local redis-server under {} ...", dir.display());
        let server = match LocalRedis::start(LocalRedisOptions::dev(dir, 0)).await {
            Ok(server) => server,
            Err(e) => {
                shards.stop().await;
                return Err(e);
            }
        };
        println!("  redis: {}", server.url());
        settings.redis.url = server.url();
        redis = Some(server);
    }
    let result = serve(&settings, args.config.config.clone()).await;
    if let Some(mut redis) = redis {
        println!("stopping the local redis-server ...");
        if let Err(e) = redis.stop().await {
            tracing::warn!(error = %format!("{e:#}"), "the local redis-server did not stop cleanly");
        }
    }
    println!("stopping the local shards ...");
    shards.stop().await;
    telemetry.shutdown().await;
    result
}

/// `--shard-buffer-pool`: digits and a unit (K, M or G; bytes without one),
/// 16 MiB to 64 GiB, given back as `mariadbd` reads it.
fn parse_pool_size(s: &str) -> Result<String, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(format!("{s:?}: the unit must be K, M or G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 512M or 2G"))?;
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n);
    let unit = if shift == 0 {
        String::new()
    } else {
        unit.to_string()
    };
    match bytes {
        Some(b) if ((16 << 20)..=(64 << 30)).contains(&b) => Ok(format!("{n}{unit}")),
        _ => Err(format!("{s:?}: the buffer pool must be 16M to 64G")),
    }
}

/// A random admin token for `serve --dev`: 32 hex characters.
fn generate_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..16)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// Completes on Ctrl-C or SIGTERM. A signal that cannot be watched is logged
/// (the other one still stops the service).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot watch for Ctrl-C; SIGTERM still stops the service");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM; Ctrl-C still stops the service");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::parse_pool_size;

    #[test]
    fn a_buffer_pool_size_is_read_as_mariadbd_reads_it_and_bounded() {
        assert_eq!(parse_pool_size("512M").as_deref(), Ok("512M"));
        assert_eq!(parse_pool_size("2g").as_deref(), Ok("2G"));
        assert_eq!(parse_pool_size("16777216").as_deref(), Ok("16777216"));
        assert_eq!(parse_pool_size("65536K").as_deref(), Ok("65536K"));
        for bad in [
            "",
            "M",
            "8M",
            "65G",
            "1T",
            "-1G",
            "1.5G",
            "99999999999999999999G",
        ] {
            assert!(parse_pool_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
