//! The Grafana dashboard and the alerting rules against a real Prometheus
//! scraping a real chatshard.
//!
//! Prometheus and promtool come from Debian's `prometheus` package; when they
//! are missing the test installs it (`apt-get update`, then `apt-get install`,
//! as root) and stops the system service the package may start. It then:
//!
//! 1. runs `promtool check rules docker/prometheus/alerts.yml` and
//!    `promtool check config` on docker/prometheus.yml (which loads the rules
//!    relative to itself) and on its own configuration;
//! 2. starts two temporary MariaDB shards and chatshard in-process, and a
//!    Prometheus of its own: a temp dir (removed afterwards), a free 127.0.0.1
//!    port, 1 s scrape and evaluation intervals, the repository's alerts.yml;
//! 3. with steady traffic on a chat of each shard, checks that the dashboard's
//!    `instance` variable lists chatshard, that every `expr` of
//!    docker/grafana/dashboards/chatshard.json (`$__rate_interval` and
//!    `$instance` substituted as Grafana would) returns data carrying the
//!    labels its legend names, that every alert expression parses and its
//!    signal (the expression with its comparison made a `bool` one) returns
//!    data carrying the labels its annotations name, and that Prometheus
//!    evaluates every rule without error;
//! 4. checks the fault panels at rest, hangs one shard (SIGSTOP), keeps
//!    traffic on a chat of it, and polls, with a deadline, until the breaker,
//!    outcome, rejection, refused-share and latency panels show the fault, the
//!    ChatshardBreakerOpen and ChatshardShardRefusing expressions return the
//!    shard and ChatshardBreakerOpen is pending; checks that the admin view
//!    and `/metrics` agree and that the other shard's breaker stayed closed;
//!    resumes the shard and waits for its breaker to close again.
//!
//! Every wait polls a condition until a deadline. Prometheus never outlives
//! the test: it is killed and reaped on drop (errors, panics and the overall
//! timeout included), and a `sh` watchdog holding the read end of a pipe kills
//! it and removes its directory if the test process dies without unwinding.
//!
//! Run it alone with `cargo test --test prometheus -- --nocapture` to see the
//! result of every query.
#![forbid(unsafe_code)]

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use chatshard::localdb::LocalMariaDb;
use chatshard::localdb::cluster::Location;
use common::{TestApp, Wait};
use serde_json::{Value, json};

