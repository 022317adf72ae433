//! Long-poll (`waitMs`) and the in-memory tail behind it: woken by a commit,
//! an empty page when the wait ends, every revision exactly once and in order
//! under concurrent writers, and many waiters of one chat costing its shard
//! at most one read per published event.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, assert_problem};

const TOKEN: &str = "long-poll-tests-admin-token";

async fn poll(app: &TestApp, chat: &str, after: u64, wait_ms: u64) -> Value {
    let r = app
        .get(&format!(
            "/v1/chats/{chat}/events?after={after}&limit=500&waitMs={wait_ms}"
        ))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.expect("json")
}

/// Long-polls `chat` from `after` until revision `until`, with `options`
/// added to each request; every revision received, in order.
async fn follow(base: &str, chat: &str, after: u64, until: u64, options: &str) -> Vec<u64> {
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    let mut after = after;
    let deadline = Instant::now() + Duration::from_secs(60);
    while after < until {
        assert!(Instant::now() < deadline, "stuck after {after}");
        let page: Value = http
            .get(format!(
                "{base}/v1/chats/{chat}/events?after={after}{options}"
            ))
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("json");
        let got = revisions(&page);
        if let Some(last) = got.last() {
            after = *last;
        }
        seen.extend(got);
    }
    seen
}

fn revisions(page: &Value) -> Vec<u64> {
    page["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["revision"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_is_answered_by_the_next_commit_or_the_end_of_its_wait() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("lp").await;
    assert_eq!(app.join(&chat, "ann").await.status(), StatusCode::CREATED);

    // Nothing after revision 1: the wait ends with an empty page.
    let started = Instant::now();
    let page = poll(&app, &chat, 1, 300).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(revisions(&page), Vec::<u64>::new());
    assert_eq!(page["latestRevision"], 1);

    // A waiter gets the message posted while it waits, long before its wait
    // of 20 s ends.
    let waiter = {
        let (base, chat) = (app.base.clone(), chat.clone());
        tokio::spawn(async move {
            reqwest::get(format!(
                "{base}/v1/chats/{chat}/events?after=1&waitMs=20000"
            ))
            .await
            .expect("poll")
            .json::<Value>()
            .await
            .expect("json")
        })
    };
    assert_eq!(
        app.post(&chat, "ann", "m1", "hello").await.status(),
        StatusCode::CREATED
    );
    let page = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("the waiter was answered before its wait ended")
        .expect("task");
    assert_eq!(revisions(&page), [2]);
    assert_eq!(page["events"][0]["text"], "hello");
    assert_eq!(page["latestRevision"], 2);

    for bad in ["30001", "-1", "soon"] {
        let r = app
            .get(&format!("/v1/chats/{chat}/events?after=0&waitMs={bad}"))
            .await;
        assert_problem(r, 422, "invalid_request").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_pollers_see_every_revision_once_and_in_order_under_concurrent_writers() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("lp-order").await;
    const WRITERS: usize = 4;
    const POSTS: usize = 40;
    let total = app.join_writers(&chat, WRITERS, POSTS).await;
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (base, chat) = (app.base.clone(), chat.clone());
            tokio::spawn(
                async move { follow(&base, &chat, 0, total, "&limit=7&waitMs=5000").await },
            )
        })
        .collect();
    app.post_concurrently(&chat, WRITERS, POSTS).await;
    for reader in readers {
        let seen = reader.await.expect("reader");
        assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_of_one_chat_cost_at_most_one_read_per_event() {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        // No periodic refresh during the test: every read it counts is one
        // the waiters caused.
        s.tail.refresh_ms = 120_000;
    })
    .await;
    let chat = app.new_chat("lp-reads").await;
    assert_eq!(app.join(&chat, "host").await.status(), StatusCode::CREATED);
    const WAITERS: usize = 20;
    const EVENTS: u64 = 10;
    let queries = || async {
        app.admin_get("/v1/admin/hot-chats").await["decisions"]["fetchQueries"]
            .as_u64()
            .expect("fetchQueries")
    };
    let before = queries().await;
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (base, chat) = (app.base.clone(), chat.clone());
            tokio::spawn(async move { follow(&base, &chat, 1, 1 + EVENTS, "&waitMs=10000").await })
        })
        .collect();
    for i in 0..EVENTS {
        let r = app.post(&chat, "host", &format!("e{i}"), "news").await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    for w in waiters {
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("every waiter saw every event")
            .expect("waiter");
    }
    let reads = queries().await - before;
    eprintln!("{WAITERS} waiters, {EVENTS} events: {reads} event read(s) on the shard");
    assert!(reads <= EVENTS, "{reads} reads for {EVENTS} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_on_a_quiet_chat_cost_no_reads_and_hear_another_instance_through_the_refresher() {
    // A writes; B serves the waiters and refreshes their tail every 200 ms.
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.tail.refresh_ms = 200;
    })
    .await;
    let chat = a.new_chat("lp-refresher").await;
    assert_eq!(a.join(&chat, "host").await.status(), StatusCode::CREATED);
    let queries = || async {
        b.admin_get("/v1/admin/hot-chats").await["decisions"]["fetchQueries"]
            .as_u64()
            .expect("fetchQueries")
    };
    let polls = || async {
        let samples =
            crate::common::metric_samples(&b.http, &b.base, "chatshard_tail_revision_polls_total")
                .await;
        crate::common::sum_where(&samples, &[])
    };
    const WAITERS: usize = 20;
    const EVENTS: u64 = 3;
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (base, chat) = (b.base.clone(), chat.clone());
            tokio::spawn(async move { follow(&base, &chat, 1, 1 + EVENTS, "&waitMs=10000").await })
        })
        .collect();
    // Once the waiters have filled the tail, ten refresher rounds pass
    // without a read of the chat's events.
    let deadline = Instant::now() + Duration::from_secs(20);
    while queries().await == 0 {
        assert!(Instant::now() < deadline, "the waiters never read the chat");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
    let (reads_before, polls_before) = (queries().await, polls().await);
    while polls().await < polls_before + 10.0 {
        assert!(Instant::now() < deadline, "the refresher does not run");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    assert_eq!(
        queries().await - reads_before,
        0,
        "a quiet chat's waiters read its events"
    );
    // Writes through A reach B's waiters by the refresher.
    for i in 0..EVENTS {
        let r = a.post(&chat, "host", &format!("e{i}"), "news").await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    for w in waiters {
        let seen = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("every waiter heard A's writes")
            .expect("waiter");
        assert_eq!(seen, (2..=1 + EVENTS).collect::<Vec<_>>());
    }
    let reads = queries().await - reads_before;
    assert!(reads <= EVENTS, "{reads} reads for {EVENTS} events");
}
