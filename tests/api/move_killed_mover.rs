//! A `chatshard move-chat` process SIGKILLed in any phase of its move
//! (copying, fenced, inside its switch, cleaning) loses nothing: the chat's
//! writes meanwhile are taken at its source or refused (never lost), and an
//! instance takes the move over after its lease and runs it to its end,
//! the chat whole on its target and its source cleaned.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, assert_problem, settings, unique};
use crate::move_kit::{
    TOKEN, driver_of_last_move, ended_move_of, fill, home_and_next, kill_cli_when, lock_chat_row,
    marker_of, member_rows, move_to_end, rows_in, whole_with,
};

/// Runs `chatshard move-chat CHAT --to SHARD` on the shared shards' settings
/// as `configure` leaves them, and SIGKILLs it once it prints `phase`.
fn kill_mover_in(
    chat: &str,
    to: &str,
    phase: &str,
    configure: impl FnOnce(&mut chatshard::config::MovesSettings),
) {
    let mut settings = settings();
    configure(&mut settings.moves);
    kill_cli_when(&settings, &["move-chat", chat, "--to", to], |line| {
        line.contains(phase)
    });
}

/// Waits for the instance to take the dead mover's move over and resume it
/// to its end; then the chat is whole on `target` (3,001 members == rows,
/// the last one joined after the move) and nothing is left on `home`.
async fn resumed_and_whole(app: &TestApp, chat: &str, home: usize, target: usize) {
    let ended = ended_move_of(app, chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.join(chat, "after").await.status(), StatusCode::CREATED);
    assert_eq!(app.shard_of(chat).await, target);
    let mut new = app.db(target).await;
    whole_with(&mut new, chat, 3001).await;
    let mut old = app.db(home).await;
    assert!(driver_of_last_move(&mut old, chat).await >= 1, "taken over");
    assert_eq!(
        member_rows(&mut old, chat).await,
        0,
        "the source is cleaned"
    );
}

