//! A bucket range moves to another shard online, as a range (bulk copy,
//! catch-up passes, one fence, the flip), under writes and creations
//! through an instance that routes by the old table; every instance follows
//! the new table (at once when a shard names the new owner, or from its
//! first poll), and nothing is lost. A range move cancelled midway drops
//! its copies and the table stays; a killed `chatshard move-buckets`
//! process is taken over by an instance, which runs the move to its end
//! or, when a cancel was asked, rolls it back.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common;
use crate::helpers::{TestApp, assert_problem, isolated_settings, unique};
use crate::move_kit::{
    TOKEN, fill, kill_cli_when, messages_of, move_to_end, past_503, row_on, wait_bucket_move,
    writer,
};

/// Chat ids of this test process whose bucket is within `first..=last`, `n`
/// of them.
fn chats_in_buckets(prefix: &str, first: u16, last: u16, n: usize) -> Vec<String> {
    let mut found = Vec::new();
    let mut i = 0;
    while found.len() < n {
        let id = unique(&format!("{prefix}{i}"));
        let bucket = chatshard::routing::bucket_of(&chatshard::domain::ChatId::parse(&id).unwrap());
        if (first..=last).contains(&bucket) {
            found.push(id);
        }
        i += 1;
    }
    found
}

/// `n` chats of buckets 256-511, made and filled with `batches` of `per`
/// joins each.
async fn range_chats(
    app: &TestApp,
    prefix: &str,
    n: usize,
    (batches, per): (usize, usize),
) -> Vec<String> {
    let chats = chats_in_buckets(prefix, 256, 511, n);
    for chat in &chats {
        assert!(app.put_chat(chat, None).await.status().is_success());
        fill(app, chat, batches, per).await;
    }
    chats
}

