//! docker/ cannot run here (no Docker engine), so its files are checked: they
//! parse, every file the compose file mounts exists, published ports are unique,
//! Prometheus gets its alerting rules where docker/prometheus.yml names them,
//! chatshard's config there is valid, and every metric the Grafana dashboard or
//! an alerting rule reads is one `/metrics` really exports, with the labels and
//! values it selects. (tests/prometheus.rs runs the same queries in a real
//! Prometheus.) The image and nginx are checked in `image.rs`.
//!
//! Telemetry: traces go to Jaeger through the collector; metrics have one path,
//! Prometheus scraping `/metrics`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::helpers::TestApp;

pub(crate) fn docker(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docker")
            .join(path),
    )
    .unwrap_or_else(|e| panic!("docker/{path}: {e}"))
}

pub(crate) fn yaml(path: &str) -> yaml_serde::Value {
    yaml_serde::from_str(&docker(path)).unwrap_or_else(|e| panic!("docker/{path}: {e}"))
}

#[test]
fn compose_references_files_and_ports_that_exist() {
    let compose = yaml("compose.yaml");
    let services = compose["services"].as_mapping().expect("services");
    let names: HashSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for needed in [
        "mysql-0",
        "mysql-1",
        "migrate",
        "chatshard",
        "redis",
        "lb",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(needed), "service {needed} missing");
    }
    let mut ports = HashSet::new();
    for (name, service) in services {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let (_, published, _) = port_mapping(port.as_str().expect("port"));
            assert!(
                ports.insert(published.to_owned()),
                "{name:?}: port {published} published twice"
            );
        }
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().expect("volume").split(':').next().unwrap();
            if let Some(rel) = source.strip_prefix("./") {
                assert!(
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("docker")
                        .join(rel)
                        .exists(),
                    "{name:?} mounts missing ./{rel}"
                );
            }
        }
        for dep in service["depends_on"]
            .as_mapping()
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            assert!(
                names.contains(dep.as_str().unwrap()),
                "{name:?} depends on unknown {dep:?}"
            );
        }
    }
    // Current components: Jaeger v2 (OTLP natively, in its default
    // configuration; v1's COLLECTOR_OTLP_ENABLED means nothing to it),
    // Prometheus 3, Grafana 12.
    let image = |service: &str| {
        compose["services"][service]["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{service}: no image"))
            .to_owned()
    };
    for (service, prefix) in [
        ("jaeger", "jaegertracing/jaeger:2."),
        ("prometheus", "prom/prometheus:v3."),
        ("grafana", "grafana/grafana:12."),
    ] {
        let found = image(service);
        assert!(
            found.starts_with(prefix),
            "{service}: {found}, not {prefix}*"
        );
    }
    assert!(
        compose["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"].is_null(),
        "COLLECTOR_OTLP_ENABLED is a Jaeger v1 setting"
    );
    // The MySQL shards run interleaved auto-increment, and a commit is on disk
    // (redo log and binary log) when it returns; nothing MySQL 8.4 deprecated
    // or removed.
    let cnf = docker("mysql/shard.cnf");
    let options: Vec<&str> = cnf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .collect();
    for wanted in [
        "innodb_autoinc_lock_mode = 2",
        "innodb_flush_log_at_trx_commit = 1",
        "sync_binlog = 1",
    ] {
        assert!(
            options.contains(&wanted),
            "docker/mysql/shard.cnf lacks {wanted}"
        );
    }
    for gone in [
        "binlog_format",
        "default_authentication_plugin",
        "mysql_native_password",
    ] {
        assert!(
            !options.iter().any(|o| o.starts_with(gone)),
            "docker/mysql/shard.cnf sets {gone}"
        );
    }
    // The image runs as a non-root user, multi-stage.
    let dockerfile = docker("Dockerfile");
    assert!(dockerfile.matches("FROM ").count() >= 2);
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root"))
    );
}

