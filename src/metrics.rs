//! Metrics: OpenTelemetry instruments, read as Prometheus text on `GET /metrics`
//! and, when an OTLP endpoint is configured, exported over OTLP too.
//!
//! Gauges and counters of state that already exists (breaker state, in-flight,
//! rejections, throttling decisions) are observed from it at collection time,
//! so the request path pays nothing for them; only the latency histograms (of
//! HTTP requests, of shard operations, and of the parts of a request of one
//! shard's chats: chatshard's own, the database's, the waits) and the shard
//! operation counter are recorded as requests run. Shards are
//! read through their `ShardStatus` snapshot, never their internals. The
//! catalogue is in docs/observability.md; a test checks that every metric the
//! Grafana dashboard queries is exported.
//!
//! Every label value comes from a bounded set: shard names and operation names
//! from the configuration and the code, outcomes and reasons from fixed lists,
//! HTTP routes from the router's templates (`unmatched` otherwise) and methods
//! from the standard ones (`_OTHER` otherwise, as the OpenTelemetry HTTP
//! conventions say). Nothing a client sends can add a series.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::{KeyValue, StringValue};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::shard::{BreakerState, Instruments, ShardSet, Spent};
use crate::throttle::{Decisions, Throttle};

/// Latency buckets in seconds: 1 ms to 10 s. 1.5 s sits just above the default
/// operation deadline (1 s), so a shard that times out reads as ~1-1.5 s, not 2.5 s.
const SECONDS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0,
];

/// Finer buckets for the parts of a request of one shard's chats, in
/// seconds: 0.1 ms to 10 s, at most 25 % apart from 0.25 ms to 25 ms, so
/// that a quantile read from them (interpolated within its bucket, as
/// `histogram_quantile` does) is within about 10 % of the exact one where
/// requests of a healthy shard fall.
const PART_SECONDS: [f64; 30] = [
    0.0001, 0.00025, 0.0003, 0.0004, 0.0005, 0.0006, 0.0008, 0.001, 0.00125, 0.0015, 0.002, 0.0025,
    0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// What the stream gauges read: implemented by the HTTP layer's stream
/// registry, so that metrics do not depend on `http`.
pub trait StreamCounts: Send + Sync {
    /// Event streams open on this instance.
    fn open(&self) -> u64;
    /// Chat subscriptions those streams hold.
    fn subscriptions(&self) -> u64;
}

/// The instruments of one chatshard instance.
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    /// `chatshard.shard.operation.duration`: one shard operation that reached
    /// the database, by outcome.
    shard_operation: Histogram<f64>,
    /// `chatshard.shard.operations`: every shard operation by outcome,
    /// refusals included.
    shard_operations: Counter<u64>,
    /// `http.server.request.duration`: by route, method and status.
    http_request: Histogram<f64>,
    /// `chatshard.shard.request.own.duration`: a request of one of the
    /// shard's chats, arrival to answer, less its database work.
    request_own: Histogram<f64>,
    /// `chatshard.shard.request.database.duration`: that request's database
    /// work.
    request_database: Histogram<f64>,
    /// `chatshard.shard.request.wait.duration`: that request's waits, by
    /// `stage` (`bulkhead`; `group_commit` for requests with a write).
    request_wait: Histogram<f64>,
    /// `chatshard.stream.events`: events written to streams.
    stream_events: Counter<u64>,
    /// `chatshard.stream.ends`: streams ended, by reason.
    stream_ends: Counter<u64>,
    /// `chatshard.stream.delivery_lag`: commit to the event handed to a stream.
    stream_lag: Histogram<f64>,
    /// `chatshard.stream.refusals`: streams refused by a limit.
    stream_refusals: Counter<u64>,
    /// `chatshard.stream.resyncs`: chats of a multiplexed stream told to
    /// fetch a gap themselves.
    stream_resyncs: Counter<u64>,
    /// `chatshard.http.stalled_connections`: closed because the client took
    /// no bytes for `http.write_stall_timeout_ms`.
    stalled_connections: Counter<u64>,
    /// `chatshard.http.auth_refusals`: requests refused for their caller,
    /// by `reason` (`unauthenticated`, `forbidden`).
    auth_refusals: Counter<u64>,
    /// `chatshard.http.tls_handshake_failures`: TLS handshakes on the API
    /// listener that did not complete, by `reason`
    /// ([`TLS_HANDSHAKE_FAILURE_REASONS`]).
    tls_handshake_failures: Counter<u64>,
}