/// The instance that takes a dead mover's move over (a 1 s lease, fenced
/// writes held for `hold_writes_ms`), and a chat on it with 3,000 members:
/// enough revisions for a copy in small batches to take a while. The chat,
/// its shard and the next one.
async fn chat_for_a_killed_mover(
    prefix: &str,
    hold_writes_ms: u64,
) -> (TestApp, String, usize, usize) {
    let app = TestApp::spawn_with(|s| {
        s.admin.token = TOKEN.to_owned();
        s.moves.lease_ms = 1000;
        s.moves.fence_ms = 500;
        s.moves.hold_writes_ms = hold_writes_ms;
        s.join_throttle.enabled = false;
    })
    .await;
    let chat = unique(prefix);
    let r = app
        .put_chat(&chat, Some(json!({"maxMembers": 100000})))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    fill(&app, &chat, 30, 100).await;
    let (home, target) = home_and_next(&app, &chat).await;
    (app, chat, home, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_mid_copy_is_resumed_by_the_instance() {
    let (app, chat, home, target) = chat_for_a_killed_mover("killed", 800).await;
    let target_name = app.settings.shards[target].name.clone();
    kill_mover_in(&chat, &target_name, "copying", |m| {
        m.batch_revisions = 50;
        m.pause_ms = 20;
    });
    // Killed inside its copy: the chat takes writes at its source meanwhile.
    assert_eq!(
        app.join(&chat, "meanwhile").await.status(),
        StatusCode::CREATED
    );

    // The instance takes the abandoned move over and resumes the copy where
    // the target stands, to the end.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(app.shard_of(&chat).await, target);
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 3001).await;
    // And it moves back home.
    let back = move_to_end(&app, &chat, &app.settings.shards[home].name).await;
    assert_eq!(back["phase"], "done", "{back}");
    let mut old = app.db(home).await;
    whole_with(&mut old, &chat, 3001).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_while_fenced_is_resumed_and_the_chat_ends_on_its_target() {
    // A fenced write is answered at once.
    let (app, chat, home, target) = chat_for_a_killed_mover("fencekill", 0).await;
    let target_name = app.settings.shards[target].name.clone();
    // The mover fences at once and copies the whole log under its fence in
    // small batches (a long fenced phase); the fence outlasts the copy.
    kill_mover_in(&chat, &target_name, "fenced", |m| {
        m.fence_lag = 1_000_000;
        m.batch_revisions = 10;
        m.fence_ms = 30_000;
        m.lease_ms = 60_000;
    });
    // Killed inside its fence: the chat's writes are refused, not lost.
    let r = app.join(&chat, "while-fenced").await;
    assert_problem(r, 503, "chat_moving").await;

    // The instance takes the move over once its lease ran out (1 s), and
    // resumes it: the rest of the copy, its own fence, the switch.
    resumed_and_whole(&app, &chat, home, target).await;
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_inside_its_switch_is_finished_by_the_instance() {
    let (app, chat, home, first) = chat_for_a_killed_mover("switchkill", 800).await;
    // The chat lives on a shard that is not its home: a move from there has
    // a third switch step, the marker at its home.
    let moved = move_to_end(&app, &chat, &app.settings.shards[first].name).await;
    assert_eq!(moved["phase"], "done", "{moved}");
    let target = (0..app.settings.shards.len())
        .find(|i| *i != home && *i != first)
        .expect("a third shard");
    let target_name = app.settings.shards[target].name.clone();
    // The home's chat row held locked from outside: the switch's last step
    // waits on it, so the mover is killed inside its switch, with the
    // tombstone at the source and the target live.
    let mut at_home = app.db(home).await;
    let lock = lock_chat_row(&mut at_home, &chat).await;
    kill_mover_in(&chat, &target_name, "switching", |_| {});
    // Meanwhile the chat is read and written where it now is: its old shard's
    // tombstone leads there.
    assert_eq!(
        app.join(&chat, "inside-the-switch").await.status(),
        StatusCode::CREATED
    );
    lock.rollback().await.expect("release");
    // The instance takes the move over after its lease and finishes the
    // switch (the home's marker) and the clean-up.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    assert_eq!(ended["target"], json!(target_name), "{ended}");
    assert_eq!(
        marker_of(&mut at_home, &chat).await.as_deref(),
        Some(target_name.as_str())
    );
    assert_eq!(app.shard_of(&chat).await, target);
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 3001).await;
    let mut old = app.db(first).await;
    assert_eq!(
        member_rows(&mut old, &chat).await,
        0,
        "the source is cleaned"
    );
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_process_killed_while_cleaning_is_finished_by_the_instance() {
    let (app, chat, home, target) = chat_for_a_killed_mover("cleankill", 800).await;
    let target_name = app.settings.shards[target].name.clone();
    // The clean-up of the source in small, paced deletes (seconds for the
    // 3,000 members and their events), so the kill lands inside it.
    kill_mover_in(&chat, &target_name, "cleaning", |m| {
        m.clean_batch = 10;
        m.pause_ms = 20;
        m.max_p99_ratio = 0.0;
    });
    // Killed inside the clean-up (the takeover waits for the 1 s lease).
    let mut old = app.db(home).await;
    assert!(
        rows_in(&mut old, "chat_event", &chat).await > 0,
        "the clean-up had ended before the kill"
    );
    // Switched before it died: the chat already lives on the target.
    assert_eq!(app.join(&chat, "after").await.status(), StatusCode::CREATED);
    assert_eq!(app.shard_of(&chat).await, target);
    // The instance takes the move over after its lease and finishes it.
    let ended = ended_move_of(&app, &chat).await;
    assert_eq!(ended["phase"], "done", "{ended}");
    let mut new = app.db(target).await;
    whole_with(&mut new, &chat, 3001).await;
    for table in ["chat_member", "chat_message", "chat_event"] {
        assert_eq!(
            rows_in(&mut old, table, &chat).await,
            0,
            "{table} is cleaned at the source"
        );
    }
    assert_eq!(marker_of(&mut old, &chat).await, Some(target_name));
    app.shut_down().await;
}