#[test]
fn collector_prometheus_grafana_and_chatshard_configs_are_valid() {
    let collector = yaml("otel-collector.yaml");
    let pipelines = collector["service"]["pipelines"]
        .as_mapping()
        .expect("pipelines");
    for (id, pipeline) in pipelines {
        for exporter in pipeline["exporters"].as_sequence().expect("exporters") {
            assert!(
                !collector["exporters"][exporter.as_str().unwrap()].is_null(),
                "{id:?}: {exporter:?} not defined"
            );
        }
    }
    // Traces go to Jaeger, over OTLP.
    let traces = collector["service"]["pipelines"]["traces"]["exporters"]
        .as_sequence()
        .expect("a traces pipeline");
    assert!(
        traces.iter().any(|e| {
            let id = e.as_str().unwrap_or("");
            id.starts_with("otlp")
                && collector["exporters"][id]["endpoint"].as_str() == Some("jaeger:4317")
        }),
        "the traces pipeline does not export to Jaeger: {traces:?}"
    );
    // Metrics have one path, Prometheus scraping /metrics: the collector has
    // no metrics pipeline, and chatshard is told not to push any
    // (OTEL_METRICS_EXPORTER=none; telemetry::pushes_metrics).
    assert!(
        pipelines
            .keys()
            .all(|id| id.as_str().and_then(|i| i.split('/').next()) != Some("metrics")),
        "the collector has a metrics pipeline: a second metrics path"
    );
    let env = &yaml("compose.yaml")["services"]["chatshard"]["environment"];
    let exporter = env["OTEL_METRICS_EXPORTER"].as_str();
    assert!(
        !chatshard::telemetry::pushes_metrics(exporter),
        "chatshard would push its metrics over OTLP too: {exporter:?}"
    );
    let prometheus = yaml("prometheus.yml");
    // Every replica of the fleet is scraped: discovered by the service's name.
    let sd = &prometheus["scrape_configs"][0]["dns_sd_configs"][0];
    assert_eq!(sd["names"][0], "chatshard");
    assert_eq!(sd["port"], 8080);
    assert_eq!(prometheus["scrape_configs"][0]["job_name"], "chatshard");
    // The fleet: two replicas sharing one Redis, behind the load balancer.
    let compose = yaml("compose.yaml");
    let chatshard = &compose["services"]["chatshard"];
    assert_eq!(chatshard["deploy"]["replicas"], 2);
    assert!(chatshard["ports"].is_null(), "replicas publish no port");
    let redis_url = chatshard["environment"]["CHATSHARD__REDIS__URL"]
        .as_str()
        .expect("CHATSHARD__REDIS__URL");
    assert!(redis_url.starts_with("redis://redis:"));
    assert_eq!(compose["services"]["lb"]["ports"][0], "8080:8080");
    assert!(docker("nginx.conf").contains("proxy_pass http://$fleet"));
    yaml("grafana/provisioning/datasources/prometheus.yaml");
    yaml("grafana/provisioning/dashboards/chatshard.yaml");
    let settings = chatshard::config::Settings::from_toml(&docker("chatshard.toml"), [])
        .expect("docker/chatshard.toml");
    assert_eq!(settings.listen.port(), 8080);
    assert_eq!(settings.shards.len(), 2);
}

/// The alerting rules: every rule names its alert, its expression, a severity,
/// a summary, a description and a runbook; and Prometheus gets each rule file
/// that docker/prometheus.yml names, at the path it names (relative to the
/// config file), mounted from the same relative path in the repository, so
/// that `promtool check config docker/prometheus.yml` checks what runs.
#[test]
fn alert_rules_parse_and_compose_mounts_them() {
    let prometheus = yaml("prometheus.yml");
    let rule_files: Vec<&str> = prometheus["rule_files"]
        .as_sequence()
        .expect("rule_files in docker/prometheus.yml")
        .iter()
        .map(|f| f.as_str().expect("rule file"))
        .collect();
    assert!(
        rule_files.contains(&"prometheus/alerts.yml"),
        "{rule_files:?}"
    );
    let compose = yaml("compose.yaml");
    let mounts: Vec<(&str, &str)> = compose["services"]["prometheus"]["volumes"]
        .as_sequence()
        .expect("prometheus volumes")
        .iter()
        .filter_map(|v| {
            let mut parts = v.as_str().expect("volume").split(':');
            Some((parts.next()?, parts.next()?))
        })
        .collect();
    let config_dir = mounts
        .iter()
        .find(|(source, _)| *source == "./prometheus.yml")
        .and_then(|(_, target)| target.rsplit_once('/'))
        .map(|(dir, _)| dir)
        .expect("compose mounts ./prometheus.yml into prometheus");
    for file in &rule_files {
        let wanted = (format!("./{file}"), format!("{config_dir}/{file}"));
        assert!(
            mounts
                .iter()
                .any(|(s, t)| (*s, *t) == (wanted.0.as_str(), wanted.1.as_str())),
            "compose does not mount {} at {} for prometheus: {mounts:?}",
            wanted.0,
            wanted.1
        );
        let rules = yaml(file);
        let groups = rules["groups"].as_sequence().expect("groups");
        assert!(!groups.is_empty(), "docker/{file}: no group");
        for group in groups {
            let list = group["rules"].as_sequence().expect("rules");
            assert!(
                !list.is_empty(),
                "docker/{file}: empty group {:?}",
                group["name"]
            );
            for rule in list {
                let name = rule["alert"].as_str().expect("every rule is an alert");
                assert!(
                    rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{name}: expr"
                );
                assert!(
                    ["critical", "warning", "info"]
                        .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                    "{name}: severity"
                );
                for key in ["summary", "description", "runbook_url"] {
                    assert!(
                        rule["annotations"][key]
                            .as_str()
                            .is_some_and(|a| !a.trim().is_empty()),
                        "{name}: annotation {key}"
                    );
                }
            }
        }
    }
}

