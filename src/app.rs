//! Builds the application from [`Settings`], binds, and runs until stopped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;
use crate::domain::MaxMembers;
use crate::http;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::service::{ChatService, ServiceSettings};
use crate::shard::{Instruments, Shard, ShardSet};
use crate::throttle::{SystemClock, Throttle};

/// A bound, ready-to-run service.
pub struct App {
    listener: tokio::net::TcpListener,
    /// Tells streams the instance is shutting down.
    closing: tokio::sync::watch::Sender<bool>,
    http: crate::config::HttpSettings,
    /// TLS on the listener (`http.tls`), if configured.
    tls: Option<Arc<http::tls::Tls>>,
    router: axum::Router,
    shards: Arc<ShardSet>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
}

impl App {
    /// Builds the shards (lazily connected), checks their InnoDB settings, and
    /// binds the listener.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        settings.validate()?;
        let tls = http::tls::Tls::from_settings(&settings.http.tls)?;
        let metrics = Metrics::new(settings.telemetry.metrics_export()?.as_ref())?;
        let shards = build_shards_measured(settings, metrics.shard_instruments())?;
        check_innodb(&shards, settings.startup.require_safe_innodb).await?;
        let live = Live::new(settings.live());
        let throttle = Throttle::new(Arc::new(SystemClock::default()), &settings.throttle);
        metrics.observe(&shards, &throttle);
        let fleet = if settings.redis.urls().is_empty() {
            None
        } else {
            Some(
                crate::fleet::Fleet::start(
                    &settings.redis,
                    settings.listen,
                    live.clone(),
                    throttle.clone(),
                    settings.throttle.tracked_chats,
                )
                .await?,
            )
        };
        if let Some(fleet) = &fleet {
            metrics.observe_fleet(fleet.clone());
        }
        let service = ChatService::new(
            shards.clone(),
            service_settings(settings)?,
            live.clone(),
            throttle,
            fleet,
        );
        let admin_token = Some(settings.admin.token.as_str())
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        let callers = Arc::new(http::auth::Callers::new(&settings.api.clients));
        if callers.is_open() {
            tracing::warn!(
                "no [[api.clients]] configured: the data API is open to anyone who reaches {}",
                settings.listen
            );
        }
        if admin_token.is_none() {
            tracing::info!("no admin token configured: the admin API is off");
        }
        let (closing, closing_rx) = tokio::sync::watch::channel(false);
        let subscribers = Arc::new(crate::service::subscribers::Subscribers::default());
        let streams = Arc::new(crate::service::mux::Streams::default());
        crate::service::mux::Streams::sweep_every_second(&streams, live.clone());
        metrics.observe_streams(subscribers.clone());
        let service = Arc::new(service);
        service.spawn_tail_refresher();
        service.spawn_replica_monitors();
        // Follows the newest bucket table the shards hold (a range moved
        // since the configuration was written), from the first poll on: no
        // read at start, so no shard gets a breaker verdict before any
        // request needs it. Until then the shards' markers and bucket
        // tables redirect what this instance routes by the configuration.
        service.spawn_bucket_map_poller();
        service.spawn_move_recovery();
        service.spawn_isolation();
        service.spawn_lifecycle(settings.purge.clone(), settings.digest.clone());
        metrics.observe_tails(service.clone());
        metrics.observe_lifecycle(service.clone());
        let router = http::router(http::Shared {
            service,
            admin_token,
            callers,
            metrics: metrics.clone(),
            chat_id_in_telemetry: settings.telemetry.chat_id,
            http: settings.http.clone(),
            schemas: Default::default(),
            subscribers,
            streams,
            closing: closing_rx,
        });
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
        Ok(Self {
            listener,
            closing,
            http: settings.http.clone(),
            tls,
            router,
            shards,
            live,
            metrics,
        })
    }

    /// The listener's TLS, whose certificate [`http::tls::Tls::reload`]
    /// swaps (SIGHUP); `None` on plain HTTP.
    pub fn tls(&self) -> Option<&Arc<http::tls::Tls>> {
        self.tls.as_ref()
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// Reloads the live section whenever the content of `path` changes (read
    /// every `every`; a config file is small); an invalid file is logged and
    /// ignored.
    pub fn watch_config(&self, path: PathBuf, every: Duration) {
        let live = self.live.clone();
        // The file's content, not its mtime, decides: two edits within one
        // timestamp tick (milliseconds on many filesystems) share an mtime.
        // Read here, before the task starts, so no edit after this call is missed.
        let mut seen = std::fs::read(&path).ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // A new content read once, not yet applied.
            let mut pending = None;
            loop {
                tick.tick().await;
                let now = std::fs::read(&path).ok();
                if now == seen {
                    pending = None;
                    continue;
                }
                // A file read while it is being written (truncated, half
                // rewritten) must not be applied: a new content counts once
                // two reads a period apart agree on it.
                if pending.as_ref() == Some(&now) {
                    seen = now;
                    pending = None;
                    reload_live(&live, &path);
                } else {
                    pending = Some(now);
                }
            }
        });
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub fn shards(&self) -> &Arc<ShardSet> {
        &self.shards
    }

    /// Serves until `shutdown` completes, then lets requests in flight finish
    /// within `http.shutdown_grace_ms` and closes what is left.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let closing = self.closing;
        let shutdown = async move {
            shutdown.await;
            // Streams end with a final event before connections are drained.
            closing.send_replace(true);
        };
        let metrics = self.metrics;
        http::serve::serve(
            self.listener,
            self.router,
            self.http,
            self.tls,
            metrics.clone(),
            shutdown,
        )
        .await;
        // Flushes the OTLP metric exporter, if any (blocking).
        if let Err(e) = tokio::task::spawn_blocking(move || metrics.shutdown()).await {
            tracing::warn!(error = %e, "flushing metrics at shutdown failed");
        }
        Ok(())
    }
}

