//! TLS on the API listener (`http.tls`): HTTP/1.1 and HTTP/2 over TLS,
//! client certificates, the certificate swapped on reload under an open
//! event stream, and the handshake deadline. Certificates are made here, by
//! a CA of each test's own.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatshard::app::App;
use chatshard::http::tls::Tls;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::common::wait::Wait;
use crate::helpers::{self, unique};

const H1: &[u8] = b"http/1.1";
const H2: &[u8] = b"h2";

/// A CA and the files of the certificates it signs, in a directory removed
/// on drop.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("chatshard-tls-{tag}")));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = name(&format!("{tag} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { dir, ca }
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// Writes the CA's certificate; its path.
    fn ca_file(&self) -> PathBuf {
        let path = self.dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).unwrap();
        path
    }

    /// A certificate for `localhost` named `cn`, and its key.
    fn issue(&self, cn: &str) -> (rcgen::Certificate, KeyPair) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name = name(cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert, key)
    }

    /// Writes a server certificate named `cn` and its key to `server.pem`
    /// and `server.key` (replacing them); the certificate.
    fn write_server(&self, cn: &str) -> CertificateDer<'static> {
        let (cert, key) = self.issue(cn);
        std::fs::write(self.dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(self.dir.join("server.key"), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn cert_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    fn key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// A client identity (certificate and key) named `cn`.
    fn client(&self, cn: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = self.issue(cn);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    name
}

/// chatshard on the shared shards, serving TLS from `pki`'s server files.
struct Served {
    addr: SocketAddr,
    tls: Arc<Tls>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Served {
    async fn start(pki: &Pki, configure: impl FnOnce(&mut chatshard::config::Settings)) -> Self {
        let mut settings = helpers::settings();
        settings.http.tls.cert_file = pki.cert_file().display().to_string();
        settings.http.tls.key_file = pki.key_file().display().to_string();
        configure(&mut settings);
        let app = App::build(&settings)
            .await
            .unwrap_or_else(|e| panic!("building the app: {e:#}"));
        let addr = app.local_addr().unwrap();
        let tls = app.tls().cloned().expect("TLS configured");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            tls,
            stop: Some(stop),
            task,
        }
    }

    /// A server whose certificate is `tag`'s and which asks every client
    /// for a certificate of `tag`'s CA (mutual TLS), further configured by
    /// `configure`.
    async fn mutual(
        tag: &str,
        configure: impl FnOnce(&mut chatshard::config::Settings),
    ) -> (Pki, Self) {
        let pki = Pki::new(tag);
        pki.write_server(&format!("chatshard {tag}"));
        let ca_file = pki.ca_file();
        let server = Self::start(&pki, |s| {
            s.http.tls.client_ca_file = ca_file.display().to_string();
            configure(s);
        })
        .await;
        (pki, server)
    }

    async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.task)
            .await
            .expect("the server stops")
            .expect("the server task")
            .expect("the server's end");
    }
}

