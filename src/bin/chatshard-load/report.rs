//! What a run measures: a latency histogram (HDR) per kind of request, answers
//! by status and problem code, throughput per second, a live progress line, a
//! final table and a JSON report.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Latencies from 1 µs to 60 s, three significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
        // The bounds are constants that hdrhistogram accepts.
        Histogram::new(3).unwrap_or_else(|e| panic!("hdrhistogram: {e}"))
    })
}

#[derive(Debug)]
struct Series {
    ok: Histogram<u64>,
    /// Answers by `status code` or `status code/problem code`.
    answers: BTreeMap<String, u64>,
    /// The answers recorded as failures: what counts as a success is the
    /// recorder's caller's to say (a delivery or a committed SQL insert has
    /// no status code), not read back from the answer's name.
    failed: u64,
    /// Successful requests per whole second since the start.
    per_second: Vec<u64>,
    /// The p99 of each second's successful requests, in µs.
    second_hist: Vec<Histogram<u64>>,
}

impl Series {
    fn new() -> Self {
        Self {
            ok: histogram(),
            answers: BTreeMap::new(),
            failed: 0,
            per_second: Vec::new(),
            second_hist: Vec::new(),
        }
    }
}

/// Shared by every client of a run.
#[derive(Clone)]
pub struct Recorder {
    started: Instant,
    series: Arc<Mutex<BTreeMap<&'static str, Series>>>,
    marks: Arc<Mutex<Vec<(f64, String)>>>,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            series: Arc::new(Mutex::new(BTreeMap::new())),
            marks: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// One request of kind `kind` that took `took` and was answered `answer`
    /// (`"201"`, `"503/chat_busy"`, `"error/connect"`); `ok` says whether it
    /// counts as a success.
    pub fn record(&self, kind: &'static str, took: Duration, answer: &str, ok: bool) {
        let second = self.started.elapsed().as_secs() as usize;
        let micros = (took.as_micros() as u64).clamp(1, 60_000_000);
        let mut all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let s = all.entry(kind).or_insert_with(Series::new);
        *s.answers.entry(answer.to_owned()).or_default() += 1;
        if !ok {
            s.failed += 1;
        } else {
            let _ = s.ok.record(micros);
            if s.per_second.len() <= second {
                s.per_second.resize(second + 1, 0);
                s.second_hist.resize_with(second + 1, histogram);
            }
            s.per_second[second] += 1;
            let _ = s.second_hist[second].record(micros);
        }
    }

    /// Several successes of kind `kind` answered `answer`, under one lock.
    pub fn record_all(&self, kind: &'static str, took: &[Duration], answer: &str) {
        let second = self.started.elapsed().as_secs() as usize;
        let mut all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let s = all.entry(kind).or_insert_with(Series::new);
        match s.answers.get_mut(answer) {
            Some(n) => *n += took.len() as u64,
            None => {
                s.answers.insert(answer.to_owned(), took.len() as u64);
            }
        }
        if s.per_second.len() <= second {
            s.per_second.resize(second + 1, 0);
            s.second_hist.resize_with(second + 1, histogram);
        }
        s.per_second[second] += took.len() as u64;
        for t in took {
            let micros = (t.as_micros() as u64).clamp(1, 60_000_000);
            let _ = s.ok.record(micros);
            let _ = s.second_hist[second].record(micros);
        }
    }

    /// The successes of `kind` so far.
    pub fn ok_count(&self, kind: &str) -> u64 {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(kind).map_or(0, |s| s.ok.len())
    }

    /// The `q` quantile (0..1) of the successes of `kind`, in ms.
    pub fn quantile_ms(&self, kind: &str, q: f64) -> Option<f64> {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let s = all.get(kind)?;
        (!s.ok.is_empty()).then(|| s.ok.value_at_quantile(q) as f64 / 1000.0)
    }

    /// The `q` quantile of the successes of `kind` recorded in the whole
    /// seconds from `from` up to `to` (seconds since the start; a second
    /// counts when it begins within them), in ms.
    pub fn quantile_ms_between(&self, kind: &str, q: f64, from: f64, to: f64) -> Option<f64> {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let s = all.get(kind)?;
        let mut merged = histogram();
        let first = from.max(0.0).ceil() as usize;
        let end = (to.max(0.0).ceil() as usize).min(s.second_hist.len());
        for h in s.second_hist.get(first..end).unwrap_or_default() {
            let _ = merged.add(h);
        }
        (!merged.is_empty()).then(|| merged.value_at_quantile(q) as f64 / 1000.0)
    }

    /// The time since the run started (the timeline's origin).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Marks a moment (spike start, fault) on the timeline.
    pub fn mark(&self, what: &str) {
        let at = self.started.elapsed().as_secs_f64();
        self.marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((at, what.to_owned()));
    }

