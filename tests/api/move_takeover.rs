//! A move whose driver died or failed is never left half done: an
//! instance takes an abandoned move over once its lease ran out (one
//! instance, by a compare-and-set that makes it the next driver, whose
//! switch alone goes through) and resumes it from the target's copy, or
//! finishes a switch left between its steps; a switch whose last step fails
//! is retried to its end, never rolled back. The abandoned moves are
//! recorded here by hand, as a driver that died would leave them.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::common;
use crate::helpers::TestApp;
use crate::move_kit::{
    TOKEN, abandoned_move, copy_chat, driver_of_last_move, end_move_record, ended_move_of, fence,
    home_and_next, join_each, lock_chat_row, mark, marker_of, member_rows, move_to_end,
    move_updated_at, request_move, started_id, unfence, verified_move, wait_move, whole_with,
};

/// A chat of 5 members copied to the next shard, the copy still marked as
/// held by the source: what a move's driver leaves when it dies after its
/// copy; on an instance that takes abandoned moves over after 1 s.
struct Copied {
    app: TestApp,
    chat: String,
    home: usize,
    home_name: String,
    target_name: String,
    old: MySqlConnection,
    new: MySqlConnection,
}

async fn copied_by_a_dead_driver(prefix: &str) -> Copied {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 1000;
        // A fenced write is answered at once: the takeover (after 1 s) must
        // not lift the fence while a held write waits.
        s.moves.hold_writes_ms = 0;
        s.moves.fence_ms = 200;
    })
    .await;
    let chat = app.new_chat(prefix).await;
    join_each(&app, &chat, "u", 5).await;
    let (home, target) = home_and_next(&app, &chat).await;
    let (home_name, target_name) = (
        app.settings.shards[home].name.clone(),
        app.settings.shards[target].name.clone(),
    );
    let mut old = app.db(home).await;
    let mut new = app.db(target).await;
    copy_chat(&mut old, &mut new, &chat).await;
    mark(&mut new, &chat, Some(&home_name)).await;
    Copied {
        app,
        chat,
        home,
        home_name,
        target_name,
        old,
        new,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_abandoned_before_its_switch_is_resumed_and_ends_on_its_target() {
    let Copied {
        app,
        chat,
        home,
        home_name,
        target_name,
        mut old,
        mut new,
    } = copied_by_a_dead_driver("abandoned").await;
    let target = app
        .settings
        .shards
        .iter()
        .position(|s| s.name == target_name)
        .expect("target");
    // Its driver died fenced, with the copy made: the source's fence holds
    // for a minute, longer than the move's lease.
    fence(&mut old, &chat, 60_000).await;
    abandoned_move(&mut old, &chat, &home_name, &target_name, "fenced").await;
    let r = app.join(&chat, "while-fenced").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.expect("problem");
    assert_eq!(body["code"], "chat_moving");
    assert!(body["detail"].is_string());

    // The instance takes the move over and resumes it from the target's
    // copy: fenced again (its own, shorter fence), verified and switched.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(ended["cancelRequested"], false, "{ended}");
    assert_eq!(
        driver_of_last_move(&mut old, &chat).await,
        1,
        "driven to its end by the instance that took it over"
    );
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    assert_eq!(app.shard_of(&chat).await, target);
    whole_with(&mut new, &chat, 6).await;
    assert_eq!(
        member_rows(&mut old, &chat).await,
        0,
        "the source is cleaned"
    );
    assert_ne!(home, target);
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_taken_over_cannot_switch_for_its_old_driver_even_with_its_fence_live() {
    use chatshard::storage::moves::{Standing, SwitchStep, claim, set_phase, switch_source};
    // A driver that was only slow comes back at its switch after another
    // instance took its move over: the takeover made the record name the
    // next driver, which stops the old one where a live fence and the
    // verified revision would have let it through. The new driver's switch
    // goes through.
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 600_000;
    })
    .await;
    let chat = app.new_chat("takenover").await;
    assert_eq!(app.join(&chat, "u").await.status(), StatusCode::CREATED);
    let home = app.shard_of(&chat).await;
    let shards = &app.settings.shards;
    let (home_name, to) = (
        shards[home].name.clone(),
        shards[(home + 1) % shards.len()].name.clone(),
    );
    let mut db = app.db(home).await;
    fence(&mut db, &chat, 60_000).await;
    let id = verified_move(&mut db, &chat, &home_name, &to).await;
    let seen = move_updated_at(&mut db, id).await;
    let now = chrono::Utc::now().naive_utc();
    let driver = claim(&mut db, id, seen, now).await.expect("claim");
    assert_eq!(driver, Some(1), "the takeover is the move's second driver");
    assert_eq!(
        claim(&mut db, id, seen, now).await.expect("claim"),
        None,
        "one instance takes a move over"
    );
    // The old driver: its switch and its record writes are refused.
    let mut tx = db.begin().await.expect("tx");
    let step = switch_source(&mut tx, (id, 0), &chat, &to, 1, now)
        .await
        .expect("switch");
    tx.commit().await.expect("commit");
    assert_eq!(step, SwitchStep::Superseded);
    assert_eq!(marker_of(&mut db, &chat).await, None, "no tombstone");
    let standing = set_phase(&mut db, (id, 0), "copying", (7, 7), None, false, now)
        .await
        .expect("record");
    assert_eq!(standing, Standing::Superseded);
    let view = app
        .admin_get(&format!("/v1/admin/moves/{home_name}:{id}"))
        .await;
    assert_eq!(view["phase"], "verified", "{view}");
    assert_eq!(view["rowsCopied"], 0, "{view}");
    assert_eq!(view["cancelRequested"], false, "{view}");
    // The new driver's switch goes through.
    let mut tx = db.begin().await.expect("tx");
    let step = switch_source(&mut tx, (id, 1), &chat, &to, 1, now)
        .await
        .expect("switch");
    tx.rollback().await.expect("rollback");
    assert_eq!(step, SwitchStep::Done);
    unfence(&mut db, &chat).await;
    end_move_record(&mut db, id).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_abandoned_inside_its_switch_is_finished_by_another_instance() {
    let Copied {
        app,
        chat,
        home_name,
        target_name,
        mut old,
        mut new,
        ..
    } = copied_by_a_dead_driver("half-switched").await;
    // Its driver died between the switch's first step (the tombstone at the
    // source) and its second (the target made live): each marker names the
    // other, and the chat answers 503 until the move is finished.
    mark(&mut old, &chat, Some(&target_name)).await;
    abandoned_move(&mut old, &chat, &home_name, &target_name, "verified").await;

    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    let body: Value = app.chat_body(&chat).await;
    assert_eq!(body["shard"], json!(target_name));
    whole_with(&mut new, &chat, 6).await;
    assert_eq!(
        member_rows(&mut old, &chat).await,
        0,
        "the source is cleaned"
    );
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_whose_last_step_fails_is_retried_to_the_end_not_rolled_back() {
    // A write stuck behind a row lock gives up after 1 s (error 1205).
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.pool.lock_wait_timeout_secs = 1;
        s.pool.operation_timeout_ms = 3000;
    })
    .await;
    let chat = app.new_chat("switchretry").await;
    join_each(&app, &chat, "u", 5).await;
    let home = app.shard_of(&chat).await;
    let first = (home + 1) % app.settings.shards.len();
    let target = (home + 2) % app.settings.shards.len();
    let moved = move_to_end(&app, &chat, &app.settings.shards[first].name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    // The home's row locked from outside: the switch's last step (the
    // home's marker) fails, after its first two went in.
    let mut at_home = app.db(home).await;
    let lock = lock_chat_row(&mut at_home, &chat).await;
    let home_label = format!("shard=\"{}\"", app.settings.shards[home].name);
    let contended = || async {
        common::sum_where(
            &common::metric_samples(&app.http, &app.base, "chatshard_shard_operations_total").await,
            &[&home_label, "outcome=\"chat_contended\""],
        )
    };
    let id = started_id(request_move(&app, &chat, &app.settings.shards[target].name).await).await;
    common::eventually(
        Duration::from_secs(20),
        "the home's marker refused",
        || async { contended().await >= 1.0 },
    )
    .await;
    lock.rollback().await.expect("release");
    // Retried until done: the chat's only live copy is not dropped.
    let ended = wait_move(&app, &id).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(
        marker_of(&mut at_home, &chat).await,
        Some(app.settings.shards[target].name.clone())
    );
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 6).await;
    app.shut_down().await;
}
