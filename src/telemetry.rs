//! Tracing: logs (text or JSON, each line with the request's trace id) and
//! OpenTelemetry traces over OTLP.
//!
//! Export is on when an endpoint is configured (`telemetry.otlp_endpoint`, or
//! the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! variables); otherwise no OpenTelemetry layer is installed and tracing costs
//! what plain logging costs. OTLP over HTTP/protobuf by default, or gRPC
//! (`telemetry.otlp_protocol` or `OTEL_EXPORTER_OTLP_PROTOCOL`; the `otlp-grpc`
//! feature, on by default), batched on its own thread; `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` apply.
//!
//! TLS: an `https://` endpoint is reached over rustls (ring), trusting the
//! system's CAs, or only those of `OTEL_EXPORTER_OTLP_CERTIFICATE`; with
//! `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY`
//! the exporter shows a client certificate. Each has a `_TRACES_` and a
//! `_METRICS_` variant, which wins for its signal ([`OtlpTlsFiles`]). The
//! files are read when the exporter is built, so one that is missing or
//! unreadable fails `serve` at start, naming its variable.
//!
//! Spans (see docs/observability.md): one server span per request (the
//! `http` middleware), a child span per shard operation (`shard`), and span
//! events for throttle decisions, breaker transitions and bulkhead rejections.
//! Events of this crate reach traces at DEBUG and above; logs follow RUST_LOG.
//! User content (message text) never goes into telemetry.

use std::path::PathBuf;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tracing::subscriber::Interest;
use tracing::{Metadata, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::{Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How chat ids appear in telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatIdInTelemetry {
    /// XXH3 of the id, in hex: correlatable, not readable.
    #[default]
    Hashed,
    Raw,
}

/// The OTLP transport, named as `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

impl OtlpProtocol {
    fn parse(value: &str) -> anyhow::Result<Self> {
        match value {
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "grpc" => Ok(Self::Grpc),
            other => anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported: use \"http/protobuf\" or \"grpc\""
            ),
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP endpoint (e.g. `http://collector:4318` for HTTP, `:4317` for gRPC);
    /// empty: the OTEL_* variables decide, and no variable means no export.
    pub otlp_endpoint: String,
    /// `http/protobuf` or `grpc`; unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else
    /// `http/protobuf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// `hashed` (default) or `raw`.
    pub chat_id: ChatIdInTelemetry,
}

/// Where and how traces and metrics are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpExport {
    /// Empty: the exporter reads the `OTEL_EXPORTER_OTLP_*` variables itself.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
}

impl TelemetrySettings {
    /// Export settings, or `None` when export is off.
    pub fn export(&self) -> anyhow::Result<Option<OtlpExport>> {
        let Some(endpoint) = self.otlp() else {
            return Ok(None);
        };
        let protocol = match self.otlp_protocol {
            Some(p) => p,
            None => match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL") {
                Ok(v) if !v.is_empty() => OtlpProtocol::parse(&v)?,
                _ => OtlpProtocol::HttpProtobuf,
            },
        };
        Ok(Some(OtlpExport { endpoint, protocol }))
    }

    /// Export settings for metrics: those of [`Self::export`], unless
    /// `OTEL_METRICS_EXPORTER` says metrics are not pushed (`none`, or
    /// `prometheus`: pulled from `/metrics` only), so a deployment keeps one
    /// metrics path while its traces go out over OTLP.
    pub fn metrics_export(&self) -> anyhow::Result<Option<OtlpExport>> {
        let exporter = std::env::var("OTEL_METRICS_EXPORTER").ok();
        if pushes_metrics(exporter.as_deref()) {
            self.export()
        } else {
            Ok(None)
        }
    }

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
            let flushed = tokio::task::spawn_blocking(move || {
                if let Err(e) = provider.force_flush() {
                    tracing::warn!(error = %e, "traces could not be flushed at shutdown");
                }
                if let Err(e) = provider.shutdown() {
                    tracing::warn!(error = %e, "the trace exporter did not shut down cleanly");
                }
            })
            .await;
            if let Err(e) = flushed {
                tracing::warn!(error = %e, "flushing traces at shutdown failed");
            }
        }
    }

    /// Exports what is buffered now (blocking work, run off the async workers).
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            match tokio::task::spawn_blocking(move || provider.force_flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "traces could not be flushed"),
                Err(e) => tracing::warn!(error = %e, "flushing traces failed"),
            }
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
    use std::io::IsTerminal as _;
    init_with_writer(
        settings,
        LogFormat::from_env(),
        BoxMakeWriter::new(std::io::stderr),
        std::io::stderr().is_terminal(),
    )
}

