//! One connection to Redis or to a Redis Cluster, the same to its callers.
//!
//! - A single Redis: redis-rs's `ConnectionManager` (one multiplexed
//!   connection, reconnected in the background), plain `SUBSCRIBE` and
//!   `PUBLISH`.
//! - A Redis Cluster: redis-rs's async `ClusterConnection`, with sharded
//!   pub/sub (`SSUBSCRIBE` / `SPUBLISH`): a notice goes only to the node that
//!   owns its channel's slot, where plain `PUBLISH` in a cluster goes to every
//!   node. The connection follows slot moves and failover, and resubscribes.
//!
//! `rediss://` URLs are TLS (rustls), checked against `redis.tls.ca_file` or
//! the system's roots, with `redis.tls.cert_file` presented when set.
//!
//! Both speak RESP3, whose pushes (messages, subscription confirmations and the
//! library's own `Disconnection`) arrive on one channel, and both resubscribe
//! by themselves after a reconnect.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ClientTlsConfig, Cmd, ProtocolVersion, PushInfo, RedisFuture, TlsCertificates, Value};
use tokio::sync::mpsc::UnboundedSender;

/// A cheap-to-clone handle on the connection.
#[derive(Clone)]
pub enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// Where Redis is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct Target {
    /// One URL for a single Redis; several (any nodes) for a cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
    /// The private CA and client certificate of `[redis.tls]`, read once at
    /// start; `None`: the system's roots (over `rediss://`) and no client
    /// certificate.
    pub certificates: Option<TlsCertificates>,
}

impl Target {
    /// Where the settings say Redis is, if a fleet is configured; reads the
    /// files of `[redis.tls]`, and fails naming the setting and the file
    /// that cannot be read.
    pub fn from_settings(settings: &crate::config::RedisSettings) -> anyhow::Result<Option<Self>> {
        let urls = settings.urls();
        if urls.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            urls,
            cluster: settings.cluster,
            response_timeout: Duration::from_millis(settings.timeout_ms),
            connect_timeout: Duration::from_millis(settings.connect_timeout_ms),
            certificates: certificates(&settings.tls)?,
        }))
    }
}

/// The PEM files of `[redis.tls]`, read and checked (certificates hold at
/// least one certificate, the key file a private key).
fn certificates(tls: &crate::config::RedisTlsSettings) -> anyhow::Result<Option<TlsCertificates>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    if !tls.is_set() {
        return Ok(None);
    }
    let read = |setting: &str, path: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{setting} {path}: cannot be read: {e}"))
    };
    let certs = |setting: &str, path: &str| -> anyhow::Result<Vec<u8>> {
        let pem = read(setting, path)?;
        let n = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{setting} {path}: not PEM certificates: {e}"))?
            .len();
        if n == 0 {
            anyhow::bail!("{setting} {path}: holds no PEM certificate");
        }
        Ok(pem)
    };
    let root_cert = match tls.ca_file.as_str() {
        "" => None,
        path => Some(certs("redis.tls.ca_file", path)?),
    };
    let client_tls = match (tls.cert_file.as_str(), tls.key_file.as_str()) {
        ("", "") => None,
        ("", _) | (_, "") => {
            anyhow::bail!("redis.tls.cert_file and redis.tls.key_file must be set together")
        }
        (cert, key) => {
            let client_cert = certs("redis.tls.cert_file", cert)?;
            let client_key = read("redis.tls.key_file", key)?;
            PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                anyhow::anyhow!("redis.tls.key_file {key}: no private key read: {e}")
            })?;
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

fn resp3(url: &str) -> redis::RedisResult<redis::ConnectionInfo> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info()?;
    let redis = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Ok(info.set_redis_settings(redis))
}

