//! What the move tests share: asking for a move and waiting for its end
//! (of a chat or of a bucket range), writers that go on through a move,
//! killing a mover process, and every read or write of a shard's rows those
//! tests make, as small named functions: the tests themselves hold no SQL.

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, MySqlConnection};

use crate::common;
use crate::helpers::{TestApp, unique};

/// The admin token of the instances that start or watch moves.
pub const TOKEN: &str = "moved-test-admin-token";

/// How long a write is retried while it is answered 503 (a fence, a busy
/// shard): far longer than any fence of these tests.
const RETRY_WITHIN: Duration = Duration::from_secs(60);

/// [`crate::common::Wait::until`] for steps that say `Break(value)` when
/// done and `Continue(state)` otherwise: the value. Fails after `within`,
/// saying `what` and the state the last `Continue` reported.
pub async fn until<T, F, Fut>(within: Duration, what: &str, mut step: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ControlFlow<T, String>>,
{
    crate::common::Wait::new(within, what)
        .until(|| {
            let step = step();
            async move {
                match step.await {
                    ControlFlow::Break(value) => Ok(value),
                    ControlFlow::Continue(last) => Err(last),
                }
            }
        })
        .await
}

/// Sends a request (`send` makes it anew each time) until it is answered
/// other than 503, as a client retries every 503 (`chat_moving` from a
/// fence; on a loaded machine also `outcome_unknown`, `shard_busy` or
/// `chat_busy`) unchanged. The answer, and how many 503s came before it.
/// Fails when 503s go on for a minute.
pub async fn past_503<F, Fut>(what: &str, mut send: F) -> (Response, u64)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Response>,
{
    let refused = AtomicU64::new(0);
    let counter = &refused;
    let answer = until(RETRY_WITHIN, &format!("{what} answered 503"), move || {
        let sent = send();
        async move {
            let r = sent.await;
            if r.status() != StatusCode::SERVICE_UNAVAILABLE {
                return ControlFlow::Break(r);
            }
            counter.fetch_add(1, Ordering::Relaxed);
            let body: Value = r.json().await.expect("problem");
            assert!(body["code"].is_string(), "{body}");
            ControlFlow::Continue(body.to_string())
        }
    })
    .await;
    (answer, refused.into_inner())
}

/// `POST /v1/admin/chats/{chat}/move` to `to`: the answer.
pub async fn request_move(app: &TestApp, chat: &str, to: &str) -> Response {
    app.admin(
        reqwest::Method::POST,
        &format!("/v1/admin/chats/{chat}/move"),
    )
    .json(&json!({ "to": to }))
    .send()
    .await
    .expect("move")
}

/// The id of the move a `202 Accepted` answer started.
pub async fn started_id(r: Response) -> String {
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned()
}

/// Starts a move and waits until it ends; the move as it ended.
pub async fn move_to_end(app: &TestApp, chat: &str, to: &str) -> Value {
    let id = started_id(request_move(app, chat, to).await).await;
    wait_move(app, &id).await
}

fn ended(m: &Value, phases: &[&str]) -> bool {
    phases.iter().any(|p| m["phase"] == *p)
}

/// Polls a move until it is `done`, `rolled_back` or `cancelled`.
pub async fn wait_move(app: &TestApp, id: &str) -> Value {
    until(Duration::from_secs(60), "the move's end", || async {
        let m = app.admin_get(&format!("/v1/admin/moves/{id}")).await;
        if ended(&m, &["done", "rolled_back", "cancelled"]) {
            ControlFlow::Break(m)
        } else {
            ControlFlow::Continue(m.to_string())
        }
    })
    .await
}

/// The moves of `chat` the admin view lists, newest first.
pub async fn moves_of(app: &TestApp, chat: &str) -> Vec<Value> {
    let all = app.admin_get("/v1/admin/moves").await;
    all["moves"]
        .as_array()
        .expect("moves")
        .iter()
        .filter(|m| m["chatId"] == chat)
        .cloned()
        .collect()
}

/// Waits until the newest move of `chat` has ended (`done` or
/// `rolled_back`): what an instance that takes a move over leaves.
pub async fn ended_move_of(app: &TestApp, chat: &str) -> Value {
    until(
        Duration::from_secs(30),
        &format!("an ended move of {chat}"),
        || async {
            let moves = moves_of(app, chat).await;
            match moves.first() {
                Some(m) if ended(m, &["done", "rolled_back"]) => ControlFlow::Break(m.clone()),
                _ => ControlFlow::Continue(format!("{moves:?}")),
            }
        },
    )
    .await
}

/// `chat` as `GET /v1/admin/moved-chats` lists it, if it does.
pub async fn moved_away(app: &TestApp, chat: &str) -> Option<Value> {
    let view = app.admin_get("/v1/admin/moved-chats").await;
    assert_eq!(view["partial"], false, "{view}");
    view["chats"]
        .as_array()
        .expect("chats")
        .iter()
        .find(|c| c["chatId"] == chat)
        .cloned()
}

/// Polls a bucket-range move until it is `done`, `failed` or `cancelled`.
pub async fn wait_bucket_move(app: &TestApp, id: u64) -> Value {
    until(Duration::from_secs(180), "the range move's end", || async {
        let m = app.admin_get(&format!("/v1/admin/bucket-moves/{id}")).await;
        if ended(&m, &["done", "failed", "cancelled"]) {
            ControlFlow::Break(m)
        } else {
            ControlFlow::Continue(m.to_string())
        }
    })
    .await
}

/// Joins `batches` × `per` members (`m<batch>-<i>`), `per` at a time. A
/// join answered 503 (retryable: a shard slow under the rest of the suite
/// can fail a whole group-commit batch) is made again, as a client would,
/// for up to 30 s; it must end joined (201, or 200 if the first had
/// applied).
pub async fn fill(app: &TestApp, chat: &str, batches: usize, per: usize) {
    for batch in 0..batches {
        let joins = (0..per).map(|i| async move {
            let user = format!("m{batch}-{i}");
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let status = app.join(chat, &user).await.status();
                if status != StatusCode::SERVICE_UNAVAILABLE || std::time::Instant::now() > deadline
                {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let statuses = futures::future::join_all(joins).await;
        assert!(
            statuses
                .iter()
                .all(|s| *s == StatusCode::CREATED || *s == StatusCode::OK),
            "{statuses:?}"
        );
    }
}

/// What one [`writer`] wrote: the users joined, the keys posted, and how
/// many answers 503 it retried.
pub type Written = (Vec<String>, Vec<String>, u64);

/// Writes through `app` until `stop`: joins of new users and posts of one
/// member, each retried with the same key until it is answered 2xx (a fence
/// answers 503 `chat_moving` for a moment).
pub async fn writer(
    app: Arc<TestApp>,
    chat: String,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> Written {
    let (mut joined, mut posted, mut moving) = (Vec::new(), Vec::new(), 0u64);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let user = format!("{name}-{n}");
        let (r, refused) = past_503(&format!("join {user}"), || app.join(&chat, &user)).await;
        assert!(
            matches!(r.status(), StatusCode::CREATED | StatusCode::OK),
            "join {user}: {}",
            r.status()
        );
        moving += refused;
        joined.push(user.clone());
        let key = format!("{name}-k{n}");
        let (r, refused) = past_503(&format!("post {key}"), || {
            app.post(&chat, &user, &key, "during the move")
        })
        .await;
        assert!(
            matches!(r.status(), StatusCode::CREATED | StatusCode::OK),
            "post {key}: {}",
            r.status()
        );
        moving += refused;
        posted.push(key);
        n += 1;
    }
    (joined, posted, moving)
}

/// A [`writer`] through each of `a` and `b`, once the chat has `members`
/// members; the flag that stops them.
pub async fn start_writers(
    a: &Arc<TestApp>,
    b: &Arc<TestApp>,
    chat: &str,
    members: u64,
) -> (Arc<AtomicBool>, [tokio::task::JoinHandle<Written>; 2]) {
    let stop = Arc::new(AtomicBool::new(false));
    let wa = tokio::spawn(writer(a.clone(), chat.to_owned(), "a", stop.clone()));
    let wb = tokio::spawn(writer(b.clone(), chat.to_owned(), "b", stop.clone()));
    common::eventually(
        Duration::from_secs(20),
        &format!("the writers bring {chat} to {members} members"),
        || async { a.count(chat).await >= members },
    )
    .await;
    (stop, [wa, wb])
}

/// Waits until `more` members more have joined through `app` (the writers
/// go on after a switch), then stops `writers`; what each wrote.
pub async fn go_on_then_stop(
    app: &TestApp,
    chat: &str,
    more: u64,
    stop: &AtomicBool,
    writers: [tokio::task::JoinHandle<Written>; 2],
) -> [Written; 2] {
    let after = app.count(chat).await;
    common::eventually(
        Duration::from_secs(20),
        &format!("the writers go on after the switch ({more} more members)"),
        || async { app.count(chat).await >= after + more },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let [a, b] = writers;
    [a.await.expect("writer a"), b.await.expect("writer b")]
}

/// Runs `chatshard ARGS --config` (on `settings`) and SIGKILLs it once a
/// line of its output satisfies `when`.
pub fn kill_cli_when(
    settings: &chatshard::config::Settings,
    args: &[&str],
    when: impl Fn(&str) -> bool,
) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(unique("mover"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("chatshard.toml");
    std::fs::write(&config, toml::to_string(settings).expect("toml")).expect("config");
    let mut mover = Command::new(env!("CARGO_BIN_EXE_chatshard"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr"))
        .spawn()
        .expect("start the mover");
    let stdout = mover.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) if when(&line) => break,
            Some(Ok(line)) => seen.push(line),
            other => panic!(
                "the mover ended first ({other:?}); it printed {seen:#?}, and on stderr:\n{}",
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
            ),
        }
    }
    mover.kill().expect("SIGKILL the mover");
    let _ = mover.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Asserts `chat` is whole on `db` with `members` members == rows.
pub async fn whole_with(db: &mut MySqlConnection, chat: &str, members: i64) {
    common::assert_chat_consistent(db, chat).await;
    assert_eq!(common::count_and_rows(db, chat).await, (members, members));
}

/// The row of a chat on one shard: (revision, moved_to, JOINED rows).
pub async fn row_on(db: &mut MySqlConnection, chat: &str) -> Option<(u64, Option<String>, i64)> {
    let row: Option<(u64, Option<String>)> =
        sqlx::query_as("SELECT revision, moved_to FROM chat WHERE chat_id = ?")
            .bind(chat)
            .fetch_optional(&mut *db)
            .await
            .expect("chat row");
    let joined: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 1")
            .bind(chat)
            .fetch_one(&mut *db)
            .await
            .expect("members");
    row.map(|(r, m)| (r, m, joined))
}

/// The chat row's revision and max_members on `db`.
pub async fn revision_and_max(db: &mut MySqlConnection, chat: &str) -> (u64, u32) {
    sqlx::query_as("SELECT revision, max_members FROM chat WHERE chat_id = ?")
        .bind(chat)
        .fetch_one(db)
        .await
        .expect("chat row")
}

/// The chat row's revision on `db`.
pub async fn revision_of(db: &mut MySqlConnection, chat: &str) -> u64 {
    revision_and_max(db, chat).await.0
}

/// The chat row's marker (`moved_to`) on `db`; the row must exist.
pub async fn marker_of(db: &mut MySqlConnection, chat: &str) -> Option<String> {
    sqlx::query_scalar("SELECT moved_to FROM chat WHERE chat_id = ?")
        .bind(chat)
        .fetch_one(db)
        .await
        .expect("chat row")
}

/// How many member rows (JOINED or LEFT) `db` holds for `chat`.
pub async fn member_rows(db: &mut MySqlConnection, chat: &str) -> i64 {
    rows_in(db, "chat_member", chat).await
}

/// How many LEFT member rows `db` holds for `chat`.
pub async fn left_rows(db: &mut MySqlConnection, chat: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM chat_member WHERE chat_id = ? AND state = 2")
        .bind(chat)
        .fetch_one(db)
        .await
        .expect("left rows")
}

/// How many messages `db` holds for `chat`.
pub async fn messages_of(db: &mut MySqlConnection, chat: &str) -> i64 {
    rows_in(db, "chat_message", chat).await
}

/// How many rows of `table` (one of a chat's tables) `db` holds for `chat`.
pub async fn rows_in(db: &mut MySqlConnection, table: &str, chat: &str) -> i64 {
    assert!(
        ["chat", "chat_member", "chat_message", "chat_event"].contains(&table),
        "{table}"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {table} WHERE chat_id = ?"
    )))
    .bind(chat)
    .fetch_one(db)
    .await
    .expect("rows")
}

/// Every row `db` holds of `chat`: its chat row, members, events and
/// messages together (0 where a copy was dropped).
pub async fn all_rows_of(db: &mut MySqlConnection, chat: &str) -> i64 {
    let mut rows = 0;
    for table in ["chat", "chat_member", "chat_event", "chat_message"] {
        rows += rows_in(db, table, chat).await;
    }
    rows
}

/// The driver of the newest move of `chat` recorded on `db` (0 for the one
/// that started it, one more for each takeover).
pub async fn driver_of_last_move(db: &mut MySqlConnection, chat: &str) -> u32 {
    sqlx::query_scalar("SELECT driver FROM chat_move WHERE chat_id = ? ORDER BY id DESC LIMIT 1")
        .bind(chat)
        .fetch_one(db)
        .await
        .expect("move record")
}

/// `(chat_id, user_id)` of the member row with id `id`.
pub async fn member_by_id(db: &mut MySqlConnection, id: u64) -> (String, String) {
    sqlx::query_as("SELECT chat_id, user_id FROM chat_member WHERE id = ?")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("member row")
}

/// `(chat_id, body)` of the message with id `id`.
pub async fn message_by_id(db: &mut MySqlConnection, id: u64) -> (String, String) {
    sqlx::query_as("SELECT chat_id, body FROM chat_message WHERE id = ?")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("message row")
}

/// The time `db` last changed move record `id`.
pub async fn move_updated_at(db: &mut MySqlConnection, id: u64) -> chrono::NaiveDateTime {
    sqlx::query_scalar("SELECT updated_at FROM chat_move WHERE id = ?")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("move record")
}

/// Copies a chat's rows from `from` to `to` (member and message ids given
/// anew by the target; events point at the new message ids), as a finished
/// copy would leave them.
pub async fn copy_chat(from: &mut MySqlConnection, to: &mut MySqlConnection, chat: &str) {
    let mut tx = to.begin().await.expect("tx");
    let (max, revision, created): (u32, u64, chrono::NaiveDateTime) =
        sqlx::query_as("SELECT max_members, revision, created_at FROM chat WHERE chat_id = ?")
            .bind(chat)
            .fetch_one(&mut *from)
            .await
            .expect("chat");
    sqlx::query(
        "INSERT INTO chat (chat_id, max_members, revision, created_at) VALUES (?, ?, ?, ?)",
    )
    .bind(chat)
    .bind(max)
    .bind(revision)
    .bind(created)
    .execute(&mut *tx)
    .await
    .expect("chat row");
    let count: u32 =
        sqlx::query_scalar("SELECT member_count FROM chat_member_count WHERE chat_id = ?")
            .bind(chat)
            .fetch_one(&mut *from)
            .await
            .expect("count");
    sqlx::query("INSERT INTO chat_member_count (chat_id, member_count) VALUES (?, ?)")
        .bind(chat)
        .bind(count)
        .execute(&mut *tx)
        .await
        .expect("count row");
    type Member = (
        String,
        u8,
        chrono::NaiveDateTime,
        Option<chrono::NaiveDateTime>,
        chrono::NaiveDateTime,
        chrono::NaiveDateTime,
    );
    let members: Vec<Member> = sqlx::query_as(
        "SELECT user_id, state, joined_at, left_at, created_at, updated_at FROM chat_member WHERE chat_id = ?",
    )
    .bind(chat)
    .fetch_all(&mut *from)
    .await
    .expect("members");
    for (user, state, joined, left, created, updated) in members {
        sqlx::query(
            "INSERT INTO chat_member (chat_id, user_id, state, joined_at, left_at, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(chat)
        .bind(user)
        .bind(state)
        .bind(joined)
        .bind(left)
        .bind(created)
        .bind(updated)
        .execute(&mut *tx)
        .await
        .expect("member row");
    }
    type Event = (u64, u8, String, Option<u64>, chrono::NaiveDateTime);
    let events: Vec<Event> = sqlx::query_as(
        "SELECT revision, event_type, user_id, message_id, created_at FROM chat_event \
         WHERE chat_id = ? ORDER BY revision",
    )
    .bind(chat)
    .fetch_all(&mut *from)
    .await
    .expect("events");
    for (rev, kind, user, message_id, at) in events {
        let new_id = match message_id {
            Some(id) => {
                let (sender, key, body, created): (String, String, String, chrono::NaiveDateTime) =
                    sqlx::query_as(
                        "SELECT sender_id, client_message_id, body, created_at FROM chat_message WHERE id = ?",
                    )
                    .bind(id)
                    .fetch_one(&mut *from)
                    .await
                    .expect("message");
                let done = sqlx::query(
                    "INSERT INTO chat_message (chat_id, sender_id, client_message_id, revision, body, created_at) \
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(chat)
                .bind(sender)
                .bind(key)
                .bind(rev)
                .bind(body)
                .bind(created)
                .execute(&mut *tx)
                .await
                .expect("message row");
                Some(done.last_insert_id())
            }
            None => None,
        };
        sqlx::query(
            "INSERT INTO chat_event (chat_id, revision, event_type, user_id, message_id, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(chat)
        .bind(rev)
        .bind(kind)
        .bind(user)
        .bind(new_id)
        .bind(at)
        .execute(&mut *tx)
        .await
        .expect("event row");
    }
    tx.commit().await.expect("commit");
}

/// Sets (or, with `None`, clears) the chat row's marker on `db`.
pub async fn mark(db: &mut MySqlConnection, chat: &str, to: Option<&str>) {
    sqlx::query("UPDATE chat SET moved_to = ? WHERE chat_id = ?")
        .bind(to)
        .bind(chat)
        .execute(db)
        .await
        .expect("marker");
}

/// Fences the chat on `db` for `ms` milliseconds from now, as a move does.
pub async fn fence(db: &mut MySqlConnection, chat: &str, ms: u64) {
    sqlx::query(
        "UPDATE chat SET fenced_until = DATE_ADD(NOW(6), INTERVAL ? MICROSECOND) WHERE chat_id = ?",
    )
    .bind(ms * 1000)
    .bind(chat)
    .execute(db)
    .await
    .expect("fence");
}

/// Lifts the chat's fence on `db`.
pub async fn unfence(db: &mut MySqlConnection, chat: &str) {
    sqlx::query("UPDATE chat SET fenced_until = NULL WHERE chat_id = ?")
        .bind(chat)
        .execute(db)
        .await
        .expect("unfence");
}

/// Makes the chat's stored count drift from its rows by `by`, behind
/// chatshard's back.
pub async fn drift_count(db: &mut MySqlConnection, chat: &str, by: i64) {
    sqlx::query("UPDATE chat_member_count SET member_count = member_count + ? WHERE chat_id = ?")
        .bind(by)
        .bind(chat)
        .execute(db)
        .await
        .expect("drift");
}

/// Holds the chat row on `db` locked (`FOR UPDATE`) until the transaction
/// returned ends.
pub async fn lock_chat_row<'c>(
    db: &'c mut MySqlConnection,
    chat: &str,
) -> sqlx::Transaction<'c, sqlx::MySql> {
    let mut lock = db.begin().await.expect("tx");
    sqlx::query("SELECT moved_to FROM chat WHERE chat_id = ? FOR UPDATE")
        .bind(chat)
        .fetch_one(&mut *lock)
        .await
        .expect("lock the chat row");
    lock
}

/// Records a move by hand as a driver that died would have left it: in
/// `phase`, last touched a minute ago.
pub async fn abandoned_move(
    db: &mut MySqlConnection,
    chat: &str,
    source: &str,
    target: &str,
    phase: &str,
) {
    sqlx::query(
        "INSERT INTO chat_move (chat_id, source, target, phase, active, copied_revision, created_at, updated_at) \
         VALUES (?, ?, ?, ?, 1, 0, DATE_SUB(NOW(6), INTERVAL 60 SECOND), DATE_SUB(NOW(6), INTERVAL 60 SECOND))",
    )
    .bind(chat)
    .bind(source)
    .bind(target)
    .bind(phase)
    .execute(db)
    .await
    .expect("move record");
}

/// Records a running move by hand, `verified` at revision 1 and touched
/// now; its id.
pub async fn verified_move(
    db: &mut MySqlConnection,
    chat: &str,
    source: &str,
    target: &str,
) -> u64 {
    sqlx::query(
        "INSERT INTO chat_move (chat_id, source, target, phase, active, copied_revision, created_at, updated_at) \
         VALUES (?, ?, ?, 'verified', 1, 1, NOW(6), NOW(6))",
    )
    .bind(chat)
    .bind(source)
    .bind(target)
    .execute(db)
    .await
    .expect("move record")
    .last_insert_id()
}

/// Ends move record `id` by hand (`rolled_back`, no longer active).
pub async fn end_move_record(db: &mut MySqlConnection, id: u64) {
    sqlx::query("UPDATE chat_move SET active = NULL, phase = 'rolled_back' WHERE id = ?")
        .bind(id)
        .execute(db)
        .await
        .expect("end the record");
}

/// Another chat's member row on `db`, holding member id `id`.
pub async fn squat_member_id(db: &mut MySqlConnection, id: u64, squatter: &str) {
    sqlx::query(
        "INSERT INTO chat_member (id, chat_id, user_id, state, joined_at, created_at, updated_at) \
         VALUES (?, ?, 'squatter', 1, NOW(6), NOW(6), NOW(6))",
    )
    .bind(id)
    .bind(squatter)
    .execute(db)
    .await
    .expect("squat a member id");
}

/// Another chat's message on `db`, holding message id `id`.
pub async fn squat_message_id(db: &mut MySqlConnection, id: u64, squatter: &str) {
    sqlx::query(
        "INSERT INTO chat_message (id, chat_id, sender_id, client_message_id, revision, body, created_at) \
         VALUES (?, ?, 'squatter', 'q', 1, 'mine', NOW(6))",
    )
    .bind(id)
    .bind(squatter)
    .execute(db)
    .await
    .expect("squat a message id");
}

/// Joins `{prefix}0` .. `{prefix}{n-1}` to `chat` one at a time, each
/// answered 201.
pub async fn join_each(app: &TestApp, chat: &str, prefix: &str, n: usize) {
    for i in 0..n {
        assert_eq!(
            app.join(chat, &format!("{prefix}{i}")).await.status(),
            reqwest::StatusCode::CREATED
        );
    }
}

/// The shard that holds `chat` and the next one, a move's usual target.
pub async fn home_and_next(app: &TestApp, chat: &str) -> (usize, usize) {
    let home = app.shard_of(chat).await;
    (home, (home + 1) % app.settings.shards.len())
}