/// [`init`] with the log format and destination given; `ansi`: colours in
/// text logs (off anyway when `NO_COLOR` is set).
pub fn init_with_writer(
    settings: &TelemetrySettings,
    format: LogFormat,
    writer: BoxMakeWriter,
    ansi: bool,
) -> anyhow::Result<TracingGuard> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = ansi && std::env::var_os("NO_COLOR").is_none();
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(writer)
            .with_filter(filter())
            .boxed(),
        // Colours only for a terminal: escape codes in a log file or a
        // journal are noise, and styling every span field costs CPU on every
        // request.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter())
            .boxed(),
    };
    let trace_filter = || {
        Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("chatshard", LevelFilter::DEBUG)
    };
    let (traces, provider) = match settings.export()? {
        Some(export) => {
            let provider = tracer_provider(&export)?;
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

fn tracer_provider(export: &OtlpExport) -> anyhow::Result<SdkTracerProvider> {
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(export.span_exporter()?)
        .with_resource(resource())
        .build())
}

/// Whether `OTEL_METRICS_EXPORTER` (its value, if set) lets metrics be
/// pushed over OTLP: unset, empty or naming `otlp` does; `none` or only
/// `prometheus` does not.
pub fn pushes_metrics(exporter: Option<&str>) -> bool {
    match exporter.map(str::trim) {
        None | Some("") => true,
        Some(list) => list
            .split(',')
            .any(|e| e.trim().eq_ignore_ascii_case("otlp")),
    }
}

impl OtlpExport {
    /// The endpoint for one signal: OTLP/HTTP puts each signal under its own
    /// path of the base endpoint; gRPC takes the endpoint as it is.
    fn signal_endpoint(&self, path: &str) -> Option<String> {
        if self.endpoint.is_empty() {
            return None;
        }
        let base = self.endpoint.trim_end_matches('/');
        Some(match self.protocol {
            OtlpProtocol::HttpProtobuf => format!("{base}/{path}"),
            OtlpProtocol::Grpc => base.to_owned(),
        })
    }

    fn span_exporter(&self) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let endpoint = self.signal_endpoint("v1/traces");
        let tls = OtlpTlsFiles::from_env(Signal::Traces)?.load()?;
        Ok(match self.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_http_client(http_client(&tls, Signal::Traces)?);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                b.build()?
            }
            OtlpProtocol::Grpc => grpc::span_exporter(endpoint, &tls)?,
        })
    }

    /// The OTLP exporter of the metrics (see [`crate::metrics`]).
    pub fn metric_exporter(&self) -> anyhow::Result<opentelemetry_otlp::MetricExporter> {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let endpoint = self.signal_endpoint("v1/metrics");
        let tls = OtlpTlsFiles::from_env(Signal::Metrics)?.load()?;
        Ok(match self.protocol {
            OtlpProtocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_http_client(http_client(&tls, Signal::Metrics)?);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                b.build()?
            }
            OtlpProtocol::Grpc => grpc::metric_exporter(endpoint, &tls)?,
        })
    }
}

/// The signal an exporter carries, which names its own variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }
}

/// A file named by an environment variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    pub variable: String,
    pub path: PathBuf,
}

/// The TLS files of one signal's exporter, as the standard variables name
/// them: `OTEL_EXPORTER_OTLP_{TRACES_|METRICS_}CERTIFICATE` (the CAs that
/// verify the collector, instead of the system's), `..._CLIENT_CERTIFICATE`
/// and `..._CLIENT_KEY` (the exporter's own certificate, both or neither).
/// The per-signal variable wins over the general one; an empty one is unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpTlsFiles {
    pub ca: Option<NamedFile>,
    pub client_cert: Option<NamedFile>,
    pub client_key: Option<NamedFile>,
}

