//! `tls-cost`: what TLS costs a join, measured on one local shard the tool
//! starts with a certificate of a throw-away CA (plain connections still
//! allowed), and a `chatshard serve` child process per run, in three setups
//! run in turn, round after round, so that every setup sees the same
//! machine:
//!
//! - `plain`: the shard over `ssl-mode=DISABLED`, the API over HTTP;
//! - `shard-tls`: the shard over `ssl-mode=VERIFY_IDENTITY` with the CA;
//! - `api-tls`: the shard plain, the API over HTTPS (`[http.tls]`).
//!
//! Each run is a [`join_spike`](super::join_spike) of `clients` for
//! `duration` against a fresh `serve` (so pools and caches start alike), with
//! its p50, p99, joins per second and the child's CPU per join; the report
//! gives every run, each setup's medians, and the ratios of the medians to
//! `plain`'s.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chatshard::config::ShardSettings;
use chatshard::localdb::tls::TestCertificates;
use chatshard::localdb::{LocalMariaDb, LocalMariaDbOptions, LocalTls};
use serde_json::{Value, json};

use crate::client::Target;
use crate::report::Recorder;

/// The setups, in the order each round runs them.
const SETUPS: [Setup; 3] = [Setup::Plain, Setup::ShardTls, Setup::ApiTls];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Plain,
    ShardTls,
    ApiTls,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Plain => "plain",
            Setup::ShardTls => "shard-tls",
            Setup::ApiTls => "api-tls",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    p50_ms: f64,
    p99_ms: f64,
    joins_per_second: f64,
    cpu_micros_per_join: f64,
}

/// The certificates and the shard all runs share.
struct Bench {
    pki: TestCertificates,
    shard: LocalMariaDb,
    api_cert: chatshard::localdb::tls::CertifiedKey,
    chatshard: PathBuf,
    dir: PathBuf,
}

/// `tls-cost`: `rounds` rounds of the three setups, each a join spike of
/// `clients` for `duration`.
pub async fn tls_cost(
    rounds: usize,
    clients: usize,
    duration: Duration,
    chatshard: Option<PathBuf>,
) -> anyhow::Result<Value> {
    let chatshard = match chatshard {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("chatshard"),
    };
    anyhow::ensure!(
        chatshard.is_file(),
        "{} not found: build it (cargo build --release --bins) or pass --chatshard-bin",
        chatshard.display()
    );
    let pki = TestCertificates::temp()?;
    let shard_cert = pki.server("shard", &["localhost", "127.0.0.1"])?;
    let api_cert = pki.server("api", &["localhost", "127.0.0.1"])?;
    let mut options = LocalMariaDbOptions::temp();
    options.tls = Some(LocalTls {
        ca: pki.ca().to_owned(),
        cert: shard_cert.cert.clone(),
        key: shard_cert.key.clone(),
        require_secure_transport: false,
    });
    let shard = LocalMariaDb::start(options).await?;
    let dir = shard.data_dir().with_extension("tls-cost");
    std::fs::create_dir_all(&dir)?;
    let bench = Bench {
        pki,
        shard,
        api_cert,
        chatshard,
        dir,
    };
    chatshard::migrate::migrate_shard(&bench.shard_settings(Setup::Plain)).await?;

    let mut runs: Vec<(Setup, Measured)> = Vec::new();
    for round in 0..rounds {
        for setup in SETUPS {
            let measured = bench.run(setup, clients, duration).await?;
            eprintln!(
                "round {}: {:<9} p50 {:.2} ms  p99 {:.2} ms  {:.0} joins/s  {:.0} µs CPU/join",
                round + 1,
                setup.name(),
                measured.p50_ms,
                measured.p99_ms,
                measured.joins_per_second,
                measured.cpu_micros_per_join
            );
            runs.push((setup, measured));
        }
    }
    let _ = std::fs::remove_dir_all(&bench.dir);
    Ok(report(&runs, rounds, clients, duration))
}

impl Bench {
    fn shard_settings(&self, setup: Setup) -> ShardSettings {
        let base = self.shard.plain_url("chatshard");
        let url = match setup {
            Setup::ShardTls => format!(
                "{base}?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
                self.pki.ca().display()
            ),
            Setup::Plain | Setup::ApiTls => format!("{base}?ssl-mode=DISABLED"),
        };
        ShardSettings {
            name: "shard-0".into(),
            url,
            buckets: vec!["0-1023".into()],
            id_block: None,
            replicas: vec![],
        }
    }

