//! Validation: whether parsed settings are ones a running service can rely
//! on, with every problem listed at once so an operator fixes a file in one
//! pass.
//!
//! Invariants: a check only reads the settings and pushes a message naming
//! the key as written in the file (`pool.max_concurrent`, `redis.url`, ...);
//! it never stops at the first problem, never changes a value, and the
//! messages and their order are part of what operators see.
//!
//! Must not: connect to anything (Redis URLs are parsed, not dialled), read
//! the environment, or import the layers that take the typed settings
//! (`crate::shard`, `crate::service`, `crate::fleet`, `crate::http`). The one
//! outside value it reads is `crate::domain::ID_SERIES`, shared by every
//! layer.

use super::{ConfigError, MovesSettings, RedisSettings, Settings};
use crate::domain::MaxMembers;
use crate::routing::Router;

impl Settings {
    /// Checks everything a running service relies on; lists every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.shards.is_empty() {
            problems.push("at least one [[shards]] entry is required".to_owned());
        }
        let mut names = std::collections::HashSet::new();
        for shard in &self.shards {
            if shard.name.is_empty()
                || !shard
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "shard name {:?} must be non-empty and use only A-Z, a-z, 0-9, '-' and '_'",
                    shard.name
                ));
            }
            if !names.insert(shard.name.as_str()) {
                problems.push(format!("shard name {:?} is used twice", shard.name));
            }
            if !shard.url.starts_with("mysql://") && !shard.url.starts_with("mariadb://") {
                problems.push(format!(
                    "shard {:?}: url must start with mysql:// (got {})",
                    shard.name,
                    shard.redacted_url()
                ));
            }
        }
        problems.extend(api_problems(
            &self.api,
            !self.http.tls.client_ca_file.is_empty(),
        ));
        let mut blocks = std::collections::HashMap::new();
        for (shard, block) in self.shards.iter().zip(self.id_blocks()) {
            if block >= crate::domain::ID_SERIES {
                problems.push(format!(
                    "shard {:?}: id_block must be below {}",
                    shard.name,
                    crate::domain::ID_SERIES
                ));
            } else if let Some(other) = blocks.insert(block, shard.name.as_str()) {
                problems.push(format!(
                    "shards {other:?} and {:?} have the same id_block {block} (it defaults to the \
                     shard's position)",
                    shard.name
                ));
            }
        }
        match self.bucket_ranges() {
            Ok(ranges) => {
                if !self.shards.is_empty()
                    && let Err(mut p) = Router::new(&ranges)
                {
                    problems.append(&mut p);
                }
            }
            Err(mut p) => problems.append(&mut p),
        }
        if MaxMembers::parse(i64::from(self.defaults.max_members)).is_err() {
            problems.push(format!(
                "defaults.max_members must be between 1 and {}",
                MaxMembers::MAX
            ));
        }
        let pool = &self.pool;
        for (name, value) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.idle_timeout_ms", self.http.idle_timeout_ms),
            ("http.ping_timeout_ms", self.http.ping_timeout_ms),
            ("http.body_read_timeout_ms", self.http.body_read_timeout_ms),
            ("http.max_connections", self.http.max_connections as u64),
            ("http.max_uri_bytes", self.http.max_uri_bytes as u64),
            (
                "http.write_stall_timeout_ms",
                self.http.write_stall_timeout_ms,
            ),
            ("tail.chats", self.tail.chats),
            ("tail.events_per_chat", self.tail.events_per_chat as u64),
            ("tail.max_bytes", self.tail.max_bytes),
            ("tail.refresh_ms", self.tail.refresh_ms),
            ("pool.max_concurrent", pool.max_concurrent as u64),
            ("pool.max_wait_ms", pool.max_wait_ms),
            ("pool.connect_timeout_ms", pool.connect_timeout_ms),
            ("pool.operation_timeout_ms", pool.operation_timeout_ms),
            ("group_commit.max_batch", self.group_commit.max_batch as u64),
            (
                "group_commit.max_pending_per_chat",
                self.group_commit.max_pending_per_chat as u64,
            ),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.http.send_buffer_bytes < 8_192 {
            problems.push("http.send_buffer_bytes must be at least 8192".to_owned());
        }
        tls_problems(&self.http.tls, &mut problems);
        if self.pool.lock_wait_timeout_secs > 0
            && self.pool.lock_wait_timeout_secs * 1000 >= self.pool.operation_timeout_ms
        {
            problems.push(
                "pool.lock_wait_timeout_secs must be below pool.operation_timeout_ms (or 0)"
                    .to_owned(),
            );
        }
        if !(self.pool.chat_share > 0.0 && self.pool.chat_share <= 1.0) {
            problems.push("pool.chat_share must be greater than 0 and at most 1".to_owned());
        }
        let r = &self.replicas;
        if !(r.primary_fallback_share > 0.0 && r.primary_fallback_share <= 1.0) {
            problems.push(
                "replicas.primary_fallback_share must be greater than 0 and at most 1".to_owned(),
            );
        }
        for (name, value) in [
            ("replicas.monitor_ms", r.monitor_ms),
            ("replicas.confirm_ms", r.confirm_ms),
            ("replicas.max_lag_ms", r.max_lag_ms),
            ("replicas.acked_keep_secs", r.acked_keep_secs),
            ("replicas.acked_chats", r.acked_chats),
            ("replicas.hold_writes_ms", r.hold_writes_ms),
            ("replicas.catch_up_ms", r.catch_up_ms),
            ("replicas.auto_failover_after_ms", r.auto_failover_after_ms),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        for shard in &self.shards {
            let mut seen = std::collections::HashSet::new();
            for url in shard.member_urls() {
                if url.parse::<sqlx::mysql::MySqlConnectOptions>().is_err() {
                    problems.push(format!(
                        "shard {:?}: member {} is not a MySQL URL",
                        shard.name,
                        crate::config::redact_url(url)
                    ));
                } else if !seen.insert(url) {
                    problems.push(format!(
                        "shard {:?}: member {} is listed twice",
                        shard.name,
                        crate::config::redact_url(url)
                    ));
                }
            }
        }
        let b = &self.breaker;
        if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
            problems.push("breaker.failure_rate must be greater than 0 and at most 1".to_owned());
        }
        for (name, value) in [
            (
                "breaker.consecutive_failures",
                u64::from(b.consecutive_failures),
            ),
            ("breaker.window_secs", b.window_secs),
            ("breaker.open_ms", b.open_ms),
            ("breaker.half_open_probes", b.half_open_probes as u64),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if !self.admin.token.is_empty() && self.admin.token.len() < 16 {
            problems.push(
                "admin.token must be at least 16 characters (or empty to turn the admin API off)"
                    .to_owned(),
            );
        }
        problems.extend(self.live().problems());
        if !self.isolation.shard.is_empty()
            && !self.shards.is_empty()
            && !self.shards.iter().any(|s| s.name == self.isolation.shard)
        {
            problems.push(format!(
                "isolation.shard {:?} is not a configured shard",
                self.isolation.shard
            ));
        }
        self.redis.problems(&mut problems);
        self.moves.problems(&mut problems);
        for (name, value) in [
            ("purge.interval_ms", self.purge.interval_ms),
            ("purge.batch_rows", u64::from(self.purge.batch_rows)),
            (
                "purge.rows_per_second",
                u64::from(self.purge.rows_per_second),
            ),
            ("digest.interval_ms", self.digest.interval_ms),
            (
                "digest.chats_per_second",
                u64::from(self.digest.chats_per_second),
            ),
            (
                "digest.full_sweep_rounds",
                u64::from(self.digest.full_sweep_rounds),
            ),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.purge.batch_rows > 10_000 {
            problems.push("purge.batch_rows must be at most 10000".to_owned());
        }
        if self.throttle.tracked_chats == 0 {
            problems.push("throttle.tracked_chats must be greater than 0".to_owned());
        }
        if self.group_commit.max_batch > 1000 {
            // Each write binds up to 6 values per statement; 1000 keeps every
            // statement far below MySQL's 65,535 placeholders.
            problems.push("group_commit.max_batch must be at most 1000".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }
}

impl MovesSettings {
    fn problems(&self, problems: &mut Vec<String>) {
        if !(1..=5000).contains(&self.batch_revisions) {
            problems.push("moves.batch_revisions must be between 1 and 5000".to_owned());
        }
        if self.clean_batch == 0 {
            problems.push("moves.clean_batch must be greater than 0".to_owned());
        }
        if self.fence_ms < 100 {
            problems.push("moves.fence_ms must be at least 100".to_owned());
        }
        if self.lease_ms < 1000 || self.lease_ms < 2 * self.fence_ms {
            problems.push(
                "moves.lease_ms must be at least 1000 and at least twice moves.fence_ms".to_owned(),
            );
        }
        if !(self.max_p99_ratio == 0.0 || (1.0..=100.0).contains(&self.max_p99_ratio)) {
            problems.push("moves.max_p99_ratio must be 0 (off) or between 1 and 100".to_owned());
        }
        if self.max_pause_ms < self.pause_ms {
            problems.push("moves.max_pause_ms must be at least moves.pause_ms".to_owned());
        }
        if self.hold_writes_ms > 5000 {
            problems.push("moves.hold_writes_ms must be at most 5000".to_owned());
        }
        if !(1..=64).contains(&self.concurrent_chats) {
            problems.push("moves.concurrent_chats must be between 1 and 64".to_owned());
        }
        if !(100..=3_600_000).contains(&self.map_poll_ms) {
            problems.push("moves.map_poll_ms must be between 100 and 3600000".to_owned());
        }
    }
}

impl RedisSettings {
    /// Checks the URLs without connecting.
    fn check_urls(&self) -> Result<(), String> {
        let urls = self.urls();
        for url in &urls {
            redis::Client::open(url.as_str())
                .map_err(|e| format!("{}: {e}", super::redact_url(url)))?;
        }
        if !self.cluster && urls.len() > 1 {
            return Err("several URLs name a Redis Cluster: set redis.cluster = true".into());
        }
        Ok(())
    }

    fn problems(&self, problems: &mut Vec<String>) {
        if let Err(e) = self.check_urls() {
            problems.push(format!("redis.url: {e}"));
        }
        let tls = &self.tls;
        if tls.cert_file.is_empty() != tls.key_file.is_empty() {
            problems.push(
                "redis.tls.cert_file and redis.tls.key_file must be set together (or neither)"
                    .to_owned(),
            );
        }
        // Certificates only mean something over TLS, and every node of a
        // fleet's Redis is reached the same way.
        let urls = self.urls();
        let secure = urls
            .iter()
            .filter(|u| {
                u.get(..9)
                    .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
            })
            .count();
        if tls.is_set() && secure < urls.len() {
            problems.push(
                "redis.tls.* needs rediss:// URLs (redis.url names a Redis without TLS)".to_owned(),
            );
        }
        if secure > 0 && secure < urls.len() {
            problems.push("redis.url: mixes rediss:// and redis:// nodes".to_owned());
        }
        for (name, value) in [
            ("redis.timeout_ms", self.timeout_ms),
            ("redis.connect_timeout_ms", self.connect_timeout_ms),
            ("redis.heartbeat_ms", self.heartbeat_ms),
            ("redis.publish_queue", self.publish_queue as u64),
            ("redis.join_lease_max", self.join_lease_max),
            (
                "redis.breaker.consecutive_failures",
                u64::from(self.breaker.consecutive_failures),
            ),
            ("redis.breaker.open_ms", self.breaker.open_ms),
            ("redis.breaker.window_secs", self.breaker.window_secs),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be greater than 0"));
            }
        }
        if self.instance_ttl_ms < 2 * self.heartbeat_ms {
            problems
                .push("redis.instance_ttl_ms must be at least twice redis.heartbeat_ms".to_owned());
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            problems.push("redis.key_prefix must be non-empty and hold no braces".to_owned());
        }
    }
}

/// What is wrong with `[[api.clients]]`.
/// `[http.tls]`: both files or neither, a client CA only with them. Whether
/// the files can be read and parsed is checked when the listener is built.
fn tls_problems(tls: &super::HttpTlsSettings, problems: &mut Vec<String>) {
    if tls.cert_file.is_empty() != tls.key_file.is_empty() {
        problems.push(
            "http.tls.cert_file and http.tls.key_file must be set together (or neither)".to_owned(),
        );
    }
    if !tls.client_ca_file.is_empty() && !tls.enabled() {
        problems.push(
            "http.tls.client_ca_file needs http.tls.cert_file and http.tls.key_file".to_owned(),
        );
    }
    if tls.handshake_timeout_ms == 0 {
        problems.push("http.tls.handshake_timeout_ms must be greater than 0".to_owned());
    }
}

/// `mutual_tls`: whether `http.tls.client_ca_file` is set, which a client
/// known by its certificate needs.
fn api_problems(api: &super::ApiSettings, mutual_tls: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut digests = std::collections::HashSet::new();
    let mut common_names = std::collections::HashMap::new();
    for client in &api.clients {
        if client.name.is_empty()
            || !client
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            problems.push(format!(
                "api.clients: name {:?} must be non-empty and use only A-Z, a-z, 0-9, '-', '_' and '.'",
                client.name
            ));
        }
        let by_token = !client.token_sha256.is_empty();
        let by_cert = !client.cert_common_name.is_empty();
        if !by_token && !by_cert {
            problems.push(format!(
                "api.clients {:?}: give a token_sha256, a cert_common_name, or both",
                client.name
            ));
        }
        if by_token {
            match client.digest() {
                None => problems.push(format!(
                    "api.clients {:?}: token_sha256 must be the 64 hex digits of the token's SHA-256 (printf %s \"$TOKEN\" | sha256sum)",
                    client.name
                )),
                Some(d) if !digests.insert(d) => problems.push(format!(
                    "api.clients {:?}: this token_sha256 is given to another client too",
                    client.name
                )),
                Some(_) => {}
            }
        }
        if by_cert {
            if !mutual_tls {
                problems.push(format!(
                    "api.clients {:?}: cert_common_name needs mutual TLS (http.tls.client_ca_file)",
                    client.name
                ));
            }
            if let Some(other) = common_names.insert(client.cert_common_name.as_str(), &client.name)
                && *other != client.name
            {
                problems.push(format!(
                    "api.clients {:?}: cert_common_name {:?} is given to client {other:?} too",
                    client.name, client.cert_common_name
                ));
            }
        }
        if client.scopes.is_empty() {
            problems.push(format!(
                "api.clients {:?}: scopes must name at least one of read, write, admin",
                client.name
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::super::TWO_SHARDS;
    use super::*;

    #[test]
    fn id_blocks_default_to_positions_and_must_be_unique_and_in_range() -> crate::TestResult {
        let s = Settings::from_toml(TWO_SHARDS, [])?;
        assert_eq!(s.id_blocks(), vec![0, 1]);
        let swapped = TWO_SHARDS.replace(
            "buckets = [\"512-1023\"]",
            "buckets = [\"512-1023\"]\n        id_block = 0",
        );
        let swapped = swapped.replacen(
            "buckets = [\"0-511\"]",
            "buckets = [\"0-511\"]\n        id_block = 1",
            1,
        );
        assert_eq!(Settings::from_toml(&swapped, [])?.id_blocks(), vec![1, 0]);
        let clash = TWO_SHARDS.replace(
            "buckets = [\"512-1023\"]",
            "buckets = [\"512-1023\"]\n        id_block = 0",
        );
        let err = Settings::from_toml(&clash, [])
            .err()
            .ok_or("a shared id_block was accepted")?;
        assert!(err.to_string().contains("same id_block 0"), "{err}");
        let far = TWO_SHARDS.replace(
            "buckets = [\"512-1023\"]",
            "buckets = [\"512-1023\"]\n        id_block = 1024",
        );
        let err = Settings::from_toml(&far, [])
            .err()
            .ok_or("id_block 1024 was accepted")?;
        assert!(err.to_string().contains("below 1024"), "{err}");
        Ok(())
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let with = |section: &str| format!("{TWO_SHARDS}\n[http.tls]\n{section}\n");
        let problems = |section: &str| match Settings::from_toml(&with(section), []) {
            Ok(_) => String::new(),
            Err(e) => e.0.join("\n"),
        };
        assert_eq!(problems("cert_file = \"c.pem\"\nkey_file = \"k.pem\""), "");
        assert!(problems("cert_file = \"c.pem\"").contains("set together"));
        assert!(problems("key_file = \"k.pem\"").contains("set together"));
        assert!(problems("client_ca_file = \"ca.pem\"").contains("needs http.tls.cert_file"));
        assert!(
            problems("cert_file = \"c.pem\"\nkey_file = \"k.pem\"\nhandshake_timeout_ms = 0")
                .contains("http.tls.handshake_timeout_ms")
        );
    }

    #[test]
    fn redis_tls_files_come_in_pairs_and_only_with_rediss() {
        let with = |redis: &str| {
            let text = format!("{TWO_SHARDS}\n[redis]\n{redis}\n");
            match Settings::from_toml(&text, []) {
                Ok(_) => String::new(),
                Err(e) => e.0.join("\n"),
            }
        };
        let ok = with(
            "url = \"rediss://r1:6380/\"\ntls.ca_file = \"ca.pem\"\n\
                       tls.cert_file = \"c.pem\"\ntls.key_file = \"c.key\"",
        );
        assert_eq!(ok, "");
        let half = with("url = \"rediss://r1:6380/\"\ntls.cert_file = \"c.pem\"");
        assert!(
            half.contains("redis.tls.cert_file and redis.tls.key_file"),
            "{half}"
        );
        let plain = with("url = \"redis://r1/\"\ntls.ca_file = \"ca.pem\"");
        assert!(plain.contains("redis.tls.* needs rediss://"), "{plain}");
        let mixed = with("url = \"rediss://r1/,redis://r2/\"\ncluster = true");
        assert!(mixed.contains("mixes rediss://"), "{mixed}");
        let secret = with("url = \"redis://:s3cret@r1/,x\"");
        assert!(!secret.contains("s3cret"), "{secret}");
    }

    #[test]
    fn every_problem_is_listed() {
        let text = r#"
            [pool]
            max_concurrent = 0
            [[shards]]
            name = "bad name"
            url = "postgres://x"
            buckets = ["0-100", "x"]
        "#;
        let err = Settings::from_toml(text, []).unwrap_err();
        let all = err.0.join("\n");
        assert!(all.contains("shard name"), "{all}");
        assert!(all.contains("url must start with mysql://"), "{all}");
        assert!(all.contains("\"x\" is not a bucket number"), "{all}");
        assert!(all.contains("pool.max_concurrent"), "{all}");
    }

    #[test]
    fn the_copy_throttle_is_checked() {
        let text = format!(
            "{TWO_SHARDS}\n[moves]\nmax_p99_ratio = 0.5\npause_ms = 50\nmax_pause_ms = 10\n"
        );
        let err = Settings::from_toml(&text, []).unwrap_err();
        let all = err.0.join("\n");
        assert!(all.contains("moves.max_p99_ratio"), "{all}");
        assert!(all.contains("moves.max_pause_ms"), "{all}");
        let text = format!("{TWO_SHARDS}\n[moves]\nmax_p99_ratio = 0\nrevisions_per_second = 0\n");
        let settings = Settings::from_toml(&text, []).expect("the throttle and the cap off");
        assert_eq!(settings.moves.max_p99_ratio, 0.0);
    }

    #[test]
    fn unknown_keys_and_uncovered_buckets_are_rejected() {
        let err = Settings::from_toml("colour = 1\n", []).unwrap_err();
        assert!(err.0[0].contains("colour"), "{err}");
        let text = TWO_SHARDS.replace("512-1023", "512-1000");
        let err = Settings::from_toml(&text, []).unwrap_err();
        assert!(err.to_string().contains("not assigned"), "{err}");
    }
}
