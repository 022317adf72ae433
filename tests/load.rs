//! The load tool keeps working: a short run of each scenario against a real
//! service and shard, asserting only that it runs and reports its figures
//! (real runs are not timed tests; their figures are in docs/benchmarks.md).
//!
//! Its own test binary: it runs the built `chatshard-load` binary.

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use chatshard::localdb::cluster::Location;
use common::{TestApp, eventually, servers};
use serde_json::Value;

const TOKEN: &str = "load-smoke-admin-token";

fn run(args: &[&str], json: &std::path::Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_chatshard-load"))
        .args(args)
        .arg("--quiet")
        .arg("--json")
        .arg(json)
        .output()
        .expect("run chatshard-load");
    assert!(
        out.status.success(),
        "chatshard-load {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("p99 ms"), "no final table: {table}");
    serde_json::from_slice(&std::fs::read(json).expect("json report")).expect("json")
}

fn ok(report: &Value, kind: &str) -> u64 {
    report["kinds"][kind]["ok"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports() {
    // Two shards: `isolation` needs a chat on each.
    let app = TestApp::builder()
        .own_shards(2, Location::Temp)
        .configure(|s| s.admin.token = TOKEN.to_owned())
        .start()
        .await;
    let url = app.base.clone();
    let shard_url = app.shard_servers().shard_settings()[0].url.clone();
    let dir = std::env::temp_dir().join(format!("chatshard-load-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");

    let reports = tokio::task::spawn_blocking(move || {
        let spike = run(
            &[
                "--url",
                &url,
                "--admin-token",
                TOKEN,
                "join-spike",
                "--clients",
                "4",
                "--seconds",
                "1",
            ],
            &dir.join("spike.json"),
        );
        let quiet = run(
            &[
                "--url",
                &url,
                "quiet",
                "--seconds",
                "0.5",
                "--shard-url",
                &shard_url,
            ],
            &dir.join("quiet.json"),
        );
        let direct = run(
            &[
                "direct-sql",
                "--shard-url",
                &shard_url,
                "--clients",
                "2",
                "--seconds",
                "0.5",
                "--batch",
                "8",
                "--chats",
                "2",
            ],
            &dir.join("direct.json"),
        );
        let pid = std::process::id().to_string();
        let fanout = run(
            &[
                "--url",
                &url,
                "--admin-token",
                TOKEN,
                "fanout",
                "--subscribers",
                "10",
                "--rate",
                "20",
                "--seconds",
                "0.5",
                "--service-pid",
                &pid,
            ],
            &dir.join("fanout.json"),
        );
        let mux = run(
            &[
                "--url",
                &url,
                "--admin-token",
                TOKEN,
                "fanout",
                "--subscribers",
                "3",
                "--mux-chats",
                "5",
                "--rate",
                "20",
                "--seconds",
                "0.5",
            ],
            &dir.join("mux.json"),
        );
        let fetch = run(
            &[
                "--url",
                &url,
                "--admin-token",
                TOKEN,
                "fetch-spike",
                "--pollers",
                "8",
                "--rate",
                "20",
                "--seconds",
                "0.5",
                "--service-pid",
                &pid,
            ],
            &dir.join("fetch.json"),
        );
        let isolation = run(
            &[
                "--url",
                &url,
                "--admin-token",
                TOKEN,
                "isolation",
                "--clients",
                "4",
                "--steady-clients",
                "1",
                "--seconds",
                "1",
                "--service-pid",
                &pid,
                "--plot",
                dir.join("isolation.svg").to_str().expect("utf-8 path"),
            ],
            &dir.join("isolation.json"),
        );
        let chart = std::fs::read_to_string(dir.join("isolation.svg")).expect("the chart");
        let refusals = run(
            &[
                "--url",
                &url,
                "--admin-token",
                TOKEN,
                "refusals",
                "--clients",
                "2",
                "--seconds",
                "0.5",
            ],
            &dir.join("refusals.json"),
        );
        let mixed = run(
            &[
                "--url",
                &url,
                "--admin-token",
                TOKEN,
                "mixed",
                "--chats",
                "1000",
                "--clients",
                "2",
                "--celebrity-joins",
                "50",
                "--celebrity-reads",
                "50",
                "--seconds",
                "1.5",
                "--service-pid",
                &pid,
            ],
            &dir.join("mixed.json"),
        );
        let autoinc = run(
            &["autoinc", "--writers", "2", "--seconds", "0.3"],
            &dir.join("autoinc.json"),
        );
        let lifecycle = run(
            &[
                "lifecycle",
                "--clients",
                "2",
                "--events",
                "3000",
                "--paced",
                "20000",
                "--seconds",
                "0.5",
                "--digest-chats",
                "2000",
            ],
            &dir.join("lifecycle.json"),
        );
        let _ = std::fs::remove_dir_all(&dir);
        (
            (mixed, lifecycle),
            autoinc,
            spike,
            quiet,
            direct,
            fanout,
            [mux, fetch, isolation, refusals],
            chart,
        )
    })
    .await
    .expect("runs");
    let (
        (mixed, lifecycle),
        autoinc,
        spike,
        quiet,
        direct,
        fanout,
        [mux, fetch, isolation, refusals],
        chart,
    ) = reports;
    // The lifecycle run purges down to the last 1000 revisions, paced and
    // not, repairs five injected drifts, and walks its 2000 small chats
    // without finding any.
    let l = &lifecycle["scenario"];
    for run in 0..2 {
        assert_eq!(
            l["purge"][if run == 0 { 0 } else { 2 }]["eventsPurged"],
            2000,
            "{lifecycle}"
        );
    }
    assert_eq!(
        l["purge"][1]["detectAndRepairMs"].as_array().map(Vec::len),
        Some(5),
        "{lifecycle}"
    );
    assert!(l["digest"]["chats"].as_u64() >= Some(2000), "{lifecycle}");
    assert_eq!(
        l["digest"]["incrementalRoundChecked"]
            .as_u64()
            .map(|n| n > 0),
        Some(true),
        "{lifecycle}"
    );
    assert_eq!(l["digest"]["repairs"], 0, "{lifecycle}");
    assert!(ok(&lifecycle, "paced_before") > 0, "{lifecycle}");
    for kind in ["bg_count", "celebrity_join", "celebrity_read"] {
        assert!(ok(&mixed, kind) > 0, "{kind}: {mixed}");
    }
    for kind in [
        "mode1_insert_values",
        "mode1_insert_select",
        "mode2_insert_values",
        "mode2_insert_select",
    ] {
        assert!(ok(&autoinc, kind) > 0, "{kind}: {autoinc}");
    }
    assert!(chart.starts_with("<svg"), "{chart}");
    assert!(
        chart.contains("spike on shard A"),
        "the chart marks the spike"
    );
    assert!(
        chart.contains("b_during_spike"),
        "the chart names its series"
    );
    let m = &mux["scenario"];
    assert_eq!(m["streamsOpen"], 3, "{mux}");
    assert_eq!(m["muxChatsPerStream"], 5, "{mux}");
    assert!(m["posted"].as_u64().unwrap_or(0) > 0, "{mux}");
    assert_eq!(m["delivered"], m["expected"], "{mux}");
    assert!(ok(&fetch, "poll") > 0, "{fetch}");
    assert!(
        fetch["scenario"]["eventQueriesPerPublishedEvent"].is_f64(),
        "{fetch}"
    );
    for kind in ["b_alone", "b_during_spike", "a_spike_join"] {
        assert!(ok(&isolation, kind) > 0, "{kind}: {isolation}");
    }
    assert!(
        isolation["scenario"]["shardBP99Ratio"].is_f64(),
        "{isolation}"
    );
    // B's requests as the service saw them: every part, both halves.
    let parts = &isolation["scenario"]["shardBInService"];
    for part in ["own", "database", "bulkheadWait", "groupCommitWait"] {
        for half in ["requestsAlone", "requestsDuringSpike"] {
            assert!(
                parts[part][half].as_f64().is_some_and(|n| n > 0.0),
                "{part} {half}: {isolation}"
            );
        }
    }
    assert!(
        isolation["scenario"]["serviceThreads"]["duringSpike"]["cores"].is_f64(),
        "{isolation}"
    );
    assert!(
        fetch["scenario"]["cpu"]["serviceCpuMicrosPerPoll"].is_f64(),
        "{fetch}"
    );
    let m = &mixed["scenario"];
    assert!(m["memory"]["bytesPerTrackedChat"].is_u64(), "{mixed}");
    assert!(
        m["cpu"]["serviceCpuMicrosPerBackgroundRequest"].is_f64(),
        "{mixed}"
    );
    for kind in ["refused_join", "refused_fetch"] {
        let answers = &refusals["kinds"][kind]["answers"];
        let code = if kind == "refused_join" {
            "429/join_throttled"
        } else {
            "429/fetch_throttled"
        };
        assert!(
            answers[code].as_u64().unwrap_or(0) > 0,
            "{kind}: {refusals}"
        );
    }
    let f = &fanout["scenario"];
    assert_eq!(f["streamsOpen"], 10, "{fanout}");
    assert!(f["posted"].as_u64().unwrap_or(0) > 0, "{fanout}");
    assert_eq!(f["delivered"], f["expected"], "{fanout}");
    assert!(f["memory"]["bytesPerSubscriber"].is_u64(), "{fanout}");
    assert!(f["cpu"]["serviceCpuMicrosPerDelivery"].is_f64(), "{fanout}");
    assert!(ok(&fanout, "delivery_lag") > 0, "{fanout}");
    assert!(ok(&spike, "join") > 0, "{spike}");
    assert_eq!(spike["scenario"]["joinThrottle"], false);
    assert!(
        spike["scenario"]["commits"]["joinsPerTransaction"].is_f64(),
        "{spike}"
    );
    assert!(
        spike["kinds"]["join"]["latencyMs"]["p99"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
    assert!(
        !spike["kinds"]["join"]["okPerSecondTimeline"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(spike["marks"][0]["what"], "spike start");
    for kind in ["quiet_join", "quiet_count", "direct_join", "direct_count"] {
        assert!(ok(&quiet, kind) > 0, "{kind}: {quiet}");
    }
    for kind in ["direct_join", "direct_batched"] {
        assert!(ok(&direct, kind) > 0, "{kind}: {direct}");
    }
    let d = &direct["scenario"];
    assert_eq!(d["runs"][0]["chats"], 2, "{direct}");
    assert!(d["runs"][0]["commitsPerSecond"].is_f64(), "{direct}");
    assert!(d["storage"]["memberBytesPerRow"].is_f64(), "{direct}");
    app.shut_down().await;
}

/// The capacity model runs on the reports docs/capacity.md was made from:
/// they still hold every cost it needs, and it names its first limit.
#[test]
fn capacity_sizes_the_reference_workload_from_the_committed_reports() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/capacity");
    let mut reports: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("docs/capacity")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    reports.sort();
    let out = Command::new(env!("CARGO_BIN_EXE_chatshard-load"))
        .arg("capacity")
        .args(&reports)
        .args(["--set", "streams=60000"])
        .output()
        .expect("run chatshard-load capacity");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("| chatshard instances | **"), "{table}");
    assert!(table.contains("| streams | 60,000 |"), "{table}");
    assert!(table.contains("First limit: **"), "{table}");
}

/// Two instances of a fleet whose Redis is reached through the tool's own
/// delaying proxy: fanout streams on one and posts through the other, and a
/// join spike spread over both.
#[test]
fn tls_cost_runs_every_setup_against_its_own_tls_shard() {
    let dir = std::env::temp_dir().join(common::unique("load-tls-cost"));
    std::fs::create_dir_all(&dir).expect("dir");
    let report = run(
        &[
            "tls-cost",
            "--rounds",
            "1",
            "--clients",
            "2",
            "--seconds",
            "0.5",
            "--chatshard-bin",
            env!("CARGO_BIN_EXE_chatshard"),
        ],
        &dir.join("tls-cost.json"),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let s = &report["scenario"];
    let setups: Vec<&str> = s["runs"]
        .as_array()
        .map(|runs| runs.iter().filter_map(|r| r["setup"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(setups, ["plain", "shard-tls", "api-tls"], "{report}");
    for run in s["runs"].as_array().into_iter().flatten() {
        assert!(run["p50Ms"].as_f64().is_some_and(|ms| ms > 0.0), "{run}");
        assert!(
            run["joinsPerSecond"].as_f64().is_some_and(|n| n > 0.0),
            "{run}"
        );
    }
    for setup in ["shard-tls", "api-tls"] {
        assert!(
            s["setups"][setup]["overPlain"]["p50"].is_f64(),
            "{setup}: {report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_options_and_the_proxy_run() {
    let redis = servers::redis().await;
    let proxy_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let proxy = Command::new(env!("CARGO_BIN_EXE_chatshard-load"))
        .args(["--quiet", "proxy", "--listen"])
        .arg(proxy_addr.to_string())
        .arg("--to")
        .arg(format!("127.0.0.1:{}", redis.port()))
        .args(["--delay-ms", "2", "--seconds", "120"])
        .spawn()
        .expect("start the proxy");
    // Stopped when the test ends, passed or failed.
    let _proxy = KillOnDrop(proxy);
    let first = TestApp::builder()
        .own_shards(2, Location::Temp)
        .redis_at(format!("redis://{proxy_addr}/"))
        .configure(|s| {
            s.admin.token = TOKEN.to_owned();
            s.redis.heartbeat_ms = 100;
            s.redis.instance_ttl_ms = 1000;
            // `move --purged` waits for a purge round.
            s.purge.interval_ms = 200;
        })
        .start()
        .await;
    // The second instance: the same shards, Redis and settings.
    let second = TestApp::builder()
        .settings(first.settings.clone())
        .start()
        .await;
    // Both instances see each other through the proxy.
    for i in [&first, &second] {
        eventually(
            Duration::from_secs(30),
            "two instances in the fleet",
            || async {
                let fleet = i.fleet().await;
                fleet["fleet"]["redisUp"] == true && fleet["fleet"]["countedInstances"] == 2
            },
        )
        .await;
    }
    let dir = std::env::temp_dir().join(format!("chatshard-load-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (a, b) = (first.base.clone(), second.base.clone());
    let (fanout, spike, moved, purged) = tokio::task::spawn_blocking(move || {
        let fanout = run(
            &[
                "--url",
                &a,
                "--also",
                &b,
                "--admin-token",
                TOKEN,
                "fanout",
                "--subscribers",
                "5",
                "--rate",
                "20",
                "--seconds",
                "0.5",
            ],
            &dir.join("fleet-fanout.json"),
        );
        let spike = run(
            &[
                "--url",
                &a,
                "--also",
                &b,
                "--admin-token",
                TOKEN,
                "join-spike",
                "--clients",
                "4",
                "--seconds",
                "1",
            ],
            &dir.join("fleet-spike.json"),
        );
        let moved = run(
            &[
                "--url",
                &a,
                "--also",
                &b,
                "--admin-token",
                TOKEN,
                "move",
                "--clients",
                "2",
                "--members",
                "200",
                "--seconds",
                "2",
                "--join-rate",
                "100",
                "--pollers",
                "2",
            ],
            &dir.join("fleet-move.json"),
        );
        let purged = run(
            &[
                "--url",
                &a,
                "--admin-token",
                TOKEN,
                "move",
                "--clients",
                "2",
                "--members",
                "100",
                "--seconds",
                "2",
                "--others",
                "0",
                "--purged",
                "20",
            ],
            &dir.join("fleet-move-purged.json"),
        );
        let _ = std::fs::remove_dir_all(&dir);
        (fanout, spike, moved, purged)
    })
    .await
    .expect("runs");
    let f = &fanout["scenario"];
    assert_eq!(f["crossInstance"], true, "{fanout}");
    assert_eq!(f["streamsOpen"], 5, "{fanout}");
    assert!(f["posted"].as_u64().unwrap_or(0) > 0, "{fanout}");
    assert_eq!(f["delivered"], f["expected"], "{fanout}");
    assert_eq!(spike["scenario"]["instances"], 2, "{spike}");
    let m = &moved["scenario"];
    assert_eq!(m["phase"], "done", "{moved}");
    assert!(
        m["moveSeconds"].as_f64().is_some_and(|s| s > 0.0),
        "{moved}"
    );
    assert!(ok(&moved, "post") > 0, "{moved}");
    // Two shards: about half of the candidate chats share the source.
    assert!(m["otherChats"].as_u64().unwrap_or(0) > 0, "{moved}");
    assert!(ok(&moved, "other_before") > 0, "{moved}");
    assert!(ok(&moved, "other_during") > 0, "{moved}");
    assert!(
        m["otherP99DuringMs"].as_f64().is_some_and(|p| p > 0.0),
        "{moved}"
    );
    // New users joined and readers long-polled across the move, through
    // both instances, and no reader missed a revision.
    assert!(ok(&moved, "join") > 0, "{moved}");
    assert!(ok(&moved, "poll") > 0, "{moved}");
    assert_eq!(m["pollers"], 2, "{moved}");
    assert_eq!(m["revisionsMissedByPollers"], 0, "{moved}");
    // A chat whose log was purged first moves too (from a snapshot).
    let p = &purged["scenario"];
    assert_eq!(p["phase"], "done", "{purged}");
    assert_eq!(p["purgedTo"], 20, "{purged}");
    assert!(p["purgeSeconds"].as_f64().is_some(), "{purged}");
    assert!(ok(&purged, "post") > 0, "{purged}");
    assert!(ok(&spike, "join") > 0, "{spike}");
    second.shut_down().await;
    first.shut_down().await;
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
