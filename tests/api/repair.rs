use chatshard::app::build_shards;
use chatshard::domain::ChatId;
use chatshard::service::repair::repair_counts;

use crate::helpers::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_counts_fixes_a_wrong_or_missing_count() {
    let app = TestApp::spawn().await;
    let chat = app.new_chat("repair").await;
    for u in ["a", "b", "c"] {
        app.join(&chat, u).await;
    }
    app.leave(&chat, "b").await;
    let mut db = app.db(app.shard_of(&chat).await).await;
    sqlx::query("UPDATE chat_member_count SET member_count = 17 WHERE chat_id = ?")
        .bind(&chat)
        .execute(&mut db)
        .await
        .unwrap();

    let shards = build_shards(&app.settings).unwrap();
    let id = ChatId::parse(&chat).unwrap();
    let fixes = repair_counts(&shards, Some(&id)).await.unwrap();
    assert_eq!(fixes.len(), 1);
    assert_eq!((fixes[0].stored, fixes[0].actual), (Some(17), 2));
    assert_eq!(app.count(&chat).await, 2);
    assert!(repair_counts(&shards, Some(&id)).await.unwrap().is_empty());

    sqlx::query("DELETE FROM chat_member_count WHERE chat_id = ?")
        .bind(&chat)
        .execute(&mut db)
        .await
        .unwrap();
    // The whole-shard walk finds it too.
    let fixes = repair_counts(&shards, None).await.unwrap();
    let fix = fixes.iter().find(|f| f.chat_id == chat).expect("fixed");
    assert_eq!((fix.stored, fix.actual), (None, 2));
    assert_eq!(app.count_and_rows(&chat).await, (2, 2));
}
