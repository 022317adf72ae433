//! Tracing: logs (text or JSON, each line with the request's trace id) and
//! OpenTelemetry traces over OTLP.
//!
//! Export is on when an endpoint is configured (`telemetry.otlp_endpoint`, or
//! the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! variables); otherwise no OpenTelemetry layer is installed and tracing costs
//! what plain logging costs. OTLP over HTTP/protobuf, batched on its own
//! thread; `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` apply.
//! gRPC is selected with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` in a build with the
//! `otlp-grpc` feature.
//!
//! Spans (see docs/observability.md): one server span per request (the
//! `http` middleware), a child span per shard operation (`shard`), and span
//! events for throttle decisions, breaker transitions and bulkhead rejections.
//! Events of this crate reach traces at DEBUG and above; logs follow RUST_LOG.
//! User content (message text) never goes into telemetry.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Deserialize;
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::{Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How chat ids appear in telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatIdInTelemetry {
    /// XXH3 of the id, in hex: correlatable, not readable.
    #[default]
    Hashed,
    Raw,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP endpoint (e.g. `http://collector:4318`); empty: the OTEL_* variables
    /// decide, and no variable means no export.
    pub otlp_endpoint: String,
    /// `hashed` (default) or `raw`.
    pub chat_id: ChatIdInTelemetry,
}

impl TelemetrySettings {
    /// The endpoint to export to, if export is on: `Some("")` means "from the
    /// OTEL_* variables".
    pub fn otlp(&self) -> Option<String> {
        if !self.otlp_endpoint.is_empty() {
            return Some(self.otlp_endpoint.clone());
        }
        let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
        (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .then(String::new)
    }
}

/// The chat id as telemetry shows it.
pub fn chat_id_attribute(chat: &str, mode: ChatIdInTelemetry) -> String {
    match mode {
        ChatIdInTelemetry::Raw => chat.to_owned(),
        ChatIdInTelemetry::Hashed => {
            format!("{:016x}", xxhash_rust::xxh3::xxh3_64(chat.as_bytes()))
        }
    }
}

/// The service's resource: `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`, or
/// `service.name=chatshard`.
pub fn resource() -> Resource {
    let builder = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_ok() {
        builder.build()
    } else {
        builder.with_service_name("chatshard").build()
    }
}

/// Flushes traces at shutdown.
#[derive(Debug)]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Exports what is buffered and stops the exporter; blocking, so run off
    /// the async workers.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || {
                let _ = provider.force_flush();
                let _ = provider.shutdown();
            })
            .await;
        }
    }

    /// Exports what is buffered now (blocking work, run off the async workers).
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        }
    }

    /// Whether traces are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object per line, with the current span's fields (among them
    /// the request's `trace_id`) and the list of enclosing spans.
    Json,
}

impl LogFormat {
    /// `CHATSHARD_LOG_FORMAT=json` selects JSON; anything else is text.
    pub fn from_env() -> Self {
        if std::env::var("CHATSHARD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
            Self::Json
        } else {
            Self::Text
        }
    }
}

/// Installs logging to stderr (format from `CHATSHARD_LOG_FORMAT`) and, when an
/// endpoint is configured, the OpenTelemetry layer. Once per process.
pub fn init(settings: &TelemetrySettings) -> anyhow::Result<TracingGuard> {
    init_with_writer(
        settings,
        LogFormat::from_env(),
        BoxMakeWriter::new(std::io::stderr),
    )
}

/// [`init`] with the log format and destination given.
pub fn init_with_writer(
    settings: &TelemetrySettings,
    format: LogFormat,
    writer: BoxMakeWriter,
) -> anyhow::Result<TracingGuard> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(writer)
            .with_filter(filter())
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_filter(filter())
            .boxed(),
    };
    let trace_filter = || {
        Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("chatshard", LevelFilter::DEBUG)
    };
    let (traces, provider) = match settings.otlp() {
        Some(endpoint) => {
            let provider = tracer_provider(&endpoint)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("chatshard"))
                .with_filter(trace_filter())
                .boxed();
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    let fresh = FreshFilterPass::new(filter(), provider.is_some().then(trace_filter));
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .with(fresh)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install tracing: {e}"))?;
    Ok(TracingGuard { provider })
}

/// The outermost layer: it makes every callsite that a filter wants
/// `Interest::sometimes`, never `always`, so that each span and event is
/// preceded by its own filter pass.
///
/// Per-layer filters hand their verdict from `enabled` to `on_new_span` /
/// `on_event` through a thread-local. A callsite whose interest is cached as
/// `always` skips `enabled`, and then reads whatever the previous filter pass on
/// that thread left there. `log_enabled!` through `tracing-log` leaves "disabled
/// by every layer" behind (sqlx checks it after every query), so the next
/// request span on that thread was silently dropped by both the log and the
/// trace layer (tokio-rs/tracing#2519; the upstream fix proposed in #3572 does
/// the same as this layer). Callsites that no filter wants stay `never`, so
/// disabled events cost what they cost before.
struct FreshFilterPass {
    logs: EnvFilter,
    traces: Option<Targets>,
    max_level: Option<LevelFilter>,
}

impl FreshFilterPass {
    fn new(logs: EnvFilter, traces: Option<Targets>) -> Self {
        let max_level = std::cmp::max(
            logs.max_level_hint(),
            traces
                .as_ref()
                .and_then(<Targets as Filter<Registry>>::max_level_hint),
        );
        Self {
            logs,
            traces,
            max_level,
        }
    }
}

impl<S: Subscriber> Layer<S> for FreshFilterPass {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        let logged = !<EnvFilter as Filter<S>>::callsite_enabled(&self.logs, meta).is_never();
        let traced = self
            .traces
            .as_ref()
            .is_some_and(|t| t.would_enable(meta.target(), meta.level()));
        if logged || traced {
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.max_level
    }
}

fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let grpc = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").is_ok_and(|p| p == "grpc");
    let exporter = if grpc {
        grpc_exporter(endpoint)?
    } else {
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        if !endpoint.is_empty() {
            builder =
                builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
        }
        builder.build()?
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build())
}

#[cfg(feature = "otlp-grpc")]
fn grpc_exporter(endpoint: &str) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    use opentelemetry_otlp::WithExportConfig;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if !endpoint.is_empty() {
        builder = builder.with_endpoint(endpoint);
    }
    Ok(builder.build()?)
}

#[cfg(not(feature = "otlp-grpc"))]
fn grpc_exporter(_endpoint: &str) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    anyhow::bail!("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs a build with `--features otlp-grpc`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_ids_are_hashed_unless_raw_is_asked_for() {
        let hashed = chat_id_attribute("celebrity", ChatIdInTelemetry::Hashed);
        assert_eq!(hashed.len(), 16);
        assert!(!hashed.contains("celebrity"));
        assert_eq!(
            hashed,
            chat_id_attribute("celebrity", ChatIdInTelemetry::Hashed)
        );
        assert_eq!(
            chat_id_attribute("celebrity", ChatIdInTelemetry::Raw),
            "celebrity"
        );
    }
}