/// Shards of a test's own (the bucket table they store is the test's),
/// three of them: the first owns `0-511`, the second `512-1023`, the third
/// nothing yet.
async fn range_settings(tag: &str) -> chatshard::config::Settings {
    let mut base = isolated_settings(tag).await;
    base.shards[0].buckets = vec!["0-511".to_owned()];
    base.shards[1].buckets = vec!["512-1023".to_owned()];
    base.shards[2].buckets = vec![];
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_range_moves_to_a_new_shard_online_and_every_instance_follows() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Shards of their own: the bucket table they store is this test's.
    let base = range_settings("buckets").await;
    let names: Vec<String> = base.shards.iter().map(|s| s.name.clone()).collect();
    let (old, other, new) = (names[0].clone(), names[1].clone(), names[2].clone());
    let app = Arc::new(
        TestApp::spawn_on(base.clone(), |s| {
            s.admin.token = TOKEN.to_owned();
            s.moves.map_poll_ms = 200;
        })
        .await,
    );
    // An instance that routes by version 1 until a shard tells it otherwise.
    let stale = Arc::new(
        TestApp::spawn_on(base.clone(), |s| {
            s.admin.token = TOKEN.to_owned();
            s.moves.map_poll_ms = 60_000;
        })
        .await,
    );
    // And one that reads nothing until after the move: its first requests
    // meet the old shard's answers.
    let sleeper = TestApp::spawn_on(base.clone(), |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.map_poll_ms = 3_600_000;
    })
    .await;
    assert_eq!(app.admin_get("/v1/admin/buckets").await["version"], 1);

    // The range's chats, with members and messages; two of them are written
    // to throughout the move, one was moved to a third shard before.
    let moving = chats_in_buckets("bm", 256, 511, 10);
    let staying = chats_in_buckets("bs", 0, 255, 3);
    for chat in moving.iter().chain(&staying) {
        assert!(app.put_chat(chat, None).await.status().is_success());
        fill(&app, chat, 2, 10).await;
        assert_eq!(
            app.post(chat, "m0-0", "before", "before the move")
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    let elsewhere = &moving[9];
    assert_eq!(move_to_end(&app, elsewhere, &other).await["phase"], "done");

    // Bad requests first.
    let post = |body: Value| {
        app.admin(Method::POST, "/v1/admin/bucket-moves")
            .json(&body)
            .send()
    };
    let r = post(json!({"buckets": "511-256", "to": new}))
        .await
        .unwrap();
    assert_problem(r, 422, "invalid_request").await;
    let r = post(json!({"buckets": "256-511", "to": "no-such-shard"}))
        .await
        .unwrap();
    assert_problem(r, 422, "unknown_shard").await;
    let r = post(json!({"buckets": "500-600", "to": new}))
        .await
        .unwrap();
    assert_problem(r, 409, "move_refused").await;
    let r = post(json!({"buckets": "256-511", "to": old}))
        .await
        .unwrap();
    assert_problem(r, 409, "move_refused").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        tokio::spawn(writer(app.clone(), moving[0].clone(), "wa", stop.clone())),
        tokio::spawn(writer(stale.clone(), moving[1].clone(), "wb", stop.clone())),
    ];
    // New chats of the range keep being created through the stale instance
    // (a fenced range answers 503 chat_moving: retried).
    let creator = {
        let (stale, stop) = (stale.clone(), stop.clone());
        tokio::spawn(async move {
            let mut created = Vec::new();
            let mut candidates = chats_in_buckets("bn", 256, 511, 400).into_iter();
            while !stop.load(Ordering::Relaxed) {
                let Some(chat) = candidates.next() else { break };
                let (r, _) = past_503(&format!("PUT {chat}"), || stale.put_chat(&chat, None)).await;
                assert!(
                    matches!(r.status().as_u16(), 200 | 201),
                    "PUT {chat}: {}",
                    r.status()
                );
                created.push(chat);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            created
        })
    };
    let r = post(json!({"buckets": "256-511", "to": new}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let started: Value = r.json().await.unwrap();
    assert_eq!(started["source"], old.as_str());
    // One range move at a time.
    let r = post(json!({"buckets": "300-301", "to": other}))
        .await
        .unwrap();
    assert_problem(r, 409, "move_refused").await;
    let ended = wait_bucket_move(&app, started["id"].as_u64().unwrap()).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(ended["version"], 2, "{ended}");
    // The view says where the move's time went: the bulk copy timed as a
    // pass, the digest check (run beside the passes) with the chats it
    // compared, the flip's time and the clean-up's.
    let stats = &ended["stats"];
    assert!(stats["bulk"]["chats"].as_u64().unwrap() > 0, "{ended}");
    assert!(stats["bulk"]["writeMs"].is_u64(), "{ended}");
    assert!(stats["chatsVerified"].as_u64().unwrap() > 0, "{ended}");
    assert!(stats["verifyMs"].is_u64(), "{ended}");
    let flipped = stats["flipSeconds"].as_f64().unwrap();
    assert!(flipped >= stats["copySeconds"].as_f64().unwrap(), "{ended}");
    assert!(stats["cleanSeconds"].is_f64(), "{ended}");
    // The copies were made live once, a statement per stretch of the range
    // (four), by the driver that flipped it: not again before its clean-up.
    let live = app
        .metric_sum(
            "chatshard_shard_operation_duration_seconds_count",
            &["operation=\"bucket_go_live\"", "outcome=\"ok\""],
        )
        .await;
    assert_eq!(live, 4.0, "{ended}");
    for pass in stats["passes"].as_array().unwrap() {
        for k in ["diffMs", "readMs", "writeMs", "pauseMs"] {
            assert!(pass[k].is_u64(), "{k} of {pass}");
        }
    }
    let mut acknowledged = Vec::new();
    for w in writers {
        acknowledged.push(w.await.unwrap());
    }
    let created = creator.await.unwrap();
    assert!(!created.is_empty());

    // The new table, on the mover and, after its first answer from a shard
    // that names the new owner, on the stale instance.
    let table = app.admin_get("/v1/admin/buckets").await;
    assert_eq!(table["version"], 2, "{table}");
    let owned = |shard: &str| {
        table["shards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["shard"] == shard)
            .unwrap()["buckets"]
            .clone()
    };
    assert_eq!(owned(&old), json!(["0-255"]));
    assert_eq!(owned(&new), json!(["256-511"]));
    assert_eq!(sleeper.admin_get("/v1/admin/buckets").await["version"], 1);
    // Through the sleeper: a moved chat is found through its tombstone, and
    // a new chat of the range is created on the new shard, never the old.
    let got: Value = sleeper
        .get(&format!("/v1/chats/{}", moving[2]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["shard"], new.as_str(), "{got}");
    let late = chats_in_buckets("bl", 256, 511, 1).remove(0);
    assert_eq!(
        sleeper.put_chat(&late, None).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(sleeper.join(&late, "u").await.status(), StatusCode::CREATED);
    common::eventually(
        Duration::from_secs(10),
        "the sleeper follows version 2",
        || {
            let sleeper = &sleeper;
            async move { sleeper.admin_get("/v1/admin/buckets").await["version"] == 2 }
        },
    )
    .await;
    // A new instance follows the newest version from its first poll.
    let fresh = TestApp::spawn_on(base.clone(), |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.map_poll_ms = 100;
    })
    .await;
    common::eventually(
        Duration::from_secs(10),
        "a new instance follows version 2",
        || {
            let fresh = &fresh;
            async move { fresh.admin_get("/v1/admin/buckets").await["version"] == 2 }
        },
    )
    .await;

    // Every chat of the range is whole on the new shard; the old one holds
    // only tombstones; nothing of the writers' is lost.
    let (mut old_db, mut new_db) = (app.db(0).await, app.db(2).await);
    for chat in moving[..9].iter().chain(&created).chain([&late]) {
        assert_eq!(
            fresh
                .get(&format!("/v1/chats/{chat}"))
                .await
                .json::<Value>()
                .await
                .unwrap()["shard"],
            new.as_str(),
            "{chat}"
        );
        let (_, marker, _) = row_on(&mut new_db, chat).await.expect("on the new shard");
        assert_eq!(marker, None, "{chat} is live on the new shard");
        common::assert_chat_consistent(&mut new_db, chat).await;
        match row_on(&mut old_db, chat).await {
            None => {}
            Some((_, marker, joined)) => {
                assert_eq!(marker.as_deref(), Some(new.as_str()), "{chat}");
                assert_eq!(joined, 0, "{chat}'s rows are cleaned from the old shard");
            }
        }
    }
    for (i, (joined, posted, _)) in acknowledged.iter().enumerate() {
        let members = common::joined_users(&mut new_db, &moving[i]).await;
        for user in joined {
            assert!(members.contains(user), "{user} of {} lost", moving[i]);
        }
        assert_eq!(
            messages_of(&mut new_db, &moving[i]).await as usize,
            posted.len() + 1,
            "{}",
            moving[i]
        );
    }
    // The chat that lived on a third shard is found from its new home.
    let (_, marker, _) = row_on(&mut new_db, elsewhere).await.expect("a marker");
    assert_eq!(marker.as_deref(), Some(other.as_str()));
    let got: Value = fresh
        .get(&format!("/v1/chats/{elsewhere}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(got["shard"], other.as_str());
    assert_eq!(got["memberCount"], 20);
    // The chats outside the range did not move.
    for chat in &staying {
        let (_, marker, joined) = row_on(&mut old_db, chat).await.expect("stays");
        assert_eq!((marker, joined), (None, 20), "{chat}");
    }
    // The list shows the move.
    let list = app.admin_get("/v1/admin/bucket-moves").await;
    assert_eq!(list["moves"][0]["id"], started["id"]);
    assert!(ended["chatsMoved"].as_u64().unwrap() >= 9, "{ended}");
    fresh.shut_down().await;
    sleeper.shut_down().await;
}

/// Waits for range move `id` to end `cancelled` with every chat back: the
/// table still at version 1, and each of `chats` (5 members) whole on the
/// first shard, taking a join there. The move.
async fn cancelled_and_back(app: &TestApp, id: u64, chats: &[String]) -> Value {
    let ended = wait_bucket_move(app, id).await;
    assert_eq!(ended["phase"], "cancelled", "{ended}");
    assert!(
        ended.get("error").is_none(),
        "every chat came back: {ended}"
    );
    assert_eq!(app.admin_get("/v1/admin/buckets").await["version"], 1);
    let mut db = app.db(0).await;
    let mut target = app.db(2).await;
    for chat in chats {
        assert_eq!(app.shard_of(chat).await, 0, "{chat}");
        // The copy on the target was dropped.
        assert_eq!(row_on(&mut target, chat).await, None, "{chat}");
        let (_, moved_to, joined) = row_on(&mut db, chat).await.expect("row on the source");
        assert_eq!((moved_to, joined), (None, 5), "{chat}");
        common::assert_chat_consistent(&mut db, chat).await;
        assert_eq!(app.join(chat, "after").await.status(), StatusCode::CREATED);
        assert_eq!(common::count_and_rows(&mut db, chat).await, (6, 6));
    }
    ended
}

/// A range move of `256-511` to the third shard, run by a `chatshard
/// move-buckets` process (a slow copy: one chat per batch, 300 ms apart)
/// that is SIGKILLed once it copied `moved` chats; the instance that takes
/// it over (1 s lease).
async fn range_move_killed_after(
    tag: &str,
    moved: u64,
    fill: (usize, usize),
) -> (TestApp, Vec<String>, String) {
    let base = range_settings(tag).await;
    let app = TestApp::spawn_on(base.clone(), |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 1000;
        s.moves.fence_ms = 500;
        s.moves.map_poll_ms = 100;
    })
    .await;
    let chats = range_chats(&app, tag, 8, fill).await;
    let mut settings = base.clone();
    settings.moves.batch_revisions = 5;
    settings.moves.concurrent_chats = 1;
    settings.moves.pause_ms = 300;
    settings.moves.lease_ms = 1000;
    settings.moves.fence_ms = 500;
    let new = base.shards[2].name.clone();
    kill_cli_when(
        &settings,
        &["move-buckets", "256-511", "--to", &new],
        |line| {
            // "  copying (N of M chat(s) moved)", or "fenced (...", N at
            // least `moved`: the range move is under way.
            let line = line.trim_start();
            line.strip_prefix("copying (")
                .or_else(|| line.strip_prefix("fenced ("))
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n >= moved)
        },
    );
    (app, chats, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_range_move_whose_mover_died_is_rolled_back_by_another_instance() {
    let (app, chats, _) = range_move_killed_after("bucketcancelkill", 2, (1, 5)).await;
    // The cancel reaches the dead mover's record; the instance that takes
    // the move over finds it and moves the chats back.
    let r = app
        .admin(Method::DELETE, "/v1/admin/bucket-moves/1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    cancelled_and_back(&app, 1, &chats).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_move_buckets_process_is_taken_over_and_the_range_moves_to_the_end() {
    // Killed once it moved a chat of the range.
    let (app, chats, new) = range_move_killed_after("bucketkill", 1, (4, 10)).await;

    // The instance takes the range move over and runs it to its end.
    let ended = wait_bucket_move(&app, 1).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.admin_get("/v1/admin/buckets").await["version"], 2);
    let mut new_db = app.db(2).await;
    let mut old_db = app.db(0).await;
    for chat in &chats {
        assert_eq!(
            app.get(&format!("/v1/chats/{chat}"))
                .await
                .json::<Value>()
                .await
                .unwrap()["shard"],
            new.as_str()
        );
        common::assert_chat_consistent(&mut new_db, chat).await;
        assert_eq!(
            common::count_and_rows(&mut new_db, chat).await,
            (40, 40),
            "{chat}"
        );
        let (_, marker, joined) = row_on(&mut old_db, chat).await.expect("tombstone");
        assert_eq!(
            (marker.as_deref(), joined),
            (Some(new.as_str()), 0),
            "{chat}"
        );
    }
    // The range moved as a range: no chat move was recorded for it, and
    // the takeover went on from the copies the killed process made.
    let moves = app.admin_get("/v1/admin/moves").await;
    assert_eq!(moves["moves"].as_array().map(Vec::len), Some(0), "{moves}");
    // The view's figures are the last driver's: the range's chats, and
    // how long its one fence held their writes.
    assert_eq!(ended["chatsTotal"], 8, "{ended}");
    let fence = ended["stats"]["fenceMs"].as_u64();
    assert!(fence.is_some(), "{ended}");
    // Where the fence went: its steps add up to no more than the fence
    // (each rounded down to a millisecond).
    let steps = &ended["stats"]["fenceSteps"];
    let within: Vec<u64> = ["diffMs", "passMs", "checkMs", "flipMs"]
        .iter()
        .map(|k| steps[k].as_u64().unwrap_or(u64::MAX))
        .collect();
    assert!(
        within.iter().sum::<u64>() <= fence.unwrap_or(0) + 1,
        "{ended}"
    );
    assert!(
        steps["setMs"].as_u64().is_some() && steps["liveMs"].as_u64().is_some(),
        "{ended}"
    );
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_move_cancelled_midway_moves_its_chats_back_and_the_table_stays() {
    let base = range_settings("bucketcancel").await;
    let new = base.shards[2].name.clone();
    // One chat per batch, a third of a second apart: the cancel lands
    // with some of the range's chats copied and most not.
    let app = TestApp::spawn_on(base, |s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.map_poll_ms = 200;
        // A batch is about five times this in rows: one 11-row chat.
        s.moves.batch_revisions = 2;
        s.moves.concurrent_chats = 1;
        s.moves.pause_ms = 300;
    })
    .await;
    let chats = range_chats(&app, "bc", 12, (1, 5)).await;
    let start = || async {
        let r = app
            .admin(Method::POST, "/v1/admin/bucket-moves")
            .json(&json!({"buckets": "256-511", "to": new}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        r.json::<Value>().await.unwrap()["id"].as_u64().expect("id")
    };
    let id = start().await;
    let path = format!("/v1/admin/bucket-moves/{id}");
    common::eventually(
        Duration::from_secs(60),
        "two chats of the range copied",
        || async { app.admin_get(&path).await["chatsMoved"].as_u64() >= Some(2) },
    )
    .await;
    let r = app.admin(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let asked: Value = r.json().await.unwrap();
    assert_eq!(asked["cancelRequested"], true, "{asked}");
    // Asking again while it winds down is answered the same.
    let again = app.admin(Method::DELETE, &path).send().await.unwrap();
    assert!(
        again.status() == StatusCode::ACCEPTED || again.status() == StatusCode::CONFLICT,
        "{}",
        again.status()
    );

    let ended = cancelled_and_back(&app, id, &chats).await;
    assert!(ended["chatsMoved"].as_u64() < Some(12), "{ended}");
    // An ended move cannot be cancelled; an unknown one is not found.
    let r = app.admin(Method::DELETE, &path).send().await.unwrap();
    assert_problem(r, 409, "move_refused").await;
    let r = app
        .admin(Method::DELETE, "/v1/admin/bucket-moves/987654321")
        .send()
        .await
        .unwrap();
    assert_problem(r, 404, "not_found").await;
    // And the range can move again, to the end this time.
    let done = wait_bucket_move(&app, start().await).await;
    assert_eq!(done["phase"], "done", "{done}");
    assert_eq!(app.shard_of(&chats[0]).await, 2);
    app.shut_down().await;
}
