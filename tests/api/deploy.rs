//! docker/ cannot run here (no Docker engine), so its files are checked: they
//! parse, every file the compose file mounts exists, published ports are unique,
//! the image runs as a non-root user, chatshard's config there is valid, and
//! every metric the Grafana dashboard queries is one `/metrics` really exports.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::helpers::TestApp;

fn docker(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docker")
            .join(path),
    )
    .unwrap_or_else(|e| panic!("docker/{path}: {e}"))
}

fn yaml(path: &str) -> yaml_serde::Value {
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
            let published = port
                .as_str()
                .expect("port")
                .split(':')
                .next()
                .unwrap()
                .to_owned();
            assert!(
                ports.insert(published.clone()),
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
    // The MySQL shards run interleaved auto-increment.
    assert!(docker("mysql/shard.cnf").contains("innodb_autoinc_lock_mode = 2"));
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
    for pipeline in ["traces", "metrics"] {
        for exporter in collector["service"]["pipelines"][pipeline]["exporters"]
            .as_sequence()
            .expect("exporters")
        {
            assert!(
                !collector["exporters"][exporter.as_str().unwrap()].is_null(),
                "{exporter:?} not defined"
            );
        }
    }
    let prometheus = yaml("prometheus.yml");
    let target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(target, "chatshard:8080");
    yaml("grafana/provisioning/datasources/prometheus.yaml");
    yaml("grafana/provisioning/dashboards/chatshard.yaml");
    let settings = chatshard::config::Settings::from_toml(&docker("chatshard.toml"), [])
        .expect("docker/chatshard.toml");
    assert_eq!(settings.listen.port(), 8080);
    assert_eq!(settings.shards.len(), 2);
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            current.push(c);
        } else {
            if current.starts_with("chatshard_") || current.starts_with("http_server_") {
                names.push(std::mem::take(&mut current));
            }
            current.clear();
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported() {
    let dashboard: Value =
        serde_json::from_str(&docker("grafana/dashboards/chatshard.json")).expect("dashboard JSON");
    let app = TestApp::spawn().await;
    // Traffic, so the histograms have series.
    let chat = app.new_chat("dash").await;
    app.join(&chat, "u").await;
    let exported = app.get("/metrics").await.text().await.unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            for name in metric_names(target["expr"].as_str().expect("expr")) {
                assert!(
                    exported.lines().any(|l| l.starts_with(&name)),
                    "panel {:?} queries {name}, which /metrics does not export",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "{checked} metric references checked");
}