/// The TLS files read and checked: the CAs' PEM (and certificates), the
/// client certificate's chain and key.
#[derive(Debug, Default)]
pub struct OtlpTls {
    ca: Option<(Vec<u8>, Vec<CertificateDer<'static>>)>,
    client: Option<ClientIdentity>,
}

#[derive(Debug)]
struct ClientIdentity {
    // The gRPC channel takes the PEM; the HTTP client the parsed chain.
    #[cfg_attr(not(feature = "otlp-grpc"), allow(dead_code))]
    cert_pem: Vec<u8>,
    #[cfg_attr(not(feature = "otlp-grpc"), allow(dead_code))]
    key_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl OtlpTlsFiles {
    /// From the process's environment.
    pub fn from_env(signal: Signal) -> anyhow::Result<Self> {
        Self::from_lookup(signal, |k| std::env::var(k).ok())
    }

    /// From `lookup` (a variable's value, if set).
    pub fn from_lookup(
        signal: Signal,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let named = |suffix: &str| {
            [
                format!("OTEL_EXPORTER_OTLP_{}_{suffix}", signal.name()),
                format!("OTEL_EXPORTER_OTLP_{suffix}"),
            ]
            .into_iter()
            .find_map(|variable| {
                let value = lookup(&variable).filter(|v| !v.trim().is_empty())?;
                Some(NamedFile {
                    variable,
                    path: PathBuf::from(value.trim()),
                })
            })
        };
        let files = Self {
            ca: named("CERTIFICATE"),
            client_cert: named("CLIENT_CERTIFICATE"),
            client_key: named("CLIENT_KEY"),
        };
        match (&files.client_cert, &files.client_key) {
            (Some(cert), None) => anyhow::bail!(
                "{} is set but no OTEL_EXPORTER_OTLP_CLIENT_KEY (or its {} variant): \
                 a client certificate needs its key",
                cert.variable,
                signal.name()
            ),
            (None, Some(key)) => anyhow::bail!(
                "{} is set but no OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE (or its {} variant): \
                 a client key needs its certificate",
                key.variable,
                signal.name()
            ),
            _ => Ok(files),
        }
    }

    /// Reads and checks the files; an error names the variable and the file.
    pub fn load(&self) -> anyhow::Result<OtlpTls> {
        let read = |f: &NamedFile| {
            std::fs::read(&f.path)
                .map_err(|e| anyhow::anyhow!("{} {}: {e}", f.variable, f.path.display()))
        };
        let ca = match &self.ca {
            Some(f) => Some((
                read(f)?,
                crate::crypto::load_certificates(&f.path, &f.variable)?,
            )),
            None => None,
        };
        let client = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
                chain: crate::crypto::load_certificates(&cert.path, &cert.variable)?,
                key: crate::crypto::load_private_key(&key.path, &key.variable)?,
            }),
            _ => None,
        };
        Ok(OtlpTls { ca, client })
    }
}

impl OtlpTls {
    /// The rustls client configuration of an OTLP/HTTP exporter: the given
    /// CAs (else the system's), and the client certificate if any.
    fn client_config(&self, signal: Signal) -> anyhow::Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some((_, certs)) => {
                for ca in certs {
                    roots.add(ca.clone()).map_err(|e| {
                        anyhow::anyhow!("OTEL_EXPORTER_OTLP_CERTIFICATE ({}): {e}", signal.name())
                    })?;
                }
            }
            None => {
                // A system without CAs can still export over plain HTTP;
                // an https:// collector then fails each export, logged.
                let native = rustls_native_certs::load_native_certs();
                for e in &native.errors {
                    tracing::debug!(error = %e, "reading the system's CAs");
                }
                let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("OTLP TLS: {e}"))?
            .with_root_certificates(roots);
        let mut config = match &self.client {
            Some(c) => builder
                .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "OTEL_EXPORTER_OTLP_CLIENT_KEY ({}): not a usable key for the client certificate: {e}",
                        signal.name()
                    )
                })?,
            None => builder.with_no_client_auth(),
        };
        // The blocking client speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Whether the signal's endpoint (`endpoint`, else the variables the