impl Conn {
    /// A connection that connects lazily (a Redis that is down at start does
    /// not stop the instance) and sends pushes to `pushes`.
    pub async fn open(
        target: &Target,
        pushes: UnboundedSender<PushInfo>,
    ) -> redis::RedisResult<Self> {
        if target.cluster {
            let nodes = target
                .urls
                .iter()
                .map(|u| resp3(u))
                .collect::<redis::RedisResult<Vec<_>>>()?;
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes);
            if let Some(certificates) = &target.certificates {
                builder = builder.certs(certificates.clone());
            }
            let client = builder
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(pushes)
                .connection_timeout(target.connect_timeout)
                .response_timeout(target.response_timeout)
                .retries(2)
                .build()?;
            // The cluster client needs a first contact to learn the slots; the
            // caller retries while the cluster is unreachable.
            let conn = client.get_async_connection().await?;
            Ok(Self::Cluster(conn))
        } else {
            let url = target.urls.first().map(String::as_str).unwrap_or_default();
            let client = match &target.certificates {
                Some(certificates) => {
                    redis::Client::build_with_tls(resp3(url)?, certificates.clone())?
                }
                None => redis::Client::open(resp3(url)?)?,
            };
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_push_sender(pushes)
                .set_automatic_resubscription()
                .set_connection_timeout(Some(target.connect_timeout))
                .set_response_timeout(Some(target.response_timeout))
                // Reconnects are driven by our own calls (heartbeats); a few
                // quick retries each, never a long back-off inside one call.
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(100));
            let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, config)?;
            Ok(Self::Single(conn))
        }
    }

    /// `PUBLISH`, or `SPUBLISH` in a cluster.
    pub fn publish_cmd(&self, channel: &str, payload: &[u8]) -> Cmd {
        let mut cmd = redis::cmd(match self {
            Self::Single(_) => "PUBLISH",
            Self::Cluster(_) => "SPUBLISH",
        });
        cmd.arg(channel).arg(payload);
        cmd
    }

    /// Subscribes to `channels`. In a cluster, sharded channels of different
    /// slots cannot share one `SSUBSCRIBE`, so each gets its own (64 in
    /// flight at a time); the first error is returned after all were tried.
    pub async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => c.subscribe(channels).await,
            Self::Cluster(c) => {
                let calls: Vec<_> = channels
                    .iter()
                    .map(|channel| {
                        let (mut c, channel) = (c.clone(), channel.clone());
                        Box::pin(async move { c.ssubscribe(channel).await })
                    })
                    .collect();
                each(calls).await
            }
        }
    }

    pub async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => c.unsubscribe(channels).await,
            Self::Cluster(c) => {
                let calls: Vec<_> = channels
                    .iter()
                    .map(|channel| {
                        let (mut c, channel) = (c.clone(), channel.clone());
                        Box::pin(async move { c.sunsubscribe(channel).await })
                    })
                    .collect();
                each(calls).await
            }
        }
    }
}

/// Runs subscription commands 64 at a time: in a cluster, sharded channels of
/// different slots cannot share one `SSUBSCRIBE`, so each has its own. The
/// first error is returned once all were tried.
async fn each<F>(calls: Vec<F>) -> redis::RedisResult<()>
where
    F: std::future::Future<Output = redis::RedisResult<()>>,
{
    use futures_util::StreamExt;
    let results: Vec<redis::RedisResult<()>> = futures_util::stream::iter(calls)
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisSettings;

    fn settings(ca: &str, cert: &str, key: &str) -> RedisSettings {
        let mut s = RedisSettings {
            url: "rediss://127.0.0.1:6380/".to_owned(),
            ..RedisSettings::default()
        };
        s.tls.ca_file = ca.to_owned();
        s.tls.cert_file = cert.to_owned();
        s.tls.key_file = key.to_owned();
        s
    }

    #[test]
    fn unreadable_tls_files_are_named_with_their_setting() -> crate::TestResult {
        let err = Target::from_settings(&settings("/nonexistent/ca.pem", "", ""))
            .err()
            .ok_or("a missing CA file was accepted")?
            .to_string();
        assert!(
            err.contains("redis.tls.ca_file /nonexistent/ca.pem: cannot be read"),
            "{err}"
        );

        let pki = crate::localdb::tls::TestCertificates::temp()?;
        let ca = pki.ca().display().to_string();
        let client = pki.client("instance", "chatshard-instance")?;
        let (cert, key) = (
            client.cert.display().to_string(),
            client.key.display().to_string(),
        );
        let err = Target::from_settings(&settings(&ca, &cert, &ca))
            .err()
            .ok_or("a certificate was taken for a key")?
            .to_string();
        assert!(err.contains("redis.tls.key_file"), "{err}");
        let err = Target::from_settings(&settings(&key, "", ""))
            .err()
            .ok_or("a key was taken for a CA")?
            .to_string();
        assert!(
            err.contains("redis.tls.ca_file") && err.contains("no PEM certificate"),
            "{err}"
        );

        let target = Target::from_settings(&settings(&ca, &cert, &key))?.ok_or("no target")?;
        let certificates = target.certificates.ok_or("no certificates")?;
        assert!(certificates.root_cert.is_some() && certificates.client_tls.is_some());
        assert!(Target::from_settings(&RedisSettings::default())?.is_none());
        Ok(())
    }
}