/// What `$__rate_interval` becomes: Prometheus scrapes every second here, and
/// Grafana makes it at least four scrape intervals.
const RATE_INTERVAL: &str = "5s";
/// What the dashboard's `$instance` variable becomes when "All" is selected
/// (its `allValue`).
const ALL_INSTANCES: &str = ".+";
/// The alerts the runbook documents; one more must watch `outcome_unknown`.
const REQUIRED_ALERTS: [&str; 5] = [
    "ChatshardInstanceDown",
    "ChatshardBreakerOpen",
    "ChatshardShardSlow",
    "ChatshardShardRefusing",
    "ChatshardHotChat",
];
const TOKEN: &str = "prometheus-test-admin-token";
/// Interval between two polls of a condition (never a synchronisation: every
/// wait below polls until a deadline).
const POLL: Duration = Duration::from_millis(200);
/// The whole test; it normally takes 20 to 30 s.
const TEST_TIMEOUT: Duration = Duration::from_secs(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_work_against_a_real_prometheus() -> Result<()> {
    let started = Instant::now();
    // On timeout `run` is dropped, and with it everything it started:
    // Prometheus killed, the shard resumed, the shards killed and removed.
    let result = tokio::time::timeout(TEST_TIMEOUT, run())
        .await
        .with_context(|| format!("the test did not finish within {TEST_TIMEOUT:?}"))?;
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    result
}

async fn run() -> Result<()> {
    let t0 = Instant::now();
    let at = || format!("[{:4.1} s]", t0.elapsed().as_secs_f64());
    let tools = tokio::task::spawn_blocking(ensure_prometheus).await??;
    let rules = repo("docker/prometheus/alerts.yml");
    tools.promtool(&["check", "rules", path_str(&rules)?])?;
    // docker/prometheus.yml names the rules relative to itself, so this checks
    // that the compose deployment loads them too.
    let out = tools.promtool(&["check", "config", path_str(&repo("docker/prometheus.yml"))?])?;
    ensure!(
        out.contains("1 rule files found"),
        "docker/prometheus.yml does not load the rules:\n{out}"
    );
    let dashboard = Dashboard::load()?;
    let alerts = alert_rules()?;

    // Two shards of its own (one is hung below), and a fleet of one, so the
    // fleet panels have series.
    let app = TestApp::builder()
        .own_shards(2, Location::Temp)
        .redis()
        .client_timeout(Duration::from_secs(5))
        .configure(|s| {
            // Two overruns of the (default, 1 s) operation deadline open a
            // breaker.
            s.breaker.consecutive_failures = 2;
            s.admin.token = TOKEN.into();
        })
        .start()
        .await;
    let addr: SocketAddr = app.base.trim_start_matches("http://").parse()?;
    let settings = &app.settings;

    println!("{} shards, chatshard on {addr}", at());
    let mut prometheus = Prometheus::start(&tools, addr, &rules).await?;
    println!("{} prometheus ready on {}", at(), prometheus.base);
    let chats = one_chat_per_shard(&app).await?;
    let load = Load::start(&app.http, &app.base, &chats);

    // -- Every query of the dashboard and every alert, with traffic.
    let within = Duration::from_secs(30);
    let instance = addr.to_string();
    for (name, expr, label) in &dashboard.variables {
        prometheus
            .poll(
                &format!("dashboard variable ${name} lists {instance}"),
                expr,
                within,
                |s| s.iter().any(|s| s.label(label) == instance),
            )
            .await;
        println!("ok variable ${name}: label_values({expr}, {label}) lists {instance}");
    }
    for q in &dashboard.queries {
        let samples = prometheus
            .poll(
                &format!("dashboard {}: data", q.name),
                &q.expr,
                within,
                |s| !s.is_empty(),
            )
            .await;
        for s in &samples {
            for label in &q.legend {
                ensure!(
                    !s.label(label).is_empty(),
                    "dashboard {}: the legend names {{{{{label}}}}}, which {s:?} does not carry",
                    q.name
                );
            }
        }
        println!("ok {:>3} series  {}: {}", samples.len(), q.name, q.expr);
    }
    for alert in &alerts {
        prometheus
            .query(&alert.expr)
            .await
            .with_context(|| format!("alert {}", alert.name))?;
        let signal = bool_signal(&alert.expr).with_context(|| {
            format!("{}: no top-level comparison in {}", alert.name, alert.expr)
        })?;
        let samples = prometheus
            .poll(
                &format!("alert {}: data from its signal", alert.name),
                &signal,
                within,
                |s| !s.is_empty(),
            )
            .await;
        for s in &samples {
            for label in &alert.annotation_labels {
                ensure!(
                    !s.label(label).is_empty(),
                    "alert {}: its annotations use $labels.{label}, which {s:?} does not carry",
                    alert.name
                );
            }
        }
        println!(
            "ok {:>3} series  alert {}: {signal}",
            samples.len(),
            alert.name
        );
    }
    prometheus.wait_rules_healthy(&alerts, within).await;
    println!(
        "{} ok every rule of group chatshard evaluated without error",
        at()
    );

    // -- The fault panels and alerts, at rest.
    let broken = settings.shards[1].name.as_str();
    let healthy = settings.shards[0].name.as_str();
    let breaker_q = dashboard.query("breaker state", |e| {
        e.contains("chatshard_shard_breaker_state") && by_labels(e) == ["instance", "shard"]
    })?;
    let outcome_q = dashboard.query("operations by outcome", |e| {
        e.contains("chatshard_shard_operations_total") && by_labels(e) == ["outcome", "shard"]
    })?;
    let rejections_q = dashboard.query("rejections by reason", |e| {
        e.contains("chatshard_shard_rejections_total") && by_labels(e) == ["reason", "shard"]
    })?;
    let refused_q = dashboard.query("refused share", |e| {
        e.contains("chatshard_shard_operations_total") && by_labels(e) == ["shard"]
    })?;
    let latency_q = dashboard.query("p99 latency", |e| {
        e.contains("histogram_quantile(0.99")
            && e.contains("chatshard_shard_operation_duration_seconds_bucket")
    })?;
    let open_alert = alert(&alerts, "ChatshardBreakerOpen")?;
    let refusing_alert = alert(&alerts, "ChatshardShardRefusing")?;

    let at_rest = prometheus.query(breaker_q).await?;
    ensure!(
        at_rest.len() == settings.shards.len() && at_rest.iter().all(|s| s.value == 0.0),
        "breaker panel before the fault: {at_rest:?}"
    );
    for (expr, what) in [(outcome_q, "outcome"), (rejections_q, "reason")] {
        for s in prometheus.query(expr).await? {
            if s.label(what) == "breaker_open" {
                ensure!(s.value == 0.0, "before the fault: {s:?} of {expr}");
            }
        }
    }
    let firing = prometheus.query(&open_alert.expr).await?;
    ensure!(
        firing.is_empty(),
        "ChatshardBreakerOpen before the fault: {firing:?}"
    );
    println!(
        "{} ok at rest: every breaker closed, no breaker_open refusal, no ChatshardBreakerOpen",
        at()
    );

    // -- Hang the shard of the second chat, with traffic on that chat.
    let suspended = Suspended::new(app.shard_servers().server(1))?;
    let seen = Mutex::new(Fault::default());
    Wait::new(within, format!("the hung {broken} shown"))
        .every(POLL)
        .until(|| async {
            let now = Fault {
                breaker: prometheus
                    .query(breaker_q)
                    .await?
                    .iter()
                    .any(|s| s.label("shard") == broken && s.value >= 1.0),
                failures: prometheus.query(outcome_q).await?.iter().any(|s| {
                    s.label("shard") == broken
                        && s.value > 0.0
                        && matches!(
                            s.label("outcome"),
                            "timeout" | "unavailable" | "outcome_unknown"
                        )
                }),
                refusals: prometheus.query(outcome_q).await?.iter().any(|s| {
                    s.label("shard") == broken
                        && s.value > 0.0
                        && s.label("outcome") == "breaker_open"
                }),
                rejections: prometheus.query(rejections_q).await?.iter().any(|s| {
                    s.label("shard") == broken
                        && s.label("reason") == "breaker_open"
                        && s.value > 0.0
                }),
                refused_share: prometheus
                    .query(refused_q)
                    .await?
                    .iter()
                    .any(|s| s.label("shard") == broken && s.value > 0.0),
                latency: prometheus
                    .query(latency_q)
                    .await?
                    .iter()
                    .any(|s| s.label("shard") == broken && s.value > 0.5),
                breaker_expression: prometheus
                    .query(&open_alert.expr)
                    .await?
                    .iter()
                    .any(|s| s.label("shard") == broken),
                refusing_expression: prometheus
                    .query(&refusing_alert.expr)
                    .await?
                    .iter()
                    .any(|s| s.label("shard") == broken),
                alert: prometheus
                    .alert_active("ChatshardBreakerOpen", broken)
                    .await?,
            };
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            seen.merge(&now);
            if seen.all() {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{seen:?}"))
            }
        })
        .await;
    let seen = seen.into_inner().unwrap_or_else(PoisonError::into_inner);
    println!("{} ok fault of {broken} shown: {seen:?}", at());

    // What Prometheus shows is what the instance says.
    let shards = app.admin_get("/v1/admin/shards").await;
    let view = shards["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == broken)
        .with_context(|| format!("{broken} not in /v1/admin/shards: {shards}"))?;
    ensure!(
        view["breaker"]["state"] != "CLOSED"
            && view["rejected"]["breakerOpen"].as_u64().unwrap_or(0) > 0,
        "the admin view of the hung {broken}: {view}"
    );
    let exported = app
        .metric_sum(
            "chatshard_shard_breaker_state",
            &[&format!("shard=\"{broken}\"")],
        )
        .await;
    ensure!(
        exported >= 1.0,
        "/metrics: the breaker of the hung {broken} is closed: {exported}"
    );
    // The other shard was not touched.
    for s in prometheus.query(breaker_q).await? {
        if s.label("shard") == healthy {
            ensure!(
                s.value == 0.0,
                "the breaker of the healthy {healthy} is {} on {}",
                s.value,
                s.label("instance")
            );
        }
    }

    // -- Resume it: the breaker closes and the alert's expression clears.
    suspended.resume()?;
    prometheus
        .poll(
            &format!("the breaker of {broken} closed after resume"),
            breaker_q,
            within,
            |s| {
                let mut of_broken = s.iter().filter(|s| s.label("shard") == broken).peekable();
                of_broken.peek().is_some() && of_broken.all(|s| s.value == 0.0)
            },
        )
        .await;
    let firing = prometheus.query(&open_alert.expr).await?;
    ensure!(
        firing.is_empty(),
        "ChatshardBreakerOpen after the breaker closed: {firing:?}"
    );
    println!("{} ok {broken} closed again after resume", at());

    let unanswered = load.stop().await;
    ensure!(
        unanswered.is_empty(),
        "{} requests of the traffic got no answer, e.g. {:?}",
        unanswered.len(),
        unanswered.first()
    );
    prometheus.finish()?;
    app.shut_down().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Prometheus and promtool

/// Where Prometheus and promtool are.
#[derive(Debug)]
struct Tools {
    prometheus: PathBuf,
    promtool: PathBuf,
}

impl Tools {
    fn find() -> Option<Self> {
        Some(Self {
            prometheus: find_program("prometheus")?,
            promtool: find_program("promtool")?,
        })
    }

    /// Runs promtool from the repository root; its output, or an error with it.
    fn promtool(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.promtool)
            .args(args)
            .current_dir(repo(""))
            .stdin(Stdio::null())
            .output()
            .context("running promtool")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success(),
            "promtool {} failed ({}):\n{text}",
            args.join(" "),
            out.status
        );
        Ok(text)
    }
}

/// Finds prometheus and promtool; installs Debian's `prometheus` package with
/// apt-get when either is missing and we are root, then stops the service the
/// package may have started (this test runs a Prometheus of its own).
fn ensure_prometheus() -> Result<Tools> {
    if let Some(tools) = Tools::find() {
        return Ok(tools);
    }
    // Parallel tests must not run apt-get concurrently.
    static INSTALL: Mutex<()> = Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tools) = Tools::find() {
        return Ok(tools);
    }
    const HINT: &str = "install Debian's prometheus package: `sudo apt-get install -y prometheus`";
    ensure!(
        is_root() && find_program("apt-get").is_some(),
        "prometheus or promtool not found, and apt-get cannot install them here: {HINT}"
    );
    let apt = |args: &[&str]| -> Result<()> {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running apt-get {}", args.join(" ")))?;
        ensure!(
            out.status.success(),
            "prometheus or promtool not found, and `apt-get {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    apt(&["update"])?;
    // No recommends: they would add (and start) prometheus-node-exporter.
    apt(&["install", "-y", "--no-install-recommends", "prometheus"])?;
    stop_system_prometheus();
    Tools::find().with_context(|| format!("prometheus is installed but not found: {HINT}"))
}

/// Stops the `prometheus` service the package may have started (port 9090):
/// through `service` where it exists, else the init script. Stopping a
/// service that is not running does nothing.
fn stop_system_prometheus() {
    let quiet = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    if quiet("service", &["prometheus", "stop"]).is_err() {
        let _ = quiet("/etc/init.d/prometheus", &["stop"]);
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

/// A Prometheus server of this test: its own directory and port. `finish`
/// stops it; dropping it without `finish` stops it too and prints its log.
struct Prometheus {
    dir: PathBuf,
    server: Option<Child>,
    /// Holds the write end of the watchdog's stdin; armed iff `server` is.
    watchdog: Option<Child>,
    base: String,
    http: reqwest::Client,
    finished: bool,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` with `rules`, and waits until it is
    /// ready. A free port picked here can be taken by someone else before
    /// Prometheus binds it: then it tries another one.
    async fn start(tools: &Tools, target: SocketAddr, rules: &Path) -> Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chatshard-prometheus-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data"))?;
        // reqwest's TLS takes the process's default provider.
        chatshard::crypto::install_default_provider();
        let mut prometheus = Self {
            dir,
            server: None,
            watchdog: None,
            base: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            finished: false,
        };
        // From here on an error drops `prometheus`, which cleans up.
        let config = prometheus.dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: chatshard\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n",
                rules = path_str(rules)?,
            ),
        )?;
        tools.promtool(&["check", "config", path_str(&config)?])?;
        for attempt in 1.. {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            prometheus.spawn(&tools.prometheus, &config, port)?;
            match prometheus.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => break,
                Err(_)
                    if attempt < 3
                        && prometheus.server.is_none()
                        && prometheus.log().contains("address already in use") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(prometheus)
    }

    fn spawn(&mut self, binary: &Path, config: &Path, port: u16) -> Result<()> {
        let log = fs::File::create(self.dir.join("prometheus.log"))?;
        let server = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: a terminal's Ctrl-C reaches only the test,
            // whose end the watchdog then sees.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = server.id();
        self.server = Some(server);
        self.base = format!("http://127.0.0.1:{port}");
        self.watchdog = Some(self.spawn_watchdog(pid)?);
        Ok(())
    }

    /// The same watchdog as the local MariaDB servers': `read` returns when
    /// the pipe closes, i.e. when the test process is gone (std pipes are
    /// close-on-exec, so no other child holds the write end); it then kills
    /// Prometheus and removes its directory.
    fn spawn_watchdog(&self, pid: u32) -> Result<Child> {
        // A zombie counts as gone, and the wait is bounded.
        let gone = r#"gone() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt $2 ] && ! grep -qs '^State:.*Z' /proc/$1/status; do sleep 0.05; i=$((i+1)); done; }"#;
        let script = format!(r#"{gone}; read _; kill -KILL "$1"; gone "$1" 100; rm -rf "$2""#);
        Command::new("sh")
            .args(["-c", &script, "sh", &pid.to_string()])
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("spawning the prometheus watchdog (sh)")
    }

    /// Kills and reaps Prometheus, then disarms the watchdog; idempotent.
    fn stop(&mut self) -> Result<()> {
        let waited = match self.server.take() {
            Some(mut server) => {
                // kill fails only when it has already exited; wait reaps it.
                let _ = server.kill();
                server.wait().map(drop)
            }
            None => Ok(()),
        };
        // Killed *before* its stdin closes (which would trigger it), so it
        // never signals a pid that may have been reused.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        waited.context("waiting for prometheus")
    }

    /// Reaps Prometheus if it has exited; `true` when it is not running.
    fn exited(&mut self) -> Result<bool> {
        let Some(server) = self.server.as_mut() else {
            return Ok(true);
        };
        if server.try_wait()?.is_none() {
            return Ok(false);
        }
        self.stop()?;
        Ok(true)
    }

    /// Stops Prometheus after a passing run (no log printed).
    fn finish(&mut self) -> Result<()> {
        self.finished = true;
        self.stop()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until Prometheus answers `/-/ready`; an error, without
    /// waiting further, when it exits first.
    async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let (http, url) = (self.http.clone(), format!("{}/-/ready", self.base));
        let exited = Wait::new(within, "prometheus ready")
            .every(POLL)
            .until(|| {
                let exited = self.exited();
                let ready = http.get(&url).send();
                async move {
                    match exited {
                        Ok(false) => {}
                        done => return Ok(done),
                    }
                    match ready.await {
                        Ok(r) if r.status().is_success() => Ok(Ok(false)),
                        Ok(r) => Err(r.status().to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            })
            .await;
        if exited? {
            bail!("prometheus exited during startup:\n{}", self.log());
        }
        Ok(())
    }

    /// An instant query; fails when Prometheus rejects it (a parse error).
    async fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.base),
            &[("query", expr)],
        )?;
        let body: Value = self.http.get(url).send().await?.json().await?;
        ensure!(body["status"] == "success", "query {expr}: {body}");
        ensure!(
            body["data"]["resultType"] == "vector",
            "query {expr}: not an instant vector: {body}"
        );
        body["data"]["result"]
            .as_array()
            .with_context(|| format!("query {expr}: no result in {body}"))?
            .iter()
            .map(Sample::from_json)
            .collect()
    }

    /// Polls `expr` until `done` holds for its result (`what`), or fails
    /// with the last result after `within`.
    async fn poll(
        &self,
        what: &str,
        expr: &str,
        within: Duration,
        done: impl Fn(&[Sample]) -> bool,
    ) -> Vec<Sample> {
        Wait::new(within, format!("{what} ({expr})"))
            .every(POLL)
            .until(|| async {
                match self.query(expr).await {
                    Ok(samples) if done(&samples) => Ok(samples),
                    Ok(samples) => Err(format!("{samples:?}")),
                    Err(e) => Err(format!("{e:#}")),
                }
            })
            .await
    }

    /// Waits until Prometheus has evaluated every alert of the `chatshard`
    /// group without error; fails at once on a rule that fails.
    async fn wait_rules_healthy(&self, alerts: &[AlertRule], within: Duration) {
        Wait::new(within, "every rule evaluated")
            .every(POLL)
            .until(|| async {
                let body: Value = self
                    .http
                    .get(format!("{}/api/v1/rules", self.base))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                let rules: Vec<&Value> = body["data"]["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| g["name"] == "chatshard")
                    .flat_map(|g| g["rules"].as_array().into_iter().flatten())
                    .filter(|r| r["type"] == "alerting")
                    .collect();
                for rule in &rules {
                    assert!(
                        rule["health"] != "err",
                        "rule {} fails: {}",
                        rule["name"],
                        rule["lastError"]
                    );
                }
                assert_eq!(
                    rules.len(),
                    alerts.len(),
                    "alerting rules loaded by prometheus, and in alerts.yml"
                );
                if rules.iter().all(|r| r["health"] == "ok") {
                    Ok(())
                } else {
                    Err(format!("{rules:?}"))
                }
            })
            .await
    }

    /// Whether `alert` is pending or firing for `shard`.
    async fn alert_active(&self, alert: &str, shard: &str) -> Result<bool> {
        let body: Value = self
            .http
            .get(format!("{}/api/v1/alerts", self.base))
            .send()
            .await?
            .json()
            .await?;
        Ok(body["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| {
                a["labels"]["alertname"] == alert
                    && a["labels"]["shard"] == shard
                    && (a["state"] == "pending" || a["state"] == "firing")
            }))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping prometheus: {e:#}");
        }
        if !self.finished {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("prometheus log (last lines):\n{}", tail.join("\n"));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn from_json(v: &Value) -> Result<Self> {
        let labels = v["metric"]
            .as_object()
            .context("metric")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        // NaN (a quantile or share of nothing) and +Inf parse too.
        let value = v["value"][1]
            .as_str()
            .context("value")?
            .parse()
            .context("value")?;
        Ok(Self { labels, value })
    }

    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

// ---------------------------------------------------------------------------
// The dashboard and the rules

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// One query of a panel, its variables substituted.
#[derive(Debug)]
struct PanelQuery {
    /// `panel "title" A`.
    name: String,
    expr: String,
    /// The labels its `legendFormat` names.
    legend: Vec<String>,
}

#[derive(Debug)]
struct Dashboard {
    queries: Vec<PanelQuery>,
    /// The query variables: name, the series selector and the label of their
    /// `label_values(selector, label)`.
    variables: Vec<(String, String, String)>,
}

impl Dashboard {
    fn load() -> Result<Self> {
        let text = fs::read_to_string(repo("docker/grafana/dashboards/chatshard.json"))?;
        let dashboard: Value = serde_json::from_str(&text).context("dashboard JSON")?;
        let mut variables = Vec::new();
        for var in dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = var["name"].as_str().context("variable without a name")?;
            ensure!(
                name == "instance",
                "dashboard variable ${name}: this test does not know it"
            );
            let query = var["query"]
                .as_str()
                .or_else(|| var["query"]["query"].as_str())
                .with_context(|| format!("variable ${name}: no query"))?;
            let (selector, label) = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .and_then(|q| q.rsplit_once(','))
                .with_context(|| format!("variable ${name}: not label_values(...): {query}"))?;
            ensure!(
                var["allValue"] == ALL_INSTANCES,
                "variable ${name}: allValue is {}, this test substitutes {ALL_INSTANCES}",
                var["allValue"]
            );
            variables.push((
                name.to_owned(),
                selector.trim().to_owned(),
                label.trim().to_owned(),
            ));
        }
        /// Every panel, those inside (collapsed) rows included.
        fn panels<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
            for panel in list.as_array().into_iter().flatten() {
                out.push(panel);
                panels(&panel["panels"], out);
            }
        }
        let mut all = Vec::new();
        panels(&dashboard["panels"], &mut all);
        let mut queries = Vec::new();
        for panel in all {
            let title = panel["title"].as_str().unwrap_or("");
            for target in panel["targets"].as_array().into_iter().flatten() {
                let name = format!("panel {title:?} {}", target["refId"].as_str().unwrap_or(""));
                let raw = target["expr"]
                    .as_str()
                    .with_context(|| format!("{name}: no expr"))?;
                // Every range is Grafana's, so that it spans enough scrapes
                // whatever the scrape interval and the zoom.
                for range in ranges(raw) {
                    ensure!(
                        ["$__rate_interval", "${__rate_interval}"].contains(&range),
                        "{name}: the range [{range}] instead of [$__rate_interval]"
                    );
                }
                let expr = raw
                    .replace("${__rate_interval}", RATE_INTERVAL)
                    .replace("$__rate_interval", RATE_INTERVAL)
                    .replace("${instance}", ALL_INSTANCES)
                    .replace("$instance", ALL_INSTANCES);
                ensure!(
                    !expr.contains('$'),
                    "{name}: a variable this test does not know in {expr}"
                );
                let legend = target["legendFormat"]
                    .as_str()
                    .unwrap_or("")
                    .split("{{")
                    .skip(1)
                    .filter_map(|s| s.split_once("}}"))
                    .map(|(label, _)| label.trim().to_owned())
                    .collect();
                queries.push(PanelQuery { name, expr, legend });
            }
        }
        ensure!(
            queries.len() >= 10,
            "only {} dashboard queries",
            queries.len()
        );
        Ok(Self { queries, variables })
    }

    /// The one query for which `pick` holds.
    fn query(&self, what: &str, pick: impl Fn(&str) -> bool) -> Result<&str> {
        let found: Vec<&str> = self
            .queries
            .iter()
            .map(|q| q.expr.as_str())
            .filter(|e| pick(e))
            .collect();
        match found.as_slice() {
            [one] => Ok(one),
            _ => bail!("{} dashboard queries of {what}: {found:?}", found.len()),
        }
    }
}

/// The `[...]` ranges of an expression, outside its quoted strings.
fn ranges(expr: &str) -> Vec<&str> {
    let (mut out, mut quote, mut start) = (Vec::new(), None::<char>, None::<usize>);
    let mut chars = expr.char_indices();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '[') => start = Some(i + 1),
            (None, ']') => out.extend(start.take().map(|s| &expr[s..i])),
            (None, _) => {}
        }
    }
    out
}

/// The labels of every `by (...)` of an expression, sorted, deduplicated.
fn by_labels(expr: &str) -> Vec<&str> {
    let mut labels: Vec<&str> = expr
        .split("by (")
        .skip(1)
        .filter_map(|rest| rest.split_once(')'))
        .flat_map(|(inside, _)| inside.split(','))
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "le")
        .collect();
    labels.sort_unstable();
    labels.dedup();
    labels
}

#[derive(Debug)]
struct AlertRule {
    name: String,
    expr: String,
    /// The labels its annotations use (`{{ $labels.shard }}`).
    annotation_labels: Vec<String>,
}

fn alert<'a>(alerts: &'a [AlertRule], name: &str) -> Result<&'a AlertRule> {
    alerts
        .iter()
        .find(|a| a.name == name)
        .with_context(|| format!("alerts.yml has no {name}"))
}

/// The alerts of group `chatshard`, checked for what an SRE needs: a
/// severity, a summary, a description and a runbook anchor that exists.
fn alert_rules() -> Result<Vec<AlertRule>> {
    let text = fs::read_to_string(repo("docker/prometheus/alerts.yml"))?;
    let rules: yaml_serde::Value = yaml_serde::from_str(&text).context("alerts.yml")?;
    let docs = fs::read_to_string(repo("docs/observability.md"))?;
    let anchors = markdown_anchors(&docs);
    let group = rules["groups"]
        .as_sequence()
        .context("groups")?
        .iter()
        .find(|g| g["name"].as_str() == Some("chatshard"))
        .context("no rule group `chatshard`")?;
    let mut alerts = Vec::new();
    for rule in group["rules"].as_sequence().context("rules")? {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        let expr = rule["expr"]
            .as_str()
            .with_context(|| format!("{name}: expr"))?;
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        ensure!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let mut annotation_labels = Vec::new();
        for key in ["summary", "description"] {
            let text = rule["annotations"][key].as_str().unwrap_or("");
            ensure!(!text.trim().is_empty(), "{name}: no {key}");
            for (at, key) in text.match_indices("$labels.") {
                let label: String = text[at + key.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !annotation_labels.contains(&label) {
                    annotation_labels.push(label);
                }
            }
        }
        let runbook = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let anchor = runbook
            .strip_prefix("docs/observability.md#")
            .with_context(|| format!("{name}: runbook_url {runbook:?}"))?;
        ensure!(
            anchors.iter().any(|a| a == anchor),
            "{name}: docs/observability.md has no heading for #{anchor}"
        );
        alerts.push(AlertRule {
            name: name.to_owned(),
            expr: expr.to_owned(),
            annotation_labels,
        });
    }
    for required in REQUIRED_ALERTS {
        alert(&alerts, required)?;
    }
    ensure!(
        alerts.iter().any(|a| a.expr.contains("outcome_unknown")),
        "no alert watches outcome_unknown"
    );
    Ok(alerts)
}

/// GitHub's anchors of the headings of a Markdown text (not of `#` lines in
/// fenced code blocks).
fn markdown_anchors(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    let mut anchors = Vec::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        anchors.push(
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect(),
        );
    }
    anchors
}

/// `expr` with its last top-level comparison made a `bool` one: the alert's
/// signal, which returns a sample (0 or 1) for every series the comparison
/// would otherwise filter out.
fn bool_signal(expr: &str) -> Option<String> {
    let b = expr.as_bytes();
    let (mut depth, mut quote, mut last) = (0i32, None::<u8>, None::<usize>);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ if depth == 0 => {
                    let rest = &b[i..];
                    if let Some(op) = ["==", "!=", ">=", "<=", ">", "<"]
                        .iter()
                        .find(|op| rest.starts_with(op.as_bytes()))
                    {
                        last = Some(i + op.len());
                        i += op.len();
                        continue;
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    let at = last?;
    Some(format!("{} bool{}", &expr[..at], &expr[at..]))
}

#[test]
fn bool_signal_finds_the_top_level_comparison() {
    assert_eq!(
        bool_signal("up{job=\"a\"} == 0").as_deref(),
        Some("up{job=\"a\"} == bool 0")
    );
    assert_eq!(
        bool_signal("sum by (s) (rate(x{o=~\"a|b\"}[2m])) / sum by (s) (rate(x[2m])) > 0.1")
            .as_deref(),
        Some("sum by (s) (rate(x{o=~\"a|b\"}[2m])) / sum by (s) (rate(x[2m])) > bool 0.1")
    );
    assert_eq!(
        bool_signal("histogram_quantile(0.99, sum by (le) (rate(h[5m])))\n  > 0.5").as_deref(),
        Some("histogram_quantile(0.99, sum by (le) (rate(h[5m])))\n  > bool 0.5")
    );
    assert_eq!(bool_signal("max(x{a!=\"b\", c=~\"d\"})"), None);
}

#[test]
fn anchors_and_by_labels_are_read_as_github_and_promql_do() {
    let md = "# Title\n## Alerts and runbooks\n```sh\n# not a heading\n```\n### ChatshardHotChat\n";
    assert_eq!(
        markdown_anchors(md),
        ["title", "alerts-and-runbooks", "chatshardhotchat"]
    );
    assert_eq!(
        by_labels("sum by (shard, outcome) (rate(x[5s])) / sum by (shard) (y)"),
        ["outcome", "shard"]
    );
    assert_eq!(
        by_labels("histogram_quantile(0.5, sum by (shard, le) (rate(h[5s])))"),
        ["shard"]
    );
    assert_eq!(
        ranges(r#"rate(x{r!~"/a[.]json|\\[x"}[$__rate_interval]) + y[5m]"#),
        ["$__rate_interval", "5m"]
    );
}

// ---------------------------------------------------------------------------
// chatshard side

/// Creates chats until each shard has one; the chat of shard `i` at `i`.
async fn one_chat_per_shard(app: &TestApp) -> Result<Vec<String>> {
    let mut chats: Vec<Option<String>> = vec![None; app.settings.shards.len()];
    for n in 0..500 {
        if chats.iter().all(Option::is_some) {
            break;
        }
        let chat = format!("prom-{}-{n}", std::process::id());
        let r = app.put_chat(&chat, None).await;
        ensure!(
            r.status().as_u16() == 201,
            "PUT /v1/chats/{chat}: {}",
            r.status()
        );
        let body: Value = r.json().await?;
        let shard = body["shard"].as_str().context("no shard in the answer")?;
        let i = app.shard_index(shard);
        if chats[i].is_none() {
            chats[i] = Some(chat);
        }
    }
    chats
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.with_context(|| format!("no chat routed to shard {i}")))
        .collect()
}

/// Steady traffic on every chat, one task per chat (so a hung shard does not
/// slow the others' traffic): a join, a member count and an event fetch, then
/// a pause; and an event stream of each chat, read and reopened (the client's
/// 5 s timeout ends it). Bounded in time; stops when told.
struct Load {
    stop: Arc<AtomicBool>,
    /// What went wrong with requests that got no answer at all.
    unanswered: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: &reqwest::Client, base: &str, chats: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let unanswered = Arc::new(Mutex::new(Vec::new()));
        let until = Instant::now() + TEST_TIMEOUT;
        let tasks = chats
            .iter()
            .map(|chat| {
                let (http, base, chat, stop, unanswered) = (
                    http.clone(),
                    base.to_owned(),
                    chat.clone(),
                    stop.clone(),
                    unanswered.clone(),
                );
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        n += 1;
                        // Any answer will do, refusals are what the fault
                        // phase is about; but every request gets one.
                        for request in [
                            http.post(format!("{base}/v1/chats/{chat}/members"))
                                .json(&json!({ "userId": format!("u{n}") })),
                            http.get(format!("{base}/v1/chats/{chat}/member-count")),
                            http.get(format!("{base}/v1/chats/{chat}/events?after=0&limit=10")),
                        ] {
                            if let Err(e) = request.send().await {
                                unanswered
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(e.to_string());
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await; // pacing
                    }
                })
            })
            .chain(chats.iter().map(|chat| {
                let (http, base, chat, stop) =
                    (http.clone(), base.to_owned(), chat.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        let opened = http
                            .get(format!("{base}/v1/chats/{chat}/events/stream?after=0"))
                            .send()
                            .await;
                        match opened {
                            // Read until the client's time-out cuts it.
                            Ok(mut r) if r.status().is_success() => {
                                while !stop.load(Ordering::Relaxed)
                                    && matches!(r.chunk().await, Ok(Some(_)))
                                {
                                }
                            }
                            // Refused (the fault phase): try again.
                            _ => tokio::time::sleep(Duration::from_millis(200)).await, // pacing
                        }
                    }
                })
            }))
            .collect();
        Self {
            stop,
            unanswered,
            tasks,
        }
    }

    /// Stops the traffic; what went wrong with requests that got no answer.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("traffic task");
        }
        std::mem::take(
            &mut *self
                .unanswered
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

/// A shard server stopped with SIGSTOP; resumed on drop, panics included.
struct Suspended<'a> {
    server: &'a LocalMariaDb,
    resumed: bool,
}

impl<'a> Suspended<'a> {
    fn new(server: &'a LocalMariaDb) -> Result<Self> {
        server.suspend()?;
        Ok(Self {
            server,
            resumed: false,
        })
    }

    fn resume(mut self) -> Result<()> {
        self.resumed = true;
        self.server.resume()
    }
}

impl Drop for Suspended<'_> {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = self.server.resume();
        }
    }
}

