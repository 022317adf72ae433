//! The throttling state stays bounded however many distinct chats it sees.
//!
//! Its own test binary, so the process's resident memory measures this state
//! and nothing else.

use std::sync::Arc;

use chatshard::config::ThrottleSettings;
use chatshard::domain::ChatId;
use chatshard::live::LiveConfig;
use chatshard::throttle::{ManualClock, Throttle};

/// The process's resident memory; the test fails, rather than passing on a
/// zero, where it cannot be read.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status is readable (Linux)");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status");
    assert!(kb > 0, "VmRSS reads 0 kB");
    kb * 1024
}

#[test]
fn a_million_distinct_chats_keep_memory_bounded() {
    const CHATS: u64 = 1_000_000;
    const TRACKED: u64 = 100_000;
    let settings = ThrottleSettings {
        tracked_chats: TRACKED,
        ..ThrottleSettings::default()
    };
    let throttle = Throttle::new(Arc::new(ManualClock::default()), &settings);
    let config = LiveConfig::default();
    // The two caches fill on the machine's two cores.
    let chats: Vec<ChatId> = (0..CHATS)
        .map(|i| ChatId::parse(&format!("chat-{i:07}")).unwrap())
        .collect();
    let before = rss_bytes();
    std::thread::scope(|s| {
        s.spawn(|| {
            for chat in &chats {
                throttle
                    .joins
                    .check(chat, config.join_rule(chat), &throttle.decisions);
            }
        });
        s.spawn(|| {
            for chat in &chats {
                throttle
                    .hot
                    .record_write(chat, 1, config.hot_chat_rule(chat), &throttle.decisions);
            }
        });
    });
    let (joins, hot) = (throttle.joins.tracked(), throttle.hot.tracked());
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "{CHATS} distinct chats: {joins} join windows and {hot} hot-chat buckets tracked (bound {TRACKED} each); \
         resident memory grew {:.1} MiB",
        grown as f64 / (1024.0 * 1024.0)
    );
    assert!(
        joins <= TRACKED && hot <= TRACKED,
        "{joins} / {hot} tracked"
    );
    // ~2 x 100,000 small entries; far below what a million would take.
    assert!(
        grown < 256 * 1024 * 1024,
        "resident memory grew {grown} bytes"
    );
}