    /// One run: a fresh `serve` in `setup`, the spike, the figures.
    async fn run(
        &self,
        setup: Setup,
        clients: usize,
        duration: Duration,
    ) -> anyhow::Result<Measured> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token = crate::client::run_id("tls-cost-admin-token");
        let config = self.dir.join(format!("{}.toml", setup.name()));
        std::fs::write(&config, self.config(setup, port, &token))?;
        let mut child = tokio::process::Command::new(&self.chatshard)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env_remove("CHATSHARD_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("serve exited at once"))?;
        let scheme = if setup == Setup::ApiTls {
            "https"
        } else {
            "http"
        };
        let target = Target {
            http: client(self.pki.ca())?,
            base: format!("{scheme}://localhost:{port}"),
            admin_token: Some(token),
            others: Vec::new(),
        };
        wait_until_ready(&target, &mut child).await?;
        let recorder = Recorder::new();
        let spike =
            super::join_spike(&target, &recorder, clients, duration, false, Some(pid)).await;
        child.kill().await?;
        let spike = spike?;
        let joins = recorder.ok_count("join");
        Ok(Measured {
            p50_ms: recorder.quantile_ms("join", 0.5).unwrap_or(f64::NAN),
            p99_ms: recorder.quantile_ms("join", 0.99).unwrap_or(f64::NAN),
            joins_per_second: joins as f64 / duration.as_secs_f64(),
            cpu_micros_per_join: spike["cpu"]["serviceCpuMicrosPerJoin"]
                .as_f64()
                .unwrap_or(f64::NAN),
        })
    }

    fn config(&self, setup: Setup, port: u16, token: &str) -> String {
        let shard = self.shard_settings(setup);
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\n\n[admin]\ntoken = \"{token}\"\n\n\
             [[shards]]\nname = \"{}\"\nurl = \"{}\"\nbuckets = [\"0-1023\"]\n",
            shard.name, shard.url
        );
        if setup == Setup::ApiTls {
            config.push_str(&format!(
                "\n[http.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                self.api_cert.cert.display(),
                self.api_cert.key.display()
            ));
        }
        config
    }
}

/// An HTTP client that trusts `ca` (for the `api-tls` runs) besides the
/// system's CAs.
fn client(ca: &Path) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(ca)?;
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem)?)
        .build()?)
}

/// Polls `/readyz` until the instance answers 200, for at most 60 s; fails
/// at once if the child exits.
async fn wait_until_ready(
    target: &Target,
    child: &mut tokio::process::Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("chatshard serve exited with {status} before it was ready");
        }
        let ready = target
            .http
            .get(format!("{}/readyz", target.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "chatshard serve was not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn report(runs: &[(Setup, Measured)], rounds: usize, clients: usize, duration: Duration) -> Value {
    let medians = |setup: Setup| {
        let of = |f: fn(&Measured) -> f64| {
            median(
                runs.iter()
                    .filter(|(s, _)| *s == setup)
                    .map(|(_, m)| f(m))
                    .collect(),
            )
        };
        Measured {
            p50_ms: of(|m| m.p50_ms),
            p99_ms: of(|m| m.p99_ms),
            joins_per_second: of(|m| m.joins_per_second),
            cpu_micros_per_join: of(|m| m.cpu_micros_per_join),
        }
    };
    let plain = medians(Setup::Plain);
    let as_json = |m: &Measured| {
        json!({
            "p50Ms": m.p50_ms,
            "p99Ms": m.p99_ms,
            "joinsPerSecond": m.joins_per_second,
            "serviceCpuMicrosPerJoin": m.cpu_micros_per_join,
        })
    };
    let setups: serde_json::Map<String, Value> = SETUPS
        .iter()
        .map(|&setup| {
            let m = medians(setup);
            let mut value = json!({ "median": as_json(&m) });
            if setup != Setup::Plain {
                value["overPlain"] = json!({
                    "p50": m.p50_ms / plain.p50_ms,
                    "p99": m.p99_ms / plain.p99_ms,
                    "joinsPerSecond": m.joins_per_second / plain.joins_per_second,
                    "serviceCpuPerJoin": m.cpu_micros_per_join / plain.cpu_micros_per_join,
                });
            }
            (setup.name().to_owned(), value)
        })
        .collect();
    json!({
        "name": "tls-cost",
        "rounds": rounds,
        "clients": clients,
        "durationSeconds": duration.as_secs_f64(),
        "runs": runs.iter().map(|(s, m)| {
            let mut v = as_json(m);
            v["setup"] = json!(s.name());
            v
        }).collect::<Vec<_>>(),
        "setups": setups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