/// What the fault phase has seen so far.
#[derive(Debug, Default)]
struct Fault {
    /// Breaker panel: the hung shard not closed.
    breaker: bool,
    /// Outcome panel: timeouts (or other failures) of the hung shard.
    failures: bool,
    /// Outcome panel: `breaker_open` refusals of the hung shard.
    refusals: bool,
    /// Rejections panel: `breaker_open` rejections of the hung shard.
    rejections: bool,
    /// Refused-share panel: above 0 for the hung shard.
    refused_share: bool,
    /// Latency panel: the hung shard's p99 above 0.5 s.
    latency: bool,
    /// The ChatshardBreakerOpen expression returns the hung shard.
    breaker_expression: bool,
    /// The ChatshardShardRefusing expression returns the hung shard.
    refusing_expression: bool,
    /// The ChatshardBreakerOpen alert is pending (or firing) for it.
    alert: bool,
}

impl Fault {
    /// Adds what `now` has seen.
    fn merge(&mut self, now: &Fault) {
        self.breaker |= now.breaker;
        self.failures |= now.failures;
        self.refusals |= now.refusals;
        self.rejections |= now.rejections;
        self.refused_share |= now.refused_share;
        self.latency |= now.latency;
        self.breaker_expression |= now.breaker_expression;
        self.refusing_expression |= now.refusing_expression;
        self.alert |= now.alert;
    }

    fn all(&self) -> bool {
        self.breaker
            && self.failures
            && self.refusals
            && self.rejections
            && self.refused_share
            && self.latency
            && self.breaker_expression
            && self.refusing_expression
            && self.alert
    }
}
