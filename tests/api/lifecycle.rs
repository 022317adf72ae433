//! The event log's lifecycle on real shards: the purge and its floor, 410
//! `revision_purged` for readers left behind, the snapshot they full-sync
//! from, and the digest check that repairs drift injected behind the
//! service's back.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{self, SseReader, eventually};
use crate::helpers::{TestApp, assert_problem, isolated_settings};

async fn chat(app: &TestApp, chat: &str) -> Value {
    app.chat_body(chat).await
}

async fn metric(app: &TestApp, name: &str, labels: &[&str]) -> f64 {
    common::sum_where(
        &common::metric_samples(&app.http, &app.base, name).await,
        labels,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_keeps_its_floors_and_readers_behind_it_get_410() {
    // Retention off for every chat but this one: the purge walks shared
    // shards, and must touch nothing else.
    let id = crate::helpers::unique("purged");
    let app = TestApp::spawn_with(|s| {
        s.retention.enabled = false;
        s.retention.overrides.insert(
            id.clone(),
            serde_json::from_value(json!({ "enabled": true, "minDays": 5, "minRevisions": 10 }))
                .expect("override"),
        );
        s.purge.interval_ms = 50;
        s.purge.batch_rows = 7;
    })
    .await;
    assert_eq!(app.put_chat(&id, None).await.status(), StatusCode::CREATED);
    app.join_writers(&id, 2, 0).await;
    app.post_concurrently(&id, 2, 24).await; // revisions 1..=50
    let db_shard = app.shard_of(&id).await;
    let mut db = app.db(db_shard).await;
    // Revisions 1..=30 are ten days old (as if written then); 31..=50 are new.
    sqlx::query(
        "UPDATE chat_event SET created_at = DATE_SUB(created_at, INTERVAL 10 DAY) \
         WHERE chat_id = ? AND revision <= 30",
    )
    .bind(&id)
    .execute(&mut db)
    .await
    .expect("backdate");

    // Both floors hold: the age floor keeps 31..=50 although the count floor
    // (10) would let 1..=40 go.
    eventually(Duration::from_secs(20), "the purge", || async {
        chat(&app, &id).await["firstRevision"] == 31
    })
    .await;
    let c = chat(&app, &id).await;
    assert_eq!(c["revision"], 50);
    common::assert_chat_consistent(&mut db, &id).await;
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_event WHERE chat_id = ?")
        .bind(&id)
        .fetch_one(&mut db)
        .await
        .expect("count");
    assert_eq!(stored, 20);
    // Messages stay: a retried post of a purged message's key is answered
    // with the original, not applied again.
    let r = app.post(&id, "w0", "k0", "x").await;
    assert_eq!(r.status(), StatusCode::OK);

    // A reader behind the first stored revision is told to full-sync.
    for after in [0, 29] {
        let r = app
            .get(&format!("/v1/chats/{id}/events?after={after}"))
            .await;
        let p = assert_problem(r, 410, "revision_purged").await;
        assert_eq!(p["firstRevision"], 31);
        assert_eq!(p["snapshot"], format!("/v1/chats/{id}/snapshot"));
    }
    // Long-polls and streams too.
    let r = app
        .get(&format!("/v1/chats/{id}/events?after=3&waitMs=200"))
        .await;
    assert_problem(r, 410, "revision_purged").await;
    let refused = SseReader::open(
        &app.http,
        &app.base,
        &format!("/v1/chats/{id}/events/stream"),
        Some(12),
    )
    .await
    .err()
    .expect("refused");
    assert_problem(refused, 410, "revision_purged").await;
    // From the first stored revision on, pages are whole.
    let r = app.get(&format!("/v1/chats/{id}/events?after=30")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let page: Value = r.json().await.expect("json");
    let revisions = common::page_revisions(&page);
    assert_eq!(revisions, (31..=50).collect::<Vec<_>>());

    // A multiplexed stream following the chat from before its first stored
    // revision gets `removed` with the reason, and the snapshot to load.
    let r = app
        .http
        .post(app.url("/v1/streams"))
        .json(&json!({ "chats": { &id: 2 } }))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let stream = r.json::<Value>().await.expect("json")["streamId"]
        .as_str()
        .expect("id")
        .to_owned();
    let mut reader = SseReader::open(&app.http, &app.base, &format!("/v1/streams/{stream}"), None)
        .await
        .expect("stream");
    let removed = reader
        .next(Duration::from_secs(10))
        .await
        .expect("a message");
    assert_eq!(removed.event.as_deref(), Some("removed"));
    let data: Value = serde_json::from_str(&removed.data).expect("json");
    assert_eq!(data["reason"], "revision_purged");
    assert_eq!(data["after"], 2);

    // Once the age floor is lowered (live), the count floor decides: the
    // last 10 revisions stay.
    let mut config = app.live.load().config.clone();
    config.retention.overrides.insert(
        id.clone(),
        serde_json::from_value(json!({ "enabled": true, "minDays": 0, "minRevisions": 10 }))
            .expect("override"),
    );
    app.live.update(config, "test").expect("valid");
    eventually(Duration::from_secs(20), "the second purge", || async {
        chat(&app, &id).await["firstRevision"] == 41
    })
    .await;
    common::assert_chat_consistent(&mut db, &id).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_what_would_go_and_deletes_nothing() {
    use chatshard::service::lifecycle::purge_shard;
    let settings = isolated_settings("dryrun").await;
    let app = TestApp::spawn_on(settings, |s| {
        s.retention.min_days = 0;
        s.retention.min_revisions = 4;
        // Only the dry run below looks at the log.
        s.purge.interval_ms = 3_600_000;
    })
    .await;
    let a = app.new_chat("dry").await;
    app.join_writers(&a, 1, 9).await;
    app.post_concurrently(&a, 1, 9).await; // 10 revisions: 6 would go
    let b = app.new_chat("dry").await;
    app.join_writers(&b, 1, 2).await;
    app.post_concurrently(&b, 1, 2).await; // 3 revisions: none would go
    let shards = chatshard::app::build_shards(&app.settings).expect("shards");
    let live = chatshard::live::Live::new(app.settings.live());
    let mut events = 0;
    let mut chats = 0;
    for shard in shards.all() {
        let report = purge_shard(shard, &live, &app.settings.purge, true, None).await;
        assert_eq!(report.stopped, None);
        events += report.events;
        chats += report.chats;
    }
    assert_eq!((chats, events), (1, 6));
    assert_eq!(chat(&app, &a).await["firstRevision"], 1);
    assert_eq!(app.all_events(&a).await.len(), 10);
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_and_the_events_after_it_miss_no_join_or_leave() {
    let app = TestApp::spawn().await;
    let id = app.new_chat("snap").await;
    const BEFORE: usize = 300;
    for status in app.join_many(&id, BEFORE).await {
        assert_eq!(status, StatusCode::CREATED);
    }
    // Writers join new users and make early ones leave (and come back)
    // while the snapshot is paged.
    let writers = async {
        for i in 0..120 {
            assert_eq!(
                app.join(&id, &format!("n{i}")).await.status(),
                StatusCode::CREATED
            );
            let old = format!("u{}", (i * 7) % BEFORE);
            let r = app.leave(&id, &old).await;
            assert_eq!(r.status(), StatusCode::NO_CONTENT);
            if i % 3 == 0 {
                app.join(&id, &old).await;
            }
        }
    };
    let reader = async {
        let mut members = BTreeSet::new();
        let mut cursor: Option<String> = None;
        let mut revision = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                None => format!("/v1/chats/{id}/snapshot?limit=20"),
                Some(c) => format!("/v1/chats/{id}/snapshot?limit=20&after={c}"),
            };
            let r = app.get(&path).await;
            assert_eq!(r.status(), StatusCode::OK);
            let page: Value = r.json().await.expect("json");
            if revision.is_none() {
                // The first page is exactly the state at its revision.
                assert_eq!(page["revision"], page["chat"]["revision"]);
            }
            let r = page["revision"].as_u64().expect("revision");
            assert_eq!(*revision.get_or_insert(r), r, "one revision on every page");
            for m in page["members"].as_array().expect("members") {
                assert_eq!(m["state"], "JOINED");
                members.insert(m["userId"].as_str().expect("user").to_owned());
            }
            pages += 1;
            match page["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
            // Let the writers move between pages.
            tokio::task::yield_now().await;
        }
        assert!(pages > 10);
        (members, revision.expect("a page"))
    };
    let ((), (mut members, revision)) = tokio::join!(writers, reader);
    // Apply the events after the snapshot's revision.
    let mut after = revision;
    loop {
        let r = app
            .get(&format!("/v1/chats/{id}/events?after={after}&limit=500"))
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let page: Value = r.json().await.expect("json");
        let events = page["events"].as_array().expect("events");
        if events.is_empty() {
            break;
        }
        for e in events {
            let user = e["userId"].as_str().expect("user").to_owned();
            match e["type"].as_str() {
                Some("MEMBER_JOINED") => {
                    members.insert(user);
                }
                Some("MEMBER_LEFT") => {
                    members.remove(&user);
                }
                _ => {}
            }
            after = e["revision"].as_u64().expect("revision");
        }
    }
    let mut db = app.db(app.shard_of(&id).await).await;
    let truth: BTreeSet<String> = common::joined_users(&mut db, &id)
        .await
        .into_iter()
        .collect();
    assert_eq!(members, truth);
    assert_eq!(app.count(&id).await, truth.len() as u64);

    // Bad cursors are refused clearly.
    for bad in ["x", "1", "1.", ".1", "1.-2", "+1.2"] {
        let r = app
            .get(&format!("/v1/chats/{id}/snapshot?after={bad}"))
            .await;
        assert_problem(r, 422, "invalid_request").await;
    }
    let r = app.get("/v1/chats/no-such-chat-here/snapshot").await;
    assert_problem(r, 404, "chat_not_found").await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digest_check_repairs_injected_drift_once_beside_writers() {
    let settings = isolated_settings("digest").await;
    let app = TestApp::spawn_on(settings, |s| {
        s.digest.interval_ms = 50;
        // Incremental rounds only, but for the sweep every 20th round.
        s.digest.full_sweep_rounds = 20;
        s.digest.chats_per_second = 10_000;
    })
    .await;
    let counted = app.new_chat("drift").await;
    for status in app.join_many(&counted, 40).await {
        assert_eq!(status, StatusCode::CREATED);
    }
    let gapped = app.new_chat("drift").await;
    app.join_writers(&gapped, 1, 10).await;
    app.post_concurrently(&gapped, 1, 10).await; // revisions 1..=11
    let behind = app.new_chat("drift").await;
    app.join_writers(&behind, 1, 4).await;
    app.post_concurrently(&behind, 1, 4).await; // revisions 1..=5
    let rounds = metric(&app, "chatshard_digest_rounds_total", &[]).await;
    eventually(Duration::from_secs(10), "two digest rounds", || async {
        metric(&app, "chatshard_digest_rounds_total", &[]).await >= rounds + 6.0
    })
    .await;
    assert_eq!(
        metric(&app, "chatshard_digest_repairs_total", &[]).await,
        0.0
    );

    // Behind the service's back: a count that is off, a JOINED row deleted,
    // an event deleted from the middle of a log, a revision set back.
    let mut db = app.db(app.shard_of(&counted).await).await;
    sqlx::query("UPDATE chat_member_count SET member_count = member_count + 7 WHERE chat_id = ?")
        .bind(&counted)
        .execute(&mut db)
        .await
        .expect("corrupt count");
    sqlx::query("DELETE FROM chat_member WHERE chat_id = ? AND user_id = 'u3'")
        .bind(&counted)
        .execute(&mut db)
        .await
        .expect("delete member");
    let mut db2 = app.db(app.shard_of(&gapped).await).await;
    sqlx::query("DELETE FROM chat_event WHERE chat_id = ? AND revision = 6")
        .bind(&gapped)
        .execute(&mut db2)
        .await
        .expect("delete event");
    let mut db3 = app.db(app.shard_of(&behind).await).await;
    sqlx::query("UPDATE chat SET revision = 2 WHERE chat_id = ?")
        .bind(&behind)
        .execute(&mut db3)
        .await
        .expect("set back");

    // Writers keep joining the first chat while the check runs: none is
    // disturbed, and its changes lead the incremental round to it.
    let writers = futures::future::join_all((0..4).map(|w| {
        let (app, chat) = (&app, &counted);
        async move {
            for i in 0..25 {
                let r = app.join(chat, &format!("j{w}-{i}")).await;
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        }
    }));
    let repaired = eventually(Duration::from_secs(30), "the repairs", || async {
        let kinds = ["count", "revision", "events_missing"];
        let mut all = true;
        for kind in kinds {
            all &= metric(
                &app,
                "chatshard_digest_repairs_total",
                &[&format!("kind=\"{kind}\"")],
            )
            .await
                >= 1.0;
        }
        all
    });
    tokio::join!(writers, repaired);

    // Each drift was repaired once: a few more rounds find nothing.
    let rounds = metric(&app, "chatshard_digest_rounds_total", &[]).await;
    eventually(Duration::from_secs(10), "more rounds", || async {
        metric(&app, "chatshard_digest_rounds_total", &[]).await >= rounds + 25.0 * 3.0
    })
    .await;
    for kind in ["count", "revision", "events_missing"] {
        assert_eq!(
            metric(
                &app,
                "chatshard_digest_repairs_total",
                &[&format!("kind=\"{kind}\"")]
            )
            .await,
            1.0,
            "{kind} repaired once"
        );
    }
    assert_eq!(app.count_and_rows(&counted).await, (139, 139));
    // The log with a hole: readers behind it full-sync; it is whole above.
    assert_eq!(chat(&app, &gapped).await["firstRevision"], 7);
    let r = app.get(&format!("/v1/chats/{gapped}/events?after=2")).await;
    assert_problem(r, 410, "revision_purged").await;
    common::assert_chat_consistent(&mut db2, &gapped).await;
    // The revision set back is the log's again, and the next write lands
    // after it instead of colliding.
    assert_eq!(chat(&app, &behind).await["revision"], 5);
    assert_eq!(
        app.post(&behind, "w0", "after-repair", "x").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(chat(&app, &behind).await["revision"], 6);
    common::assert_chat_consistent(&mut db3, &behind).await;
    app.shut_down().await;
}
