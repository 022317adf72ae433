//! `chatId -> bucket -> shard`.
//!
//! A chat is hashed into one of [`BUCKETS`] virtual buckets with XXH3-64 of the
//! chat id's bytes (seed 0), and the configuration assigns bucket ranges to named
//! shards. Splitting a shard later means moving a bucket range (and its rows) to a
//! new shard; no chat ever changes bucket.
//!
//! Invariant: the hash and [`BUCKETS`] are frozen. Changing either would move
//! existing chats to shards that do not hold their rows; the test
//! `bucket_vectors_are_frozen` pins them.

use crate::domain::ChatId;

/// The number of virtual buckets. Frozen: see the module docs.
pub const BUCKETS: u16 = 1024;

/// The bucket of a chat id, in `0..BUCKETS`.
pub fn bucket_of(chat: &ChatId) -> u16 {
    bucket_of_key(chat_key(chat))
}

/// The chat's routing hash: its bucket is [`bucket_of_key`] of it.
pub fn chat_key(chat: &ChatId) -> u64 {
    key_of(chat.as_str())
}

/// The routing hash of a chat id as stored (a row's `chat_id`).
pub fn key_of(chat_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(chat_id.as_bytes())
}

/// The bucket of a chat's key.
pub fn bucket_of_key(key: u64) -> u16 {
    (key % u64::from(BUCKETS)) as u16
}

/// An index into the configured shard list.
pub type ShardIndex = usize;

/// Maps every bucket to exactly one shard.
#[derive(Debug, Clone)]
pub struct Router {
    table: Vec<ShardIndex>,
}

/// An inclusive range of buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketRange {
    pub first: u16,
    pub last: u16,
}

impl BucketRange {
    /// Parses `"0-255"` or a single bucket `"17"`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (first, last) = match raw.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (raw.trim(), raw.trim()),
        };
        let parse = |s: &str| {
            s.parse::<u16>()
                .map_err(|_| format!("bucket range {raw:?}: {s:?} is not a bucket number"))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if first > last || last >= BUCKETS {
            return Err(format!(
                "bucket range {raw:?} must satisfy first <= last < {BUCKETS}"
            ));
        }
        Ok(Self { first, last })
    }

    /// Splits `0..BUCKETS` into `n` contiguous ranges of near-equal size.
    pub fn even_split(n: usize) -> Vec<Self> {
        let n = n.clamp(1, usize::from(BUCKETS));
        let per = usize::from(BUCKETS) / n;
        let extra = usize::from(BUCKETS) % n;
        let mut first = 0usize;
        (0..n)
            .map(|i| {
                let size = per + usize::from(i < extra);
                let range = Self {
                    first: first as u16,
                    last: (first + size - 1) as u16,
                };
                first += size;
                range
            })
            .collect()
    }
}

impl std::fmt::Display for BucketRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl Router {
    /// Builds the table from each shard's ranges; every bucket must be assigned to
    /// exactly one shard. Returns every problem found, not just the first.
    pub fn new(assignments: &[Vec<BucketRange>]) -> Result<Self, Vec<String>> {
        let mut owner: Vec<Option<ShardIndex>> = vec![None; usize::from(BUCKETS)];
        let mut problems = Vec::new();
        for (shard, ranges) in assignments.iter().enumerate() {
            for range in ranges {
                for bucket in range.first..=range.last {
                    let slot = &mut owner[usize::from(bucket)];
                    match slot {
                        Some(other) if *other != shard => problems.push(format!(
                            "bucket {bucket} is assigned to shards #{other} and #{shard}"
                        )),
                        _ => *slot = Some(shard),
                    }
                }
            }
        }
        let missing: Vec<usize> = (0..owner.len()).filter(|b| owner[*b].is_none()).collect();
        if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
            problems.push(format!(
                "{} buckets are not assigned to any shard (first {first}, last {last})",
                missing.len()
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            table: owner.into_iter().flatten().collect(),
        })
    }

    /// The shard that owns a chat.
    pub fn shard_of(&self, chat: &ChatId) -> ShardIndex {
        self.table[usize::from(bucket_of(chat))]
    }

    /// The highest shard index any bucket routes to.
    pub fn highest_shard(&self) -> ShardIndex {
        self.table.iter().copied().max().unwrap_or(0)
    }

    /// The shard that owns a bucket.
    pub fn owner(&self, bucket: u16) -> ShardIndex {
        self.table[usize::from(bucket)]
    }

    /// The single shard that owns every bucket of `range`; `None` when
    /// several do.
    pub fn owner_of_range(&self, range: BucketRange) -> Option<ShardIndex> {
        let first = self.owner(range.first);
        (range.first..=range.last)
            .all(|b| self.owner(b) == first)
            .then_some(first)
    }

    /// This table with `range` given to `to`.
    pub fn with_range(&self, range: BucketRange, to: ShardIndex) -> Self {
        let mut table = self.table.clone();
        for b in range.first..=range.last {
            table[usize::from(b)] = to;
        }
        Self { table }
    }

