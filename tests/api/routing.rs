use std::collections::HashSet;

use crate::helpers::{SHARDS, TestApp, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_spread_over_all_shards_and_rows_stay_on_their_shard() {
    let app = TestApp::spawn().await;
    let prefix = unique("spread");
    let mut used = HashSet::new();
    let mut chats = Vec::new();
    for i in 0..60 {
        let chat = format!("{prefix}-{i}");
        app.put_chat(&chat, None).await;
        used.insert(app.shard_of(&chat).await);
        chats.push(chat);
    }
    assert_eq!(used.len(), SHARDS, "60 chats should land on every shard");

    for chat in chats.iter().take(6) {
        app.join(chat, "u").await;
        app.post(chat, "u", "k", "hello").await;
        let home = app.shard_of(chat).await;
        for shard in 0..SHARDS {
            let mut db = app.db(shard).await;
            for table in [
                "chat",
                "chat_member_count",
                "chat_member",
                "chat_message",
                "chat_event",
            ] {
                let sql = format!("SELECT COUNT(*) FROM {table} WHERE chat_id = ?");
                let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(chat)
                    .fetch_one(&mut db)
                    .await
                    .unwrap();
                assert_eq!(
                    n > 0,
                    shard == home,
                    "{table} rows of {chat} on shard {shard} (home {home})"
                );
            }
        }
    }
}
