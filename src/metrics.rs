//! Metrics: OpenTelemetry instruments, read as Prometheus text on `GET /metrics`
//! and, when an OTLP endpoint is configured, exported over OTLP too.
//!
//! Gauges and counters of state that already exists (breaker state, in-flight,
//! rejections, throttling decisions) are observed from it at collection time,
//! so the request path pays nothing for them; only the two latency histograms
//! are recorded as requests run. The catalogue is in docs/observability.md; a
//! test checks that every metric the Grafana dashboard queries is exported.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::shard::{BreakerState, ShardSet};
use crate::throttle::{Decisions, Throttle};

/// Latency buckets in seconds: 1 ms to 10 s.
const SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The instruments of one chatshard instance.
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    /// `chatshard.shard.operation.duration`: one shard operation, by outcome.
    pub shard_operation: Histogram<f64>,
    /// `http.server.request.duration`: by route, method and status.
    pub http_request: Histogram<f64>,
}

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
                "Duration of one shard operation (a read, or one group-commit transaction)",
            )
            .with_unit("s")
            .with_boundaries(SECONDS.to_vec())
            .build();
        let http_request = meter
            .f64_histogram("http.server.request.duration")
            .with_description("Duration of HTTP requests")
            .with_unit("s")
            .with_boundaries(SECONDS.to_vec())
            .build();
        Ok(Arc::new(Self {
            registry,
            provider,
            meter,
            shard_operation,
            http_request,
        }))
    }

    /// Registers the observed instruments over the shards and the throttle.
    pub fn observe(&self, shards: &Arc<ShardSet>, throttle: &Arc<Throttle>) {
        let s = shards.clone();
        self.meter
            .i64_observable_gauge("chatshard.shard.breaker.state")
            .with_description("Circuit breaker state: 0 closed, 1 open, 2 half-open")
            .with_callback(move |o| {
                for shard in s.all() {
                    let v = match shard.breaker().state() {
                        BreakerState::Closed => 0,
                        BreakerState::Open => 1,
                        BreakerState::HalfOpen => 2,
                    };
                    o.observe(v, &[KeyValue::new("shard", shard.name().to_owned())]);
                }
            })
            .build();
        let s = shards.clone();
        self.meter
            .u64_observable_gauge("chatshard.shard.in_flight")
            .with_description("Operations running on the shard")
            .with_callback(move |o| {
                for shard in s.all() {
                    o.observe(
                        shard.stats().in_flight() as u64,
                        &[KeyValue::new("shard", shard.name().to_owned())],
                    );
                }
            })
            .build();
        let s = shards.clone();
        self.meter
            .u64_observable_gauge("chatshard.shard.waiting")
            .with_description("Callers waiting for a connection of the shard")
            .with_callback(move |o| {
                for shard in s.all() {
                    let waiting = shard.admitted().saturating_sub(shard.stats().in_flight());
                    o.observe(
                        waiting as u64,
                        &[KeyValue::new("shard", shard.name().to_owned())],
                    );
                }
            })
            .build();
        let s = shards.clone();
        self.meter
            .u64_observable_counter("chatshard.shard.rejections")
            .with_description("Calls refused by the shard's protections, by reason")
            .with_callback(move |o| {
                use std::sync::atomic::Ordering::Relaxed;
                for shard in s.all() {
                    let stats = shard.stats();
                    for (reason, n) in [
                        ("breaker_open", stats.rejected_open.load(Relaxed)),
                        ("shard_busy", stats.rejected_busy.load(Relaxed)),
                        ("chat_busy", stats.rejected_chat_busy.load(Relaxed)),
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
            .with_callback(move |o| {
                let d = &t.decisions;
                let served = Decisions::get(&d.fetches)
                    .saturating_sub(Decisions::get(&d.fetches_throttled))
                    .saturating_sub(Decisions::get(&d.fetch_queries));
                o.observe(served, &[]);
            })
            .build();
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
        let _ = self.provider.shutdown();
    }
}