    /// The contiguous ranges each of `shards` shards owns (an empty list for
    /// a shard that owns none).
    pub fn ranges(&self, shards: usize) -> Vec<Vec<BucketRange>> {
        let mut out = vec![Vec::new(); shards.max(self.highest_shard() + 1)];
        let mut start = 0u16;
        for b in 1..=BUCKETS {
            let ends = b == BUCKETS || self.owner(b) != self.owner(start);
            if ends {
                out[self.owner(start)].push(BucketRange {
                    first: start,
                    last: b - 1,
                });
                start = b;
            }
        }
        out
    }
}

/// A version of the bucket table as the shards store it
/// (docs/moving-chats.md): each shard's name and its ranges.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketMap(pub std::collections::BTreeMap<String, Vec<String>>);

impl BucketMap {
    /// The map of `router` over the shards named `names` (in index order).
    pub fn of(router: &Router, names: &[&str]) -> Self {
        Self(
            router
                .ranges(names.len())
                .into_iter()
                .zip(names)
                .map(|(ranges, name)| {
                    (
                        (*name).to_owned(),
                        ranges.iter().map(ToString::to_string).collect(),
                    )
                })
                .collect(),
        )
    }

    /// The table it describes over the shards named `names`; refused when it
    /// names a shard that is not among them, or does not cover every bucket
    /// exactly once.
    pub fn router(&self, names: &[&str]) -> Result<Router, Vec<String>> {
        let mut problems = Vec::new();
        for name in self.0.keys() {
            if !names.contains(&name.as_str()) {
                problems.push(format!(
                    "the bucket map gives buckets to shard {name:?}, which is not configured"
                ));
            }
        }
        let ranges: Vec<Vec<BucketRange>> = names
            .iter()
            .map(|name| {
                self.0
                    .get(*name)
                    .into_iter()
                    .flatten()
                    .filter_map(|r| BucketRange::parse(r).map_err(|e| problems.push(e)).ok())
                    .collect()
            })
            .collect();
        if !problems.is_empty() {
            return Err(problems);
        }
        Router::new(&ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chat(s: &str) -> ChatId {
        ChatId::parse(s).unwrap()
    }

    #[test]
    fn bucket_vectors_are_frozen() {
        // If this test fails, existing chats would move to other shards: do not
        // "fix" the vectors, restore the hash.
        let vectors: &[(&str, u16)] = &[
            ("a", 543),
            ("celebrity", 534),
            ("chat-1", 763),
            ("chat-2", 448),
            ("general", 787),
            ("Z_9-x", 46),
            (
                "0000000000000000000000000000000000000000000000000000000000000000",
                788,
            ),
        ];
        for (id, bucket) in vectors {
            assert_eq!(bucket_of(&chat(id)), *bucket, "bucket of {id:?}");
        }
    }

    #[test]
    fn even_split_covers_every_bucket_once() {
        for n in 1..=9 {
            let ranges = BucketRange::even_split(n);
            assert_eq!(ranges.len(), n);
            assert!(Router::new(&ranges.iter().map(|r| vec![*r]).collect::<Vec<_>>()).is_ok());
        }
    }

    #[test]
    fn gaps_and_overlaps_are_reported() -> crate::TestResult {
        let a = vec![BucketRange::parse("0-600")?];
        let b = vec![BucketRange::parse("500-1000")?];
        let problems = Router::new(&[a, b]).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("bucket 500")));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("23 buckets are not assigned"))
        );
        assert!(BucketRange::parse("5-1").is_err());
        assert!(BucketRange::parse("0-1024").is_err());
        assert!(BucketRange::parse("x").is_err());
        Ok(())
    }

    #[test]
    fn a_range_given_to_another_shard_round_trips_through_the_stored_map() -> crate::TestResult {
        let router = Router::new(&[
            vec![BucketRange::parse("0-511")?],
            vec![BucketRange::parse("512-1023")?],
            vec![],
        ])
        .map_err(|p| p.join("; "))?;
        let names = ["a", "b", "c"];
        let range = BucketRange::parse("256-383")?;
        assert_eq!(router.owner_of_range(range), Some(0));
        assert_eq!(router.owner_of_range(BucketRange::parse("500-600")?), None);
        let moved = router.with_range(range, 2);
        let map = BucketMap::of(&moved, &names);
        assert_eq!(map.0["a"], ["0-255", "384-511"]);
        assert_eq!(map.0["b"], ["512-1023"]);
        assert_eq!(map.0["c"], ["256-383"]);
        let back = map.router(&names).map_err(|p| p.join("; "))?;
        assert_eq!(BucketMap::of(&back, &names), map);
        // A map naming a shard this configuration lacks is refused.
        let problems = map.router(&["a", "b"]).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("\"c\"")), "{problems:?}");
        Ok(())
    }

    proptest! {
        #[test]
        fn every_chat_routes_to_one_shard_and_always_the_same(id in "[A-Za-z0-9_-]{1,64}", n in 1usize..8) {
            let ranges = BucketRange::even_split(n);
            let router = Router::new(&ranges.iter().map(|r| vec![*r]).collect::<Vec<_>>()).unwrap();
            let c = chat(&id);
            let shard = router.shard_of(&c);
            prop_assert!(shard < n);
            prop_assert_eq!(shard, router.shard_of(&c.clone()));
            let b = bucket_of(&c);
            prop_assert!(ranges[shard].first <= b && b <= ranges[shard].last);
        }
    }
}