/// Why a TLS handshake on the listener failed (every one is a series from
/// the start): no handshake within `http.tls.handshake_timeout_ms`; a client
/// without a certificate, or with one that does not verify, when
/// `client_ca_file` asks for one; a client that refused the server's
/// certificate (it sent an alert); anything else the peer sent that is not
/// a TLS handshake we accept (plain HTTP, no common version or cipher); a
/// connection closed or reset during the handshake.
pub const TLS_HANDSHAKE_FAILURE_REASONS: [&str; 6] = [
    "timeout",
    "no_client_cert",
    "bad_client_cert",
    "client_refused",
    "protocol",
    "closed",
];

/// Why event streams end (every one is a series from the start).
const STREAM_END_REASONS: [&str; 6] = [
    "client",
    "shutdown",
    "chat_not_found",
    "error",
    "replaced",
    "closed",
];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A Prometheus reader always; an OTLP reader when `otlp` is given.
    pub fn new(otlp: Option<&crate::telemetry::OtlpExport>) -> anyhow::Result<Arc<Self>> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()?;
        let mut builder = SdkMeterProvider::builder()
            .with_reader(prometheus)
            .with_resource(crate::telemetry::resource());
        if let Some(export) = otlp {
            builder = builder.with_periodic_exporter(export.metric_exporter()?);
        }
        let provider = builder.build();
        let meter = provider.meter("chatshard");
        let shard_operation = meter
            .f64_histogram("chatshard.shard.operation.duration")
            .with_description(
                "Duration of one shard operation that reached the database (a read, or one \
                 group-commit transaction); refused calls are not in it",
            )
            .with_unit("s")
            .with_boundaries(SECONDS.to_vec())
            .build();
        let shard_operations = meter
            .u64_counter("chatshard.shard.operations")
            .with_description("Shard operations by outcome, refusals included")
            .build();
        let http_request = meter
            .f64_histogram("http.server.request.duration")
            .with_description("Duration of HTTP requests")
            .with_unit("s")
            .with_boundaries(SECONDS.to_vec())
            .build();
        let part = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_description(description)
                .with_unit("s")
                .with_boundaries(PART_SECONDS.to_vec())
                .build()
        };
        let request_own = part(
            "chatshard.shard.request.own.duration",
            "A short request of one of the shard's chats (not a stream nor a long-poll), \
             arrival to answer, less the time in its database work: chatshard's own part \
             (HTTP, protections, group-commit queue, its CPU)",
        );
        let request_database = part(
            "chatshard.shard.request.database.duration",
            "The time the same requests spent in their database work (every shard operation \
             made for them, the group-commit batch of a write included, and a write's wait \
             behind its chat's previous batch), timed by chatshard",
        );
        let request_wait = part(
            "chatshard.shard.request.wait.duration",
            "The same requests' waits inside chatshard, by stage: bulkhead (breaker, chat \
             share, admission, pool), group_commit (until the write's batch started, less \
             the wait behind the chat's previous batch; requests with a write only)",
        );
        let stream_events = meter
            .u64_counter("chatshard.stream.events")
            .with_description("Events written to event streams (SSE)")
            .build();
        let stream_ends = meter
            .u64_counter("chatshard.stream.ends")
            .with_description(
                "Event streams ended, by reason: client (went away), shutdown, chat_not_found, \
                 error, replaced (another connection took a multiplexed stream over), closed \
                 (the multiplexed stream was deleted)",
            )
            .build();
        let stream_refusals = meter
            .u64_counter("chatshard.stream.refusals")
            .with_description(
                "Event streams and subscriptions refused by a limit: instance, chat, or stream \
                 (chats per multiplexed stream)",
            )
            .build();
        let stream_resyncs = meter
            .u64_counter("chatshard.stream.resyncs")
            .with_description(
                "Chats of a multiplexed stream too far behind, told to fetch the gap (resync event)",
            )
            .build();
        let stream_lag = meter
            .f64_histogram("chatshard.stream.delivery_lag")
            .with_description(
                "Time from an event's commit to its hand-over to a stream (the socket write follows)",
            )
            .with_unit("s")
            .with_boundaries(SECONDS.to_vec())
            .build();
        let stalled_connections = meter
            .u64_counter("chatshard.http.stalled_connections")
            .with_description(
                "Client connections closed because the client took no bytes for \
                 http.write_stall_timeout_ms (a stream subscriber that stopped reading)",
            )
            .build();
        stalled_connections.add(0, &[]);
        let auth_refusals = meter
            .u64_counter("chatshard.http.auth_refusals")
            .with_description(
                "Requests refused for their caller: no known client token (unauthenticated) \
                 or a client without the route's scope (forbidden)",
            )
            .build();
        for reason in ["unauthenticated", "forbidden"] {
            auth_refusals.add(0, &[KeyValue::new("reason", reason)]);
        }
        let tls_handshake_failures = meter
            .u64_counter("chatshard.http.tls_handshake_failures")
            .with_description(
                "TLS handshakes on the API listener that did not complete, by reason \
                 (timeout, no_client_cert, bad_client_cert, client_refused, protocol, closed)",
            )
            .build();
        for reason in TLS_HANDSHAKE_FAILURE_REASONS {
            tls_handshake_failures.add(0, &[KeyValue::new("reason", reason)]);
        }
        stream_resyncs.add(0, &[]);
        for reason in STREAM_END_REASONS {
            stream_ends.add(0, &[KeyValue::new("reason", reason)]);
        }
        for limit in ["instance", "chat", "stream"] {
            stream_refusals.add(0, &[KeyValue::new("limit", limit)]);
        }
        Ok(Arc::new(Self {
            registry,
            provider,
            meter,
            shard_operation,
            shard_operations,
            http_request,
            request_own,
            request_database,
            request_wait,
            stream_events,
            stream_ends,
            stream_lag,
            stream_refusals,
            stream_resyncs,
            stalled_connections,
            auth_refusals,
            tls_handshake_failures,
        }))
    }

    /// What every shard records its operations into.
    pub fn shard_instruments(&self) -> Instruments {
        Instruments {
            operation_seconds: self.shard_operation.clone(),
            operations: self.shard_operations.clone(),
        }
    }

    /// Registers the observed instruments over the shards and the throttle.
    pub fn observe(&self, shards: &Arc<ShardSet>, throttle: &Arc<Throttle>) {
        self.observe_shards(
            shards,
            "chatshard.shard.breaker.state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            |s, o, shard| {
                let v = match s.breaker {
                    BreakerState::Closed => 0,
                    BreakerState::Open => 1,
                    BreakerState::HalfOpen => 2,
                };
                o.observe(v, &[shard]);
            },
        );
        self.observe_shards(
            shards,
            "chatshard.shard.in_flight",
            "Operations running on the shard",
            |s, o, shard| {
                o.observe(s.in_flight as i64, &[shard]);
            },
        );
        self.observe_shards(
            shards,
            "chatshard.shard.waiting",
            "Callers waiting for a connection of the shard",
            |s, o, shard| {
                o.observe(s.waiting as i64, &[shard]);
            },
        );
        self.observe_shards(
            shards,
            "chatshard.shard.writes_gate",
            "Where the shard's writes go: 0 to its writer, 1 a new writer awaits its \
             confirmation, 2 no member is writable, 3 split brain (several are)",
            |s, o, shard| {
                let v = match s.gate {
                    crate::shard::topology::Gate::Writer(_) => 0,
                    crate::shard::topology::Gate::Pending(_) => 1,
                    crate::shard::topology::Gate::NoWriter => 2,
                    crate::shard::topology::Gate::SplitBrain => 3,
                };
                o.observe(v, &[shard]);
            },
        );
        let s = shards.clone();
        self.meter
            .u64_observable_counter("chatshard.shard.writer_changes")
            .with_description("Times the shard's writes went to another member since start")
            .with_callback(move |o| {
                for shard in s.all() {
                    o.observe(
                        shard.status().role_changes,
                        &[KeyValue::new("shard", shard.name().to_owned())],
                    );
                }
            })
            .build();
        let s = shards.clone();
        self.meter
            .i64_observable_gauge("chatshard.shard.member.lag_ms")
            .with_description(
                "How far each member of a replicated shard is behind its writer, by the \
                 heartbeat (milliseconds; -1 when unknown: down, or no writer to compare with)",
            )
            .with_callback(move |o| {
                for shard in s.all() {
                    let status = shard.status();
                    if status.members.is_empty() {
                        // A shard without replicas: its one member, the
                        // writer, is behind nobody.
                        o.observe(
                            0,
                            &[
                                KeyValue::new("shard", shard.name().to_owned()),
                                KeyValue::new("member", status.address.clone()),
                                KeyValue::new("role", "writer"),
                            ],
                        );
                    }
                    for m in status.members {
                        o.observe(
                            m.lag_ms
                                .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)),
                            &[
                                KeyValue::new("shard", shard.name().to_owned()),
                                KeyValue::new("member", m.address.clone()),
                                KeyValue::new("role", m.role.as_str()),
                            ],
                        );
                    }
                }
            })
            .build();
        let s = shards.clone();
        self.meter
            .i64_observable_gauge("chatshard.shard.member.in_rotation")
            .with_description("1 when the replica serves reads now (read-only, answering, lag within replicas.max_lag_ms)")
            .with_callback(move |o| {
                for shard in s.all() {
                    for m in shard.status().members {
                        o.observe(
                            i64::from(m.in_rotation),
                            &[
                                KeyValue::new("shard", shard.name().to_owned()),
                                KeyValue::new("member", m.address.clone()),
                            ],
                        );
                    }
                }
            })
            .build();
        let s = shards.clone();
        self.meter
            .u64_observable_counter("chatshard.shard.rejections")
            .with_description("Calls refused by the shard's protections, by reason")
            .with_callback(move |o| {
                for shard in s.all() {
                    let r = shard.status().rejected;
                    for (reason, n) in [
                        ("breaker_open", r.breaker_open),
                        ("shard_busy", r.shard_busy),
                        ("chat_busy", r.chat_busy),
                    ] {
                        o.observe(
                            n,
                            &[
                                KeyValue::new("shard", shard.name().to_owned()),
                                KeyValue::new("reason", reason),
                            ],
                        );
                    }
                }
            })
            .build();
        let t = throttle.clone();
        self.meter
            .u64_observable_counter("chatshard.throttle.decisions")
            .with_description("Throttling decisions by kind; dry_run=true ones refused nothing")
            .with_callback(move |o| {
                let d = &t.decisions;
                for (kind, dry_run, n) in [
                    ("join_throttled", false, Decisions::get(&d.joins_throttled)),
                    (
                        "join_throttled",
                        true,
                        Decisions::get(&d.joins_throttled_dry_run),
                    ),
                    (
                        "fetch_throttled",
                        false,
                        Decisions::get(&d.fetches_throttled),
                    ),
                    (
                        "fetch_throttled",
                        true,
                        Decisions::get(&d.fetches_throttled_dry_run),
                    ),
                    (
                        "hot_chat_marked",
                        false,
                        Decisions::get(&d.hot_chats_marked),
                    ),
                    (
                        "hot_chat_marked",
                        true,
                        Decisions::get(&d.hot_chats_marked_dry_run),
                    ),
                    ("chat_isolated", false, Decisions::get(&d.chats_isolated)),
                    (
                        "chat_isolated",
                        true,
                        Decisions::get(&d.chats_isolated_dry_run),
                    ),
                    (
                        "isolation_deferred",
                        false,
                        Decisions::get(&d.isolations_deferred),
                    ),
                ] {
                    o.observe(
                        n,
                        &[
                            KeyValue::new("kind", kind),
                            KeyValue::new("dry_run", dry_run),
                        ],
                    );
                }
            })
            .build();
        let t = throttle.clone();
        self.meter
            .u64_observable_gauge("chatshard.hot_chats")
            .with_description("Chats hot now on this instance")
            .with_callback(move |o| o.observe(t.hot.hot_chats().len() as u64, &[]))
            .build();
        let t = throttle.clone();
        self.meter
            .u64_observable_counter("chatshard.fetches.coalesced")
            .with_description(
                "Event fetches served without a query of their own (coalesced or kept pages)",
            )
            .with_callback(move |o| o.observe(Decisions::get(&t.decisions.fetches_coalesced), &[]))
            .build();
        let t = throttle.clone();
        self.meter
            .u64_observable_counter("chatshard.tail.reads")
            .with_description(
                "Event fetches (polls, long-polls, streams) by how the chat's in-memory tail \
                 answered: hit (as it stood), miss (after one shared refresh read), behind \
                 (older than the tail: read from the log)",
            )
            .with_callback(move |o| {
                let d = &t.decisions;
                for (result, counter) in [
                    ("hit", &d.tail_hits),
                    ("miss", &d.tail_misses),
                    ("behind", &d.tail_behind),
                ] {
                    o.observe(Decisions::get(counter), &[KeyValue::new("result", result)]);
                }
            })
            .build();
        let t = throttle.clone();
        self.meter
            .u64_observable_counter("chatshard.tail.revision_polls")
            .with_description(
                "Queries of the tail refresher: the latest revisions of up to 500 waited-on chats \
                 of one shard each, every tail.refresh_ms",
            )
            .with_callback(move |o| {
                o.observe(Decisions::get(&t.decisions.tail_revision_polls), &[])
            })
            .build();
    }

    /// A gauge per shard, observed from its status at collection time.
    fn observe_shards(
        &self,
        shards: &Arc<ShardSet>,
        name: &'static str,
        description: &'static str,
        observe: impl Fn(
            &crate::shard::ShardStatus,
            &dyn opentelemetry::metrics::AsyncInstrument<i64>,
            KeyValue,
        ) + Send
        + Sync
        + 'static,
    ) {
        let shards = shards.clone();
        self.meter
            .i64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |o| {
                for shard in shards.all() {
                    observe(
                        &shard.status(),
                        o,
                        KeyValue::new("shard", shard.name().to_owned()),
                    );
                }
            })
            .build();
    }

    /// One event handed to a stream, `lag` after its commit.
    pub fn stream_event(&self, lag: f64) {
        self.stream_events.add(1, &[]);
        self.stream_lag.record(lag.max(0.0), &[]);
    }

    /// A request refused for its caller (`unauthenticated` or `forbidden`).
    pub fn auth_refused(&self, reason: &'static str) {
        self.auth_refusals
            .add(1, &[KeyValue::new("reason", reason)]);
    }

    /// A stream ended for `reason` (a fixed set, see the instrument).
    pub fn stream_ended(&self, reason: &'static str) {
        self.stream_ends.add(1, &[KeyValue::new("reason", reason)]);
    }

    /// A stream refused by the `limit` of the instance or of the chat.
    pub fn stream_refused(&self, limit: &'static str) {
        self.stream_refusals
            .add(1, &[KeyValue::new("limit", limit)]);
    }

    /// A TLS handshake on the listener failed for `reason` (one of
    /// [`TLS_HANDSHAKE_FAILURE_REASONS`]).
    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.tls_handshake_failures
            .add(1, &[KeyValue::new("reason", reason)]);
    }

    /// A client connection was closed for taking no bytes.
    pub fn connection_stalled(&self) {
        self.stalled_connections.add(1, &[]);
    }

    /// A chat of a multiplexed stream was told to resync.
    pub fn stream_resync(&self) {
        self.stream_resyncs.add(1, &[]);
    }

    /// Registers the gauges of the in-memory tails: how many chats have one,
    /// and the bytes they hold against `tail.max_bytes`.
    pub fn observe_tails(&self, service: Arc<crate::service::ChatService>) {
        let s = service.clone();
        self.meter
            .u64_observable_gauge("chatshard.tails")
            .with_description("Chats with an in-memory tail of their events on this instance")
            .with_callback(move |o| o.observe(s.tails(), &[]))
            .build();
        self.meter
            .u64_observable_gauge("chatshard.tail.bytes")
            .with_description(
                "Bytes the in-memory tails hold together (estimated), against tail.max_bytes",
            )
            .with_unit("By")
            .with_callback(move |o| o.observe(service.tail_bytes(), &[]))
            .build();
    }

    /// Registers the counters of the purge and the digest check.
    pub fn observe_lifecycle(&self, service: Arc<crate::service::ChatService>) {
        let s = service.clone();
        self.meter
            .u64_observable_counter("chatshard.failover.lost_chats")
            .with_description(
                "Chats found, after a change of writer, below the revision this instance \
                 acknowledged (acknowledged writes lost in a failover)",
            )
            .with_callback(move |o| o.observe(s.acked().lost_total(), &[]))
            .build();
        use crate::service::lifecycle::LifecycleStats as S;
        use opentelemetry::KeyValue;
        let s = service.clone();
        self.meter
            .u64_observable_counter("chatshard.purge.events")
            .with_description("Events deleted by the purge (past the retention policy)")
            .with_callback(move |o| o.observe(S::get(&s.lifecycle().events_purged), &[]))
            .build();
        let s = service.clone();
        self.meter
            .u64_observable_counter("chatshard.purge.rounds")
            .with_description("Purge rounds run (one per shard per purge.interval_ms)")
            .with_callback(move |o| o.observe(S::get(&s.lifecycle().purge_rounds), &[]))
            .build();
        let s = service.clone();
        self.meter
            .u64_observable_counter("chatshard.digest.rounds")
            .with_description("Digest check rounds run (one per shard per digest.interval_ms)")
            .with_callback(move |o| o.observe(S::get(&s.lifecycle().digest_rounds), &[]))
            .build();
        let s = service.clone();
        self.meter
            .u64_observable_counter("chatshard.digest.checks")
            .with_description(
                "Chats whose derived state the digest check compared with its sources",
            )
            .with_callback(move |o| o.observe(S::get(&s.lifecycle().chats_checked), &[]))
            .build();
        self.meter
            .u64_observable_counter("chatshard.digest.repairs")
            .with_description(
                "Drift the digest check repaired, by kind: count (member count != JOINED rows), \
                 revision (revision behind the stored events), events_missing (first revision raised)",
            )
            .with_callback(move |o| {
                let l = service.lifecycle();
                for (kind, counter) in [
                    ("count", &l.repairs_count),
                    ("revision", &l.repairs_revision),
                    ("events_missing", &l.repairs_events_missing),
                ] {
                    o.observe(S::get(counter), &[KeyValue::new("kind", kind)]);
                }
            })
            .build();
    }

    /// Registers the fleet's gauges and counters: whether Redis answers, the
    /// live instances, and what crossed Redis.
    pub fn observe_fleet(&self, fleet: Arc<crate::fleet::Fleet>) {
        use opentelemetry::KeyValue;
        let f = fleet.clone();
        self.meter
            .u64_observable_gauge("chatshard.fleet.redis.up")
            .with_description(
                "1 while Redis answers; 0 while this instance acts alone (local limits, no notices)",
            )
            .with_callback(move |o| o.observe(u64::from(f.is_up()), &[]))
            .build();
        let f = fleet.clone();
        self.meter
            .u64_observable_gauge("chatshard.fleet.instances")
            .with_description("Live instances of the fleet, as last heard through Redis")
            .with_callback(move |o| o.observe(f.counted_instances(), &[]))
            .build();
        self.meter
            .u64_observable_counter("chatshard.fleet.messages")
            .with_description(
                "What crossed Redis, by kind and direction; dropped = not sent (Redis away or queue full)",
            )
            .with_callback(move |o| {
                let c = fleet.view().counters;
                for (kind, direction, n) in [
                    ("notice", "sent", c.notices_sent),
                    ("notice", "received", c.notices_received),
                    ("notice", "dropped", c.notices_dropped),
                    ("hot_mark", "sent", c.hot_marks_sent),
                    ("hot_mark", "received", c.hot_marks_received),
                    ("config", "received", c.config_changes_received),
                    ("join_lease", "sent", c.lease_requests),
                    ("outage", "received", c.outages),
                ] {
                    o.observe(
                        n,
                        &[
                            KeyValue::new("kind", kind),
                            KeyValue::new("direction", direction),
                        ],
                    );
                }
            })
            .build();
    }

    /// Registers the gauges of open streams and of the chat subscriptions
    /// they hold.
    pub fn observe_streams(&self, subscribers: Arc<dyn StreamCounts>) {
        let s = subscribers.clone();
        self.meter
            .u64_observable_gauge("chatshard.streams.open")
            .with_description("Event streams on this instance (per chat and multiplexed)")
            .with_callback(move |o| o.observe(s.open(), &[]))
            .build();
        self.meter
            .u64_observable_gauge("chatshard.streams.subscriptions")
            .with_description("Chat subscriptions held by the event streams of this instance")
            .with_callback(move |o| o.observe(subscribers.subscriptions(), &[]))
            .build();
    }

    /// Records one HTTP request; the method is a standard one or `_OTHER`.
    pub fn record_http(
        &self,
        seconds: f64,
        route: String,
        method: &axum::http::Method,
        status: u16,
    ) {
        self.http_request.record(
            seconds,
            &[
                KeyValue::new("http.route", route),
                KeyValue::new("http.request.method", method_label(method)),
                KeyValue::new("http.response.status_code", i64::from(status)),
            ],
        );
    }

    /// Records where the time of a request of one of `shard`'s chats went:
    /// `took` from arrival to answer, and its tally.
    pub fn record_shard_request(&self, shard: &str, took: Duration, spent: &Spent) {
        let shard = KeyValue::new("shard", StringValue::from(Arc::<str>::from(shard)));
        let database = spent.database();
        self.request_own.record(
            took.saturating_sub(database).as_secs_f64(),
            std::slice::from_ref(&shard),
        );
        self.request_database
            .record(database.as_secs_f64(), std::slice::from_ref(&shard));
        self.request_wait.record(
            spent.bulkhead().as_secs_f64(),
            &[shard.clone(), KeyValue::new("stage", "bulkhead")],
        );
        if let Some(queue) = spent.queue() {
            self.request_wait.record(
                queue.as_secs_f64(),
                &[shard, KeyValue::new("stage", "group_commit")],
            );
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Flushes and stops the OTLP reader, if any (blocking).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the metric exporter did not shut down cleanly");
        }
    }
}

/// The method as a metric label: one of the standard methods, else `_OTHER`,
/// so made-up methods cannot grow the number of series.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_share_one_label() -> crate::TestResult {
        let zzz = axum::http::Method::from_bytes(b"ZZZ1")?;
        assert_eq!(method_label(&zzz), "_OTHER");
        assert_eq!(method_label(&axum::http::Method::PATCH), "PATCH");
        Ok(())
    }
}