/// exporter reads) is an `https://` one.
#[cfg_attr(not(feature = "otlp-grpc"), allow(dead_code))]
fn is_https(endpoint: Option<&str>, signal: Signal) -> bool {
    let from_env = || {
        [
            format!("OTEL_EXPORTER_OTLP_{}_ENDPOINT", signal.name()),
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
        ]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    };
    endpoint
        .map(str::to_owned)
        .or_else(from_env)
        .is_some_and(|e| e.trim_start().to_ascii_lowercase().starts_with("https://"))
}

/// The timeout of one export: `OTEL_EXPORTER_OTLP_{signal_}TIMEOUT` in
/// milliseconds, else the exporter's default of 10 s.
fn export_timeout(signal: Signal) -> std::time::Duration {
    let ms = [
        format!("OTEL_EXPORTER_OTLP_{}_TIMEOUT", signal.name()),
        "OTEL_EXPORTER_OTLP_TIMEOUT".to_owned(),
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse::<u64>().ok())
    .unwrap_or(10_000);
    std::time::Duration::from_millis(ms)
}

/// The blocking HTTP client of an OTLP/HTTP exporter, with its TLS. Built on
/// a thread of its own: reqwest's blocking client runs its own runtime, which
/// may not be made (or dropped) on an async worker.
fn http_client(tls: &OtlpTls, signal: Signal) -> anyhow::Result<reqwest::blocking::Client> {
    let config = tls.client_config(signal)?;
    let timeout = export_timeout(signal);
    std::thread::Builder::new()
        .name("otlp-http-client".into())
        .spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(timeout)
                .tls_backend_preconfigured(config)
                .build()
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("building the OTLP HTTP client panicked"))?
        .map_err(|e| anyhow::anyhow!("building the OTLP HTTP client: {e}"))
}

#[cfg(feature = "otlp-grpc")]
mod grpc {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
    use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig, WithTonicConfig};

    use super::OtlpTls;

    /// The channel's TLS (tonic uses it for an `https://` endpoint only):
    /// the given CAs, else the system's; `None` when neither a file nor an
    /// `https://` endpoint asks for TLS, so a plain collector does not need
    /// the system's CAs to be readable.
    fn tls_config(
        endpoint: Option<&str>,
        signal: super::Signal,
        tls: &OtlpTls,
    ) -> Option<ClientTlsConfig> {
        let config = match &tls.ca {
            Some((pem, _)) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None if tls.client.is_some() || super::is_https(endpoint, signal) => {
                ClientTlsConfig::new().with_native_roots()
            }
            None => return None,
        };
        Some(match &tls.client {
            Some(c) => config.identity(Identity::from_pem(&c.cert_pem, &c.key_pem)),
            None => config,
        })
    }

    pub fn span_exporter(endpoint: Option<String>, tls: &OtlpTls) -> anyhow::Result<SpanExporter> {
        let mut b = SpanExporter::builder().with_tonic();
        if let Some(config) = tls_config(endpoint.as_deref(), super::Signal::Traces, tls) {
            b = b.with_tls_config(config);
        }
        if let Some(e) = endpoint {
            b = b.with_endpoint(e);
        }
        Ok(b.build()?)
    }

    pub fn metric_exporter(
        endpoint: Option<String>,
        tls: &OtlpTls,
    ) -> anyhow::Result<MetricExporter> {
        let mut b = MetricExporter::builder().with_tonic();
        if let Some(config) = tls_config(endpoint.as_deref(), super::Signal::Metrics, tls) {
            b = b.with_tls_config(config);
        }
        if let Some(e) = endpoint {
            b = b.with_endpoint(e);
        }
        Ok(b.build()?)
    }
}

#[cfg(not(feature = "otlp-grpc"))]
mod grpc {
    use opentelemetry_otlp::{MetricExporter, SpanExporter};

    use super::OtlpTls;

    const MISSING: &str =
        "OTLP over gRPC needs a build with the `otlp-grpc` feature (on by default)";

