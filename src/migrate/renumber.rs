//! Migrations that changed their version number, and the pure plan that
//! renames them on a shard that applied the old numbers.
//!
//! Eight migrations were first committed with versions dated after the day
//! they were written (`20261202000001` to `20261207000003`). sqlx applies any
//! unapplied version whatever its order, so a migration written on one of
//! those days would have run after them on existing shards and before them on
//! new ones. They now carry the date they were committed (a test in
//! `tests/dba.rs` keeps every later version in order). Their SQL did not
//! change, so their checksums did not either: a shard that applied an old
//! number has the new file's checksum under the old version, and `migrate`
//! renames that row before it runs anything (`crate::storage::migrations::renumber`).
//! Only a row whose checksum equals the new file's is renamed, so a row with
//! other content under an old number is never touched.

/// `(old version, new version)`, in the order of the old versions.
pub const RENUMBERED: [(i64, i64); 8] = [
    (20261202000001, 20261201000003),
    (20261203000001, 20261201000004),
    (20261204000001, 20261202000001),
    (20261205000001, 20261202000002),
    (20261206000001, 20261202000003),
    (20261207000001, 20261202000004),
    (20261207000002, 20261202000005),
    (20261207000003, 20261202000006),
];

/// One row to rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rename {
    pub from: i64,
    pub to: i64,
}

/// The renames a shard needs, in the order they must run: `rows` are the
/// shard's `(version, checksum)`, `build` this binary's. A rename runs only
/// when the row's checksum is the new file's and the new number is free at
/// that point of the sequence (an earlier rename may free it: the old
/// `20261202000001` moves away before another row takes that number).
pub fn plan(rows: &[(i64, &[u8])], build: &[(i64, &[u8])]) -> Vec<Rename> {
    let mut versions: Vec<i64> = rows.iter().map(|(v, _)| *v).collect();
    let mut renames = Vec::new();
    for (from, to) in RENUMBERED {
        let Some(row) = rows.iter().find(|(v, _)| *v == from) else {
            continue;
        };
        let Some(file) = build.iter().find(|(v, _)| *v == to) else {
            continue;
        };
        if row.1 != file.1 || versions.contains(&to) || !versions.contains(&from) {
            continue;
        }
        versions.retain(|v| *v != from);
        versions.push(to);
        renames.push(Rename { from, to });
    }
    renames
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A checksum per file of the build, distinct per migration.
    fn sum(version: i64) -> Vec<u8> {
        version.to_be_bytes().to_vec()
    }

    fn build() -> Vec<(i64, Vec<u8>)> {
        let mut files = vec![20261124000001, 20261201000001, 20261201000002];
        files.extend(RENUMBERED.map(|(_, new)| new));
        files.into_iter().map(|v| (v, sum(v))).collect()
    }

    /// The shard after applying the first `n` migrations under the old
    /// numbers.
    fn old_shard(n: usize) -> Vec<(i64, Vec<u8>)> {
        let mut rows: Vec<(i64, Vec<u8>)> = [20261124000001, 20261201000001, 20261201000002]
            .into_iter()
            .map(|v| (v, sum(v)))
            .collect();
        rows.extend(
            RENUMBERED
                .iter()
                .take(n)
                .map(|(old, new)| (*old, sum(*new))),
        );
        rows
    }

    fn borrow(rows: &[(i64, Vec<u8>)]) -> Vec<(i64, &[u8])> {
        rows.iter().map(|(v, s)| (*v, s.as_slice())).collect()
    }

    fn apply(rows: &mut [(i64, Vec<u8>)], renames: &[Rename]) {
        for r in renames {
            let row = rows.iter_mut().find(|(v, _)| *v == r.from);
            if let Some(row) = row {
                row.0 = r.to;
            }
        }
    }

    #[test]
    fn the_table_keeps_the_order_and_dates_no_version_after_its_commit() {
        let olds: Vec<i64> = RENUMBERED.iter().map(|(o, _)| *o).collect();
        let news: Vec<i64> = RENUMBERED.iter().map(|(_, n)| *n).collect();
        assert!(olds.windows(2).all(|w| w[0] < w[1]));
        assert!(
            news.windows(2).all(|w| w[0] < w[1]),
            "renumbering kept the order"
        );
        assert!(news.iter().all(|n| *n < 20261203000000));
    }

    proptest! {
        /// Whatever prefix of the old migrations a shard applied, the plan
        /// renames every one of them to its new number, with no two rows on
        /// one number at any step, and a second plan finds nothing left.
        #[test]
        fn every_old_prefix_ends_on_the_new_numbers(n in 0usize..=8) {
            let build = build();
            let mut rows = old_shard(n);
            let renames = plan(&borrow(&rows), &borrow(&build));
            prop_assert_eq!(renames.len(), n);
            for (i, r) in renames.iter().enumerate() {
                apply(&mut rows, &renames[i..=i]);
                let mut seen: Vec<i64> = rows.iter().map(|(v, _)| *v).collect();
                seen.sort_unstable();
                seen.dedup();
                prop_assert_eq!(seen.len(), rows.len(), "two rows on {} after {:?}", r.to, r);
            }
            for (v, s) in &rows {
                let file = build.iter().find(|(b, _)| b == v);
                prop_assert!(file.is_some_and(|(_, fs)| fs == s), "row {} is not the build's", v);
            }
            prop_assert!(plan(&borrow(&rows), &borrow(&build)).is_empty());
        }
    }

    #[test]
    fn a_shard_on_the_new_numbers_is_left_alone() {
        let build = build();
        assert!(plan(&borrow(&build), &borrow(&build)).is_empty());
    }

    #[test]
    fn a_row_with_other_content_under_an_old_number_is_not_renamed() {
        let build = build();
        let mut rows = old_shard(8);
        rows[3].1 = b"something else".to_vec();
        let renames = plan(&borrow(&rows), &borrow(&build));
        assert!(renames.iter().all(|r| r.from != rows[3].0));
        // The number it holds is the new one of another row, which then
        // stays where it is too: never two rows on one number.
        assert!(renames.iter().all(|r| r.to != rows[3].0));
        assert_eq!(renames.len(), 6);
    }
}
