//! Long-poll (`waitMs`) and the in-memory tail behind it: woken by a commit,
//! an empty page when the wait ends, every revision exactly once and in order
//! under concurrent writers, and many waiters of one chat costing its shard
//! at most one read per published event.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::eventually;
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
/// added to each request; every revision received, in order. Fails when it
/// has not got there within 60 s.
async fn follow(base: &str, chat: &str, after: u64, until: u64, options: &str) -> Vec<u64> {
    // reqwest's TLS takes the process's default provider.
    chatshard::crypto::install_default_provider();
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    let mut after = after;
    let all = async {
        while after < until {
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
    };
    if tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .is_err()
    {
        panic!("stuck after {after}");
    }
    seen
}

/// Event fetches (polls and long-polls) that reached `app`'s service, and
/// the reads of the shard they cost (`admin.token` set).
async fn fetches_and_reads(app: &TestApp) -> (u64, u64) {
    let d = &app.admin_get("/v1/admin/hot-chats").await["decisions"];
    (
        d["fetches"].as_u64().expect("fetches"),
        d["fetchQueries"].as_u64().expect("fetchQueries"),
    )
}

/// Waits until the long-polls of `waiters` are waiting on `chat`'s tail:
/// all of them reached the service (`fetches` grew by `requests_each` of
/// theirs since `before`), none was answered, and the chat's tail was filled
/// for them (a plain poll from the waiters' `after`, answered from the tail
/// without a read of its own, returns only once the shared read is done).
/// What is left of each before its wait touches neither the network nor the
/// shard, and a commit after that wakes it (it subscribed to the tail before
/// reading it).
async fn wait_for_waiters<T>(
    app: &TestApp,
    chat: &str,
    after: u64,
    before: (u64, u64),
    waiters: &[tokio::task::JoinHandle<T>],
    requests_each: u64,
) {
    let n = waiters.len() as u64 * requests_each;
    crate::common::Wait::new(Duration::from_secs(20), format!("{n} fetches arrived"))
        .until(|| async {
            let (fetches, _) = fetches_and_reads(app).await;
            if fetches >= before.0 + n {
                Ok(())
            } else {
                Err(fetches - before.0)
            }
        })
        .await;
    let page = poll(app, chat, after, 0).await;
    let (fetches, reads) = fetches_and_reads(app).await;
    assert_eq!(
        fetches,
        before.0 + n + 1,
        "only the waiters' fetches and the plain poll: {page}"
    );
    assert_eq!(reads, before.1 + 1, "one read of the chat for every waiter");
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "a waiter was answered before anything was posted"
    );
}

/// Waits until the tail refresher has run twice with a waited-on tail: on an
/// app with a single long-poll, that long-poll is waiting.
async fn wait_for_a_waiting_round(app: &TestApp) {
    let rounds = || async {
        app.metric_sum("chatshard_tail_revision_polls_total", &[])
            .await
    };
    let before = rounds().await;
    crate::common::Wait::new(
        Duration::from_secs(20),
        "two refresher rounds with a waiter",
    )
    .until(|| async {
        let now = rounds().await;
        if now >= before + 2.0 {
            Ok(())
        } else {
            Err(now)
        }
    })
    .await;
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
    // A quick refresher: it is what tells that the waiter below waits.
    let app = TestApp::spawn_with(|s| s.tail.refresh_ms = 100).await;
    let chat = app.new_chat("lp").await;
    assert_eq!(app.join(&chat, "ann").await.status(), StatusCode::CREATED);

    // Nothing after revision 1: the wait ends with an empty page.
    let started = Instant::now();
    let page = poll(&app, &chat, 1, 300).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(revisions(&page), Vec::<u64>::new());
    assert_eq!(page["latestRevision"], 1);

    // A waiter gets the message posted while it waits, long before its wait
    // of 20 s ends. It is the app's only one: refresher rounds that find a
    // waited-on tail, begun after the poll above was answered, find it.
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
    wait_for_a_waiting_round(&app).await;
    assert!(!waiter.is_finished(), "answered before anything was posted");
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
    let app = TestApp::spawn_with(|s| s.admin.token = TOKEN.to_owned()).await;
    let chat = app.new_chat("lp-order").await;
    const WRITERS: usize = 4;
    const POSTS: usize = 40;
    let total = app.join_writers(&chat, WRITERS, POSTS).await;
    let before = fetches_and_reads(&app).await;
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (base, chat) = (app.base.clone(), chat.clone());
            tokio::spawn(
                async move { follow(&base, &chat, 0, total, "&limit=7&waitMs=5000").await },
            )
        })
        .collect();
    // Each reader's first page holds the joins; its second long-poll waits.
    wait_for_waiters(&app, &chat, 0, before, &readers, 2).await;
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
    let before = fetches_and_reads(&app).await;
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (base, chat) = (app.base.clone(), chat.clone());
            tokio::spawn(async move { follow(&base, &chat, 1, 1 + EVENTS, "&waitMs=10000").await })
        })
        .collect();
    wait_for_waiters(&app, &chat, 1, before, &waiters, 1).await;
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
    let reads = fetches_and_reads(&app).await.1 - before.1;
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
    eventually(
        Duration::from_secs(20),
        "the waiters read the chat",
        || async { queries().await > 0 },
    )
    .await;
    let (reads_before, polls_before) = (queries().await, polls().await);
    eventually(Duration::from_secs(20), "ten refresher rounds", || async {
        polls().await >= polls_before + 10.0
    })
    .await;
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
