//! Prometheus histograms read off the service's `/metrics` text: the
//! cumulative buckets of one series, the difference of two readings (what a
//! phase of a run added), and a quantile interpolated within its bucket, as
//! PromQL's `histogram_quantile` does.

/// The cumulative buckets of one histogram series: `(le, count)` by rising
/// `le`, the last one `+Inf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// The buckets of `{name}_bucket` summed over the series whose labels hold
    /// every one of `labels` (each `key="value"`), from a `/metrics` text.
    pub fn read(text: &str, name: &str, labels: &[&str]) -> Self {
        let prefix = format!("{name}_bucket{{");
        let mut by_le: Vec<(f64, f64)> = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((label_text, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            if !labels.iter().all(|want| label_text.contains(want)) {
                continue;
            }
            let (Some(le), Ok(count)) = (le_of(label_text), value.trim().parse::<f64>()) else {
                continue;
            };
            match by_le.iter_mut().find(|(l, _)| *l == le) {
                Some((_, c)) => *c += count,
                None => by_le.push((le, count)),
            }
        }
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self(by_le)
    }

    /// What was added between `earlier` and this reading.
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|&(le, count)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map_or(0.0, |(_, c)| *c);
                    (le, (count - before).max(0.0))
                })
                .collect(),
        )
    }

    /// The number of observations.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, c)| *c)
    }

    /// The `q` quantile (0..1), interpolated linearly within its bucket (from
    /// 0 for the first one); the highest finite bound when it falls in
    /// `+Inf`. `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &self.0 {
            if count >= rank && count > lower.1 {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let share = (rank - lower.1) / (count - lower.1);
                return Some(lower.0 + (le - lower.0) * share);
            }
            lower = (le, count);
        }
        Some(lower.0)
    }
}

/// The `le` label's value of a series' label text.
fn le_of(labels: &str) -> Option<f64> {
    let start = labels.find("le=\"")? + 4;
    let end = start + labels[start..].find('"')?;
    match &labels[start..end] {
        "+Inf" => Some(f64::INFINITY),
        v => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP x_seconds A histogram
x_seconds_bucket{shard=\"s0\",le=\"0.001\"} 10
x_seconds_bucket{shard=\"s0\",le=\"0.002\"} 90
x_seconds_bucket{shard=\"s0\",le=\"0.004\"} 100
x_seconds_bucket{shard=\"s0\",le=\"+Inf\"} 100
x_seconds_bucket{shard=\"s1\",le=\"0.001\"} 1
x_seconds_bucket{shard=\"s1\",le=\"0.002\"} 1
x_seconds_bucket{shard=\"s1\",le=\"0.004\"} 1
x_seconds_bucket{shard=\"s1\",le=\"+Inf\"} 2
x_seconds_sum{shard=\"s0\"} 0.15
x_seconds_count{shard=\"s0\"} 100
";

    #[test]
    fn one_series_is_read_and_its_quantiles_interpolated() {
        let b = Buckets::read(TEXT, "x_seconds", &["shard=\"s0\""]);
        assert_eq!(b.count(), 100.0);
        // The 50th of 100 is half-way through the (1 ms, 2 ms] bucket.
        assert_eq!(b.quantile(0.5), Some(0.0015));
        // The 99th: 9/10 of the way through (2 ms, 4 ms].
        let p99 = b.quantile(0.99).unwrap_or_default();
        assert!((p99 - 0.0038).abs() < 1e-12, "{p99}");
        // The first bucket starts at 0.
        assert_eq!(b.quantile(0.05), Some(0.0005));
        // Past the last finite bound: that bound.
        let s1 = Buckets::read(TEXT, "x_seconds", &["shard=\"s1\""]);
        assert_eq!(s1.quantile(0.99), Some(0.004));
        assert_eq!(Buckets::default().quantile(0.5), None);
    }

    #[test]
    fn a_phase_is_the_difference_of_two_readings() {
        let earlier = Buckets(vec![(0.001, 5.0), (0.002, 5.0), (f64::INFINITY, 5.0)]);
        let later = Buckets(vec![(0.001, 5.0), (0.002, 15.0), (f64::INFINITY, 15.0)]);
        let phase = later.since(&earlier);
        assert_eq!(phase.count(), 10.0);
        assert_eq!(phase.quantile(0.5), Some(0.0015));
        // Series summed over the labels left open.
        let both = Buckets::read(TEXT, "x_seconds", &[]);
        assert_eq!(both.count(), 102.0);
    }
}