/// Every query of the dashboard and of the alerting rules, named.
fn queries() -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push((
                    format!("panel {:?}", panel["title"]),
                    target["expr"].as_str().expect("expr").to_owned(),
                ));
            }
            // A row keeps its collapsed panels inside.
            panels(&panel["panels"], out);
        }
    }
    let dashboard: Value =
        serde_json::from_str(&docker("grafana/dashboards/chatshard.json")).expect("dashboard JSON");
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    let rules = yaml("prometheus/alerts.yml");
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push((
                format!("alert {:?}", rule["alert"].as_str().unwrap_or("")),
                rule["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    out
}

/// A label matcher of a selector: label, operator, value.
type Matcher = (String, String, String);

/// The selectors of chatshard's metrics (and of Prometheus's own `up`) in a
/// PromQL expression: the metric name and its label matchers. Quoted strings
/// are skipped, so a label value never reads as a metric.
fn selectors(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len()
            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
        {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if !(name.starts_with("chatshard_") || name.starts_with("http_server_") || name == "up") {
            continue;
        }
        let mut matchers = Vec::new();
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        if chars.get(j) == Some(&'{') {
            j += 1;
            loop {
                while j < chars.len() && (chars[j].is_whitespace() || chars[j] == ',') {
                    j += 1;
                }
                if j >= chars.len() || chars[j] == '}' {
                    break;
                }
                let label_start = j;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let label: String = chars[label_start..j].iter().collect();
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let op_start = j;
                while j < chars.len() && matches!(chars[j], '=' | '!' | '~') {
                    j += 1;
                }
                let op: String = chars[op_start..j].iter().collect();
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let end = skip_string(&chars, j);
                assert!(
                    !label.is_empty() && end > j + 1,
                    "cannot read the matchers of {name} in {expr}"
                );
                let value: String = chars[j + 1..end - 1].iter().collect();
                matchers.push((label, op, value.replace("\\\\", "\\")));
                j = end;
            }
            i = j + 1;
        }
        out.push((name, matchers));
    }
    out
}

/// The index just past the quoted string that starts at `i`.
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        if chars[j] == '\\' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// Prometheus text exposition: every sample's name and labels.
fn exposition(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let mut labels = BTreeMap::new();
            if line[name_end..].starts_with('{') {
                let chars: Vec<char> = line[name_end + 1..].chars().collect();
                let mut j = 0;
                while j < chars.len() && chars[j] != '}' {
                    let eq = j + chars[j..].iter().position(|c| *c == '=').expect("label =");
                    let key: String = chars[j..eq].iter().collect();
                    let end = skip_string(&chars, eq + 1);
                    labels.insert(
                        key.trim_start_matches(',').trim().to_owned(),
                        chars[eq + 2..end - 1].iter().collect(),
                    );
                    j = end;
                    if chars.get(j) == Some(&',') {
                        j += 1;
                    }
                }
            }
            (line[..name_end].to_owned(), labels)
        })
        .collect()
}

