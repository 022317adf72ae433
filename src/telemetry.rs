//! Tracing: logs (text or JSON) and OpenTelemetry traces over OTLP.
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
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
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

/// Installs logging (text, or JSON with `CHATSHARD_LOG_FORMAT=json`) and, when an
/// endpoint is configured, the OpenTelemetry layer. Once per process.
pub fn init(settings: &TelemetrySettings) -> anyhow::Result<TracingGuard> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let json = std::env::var("CHATSHARD_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed()
    };
    let (traces, provider) = match settings.otlp() {
        Some(endpoint) => {
            let provider = tracer_provider(&endpoint)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("chatshard"))
                .with_filter(
                    Targets::new()
                        .with_default(LevelFilter::INFO)
                        .with_target("chatshard", LevelFilter::DEBUG),
                )
                .boxed();
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install tracing: {e}"))?;
    Ok(TracingGuard { provider })
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
