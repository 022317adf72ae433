//! Several chatshard instances in one fleet: real `mariadbd` shards shared by
//! the binary, a real `redis-server` (or Redis Cluster) per test, started by
//! the kit, and in-process instances on their own ports. Each test uses its
//! own chats and its own key prefix.
//!
//! The instances' tail refresh is long (30 s), so that anything an instance
//! learns of another's writes within seconds came through Redis.

#[path = "../common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use chatshard::config::Settings;
use reqwest::StatusCode;
use serde_json::{Value, json};

use common::{TestApp, eventually, servers, unique};

const SHARDS: usize = 2;
const TOKEN: &str = "fleet-test-admin-token";

/// One instance of the fleet whose Redis is at `redis_url`, keys under
/// `prefix`.
async fn instance(
    redis_url: &str,
    prefix: &str,
    configure: impl FnOnce(&mut Settings) + Send,
) -> TestApp {
    TestApp::builder()
        .shared_shards(SHARDS)
        .redis_at(redis_url)
        .configure(|s| {
            s.admin.token = TOKEN.to_owned();
            s.redis.key_prefix = prefix.to_owned();
            s.redis.heartbeat_ms = 100;
            s.redis.instance_ttl_ms = 1000;
            s.tail.refresh_ms = 30_000;
        })
        .configure(configure)
        .start()
        .await
}

/// Creates a chat through `i`.
async fn put_chat(i: &TestApp, chat: &str) {
    let r = i.put_chat(chat, Some(json!({}))).await;
    assert!(r.status().is_success(), "PUT chat: {}", r.status());
}

async fn join(i: &TestApp, chat: &str, user: &str) -> StatusCode {
    i.join(chat, user).await.status()
}

async fn post(i: &TestApp, chat: &str, sender: &str, key: &str) -> StatusCode {
    i.post(chat, sender, key, key).await.status()
}

/// The chat's event stream on `i` from `after`.
async fn chat_stream(i: &TestApp, chat: &str, after: u64) -> common::SseReader {
    i.open_stream(&format!("/v1/chats/{chat}/events/stream?after={after}"))
        .await
}

/// Waits until Redis confirmed at least `n` chat subscriptions of `i`.
async fn wait_subscribed(i: &TestApp, n: u64) {
    eventually(Duration::from_secs(10), "chats followed", || async {
        i.fleet().await["fleet"]["subscribedChats"].as_u64() >= Some(n)
    })
    .await;
}

/// Waits until every instance sees Redis and all the others.
async fn wait_joined(instances: &[&TestApp]) {
    let n = instances.len() as u64;
    for i in instances {
        eventually(
            Duration::from_secs(15),
            "instance joined the fleet",
            || async {
                let f = i.fleet().await;
                f["fleet"]["redisUp"] == json!(true) && f["fleet"]["countedInstances"] == json!(n)
            },
        )
        .await;
    }
}

/// The revision of the stream's next event.
async fn next_revision(stream: &mut common::SseReader) -> u64 {
    let event = stream
        .next(Duration::from_secs(10))
        .await
        .expect("the stream ended early");
    let v: Value = serde_json::from_str(&event.data).expect("event json");
    v["revision"].as_u64().expect("revision")
}

/// `N` instances of one fleet (Redis at `url`, keys under `prefix`), each
/// configured by `configure`, once they all see Redis and each other.
async fn start_fleet<const N: usize>(
    url: &str,
    prefix: &str,
    configure: impl Fn(&mut Settings) + Copy + Send,
) -> [TestApp; N] {
    let mut instances = Vec::with_capacity(N);
    for _ in 0..N {
        instances.push(instance(url, prefix, configure).await);
    }
    wait_joined(&instances.iter().collect::<Vec<_>>()).await;
    match instances.try_into() {
        Ok(all) => all,
        Err(_) => unreachable!("N instances were started"),
    }
}