#[test]
fn selectors_and_exposition_are_read_as_prometheus_does() {
    assert_eq!(
        selectors(
            r#"sum by (shard) (rate(chatshard_x_total{job="chatshard", outcome=~"a|b", r!~"/m[.]json"}[$__rate_interval])) / chatshard_y"#
        ),
        [
            (
                "chatshard_x_total".to_owned(),
                vec![
                    ("job".into(), "=".into(), "chatshard".into()),
                    ("outcome".into(), "=~".into(), "a|b".into()),
                    ("r".into(), "!~".into(), "/m[.]json".into()),
                ]
            ),
            ("chatshard_y".to_owned(), vec![]),
        ]
    );
    assert_eq!(
        selectors(r#"up{job="chatshard"} == 0"#),
        [(
            "up".to_owned(),
            vec![("job".into(), "=".into(), "chatshard".into())]
        )]
    );
    let samples = exposition("# TYPE a counter\na_total{shard=\"s-0\",outcome=\"ok\"} 3\nb 1\n");
    assert_eq!(samples[0].0, "a_total");
    assert_eq!(samples[0].1["outcome"], "ok");
    assert_eq!(samples[1], ("b".to_owned(), BTreeMap::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported() {
    // In a fleet (of one), so the fleet's metrics are exported too.
    let app = TestApp::builder().redis().start().await;
    // Traffic, so the histograms have series: a join, and its event received
    // by a stream.
    let chat = app.new_chat("dash").await;
    let mut stream = crate::common::SseReader::open(
        &app.http,
        &app.base,
        &format!("/v1/chats/{chat}/events/stream"),
        None,
    )
    .await
    .unwrap_or_else(|r| panic!("stream refused: {}", r.status()));
    app.join(&chat, "u").await;
    let event = stream
        .next(std::time::Duration::from_secs(10))
        .await
        .expect("the join's event");
    assert_eq!(event.id.as_deref(), Some("1"));
    let samples = exposition(&app.get("/metrics").await.text().await.unwrap());
    let prometheus = yaml("prometheus.yml");
    let jobs: Vec<&str> = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .filter_map(|c| c["job_name"].as_str())
        .collect();
    let mut checked = 0;
    for (what, expr) in queries() {
        let found = selectors(&expr);
        assert!(
            !found.is_empty(),
            "{what} reads no chatshard metric: {expr}"
        );
        for (name, matchers) in found {
            // Prometheus's own: only its job is checked.
            let own = name == "up";
            let series: Vec<&BTreeMap<String, String>> = samples
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, labels)| labels)
                .collect();
            assert!(
                own || !series.is_empty(),
                "{what} reads {name}, which /metrics does not export"
            );
            for (label, op, value) in matchers {
                match label.as_str() {
                    // Added by Prometheus when it scrapes.
                    "job" => assert!(
                        op != "=" || jobs.contains(&value.as_str()),
                        "{what} reads job {value:?}, which docker/prometheus.yml does not scrape"
                    ),
                    _ if own => {}
                    "instance" => {}
                    _ => {
                        let values: HashSet<&str> = series
                            .iter()
                            .filter_map(|l| l.get(&label).map(String::as_str))
                            .collect();
                        assert!(
                            !values.is_empty(),
                            "{what} selects {name} by {label}, a label /metrics does not give it"
                        );
                        // An exact value, or an alternation of plain words:
                        // each must be a value /metrics exports.
                        let wanted: Vec<&str> = match op.as_str() {
                            "=" => vec![value.as_str()],
                            "=~" if value
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|') =>
                            {
                                value.split('|').collect()
                            }
                            _ => vec![],
                        };
                        for v in wanted {
                            assert!(
                                values.contains(v),
                                "{what} selects {name}{{{label}{op}{value:?}}}: /metrics has no {label}={v:?} (it has {values:?})"
                            );
                        }
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked} metric references checked");
}

/// A `ports` entry of the compose file: the host address it binds (`None`:
/// every interface), the published port and the container's port.
pub(crate) fn port_mapping(entry: &str) -> (Option<&str>, &str, &str) {
    match entry.split(':').collect::<Vec<_>>().as_slice() {
        [host, published, container] => (Some(*host), *published, *container),
        [published, container] => (None, *published, *container),
        _ => panic!("port {entry:?} is not [host:]published:container"),
    }
}