/// Reads the live section of the file at `path` into `live`; a file that does
/// not parse, or a live section that is not valid, is logged and ignored.
pub fn reload_live(live: &Live, path: &Path) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the configuration file; the live configuration stays");
            return;
        }
    };
    match Settings::from_toml_unvalidated(&text, std::env::vars()) {
        Ok(settings) => {
            // A rejected section is logged by `update`, and the old one stays.
            let _rejected = live.update(settings.live(), "configuration file");
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "configuration file rejected; the live configuration stays");
        }
    }
}

/// How the service is sized, from the settings.
pub fn service_settings(settings: &Settings) -> anyhow::Result<ServiceSettings> {
    Ok(ServiceSettings {
        group_commit: settings.group_commit.clone(),
        default_max_members: MaxMembers::parse(i64::from(settings.defaults.max_members))
            .map_err(|e| anyhow::anyhow!(e))?,
        page_cache_bytes: settings.throttle.page_cache_bytes,
        replicas: settings.replicas.clone(),
        moves: crate::service::moves::MoveSettings {
            batch: settings.moves.batch_revisions,
            fence_lag: settings.moves.fence_lag,
            fence: Duration::from_millis(settings.moves.fence_ms),
            pause: Duration::from_millis(settings.moves.pause_ms),
            max_p99_ratio: settings.moves.max_p99_ratio,
            // A paused copy still renews its lease.
            max_pause: Duration::from_millis(
                settings
                    .moves
                    .max_pause_ms
                    .min(settings.moves.lease_ms / 4)
                    .max(settings.moves.pause_ms),
            ),
            revisions_per_second: settings.moves.revisions_per_second,
            clean_batch: settings.moves.clean_batch,
            lease: Duration::from_millis(settings.moves.lease_ms),
            hold_writes: Duration::from_millis(settings.moves.hold_writes_ms),
            concurrent_batches: settings.moves.concurrent_chats as usize,
            map_poll: Duration::from_millis(settings.moves.map_poll_ms),
        },
        tail: crate::service::tail::TailSettings {
            chats: settings.tail.chats,
            events_per_chat: settings.tail.events_per_chat,
            max_bytes: settings.tail.max_bytes,
            refresh: Duration::from_millis(settings.tail.refresh_ms),
        },
    })
}

/// One [`Shard`] per configured shard, plus the routing table.
pub fn build_shards(settings: &Settings) -> anyhow::Result<Arc<ShardSet>> {
    // Outside `serve` (repair, benches) operations are not measured.
    build_shards_measured(settings, Instruments::unmeasured())
}

/// [`build_shards`], recording each operation into `instruments`.
pub fn build_shards_measured(
    settings: &Settings,
    instruments: Instruments,
) -> anyhow::Result<Arc<ShardSet>> {
    let router = settings.router()?;
    let shards = settings
        .shards
        .iter()
        .zip(settings.id_blocks())
        .map(|(s, block)| {
            Shard::new(
                s,
                block,
                &settings.pool,
                &settings.breaker,
                &settings.replicas,
                instruments.clone(),
            )
            .map(Arc::new)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Arc::new(ShardSet::new(shards, router)?))
}

/// Warns about (or, when `require` is set, refuses) shards whose InnoDB settings
/// would take the AUTO-INC table lock or lose commits. A shard that cannot be
/// reached is reported and does not stop the start: the service must come up
/// with one shard down. A shard that answers but refuses the connection (a
/// TLS handshake that fails, a certificate that does not verify,
/// `ssl-mode=DISABLED` against `require_secure_transport=ON`, a refused
/// login) is a configuration error that no retry mends: the start is
/// refused, with one error naming every such shard and its cause.
pub async fn check_innodb(shards: &ShardSet, require: bool) -> anyhow::Result<()> {
    let mut unsafe_shards = Vec::new();
    let mut refused = Vec::new();
    for shard in shards.all() {
        match shard.read_innodb().await {
            Ok(s) if s.is_safe() => {
                tracing::info!(
                    shard = shard.name(),
                    "innodb_autoinc_lock_mode=2, innodb_flush_log_at_trx_commit=1"
                );
            }
            Ok(s) => {
                tracing::warn!(
                    shard = shard.name(),
                    address = shard.address(),
                    innodb_autoinc_lock_mode = s.autoinc_lock_mode,
                    innodb_flush_log_at_trx_commit = s.flush_log_at_trx_commit,
                    "shard should run innodb_autoinc_lock_mode=2 (no table-level AUTO-INC lock under \
                     concurrent inserts) and innodb_flush_log_at_trx_commit=1 (no lost commits); see docs/operations.md"
                );
                unsafe_shards.push(format!(
                    "{} (innodb_autoinc_lock_mode={}, innodb_flush_log_at_trx_commit={})",
                    shard.name(),
                    s.autoinc_lock_mode,
                    s.flush_log_at_trx_commit
                ));
            }
            Err(e) => match e.connect_refusal() {
                Some((why, cause)) => refused.push(format!(
                    "shard {} ({}) refused the connection: {why}: {cause}",
                    shard.name(),
                    shard.redacted_url(),
                )),
                None => {
                    tracing::warn!(shard = shard.name(), error = %crate::error::chain(&e), "cannot check InnoDB settings: shard unreachable");
                }
            },
        }
    }
    if !refused.is_empty() {
        anyhow::bail!("refusing to start: {}", refused.join("; "));
    }
    if require && !unsafe_shards.is_empty() {
        anyhow::bail!(
            "refusing to start (startup.require_safe_innodb = true): {}",
            unsafe_shards.join(", ")
        );
    }
    Ok(())
}