/// Shuts every instance down.
async fn shut_down(instances: impl IntoIterator<Item = TestApp>) {
    for i in instances {
        i.shut_down().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_on_one_instance_reach_a_stream_on_another_in_order() {
    let redis = servers::redis().await;
    notices_reach_a_stream_on_another_instance(&redis.url(), |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_events_written_on_one_instance_reach_a_stream_on_another() {
    let pki = servers::RedisPki::new();
    let redis = servers::tls_redis(&pki, false).await;
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    let ca_file = pki.ca_file();
    notices_reach_a_stream_on_another_instance(&redis.url(), |s| {
        s.redis.tls.ca_file.clone_from(&ca_file);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_tls_redis_cluster_events_reach_a_stream_on_another_instance() {
    let pki = servers::RedisPki::new();
    let mut cluster = servers::tls_redis_cluster(3, &pki).await;
    let urls = cluster.urls().join(",");
    assert!(urls.starts_with("rediss://"), "{urls}");
    let ca_file = pki.ca_file();
    notices_reach_a_stream_on_another_instance(&urls, |s| {
        s.redis.cluster = true;
        s.redis.tls.ca_file.clone_from(&ca_file);
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_asking_for_client_certificates_admits_only_instances_with_one() {
    let pki = servers::RedisPki::new();
    let redis = servers::tls_redis(&pki, true).await;
    let (ca_file, client) = (pki.ca_file(), pki.client.clone());
    // With the certificate: a fleet, as over plain TCP.
    notices_reach_a_stream_on_another_instance(&redis.url(), |s| {
        s.redis.tls.ca_file.clone_from(&ca_file);
        s.redis.tls.cert_file = client.cert.display().to_string();
        s.redis.tls.key_file = client.key.display().to_string();
    })
    .await;

    // Without it: the instance starts and serves, acting alone, as when
    // Redis is unreachable; Redis refuses it on every heartbeat.
    let prefix = unique("no-cert");
    let alone = instance(&redis.url(), &prefix, |s| {
        s.redis.tls.ca_file.clone_from(&ca_file);
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "a heartbeat refused by Redis",
        || async {
            let f = alone.fleet().await;
            f["fleet"]["redisUp"] == json!(false)
                && f["fleet"]["lastError"]
                    .as_str()
                    .is_some_and(|e| e != "not connected yet")
        },
    )
    .await;
    let chat = unique("alone");
    put_chat(&alone, &chat).await;
    assert_eq!(join(&alone, &chat, "u1").await, StatusCode::CREATED);
    let f = alone.fleet().await;
    assert_eq!(f["fleet"]["redisUp"], json!(false), "{f}");
    assert_eq!(f["fleet"]["countedInstances"], json!(1), "{f}");
    alone.shut_down().await;
}

/// Two instances of a fleet whose Redis is at `url` (each configured by
/// `configure`): 100 events written concurrently on A reach a stream on B, in
/// revision order, long before B's own refresh.
async fn notices_reach_a_stream_on_another_instance(
    url: &str,
    configure: impl Fn(&mut Settings) + Copy + Send,
) {
    let prefix = unique("notices");
    let [a, b] = start_fleet(url, &prefix, configure).await;
    let chat = unique("n");
    put_chat(&a, &chat).await;

    let mut stream = chat_stream(&b, &chat, 0).await;
    wait_subscribed(&b, 1).await;

    // Four writers on A, 25 posts each, concurrently.
    for w in 0..4 {
        assert_eq!(join(&a, &chat, &format!("w{w}")).await, StatusCode::CREATED);
    }
    let writers = (0..4).map(|w| {
        let (a, chat) = (&a, &chat);
        async move {
            for i in 0..25 {
                assert_eq!(
                    post(a, chat, &format!("w{w}"), &format!("k{w}-{i}")).await,
                    StatusCode::CREATED
                );
            }
        }
    });
    futures::future::join_all(writers).await;

    // Everything, in revision order, long before B's own refresh (30 s).
    let mut seen = Vec::new();
    while seen.len() < 104 {
        let event = stream
            .next(Duration::from_secs(10))
            .await
            .expect("the stream ended early");
        if event.event.as_deref().unwrap_or("message") != "message" {
            continue;
        }
        let v: Value = serde_json::from_str(&event.data).expect("event json");
        seen.push(v["revision"].as_u64().expect("revision"));
    }
    assert_eq!(seen, (1..=104).collect::<Vec<u64>>());
    let fb = b.fleet().await;
    assert!(fb["fleet"]["counters"]["noticesReceived"].as_u64() > Some(0));
    let fa = a.fleet().await;
    assert!(fa["fleet"]["counters"]["noticesSent"].as_u64() > Some(0));
    drop(stream);
    shut_down([a, b]).await;
}

/// The chat's first stored revision, if `r` is a 410 `revision_purged`.
async fn purged_since(r: reqwest::Response) -> Option<u64> {
    if r.status() != StatusCode::GONE {
        return None;
    }
    let problem: Value = r.json().await.ok()?;
    (problem["code"] == "revision_purged")
        .then(|| problem["firstRevision"].as_u64())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_instance_trims_the_tail_another_holds() {
    let redis = servers::redis().await;
    let prefix = unique("purge");
    let chat = unique("p");
    // A purges this chat (its last 10 revisions and its last 5 days stay);
    // B purges nothing, and its tail would be trusted for 45 s: within
    // seconds, only A's notice can tell it of the purge.
    let a = instance(&redis.url(), &prefix, |s| {
        s.retention.enabled = false;
        s.retention.overrides.insert(
            chat.clone(),
            serde_json::from_value(json!({ "enabled": true, "minDays": 5, "minRevisions": 10 }))
                .expect("override"),
        );
        s.purge.interval_ms = 50;
    })
    .await;
    let b = instance(&redis.url(), &prefix, |s| {
        s.retention.enabled = false;
        s.retention.overrides.clear();
    })
    .await;
    wait_joined(&[&a, &b]).await;
    put_chat(&a, &chat).await;
    a.join_writers(&chat, 2, 0).await;
    a.post_concurrently(&chat, 2, 24).await; // revisions 1..=50

    // B holds the whole log in its tail, and follows the chat's notices.
    let r = b.get(&format!("/v1/chats/{chat}/events?after=0")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let page: Value = r.json().await.expect("json");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(50));
    assert_eq!(page["events"][0]["revision"], 1);
    wait_subscribed(&b, 1).await;

    // Revisions 1..=30 become ten days old: A's purge lets them go.
    let mut db = a.db(a.shard_of(&chat).await).await;
    sqlx::query(
        "UPDATE chat_event SET created_at = DATE_SUB(created_at, INTERVAL 10 DAY) \
         WHERE chat_id = ? AND revision <= 30",
    )
    .bind(&chat)
    .execute(&mut db)
    .await
    .expect("backdate");
    eventually(Duration::from_secs(20), "the purge", || async {
        a.chat_body(&chat).await["firstRevision"] == 31
    })
    .await;

    // Both instances refuse what was purged: polls, long-polls, streams.
    for i in [&a, &b] {
        eventually(Duration::from_secs(10), "410 below the floor", || async {
            purged_since(i.get(&format!("/v1/chats/{chat}/events?after=0")).await).await == Some(31)
        })
        .await;
        for path in [
            format!("/v1/chats/{chat}/events?after=29"),
            format!("/v1/chats/{chat}/events?after=3&waitMs=200"),
            format!("/v1/chats/{chat}/events/stream?after=0"),
        ] {
            assert_eq!(purged_since(i.get(&path).await).await, Some(31), "{path}");
        }
        // What the purge kept is served whole.
        let r = i.get(&format!("/v1/chats/{chat}/events?after=30")).await;
        assert_eq!(r.status(), StatusCode::OK);
        let page: Value = r.json().await.expect("json");
        let revisions = common::page_revisions(&page);
        assert_eq!(revisions, (31..=50).collect::<Vec<u64>>());
    }
    let fb = b.fleet().await;
    assert!(fb["fleet"]["counters"]["noticesReceived"].as_u64() > Some(0));
    shut_down([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_marked_hot_on_one_instance_is_throttled_on_another() {
    let redis = servers::redis().await;
    let prefix = unique("hot");
    let hot = |s: &mut Settings| {
        s.hot_chat.enabled = true;
        s.hot_chat.threshold = 5;
        s.hot_chat.duration_seconds = 60;
        s.hot_chat.expire_seconds = 60;
        s.hot_chat.throttle_rate = 1.0;
    };
    let [a, b] = start_fleet(&redis.url(), &prefix, hot).await;
    let chat = unique("h");
    put_chat(&a, &chat).await;
    // B serves the chat's events before it is hot.
    let r = b
        .http
        .get(b.url(&format!("/v1/chats/{chat}/events?after=0")))
        .send()
        .await
        .expect("fetch");
    assert_eq!(r.status(), StatusCode::OK);

    assert_eq!(join(&a, &chat, "u").await, StatusCode::CREATED);
    for i in 0..10 {
        assert_eq!(
            post(&a, &chat, "u", &format!("k{i}")).await,
            StatusCode::CREATED
        );
    }
    let listed = |body: Value| {
        body["hotChats"]
            .as_array()
            .is_some_and(|l| l.iter().any(|h| h["chatId"] == json!(chat)))
    };
    assert!(listed(a.admin_get("/v1/admin/hot-chats").await));
    eventually(
        Duration::from_secs(5),
        "B lists the chat as hot",
        || async { listed(b.admin_get("/v1/admin/hot-chats").await) },
    )
    .await;
    // B wrote nothing to the chat, yet throttles its fetches.
    let r = b
        .http
        .get(b.url(&format!("/v1/chats/{chat}/events?after=0")))
        .send()
        .await
        .expect("fetch");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = r.json().await.expect("problem");
    assert_eq!(body["code"], "fetch_throttled");
    // An instance that starts while the mark lasts marks the chat too.
    let c = instance(&redis.url(), &prefix, hot).await;
    eventually(
        Duration::from_secs(5),
        "C lists the chat as hot",
        || async { listed(c.admin_get("/v1/admin/hot-chats").await) },
    )
    .await;
    shut_down([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_join_limit_holds_across_three_instances() {
    let redis = servers::redis().await;
    let prefix = unique("joins");
    const LIMIT: u64 = 60;
    let limit = |s: &mut Settings| {
        s.join_throttle.enabled = true;
        s.join_throttle.limit = LIMIT;
        s.join_throttle.window_seconds = 600;
    };
    let [a, b, c] = start_fleet(&redis.url(), &prefix, limit).await;
    let all = [&a, &b, &c];
    let chat = unique("j");
    put_chat(&a, &chat).await;

    // 100 joins through each instance, 4 at a time per instance. Alone, each
    // instance would admit the whole limit: 180 in all.
    let attempts = all.iter().enumerate().map(|(n, i)| {
        let chat = &chat;
        async move {
            let mut admitted = 0u64;
            for batch in 0..25 {
                let joins = (0..4)
                    .map(|k| async move { join(i, chat, &format!("i{n}-{batch}-{k}")).await });
                for status in futures::future::join_all(joins).await {
                    match status {
                        StatusCode::CREATED | StatusCode::OK => admitted += 1,
                        StatusCode::TOO_MANY_REQUESTS => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            }
            admitted
        }
    });
    let admitted: u64 = futures::future::join_all(attempts).await.iter().sum();
    // One lease per instance at most beyond the limit: 60 / (4 × 3) = 5.
    let batch = LIMIT / 12;
    assert!(
        (LIMIT - batch..=LIMIT + 3 * batch).contains(&admitted),
        "admitted {admitted} of 300 against a fleet-wide limit of {LIMIT}"
    );
    let (count, rows) = a.count_and_rows(&chat).await;
    assert_eq!((count, rows), (admitted as i64, admitted as i64));
    for i in all {
        assert!(i.fleet().await["fleet"]["counters"]["leaseRequests"].as_u64() > Some(0));
    }
    shut_down([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_changed_on_one_instance_is_served_by_the_others() {
    let redis = servers::redis().await;
    let prefix = unique("config");
    let [a, b] = start_fleet(&redis.url(), &prefix, |_| {}).await;

    let changed = a.patch_config(r#"{"joinThrottle":{"limit":1234}}"#).await;
    let version = changed["version"].as_u64().expect("version");
    eventually(Duration::from_secs(5), "B serves A's change", || async {
        let c = b.admin_get("/v1/admin/config").await;
        c["config"]["joinThrottle"]["limit"] == json!(1234) && c["version"] == json!(version)
    })
    .await;

    // A second change, on B this time: the version keeps growing fleet-wide.
    let second = b.patch_config(r#"{"joinThrottle":{"limit":77}}"#).await;
    assert!(second["version"].as_u64() > Some(version));
    eventually(Duration::from_secs(5), "A serves B's change", || async {
        let c = a.admin_get("/v1/admin/config").await;
        c["config"]["joinThrottle"]["limit"] == json!(77) && c["version"] == second["version"]
    })
    .await;

    // An instance that joins later takes the fleet's configuration.
    let c = instance(&redis.url(), &prefix, |_| {}).await;
    eventually(
        Duration::from_secs(5),
        "a new instance adopts it",
        || async {
            let conf = c.admin_get("/v1/admin/config").await;
            conf["config"]["joinThrottle"]["limit"] == json!(77)
        },
    )
    .await;
    shut_down([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_loses_no_request_and_the_fleet_comes_back() {
    let mut redis = servers::redis().await;
    let prefix = unique("outage");
    // The join throttle off: while Redis is away each instance admits its
    // share of a chat's limit, and fast writers would meet it; this test is
    // about losing nothing across the outage.
    let [a, b] = start_fleet(&redis.url(), &prefix, |s| s.join_throttle.enabled = false).await;
    let chat = unique("o");
    put_chat(&a, &chat).await;

    // Writers on both instances throughout; Redis is killed under them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = |i: &TestApp, name: &'static str| {
        let (stop, chat, http, base) = (stop.clone(), chat.clone(), i.http.clone(), i.base.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let status = http
                    .post(format!("{base}/v1/chats/{chat}/members"))
                    .json(&json!({ "userId": format!("{name}-{n}") }))
                    .send()
                    .await
                    .expect("join")
                    .status();
                assert_eq!(status, StatusCode::CREATED, "join {name}-{n}");
                n += 1;
            }
            n
        })
    };
    let wa = writer(&a, "a");
    let wb = writer(&b, "b");
    let count = |i: &TestApp| {
        let (http, url) = (
            i.http.clone(),
            i.url(&format!("/v1/chats/{chat}/member-count")),
        );
        async move {
            http.get(url)
                .send()
                .await
                .expect("count")
                .json::<Value>()
                .await
                .expect("json")["memberCount"]
                .as_u64()
                .expect("memberCount")
        }
    };
    eventually(Duration::from_secs(10), "writers under way", || async {
        count(&a).await >= 10
    })
    .await;
    redis.kill().expect("kill redis");
    for i in [&a, &b] {
        eventually(
            Duration::from_secs(10),
            "the instance acts alone",
            || async {
                let f = i.fleet().await;
                f["fleet"]["redisUp"] == json!(false) && f["fleet"]["lastError"].is_string()
            },
        )
        .await;
    }
    redis.restart().await.expect("restart redis");
    wait_joined(&[&a, &b]).await;
    stop.store(true, Ordering::Relaxed);
    let joined = wa.await.expect("writer a") + wb.await.expect("writer b");
    assert!(joined > 0);
    assert_eq!(
        count(&a).await,
        joined,
        "every acknowledged join is counted"
    );

    // Notices flow again: a stream on B hears a write on A.
    let mut stream = chat_stream(&b, &chat, joined).await;
    eventually(
        Duration::from_secs(10),
        "B follows the chat again",
        || async {
            b.fleet().await["fleet"]["subscribedChats"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        },
    )
    .await;
    assert_eq!(post(&a, &chat, "a-0", "after").await, StatusCode::CREATED);
    assert_eq!(next_revision(&mut stream).await, joined + 1);
    assert!(a.fleet().await["fleet"]["counters"]["outages"].as_u64() >= Some(1));
    drop(stream);
    shut_down([a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_carries_notices_and_a_dead_node_costs_no_request() {
    let mut cluster = servers::redis_cluster(3).await;
    let urls = cluster.urls().join(",");
    let prefix = unique("cluster");
    let in_cluster = |s: &mut Settings| s.redis.cluster = true;
    let [a, b] = start_fleet(&urls, &prefix, in_cluster).await;
    assert_eq!(a.fleet().await["fleet"]["redisMode"], "cluster");

    // Chats spread over the slots of every node: each one's notices reach B.
    let chats: Vec<String> = (0..6).map(|i| unique(&format!("c{i}"))).collect();
    let mut streams = Vec::new();
    for chat in &chats {
        put_chat(&a, chat).await;
        let stream = chat_stream(&b, chat, 0).await;
        streams.push(stream);
    }
    wait_subscribed(&b, chats.len() as u64).await;
    // All at once, so that one batch of notices spans several slots.
    let joins = chats.iter().map(|chat| join(&a, chat, "u1"));
    for status in futures::future::join_all(joins).await {
        assert_eq!(status, StatusCode::CREATED);
    }
    for stream in &mut streams {
        assert_eq!(next_revision(stream).await, 1);
    }

    // A node dies: the cluster stops answering for its slots (no replicas),
    // and every request still succeeds, served by instances acting alone.
    cluster.node_mut(1).kill().expect("kill a node");
    for i in [&a, &b] {
        eventually(
            Duration::from_secs(20),
            "the instance acts alone",
            || async { i.fleet().await["fleet"]["redisUp"] == json!(false) },
        )
        .await;
    }
    for (n, chat) in chats.iter().enumerate() {
        for k in 0..5 {
            let user = format!("dead-{n}-{k}");
            assert_eq!(join(&a, chat, &user).await, StatusCode::CREATED);
            assert_eq!(
                join(&b, chat, &format!("{user}-b")).await,
                StatusCode::CREATED
            );
        }
    }
    cluster
        .node_mut(1)
        .restart()
        .await
        .expect("restart the node");
    for chat in &chats {
        let (count, rows) = a.count_and_rows(chat).await;
        assert_eq!((count, rows), (11, 11));
    }
    // Back: every stream on B has every event, in order, and a write on A
    // made once the cluster is whole again reaches B through it.
    cluster.wait_ok().await.expect("cluster ok again");
    wait_joined(&[&a, &b]).await;
    wait_subscribed(&b, chats.len() as u64).await;
    for chat in &chats {
        assert_eq!(join(&a, chat, "back").await, StatusCode::CREATED);
    }
    for stream in &mut streams {
        let mut revisions = Vec::new();
        while revisions.last() != Some(&12) {
            revisions.push(next_revision(stream).await);
        }
        assert_eq!(revisions, (2..=12).collect::<Vec<u64>>());
    }
    drop(streams);
    shut_down([a, b]).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_chat_hammered_from_three_instances_leaves_its_shard_closed_for_the_others() {
    let redis = servers::redis().await;
    let prefix = unique("contention");
    let [a, b, c] = start_fleet(&redis.url(), &prefix, |_| {}).await;
    let all = [&a, &b, &c];
    let hot = unique("hammered");
    put_chat(&a, &hot).await;
    let shard = a.shard_name_of(&hot).await;
    // Quiet chats of the same shard.
    let mut quiet = Vec::new();
    while quiet.len() < 3 {
        let chat = unique("quiet");
        put_chat(&a, &chat).await;
        if a.shard_name_of(&chat).await == shard {
            quiet.push(chat);
        }
    }

    // Three instances' flushers take turns on the hot chat's row lock while
    // the quiet chats write through the same shard.
    let hammer = all.iter().enumerate().map(|(n, i)| {
        let hot = &hot;
        async move {
            let joins = (0..150).map(|k| async move { join(i, hot, &format!("h{n}-{k}")).await });
            futures::future::join_all(joins).await
        }
    });
    let quiet_writes = async {
        let mut statuses = Vec::new();
        for round in 0..10 {
            for (q, chat) in quiet.iter().enumerate() {
                let i = all[(round + q) % 3];
                statuses.push(join(i, chat, &format!("q{round}")).await);
            }
        }
        statuses
    };
    let (hot_statuses, quiet_statuses) =
        tokio::join!(futures::future::join_all(hammer), quiet_writes);
    assert!(
        quiet_statuses.iter().all(|s| *s == StatusCode::CREATED),
        "every quiet chat's write succeeded: {quiet_statuses:?}"
    );
    let hot_ok = hot_statuses
        .iter()
        .flatten()
        .filter(|s| s.is_success())
        .count();
    assert!(hot_ok > 0);
    for i in all {
        let shards = i.admin_get("/v1/admin/shards").await;
        for s in shards["shards"].as_array().expect("shards") {
            assert_eq!(s["breaker"]["state"], "CLOSED", "{s}");
        }
    }
    let (count, rows) = a.count_and_rows(&hot).await;
    assert_eq!((count, rows), (hot_ok as i64, hot_ok as i64));
    shut_down([a, b, c]).await;
}
