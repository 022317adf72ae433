//! TLS to OTLP collectors, as an SRE deploys it: the real `chatshard serve
//! --dev` exports to collectors that run inside this test over HTTPS (and
//! gRPC over TLS), with certificates from a CA the test makes and a client
//! certificate the collector requires. The exporter is configured only
//! through the standard `OTEL_EXPORTER_OTLP_*` variables.
//!
//! - traces reach an HTTPS collector that trusts only the test CA's client
//!   certificates, through the per-signal `..._TRACES_CERTIFICATE`, while the
//!   metrics, told by the general variable to trust another CA, are refused
//!   in the handshake, export nothing, and `serve` goes on serving;
//! - traces reach a gRPC collector over TLS with a client certificate;
//! - a certificate file that cannot be read stops `serve` at start, and the
//!   error names the variable.
//!
//! Its own test binary: it runs the built `chatshard` binary.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use axum::body::Bytes;
use chatshard::localdb::tls::{CertifiedKey, TestCertificates};
use common::Wait;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// The variables a test sets, removed from what the child inherits first.
const OTEL_VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY",
    "OTEL_METRICS_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "CHATSHARD_CONFIG",
];

/// What a collector received, and the handshakes it refused.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<AtomicUsize>,
    metrics: Arc<AtomicUsize>,
    refused_handshakes: Arc<AtomicUsize>,
}

fn server_config(
    server: &CertifiedKey,
    client_ca: &Path,
) -> Result<rustls::ServerConfig, Box<dyn std::error::Error>> {
    let provider = chatshard::crypto::provider();
    let chain = chatshard::crypto::load_certificates(&server.cert, "collector cert")?;
    let key = chatshard::crypto::load_private_key(&server.key, "collector key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in chatshard::crypto::load_certificates(client_ca, "collector client CA")? {
        roots.add(ca)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// An OTLP/HTTP collector over HTTPS that requires a client certificate from
/// `client_ca`; its base URL.
async fn https_collector(server: &CertifiedKey, client_ca: &Path) -> (String, Received) {
    let received = Received::default();
    let (spans, metrics) = (received.spans.clone(), received.metrics.clone());
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| async move {
                let request =
                    ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf");
                let n: usize = request
                    .resource_spans
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .map(|ss| ss.spans.len())
                    .sum();
                spans.fetch_add(n, Ordering::Relaxed);
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }),
        )
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: Bytes| async move {
                let request =
                    ExportMetricsServiceRequest::decode(body.as_ref()).expect("OTLP protobuf");
                let n: usize = request
                    .resource_metrics
                    .iter()
                    .flat_map(|rm| &rm.scope_metrics)
                    .map(|sm| sm.metrics.len())
                    .sum();
                metrics.fetch_add(n, Ordering::Relaxed);
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }),
        );
    let config = server_config(server, client_ca).expect("collector TLS");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = received.refused_handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app, refused) = (acceptor.clone(), app.clone(), refused.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper_util::service::TowerToHyperService::new(app),
                )
                .await;
            });
        }
    });
    (format!("https://127.0.0.1:{}", addr.port()), received)
}