    pub fn span_exporter(
        _endpoint: Option<String>,
        _tls: &OtlpTls,
    ) -> anyhow::Result<SpanExporter> {
        anyhow::bail!(MISSING)
    }

    pub fn metric_exporter(
        _endpoint: Option<String>,
        _tls: &OtlpTls,
    ) -> anyhow::Result<MetricExporter> {
        anyhow::bail!(MISSING)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn otel_metrics_exporter_none_or_prometheus_stops_the_push() {
        assert!(pushes_metrics(None));
        assert!(pushes_metrics(Some("")));
        assert!(pushes_metrics(Some("otlp")));
        assert!(pushes_metrics(Some("prometheus, otlp")));
        assert!(!pushes_metrics(Some("none")));
        assert!(!pushes_metrics(Some("prometheus")));
    }

    use super::*;

    #[test]
    fn otlp_http_puts_each_signal_under_its_path_and_grpc_takes_the_endpoint() {
        let http = OtlpExport {
            endpoint: "http://collector:4318/".into(),
            protocol: OtlpProtocol::HttpProtobuf,
        };
        assert_eq!(
            http.signal_endpoint("v1/traces").as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let grpc = OtlpExport {
            endpoint: "http://collector:4317".into(),
            protocol: OtlpProtocol::Grpc,
        };
        assert_eq!(
            grpc.signal_endpoint("v1/metrics").as_deref(),
            Some("http://collector:4317")
        );
        let from_env = OtlpExport {
            endpoint: String::new(),
            protocol: OtlpProtocol::Grpc,
        };
        assert_eq!(from_env.signal_endpoint("v1/traces"), None);
        assert_eq!(OtlpProtocol::parse("grpc").ok(), Some(OtlpProtocol::Grpc));
        assert!(OtlpProtocol::parse("http/json").is_err());
    }

    #[test]
    fn the_configured_protocol_is_used_and_unknown_ones_are_refused() -> crate::TestResult {
        let settings: TelemetrySettings =
            toml::from_str("otlp_endpoint = \"http://c:4317\"\notlp_protocol = \"grpc\"")?;
        assert_eq!(
            settings.export()?,
            Some(OtlpExport {
                endpoint: "http://c:4317".into(),
                protocol: OtlpProtocol::Grpc
            })
        );
        assert!(toml::from_str::<TelemetrySettings>("otlp_protocol = \"http/json\"").is_err());
        Ok(())
    }

    #[test]
    fn a_signals_own_tls_variable_wins_and_a_client_certificate_needs_its_key() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let both = env(&[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/general/ca.pem"),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/traces/ca.pem"),
            ("OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE", " "),
        ]);
        let traces = OtlpTlsFiles::from_lookup(Signal::Traces, both).ok();
        let metrics = OtlpTlsFiles::from_lookup(Signal::Metrics, both).ok();
        let ca = |f: Option<OtlpTlsFiles>| f.and_then(|f| f.ca).map(|c| (c.variable, c.path));
        assert_eq!(
            ca(traces),
            Some((
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE".to_owned(),
                PathBuf::from("/traces/ca.pem")
            ))
        );
        // A blank variable is unset; the other signal takes the general one.
        assert_eq!(
            ca(metrics),
            Some((
                "OTEL_EXPORTER_OTLP_CERTIFICATE".to_owned(),
                PathBuf::from("/general/ca.pem")
            ))
        );
        let lonely = env(&[("OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE", "/c.pem")]);
        let e = OtlpTlsFiles::from_lookup(Signal::Metrics, lonely)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE") && e.contains("CLIENT_KEY"),
            "{e}"
        );
        // The traces do not see the metrics' certificate.
        assert_eq!(
            OtlpTlsFiles::from_lookup(Signal::Traces, lonely).ok(),
            Some(OtlpTlsFiles::default())
        );
        let missing = OtlpTlsFiles {
            ca: Some(NamedFile {
                variable: "OTEL_EXPORTER_OTLP_CERTIFICATE".to_owned(),
                path: PathBuf::from("/nonexistent/chatshard/ca.pem"),
            }),
            ..OtlpTlsFiles::default()
        };
        let e = missing
            .load()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE /nonexistent"),
            "{e}"
        );
    }

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