/// A client trusting `ca`, offering `alpn`, with `identity` if given.
fn client(
    ca: CertificateDer<'static>,
    alpn: &[u8],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// An HTTP connection over TLS, speaking what ALPN chose.
enum Http {
    One(hyper::client::conn::http1::SendRequest<String>),
    Two(hyper::client::conn::http2::SendRequest<String>),
}

impl Http {
    /// Connects; the server's certificate and the connection.
    async fn open(
        addr: SocketAddr,
        connector: &TlsConnector,
    ) -> Result<(CertificateDer<'static>, Self), String> {
        let tls = tls_connect(addr, connector)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .ok_or("no server certificate")?;
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        let http = match alpn.as_deref() {
            Some(H2) => {
                let (send, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| format!("HTTP/2: {e}"))?;
                tokio::spawn(connection);
                Self::Two(send)
            }
            Some(H1) => {
                let (send, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| format!("HTTP/1.1: {e}"))?;
                tokio::spawn(connection);
                Self::One(send)
            }
            other => return Err(format!("ALPN chose {other:?}")),
        };
        Ok((cert, http))
    }

    fn version(&self) -> hyper::Version {
        match self {
            Self::One(_) => hyper::Version::HTTP_11,
            Self::Two(_) => hyper::Version::HTTP_2,
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<Incoming>, String> {
        self.send_with(method, path, body, None).await
    }

    /// [`Self::send`], with `Authorization: Bearer <token>` if given.
    async fn send_with(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if matches!(self, Self::One(_)) {
            request = request.header("host", "localhost");
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(body.map(|b| b.to_string()).unwrap_or_default())
            .unwrap();
        let answer = match self {
            Self::One(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(request).await
            }
            Self::Two(send) => {
                send.ready().await.map_err(|e| e.to_string())?;
                send.send_request(request).await
            }
        };
        let answer = answer.map_err(|e| format!("request: {e}"))?;
        // Over HTTP/1 an event stream is answered as HTTP/1.0, its body
        // ended by the close (written without hyper once the head is out).
        let stream = method == "GET"
            && (path.contains("/events/stream") || path.starts_with("/v1/streams/"));
        let expected = match self.version() {
            hyper::Version::HTTP_11 if stream => hyper::Version::HTTP_10,
            version => version,
        };
        assert_eq!(answer.version(), expected);
        Ok(answer)
    }

    /// Sends a request and reads its whole answer: status and body.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, String), String> {
        self.call_with(method, path, body, None).await
    }

    /// [`Self::call`], with a bearer token if given.
    async fn call_with(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: Option<&str>,
    ) -> Result<(u16, String), String> {
        let mut answer = self.send_with(method, path, body, token).await?;
        let status = answer.status().as_u16();
        let mut text = Vec::new();
        while let Some(data) = next_data(answer.body_mut()).await {
            text.extend(data);
        }
        Ok((status, String::from_utf8_lossy(&text).into_owned()))
    }
}

/// The next data of `body` (trailers skipped); `None` at its end.
async fn next_data(body: &mut Incoming) -> Option<Vec<u8>> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        if let Ok(data) = frame.ok()?.into_data() {
            return Some(data.to_vec());
        }
    }
}

/// Creates a chat and joins `user` to it over `http`; the chat.
async fn chat_with_member(http: &mut Http, user: &str) -> String {
    let chat = unique("tls");
    let (status, body) = http
        .call("PUT", &format!("/v1/chats/{chat}"), None)
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = http
        .call(
            "POST",
            &format!("/v1/chats/{chat}/members"),
            Some(serde_json::json!({ "userId": user })),
        )
        .await
        .unwrap();
    assert!((200..300).contains(&status), "join: {status} {body}");
    chat
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http1_and_http2() {
    let pki = Pki::new("serve");
    let served_cert = pki.write_server("chatshard one");
    let server = Served::start(&pki, |_| {}).await;
    for alpn in [H1, H2] {
        let (cert, mut http) = Http::open(server.addr, &client(pki.ca_der(), alpn, None))
            .await
            .unwrap();
        assert_eq!(cert, served_cert);
        let (status, body) = http.call("GET", "/healthz", None).await.unwrap();
        assert_eq!(status, 200, "{body}");
        chat_with_member(&mut http, "u1").await;
    }
    // Plain HTTP on a TLS listener is not served.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), plain.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    // A client that does not trust the server's certificate says so.
    let stranger = Pki::new("serve-other");
    assert!(
        Http::open(server.addr, &client(stranger.ca_der(), H1, None))
            .await
            .is_err()
    );
    wait_for_handshake_failures(
        server.addr,
        &client(pki.ca_der(), H1, None),
        &[("protocol", 1.0), ("client_refused", 1.0)],
    )
    .await;
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_must_come_from_the_configured_ca() {
    let (pki, server) = Served::mutual("mtls", |_| {}).await;
    let other = Pki::new("mtls-other");
    for (what, identity) in [
        ("no certificate", None),
        (
            "a certificate of another CA",
            Some(other.client("stranger")),
        ),
    ] {
        for alpn in [H1, H2] {
            let identity = identity
                .as_ref()
                .map(|(chain, key)| (chain.clone(), key.clone_key()));
            let connector = client(pki.ca_der(), alpn, identity);
            // TLS 1.3: the client may finish its side before the server's
            // refusal arrives; it then fails its first request.
            let served = match Http::open(server.addr, &connector).await {
                Err(_) => false,
                Ok((_, mut http)) => http.call("GET", "/healthz", None).await.is_ok(),
            };
            assert!(!served, "a client with {what} was served");
        }
    }
    for alpn in [H1, H2] {
        let connector = client(pki.ca_der(), alpn, Some(pki.client("chat server")));
        let (_, mut http) = Http::open(server.addr, &connector).await.unwrap();
        let (status, _) = http.call("GET", "/healthz", None).await.unwrap();
        assert_eq!(status, 200);
    }
    // Each refusal is counted by what the client lacked.
    let trusted = client(pki.ca_der(), H1, Some(pki.client("chat server")));
    wait_for_handshake_failures(
        server.addr,
        &trusted,
        &[("no_client_cert", 2.0), ("bad_client_cert", 2.0)],
    )
    .await;
    server.shut_down().await;
}

/// Waits until `/metrics`, read over connections `connector` opens, counts
/// at least `at_least` TLS handshake failures for each reason given.
async fn wait_for_handshake_failures(
    addr: SocketAddr,
    connector: &TlsConnector,
    expected: &[(&str, f64)],
) {
    Wait::new(
        Duration::from_secs(30),
        format!("handshake failures {expected:?}"),
    )
    .until(|| async {
        let (_, mut http) = Http::open(addr, connector).await?;
        let (status, text) = http.call("GET", "/metrics", None).await?;
        if status != 200 {
            return Err(format!("/metrics: {status}"));
        }
        let samples = crate::common::metrics::samples_of(
            &text,
            "chatshard_http_tls_handshake_failures_total",
        );
        let short: Vec<String> = expected
            .iter()
            .filter_map(|(reason, at_least)| {
                let label = format!("reason=\"{reason}\"");
                let seen = crate::common::sum_where(&samples, &[label.as_str()]);
                (seen < *at_least).then(|| format!("{reason}: {seen}"))
            })
            .collect();
        if short.is_empty() {
            Ok(())
        } else {
            Err(format!("{short:?} of {samples:?}"))
        }
    })
    .await;
}

/// The `code` of a problem+json body.
fn problem_code(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("not a problem: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificates_common_name_stands_for_its_client() {
    use chatshard::config::{ApiClient, Scope};
    use sha2::Digest as _;
    const TOKEN: &str = "certname-writer-token";
    let (pki, server) = Served::mutual("certname", |s| {
        s.api.clients = vec![
            ApiClient {
                name: "chat-server-1".to_owned(),
                cert_common_name: "chat-server-1.internal".to_owned(),
                scopes: vec![Scope::Read, Scope::Write],
                ..ApiClient::default()
            },
            ApiClient {
                name: "dashboard".to_owned(),
                cert_common_name: "dashboard.internal".to_owned(),
                scopes: vec![Scope::Read],
                ..ApiClient::default()
            },
            ApiClient {
                name: "tokened".to_owned(),
                token_sha256: sha2::Sha256::digest(TOKEN.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                scopes: vec![Scope::Read, Scope::Write],
                ..ApiClient::default()
            },
        ];
    })
    .await;
    let open = |cn: &str, alpn: &'static [u8]| {
        let connector = client(pki.ca_der(), alpn, Some(pki.client(cn)));
        let addr = server.addr;
        async move { Http::open(addr, &connector).await.unwrap().1 }
    };
    for alpn in [H1, H2] {
        // The writer's certificate: it creates a chat and joins a member.
        let mut writer = open("chat-server-1.internal", alpn).await;
        let chat = chat_with_member(&mut writer, "u1").await;

        // The reader's certificate: it reads, and may not write.
        let mut reader = open("dashboard.internal", alpn).await;
        let (status, body) = reader
            .call("GET", &format!("/v1/chats/{chat}"), None)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let (status, body) = reader
            .call("PUT", &format!("/v1/chats/{}", unique("certname")), None)
            .await
            .unwrap();
        assert_eq!(
            (status, problem_code(&body)),
            (403, "forbidden".to_owned()),
            "{body}"
        );
        assert!(
            body.contains("dashboard"),
            "the refusal names the client: {body}"
        );

        // A token sent over the reader's connection decides: its client writes.
        let (status, body) = reader
            .call_with(
                "PUT",
                &format!("/v1/chats/{}", unique("certname")),
                None,
                Some(TOKEN),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{body}");
        // And a wrong one is refused, the certificate notwithstanding.
        let (status, body) = reader
            .call_with("GET", &format!("/v1/chats/{chat}"), None, Some("wrong"))
            .await
            .unwrap();
        assert_eq!(
            (status, problem_code(&body)),
            (401, "unauthenticated".to_owned()),
            "{body}"
        );

        // A certificate of the right CA whose name is no client's.
        let mut stranger = open("someone-else.internal", alpn).await;
        let (status, body) = stranger
            .call("GET", &format!("/v1/chats/{chat}"), None)
            .await
            .unwrap();
        assert_eq!(
            (status, problem_code(&body)),
            (401, "unauthenticated".to_owned()),
            "{body}"
        );
        let (status, _) = stranger.call("GET", "/healthz", None).await.unwrap();
        assert_eq!(status, 200, "/healthz stays open");
    }
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_certificate_and_open_streams_go_on() {
    let pki = Pki::new("reload");
    let first = pki.write_server("chatshard before");
    let server = Served::start(&pki, |_| {}).await;
    let mut streams = Vec::new();
    for alpn in [H1, H2] {
        let connector = client(pki.ca_der(), alpn, None);
        let (cert, mut http) = Http::open(server.addr, &connector).await.unwrap();
        assert_eq!(cert, first);
        let chat = chat_with_member(&mut http, "writer").await;
        let mut stream = http
            .send(
                "GET",
                &format!("/v1/chats/{chat}/events/stream?after=0"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(stream.status(), 200);
        // The join's event: the stream is flowing.
        let seen = next_data(stream.body_mut()).await.expect("the first event");
        assert!(!seen.is_empty());
        streams.push((alpn, chat, http, stream));
    }

    let second = pki.write_server("chatshard after");
    server.tls.reload().unwrap();
    // A file that does not parse leaves the new certificate in force.
    std::fs::write(pki.key_file(), "not a key").unwrap();
    assert!(server.tls.reload().is_err());

    for (alpn, chat, _http, mut stream) in streams {
        let connector = client(pki.ca_der(), alpn, None);
        let (cert, mut http) = Http::open(server.addr, &connector).await.unwrap();
        assert_eq!(cert, second, "a new connection's certificate");
        let text = unique("after-reload");
        let (status, body) = http
            .call(
                "POST",
                &format!("/v1/chats/{chat}/messages"),
                Some(serde_json::json!({
                    "senderId": "writer", "clientMessageId": text, "text": text,
                })),
            )
            .await
            .unwrap();
        assert!((200..300).contains(&status), "post: {status} {body}");
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(30), async {
            while !got.contains(&text) {
                let data = next_data(stream.body_mut())
                    .await
                    .expect("the stream opened before the reload is still open");
                got.push_str(&String::from_utf8_lossy(&data));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no event after the reload on {alpn:?}: {got}"));
    }
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_client_cas_again() {
    let (pki, server) = Served::mutual("careload", |_| {}).await;
    let ca_file = pki.ca_file();
    let newer = Pki::new("careload-new");
    let served = |identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)| {
        let connector = client(pki.ca_der(), H1, Some(identity));
        let addr = server.addr;
        async move {
            match Http::open(addr, &connector).await {
                Err(_) => false,
                Ok((_, mut http)) => http.call("GET", "/healthz", None).await.is_ok(),
            }
        }
    };
    assert!(served(pki.client("old client")).await);
    assert!(!served(newer.client("new client")).await);
    // The chat servers move to the new CA: its certificate replaces the old.
    std::fs::write(&ca_file, newer.ca.pem()).unwrap();
    server.tls.reload().unwrap();
    assert!(served(newer.client("new client")).await);
    assert!(!served(pki.client("old client")).await);
    // A CA file that does not parse changes nothing.
    std::fs::write(&ca_file, "not a certificate").unwrap();
    assert!(server.tls.reload().is_err());
    assert!(served(newer.client("new client")).await);
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_shakes_hands_is_closed_and_frees_its_slot() {
    const HANDSHAKE_MS: u64 = 1_000;
    let pki = Pki::new("handshake");
    pki.write_server("chatshard handshake");
    let server = Served::start(&pki, |s| {
        s.http.max_connections = 1;
        s.http.tls.handshake_timeout_ms = HANDSHAKE_MS;
    })
    .await;
    let connector = client(pki.ca_der(), H2, None);
    let opened = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // It holds the only slot: one more connection is closed before its
    // handshake.
    assert!(tls_connect(server.addr, &connector).await.is_err());
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut rest))
        .await
        .expect("the silent connection is closed")
        .ok();
    let took = opened.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        took >= Duration::from_millis(HANDSHAKE_MS),
        "closed after {took:?}"
    );
    // Its slot is free again.
    Wait::new(
        Duration::from_secs(30),
        "a TLS client served after the silent one",
    )
    .until(|| async {
        let (_, mut http) = Http::open(server.addr, &connector).await?;
        match http.call("GET", "/healthz", None).await? {
            (200, _) => Ok(()),
            (status, body) => Err(format!("{status} {body}")),
        }
    })
    .await;
    wait_for_handshake_failures(server.addr, &connector, &[("timeout", 1.0)]).await;
    server.shut_down().await;
}

#[tokio::test]
async fn unreadable_or_mismatched_files_fail_the_start_naming_the_file() {
    let pki = Pki::new("bad");
    pki.write_server("chatshard bad");
    let mut settings = chatshard::config::HttpTlsSettings {
        cert_file: pki.cert_file().display().to_string(),
        key_file: pki.dir.join("missing.key").display().to_string(),
        ..Default::default()
    };
    let err = Tls::from_settings(&settings).unwrap_err().to_string();
    assert!(
        err.contains("http.tls.key_file") && err.contains("missing.key"),
        "{err}"
    );
    // A key of another certificate.
    let (_, other_key) = pki.issue("other");
    let other = pki.dir.join("other.key");
    std::fs::write(&other, other_key.serialize_pem()).unwrap();
    settings.key_file = other.display().to_string();
    let err = Tls::from_settings(&settings).unwrap_err().to_string();
    assert!(err.contains("other.key"), "{err}");
    settings.key_file = pki.key_file().display().to_string();
    settings.cert_file = pki.key_file().display().to_string();
    let err = Tls::from_settings(&settings).unwrap_err().to_string();
    assert!(
        err.contains("http.tls.cert_file") && err.contains("server.key"),
        "{err}"
    );
    settings.cert_file = pki.cert_file().display().to_string();
    settings.client_ca_file = pki.dir.join("nope.pem").display().to_string();
    let err = Tls::from_settings(&settings).unwrap_err().to_string();
    assert!(
        err.contains("http.tls.client_ca_file") && err.contains("nope.pem"),
        "{err}"
    );
    assert!(Path::new(&pki.cert_file()).exists());
}