/// A running `chatshard serve --dev`, killed when dropped.
struct Serve {
    child: Child,
    base: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(common::unique(name));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn serve_command(dir: &Path, port: u16, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chatshard"));
    command
        .args(["serve", "--dev", "--shards", "1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir);
    for v in OTEL_VARIABLES {
        command.env_remove(v);
    }
    command
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .envs(env.iter().map(|(k, v)| (k, v)));
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Serve {
    fn start(env: &[(&str, String)]) -> Self {
        let dir = TempDir::new("chatshard-otlp-tls");
        let port = free_port();
        let mut child = serve_command(&dir.0, port, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chatshard");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        Wait::new(Duration::from_secs(180), "serve --dev listening").until_blocking(|| {
            while let Ok(line) = lines.try_recv() {
                if line.contains("chatshard listening on") {
                    return Ok(());
                }
                seen.push(line);
            }
            match child.try_wait() {
                Ok(Some(status)) => panic!("serve --dev exited with {status}: {seen:?}"),
                _ => Err(format!("{seen:?}")),
            }
        });
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn http() -> reqwest::Client {
    chatshard::crypto::install_default_provider();
    reqwest::Client::new()
}

/// Requests that make server spans.
async fn make_spans(http: &reqwest::Client, base: &str) {
    let chat = common::unique("otlp-tls");
    let r = http
        .put(format!("{base}/v1/chats/{chat}"))
        .json(&serde_json::json!({"maxMembers": 10}))
        .send()
        .await
        .expect("create a chat");
    assert!(r.status().is_success(), "{}", r.status());
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_an_https_collector_with_a_private_ca_and_a_client_certificate() {
    let pki = TestCertificates::temp().expect("test CA");
    let other = TestCertificates::temp().expect("another CA");
    let collector = pki
        .server("collector", &["localhost", "127.0.0.1"])
        .expect("collector cert");
    let exporter = pki
        .client("exporter", "chatshard-exporter")
        .expect("client cert");
    let (endpoint, received) = https_collector(&collector, pki.ca()).await;

    let mut serve = Serve::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        // The general CA is the wrong one: the metrics exporter uses it.
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", path(other.ca())),
        // The traces' own variable wins for traces.
        ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", path(pki.ca())),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            path(&exporter.cert),
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", path(&exporter.key)),
    ]);
    let http = http();
    make_spans(&http, &serve.base).await;
    Wait::new(Duration::from_secs(30), "spans over https")
        .every(Duration::from_millis(50))
        .until_blocking(|| match received.spans.load(Ordering::Relaxed) {
            0 => Err("no span yet"),
            n => Ok(n),
        });
    // The metrics exporter tried, and its handshake failed: it does not
    // trust the collector's certificate.
    Wait::new(Duration::from_secs(30), "a refused metrics handshake")
        .every(Duration::from_millis(50))
        .until_blocking(
            || match received.refused_handshakes.load(Ordering::Relaxed) {
                0 => Err("no refused handshake yet"),
                n => Ok(n),
            },
        );
    assert_eq!(
        received.metrics.load(Ordering::Relaxed),
        0,
        "metrics exported through a collector the exporter must not trust"
    );
    // And serve goes on serving.
    make_spans(&http, &serve.base).await;
    assert!(serve.running(), "serve stopped after a failed export");
}

#[cfg(feature = "otlp-grpc")]
mod grpc {
    use super::*;

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };

    #[derive(Clone, Default)]
    struct Collector {
        spans: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum();
            self.spans.fetch_add(n, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn traces_reach_a_grpc_collector_over_tls_with_a_client_certificate() {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let pki = TestCertificates::temp().expect("test CA");
        let server = pki
            .server("grpc-collector", &["localhost", "127.0.0.1"])
            .expect("collector cert");
        let exporter = pki
            .client("grpc-exporter", "chatshard-exporter")
            .expect("client cert");
        let read = |p: &Path| std::fs::read(p).expect("PEM");
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&server.cert), read(&server.key)))
            .client_ca_root(Certificate::from_pem(read(pki.ca())));
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let services = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("server TLS")
            .add_service(TraceServiceServer::new(collector.clone()));
        tokio::spawn(async move {
            services
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap()
        });

        let serve = Serve::start(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("https://localhost:{port}"),
            ),
            ("OTEL_METRICS_EXPORTER", "none".to_owned()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", path(pki.ca())),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                path(&exporter.cert),
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", path(&exporter.key)),
        ]);
        make_spans(&http(), &serve.base).await;
        Wait::new(Duration::from_secs(30), "spans over gRPC with TLS")
            .every(Duration::from_millis(50))
            .until_blocking(|| match collector.spans.load(Ordering::Relaxed) {
                0 => Err("no span yet"),
                n => Ok(n),
            });
    }
}

#[test]
fn an_unreadable_certificate_stops_serve_at_start_naming_its_variable() {
    let pki = TestCertificates::temp().expect("test CA");
    let client = pki
        .client("lonely", "chatshard-exporter")
        .expect("client cert");
    let missing = std::env::temp_dir()
        .join(common::unique("no-such-ca"))
        .join("ca.pem");
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (
            vec![("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", path(&missing))],
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        ),
        (
            vec![("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", path(&client.cert))],
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        ),
    ];
    for (env, variable) in cases {
        let dir = TempDir::new("chatshard-otlp-tls-bad");
        let mut env = env;
        env.push((
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://127.0.0.1:9".to_owned(),
        ));
        let mut child = serve_command(&dir.0, free_port(), &env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chatshard");
        let status = Wait::new(Duration::from_secs(60), "serve refusing to start")
            .until_blocking(|| child.try_wait().expect("try_wait").ok_or("still running"));
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        assert!(!status.success(), "serve started: {stderr}");
        assert!(stderr.contains(variable), "{variable} not named: {stderr}");
    }
}