    /// One line: throughput and percentiles so far, per kind.
    pub fn progress_line(&self) -> String {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let parts: Vec<String> = all
            .iter()
            .map(|(kind, s)| {
                format!(
                    "{kind}: {:.0}/s ok, {} failed, p50 {:.1} ms, p99 {:.1} ms",
                    s.ok.len() as f64 / secs,
                    s.failed,
                    ms(s.ok.value_at_quantile(0.5)),
                    ms(s.ok.value_at_quantile(0.99)),
                )
            })
            .collect();
        format!("[{secs:5.1}s] {}", parts.join(" | "))
    }

    /// Every figure, as JSON.
    pub fn to_json(&self, extra: Value) -> Value {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let kinds: serde_json::Map<String, Value> = all
            .iter()
            .map(|(kind, s)| {
                let h = &s.ok;
                let per_second = |q: f64| -> Vec<f64> {
                    s.second_hist
                        .iter()
                        .map(|h| ms(h.value_at_quantile(q)))
                        .collect()
                };
                (
                    (*kind).to_owned(),
                    json!({
                        "ok": h.len(),
                        "okPerSecond": h.len() as f64 / secs,
                        "latencyMs": {
                            "p50": ms(h.value_at_quantile(0.5)),
                            "p90": ms(h.value_at_quantile(0.9)),
                            "p99": ms(h.value_at_quantile(0.99)),
                            "p999": ms(h.value_at_quantile(0.999)),
                            "max": ms(h.max()),
                            "mean": h.mean() / 1000.0,
                        },
                        "answers": s.answers,
                        "okPerSecondTimeline": s.per_second,
                        "p99MsTimeline": per_second(0.99),
                        "p50MsTimeline": per_second(0.5),
                    }),
                )
            })
            .collect();
        let marks: Vec<Value> = self
            .marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(at, what)| json!({"atSeconds": at, "what": what}))
            .collect();
        json!({
            "seconds": secs,
            "kinds": kinds,
            "marks": marks,
            "scenario": extra,
        })
    }

    /// The final table, for people.
    pub fn table(&self) -> String {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let mut out = format!(
            "{:<14} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}  answers\n",
            "kind", "ok", "ok/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for (kind, s) in all.iter() {
            let h = &s.ok;
            let answers: Vec<String> = s.answers.iter().map(|(a, n)| format!("{a}:{n}")).collect();
            out.push_str(&format!(
                "{:<14} {:>9} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}  {}\n",
                kind,
                h.len(),
                h.len() as f64 / secs,
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.9)),
                ms(h.value_at_quantile(0.99)),
                ms(h.max()),
                answers.join(" ")
            ));
        }
        out
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Prints the progress line every second until `done` resolves.
pub async fn progress(recorder: Recorder, quiet: bool, done: tokio::sync::watch::Receiver<bool>) {
    let mut done = done;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !quiet {
                    eprint!("\r{}\x1b[K", recorder.progress_line());
                }
            }
            changed = done.changed() => {
                if changed.is_err() || *done.borrow() {
                    break;
                }
            }
        }
    }
    if !quiet {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(line: &str, kind: &str) -> String {
        let (_, parts) = line
            .split_once("] ")
            .unwrap_or_else(|| panic!("no time in {line}"));
        parts
            .split(" | ")
            .find(|part| part.starts_with(&format!("{kind}:")))
            .unwrap_or_else(|| panic!("no {kind} in {line}"))
            .to_owned()
    }

    #[test]
    fn successes_named_without_a_status_code_are_not_counted_as_failures() {
        let recorder = Recorder::new();
        let lags = [Duration::from_millis(3); 5];
        recorder.record_all("delivery_lag", &lags, "received");
        recorder.record("insert", Duration::from_millis(1), "inserted", true);
        recorder.record("insert", Duration::from_millis(1), "error/1213", false);
        recorder.record("post", Duration::from_millis(2), "201", true);
        recorder.record("post", Duration::from_millis(2), "503/chat_busy", false);
        recorder.record("post", Duration::from_millis(2), "error/connect", false);
        let line = recorder.progress_line();
        assert!(
            figures(&line, "delivery_lag").contains(" 0 failed,"),
            "{line}"
        );
        assert!(figures(&line, "insert").contains(" 1 failed,"), "{line}");
        assert!(figures(&line, "post").contains(" 2 failed,"), "{line}");
        assert_eq!(recorder.ok_count("delivery_lag"), 5);
        assert_eq!(recorder.ok_count("insert"), 1);
        assert_eq!(recorder.ok_count("post"), 1);
    }
}
