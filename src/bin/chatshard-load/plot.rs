//! `--plot FILE.svg`: throughput and latency over time, one line per kind of
//! request, with the run's marks (spike start, fault) as vertical lines.
//!
//! Drawn from the JSON report as plain SVG (polylines and text): the chart is
//! two panels of lines, and plotters would need a font file for its text
//! layout to draw the same.

use std::fmt::Write as _;

use serde_json::Value;

const WIDTH: f64 = 960.0;
const PANEL: f64 = 250.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The chart of a report made by `Recorder::to_json`.
pub fn svg(report: &Value) -> String {
    let kinds: Vec<(&String, &Value)> = report["kinds"]
        .as_object()
        .map(|k| k.iter().collect())
        .unwrap_or_default();
    let numbers = |v: &Value, key: &str| -> Vec<f64> {
        v[key]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    let seconds = report["seconds"].as_f64().unwrap_or(1.0).max(1.0);
    let (rate_max, rate_step) = axis(
        kinds
            .iter()
            .flat_map(|(_, v)| numbers(v, "okPerSecondTimeline"))
            .fold(1.0, f64::max),
    );
    let (ms_max, ms_step) = axis(
        kinds
            .iter()
            .flat_map(|(_, v)| numbers(v, "p99MsTimeline"))
            .fold(1.0, f64::max),
    );
    let height = TOP + 2.0 * PANEL + GAP + 50.0;
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |s: f64| LEFT + plot_w * (s / seconds).min(1.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let panels = [
        ("successes per second", TOP, (rate_max, rate_step)),
        (
            "p99 (solid) and p50 (dashed), ms",
            TOP + PANEL + GAP,
            (ms_max, ms_step),
        ),
    ];
    for (title, top, (max, step)) in panels {
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"{}\" font-weight=\"bold\">{title}</text>",
            top - 10.0
        );
        let _ = writeln!(
            out,
            "<rect x=\"{LEFT}\" y=\"{top}\" width=\"{plot_w}\" height=\"{PANEL}\" fill=\"none\" stroke=\"#999\"/>"
        );
        for value in ticks(max, step) {
            let y = top + PANEL - PANEL * value / max;
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
                LEFT + plot_w,
                LEFT - 6.0,
                y + 4.0,
                label(value)
            );
        }
    }
    // Seconds along the bottom.
    let bottom = TOP + 2.0 * PANEL + GAP;
    for i in 0..=10 {
        let s = seconds * f64::from(i) / 10.0;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{s:.0} s</text>",
            x(s),
            bottom + 18.0
        );
    }
    let line = |points: &[f64], top: f64, max: f64, color: &str, dash: &str| {
        let path: Vec<String> = points
            .iter()
            .enumerate()
            .map(|(i, v)| {
                // Each second's value is drawn at the middle of that second.
                let y = top + PANEL - PANEL * (v / max).min(1.0);
                format!("{:.1},{:.1}", x(i as f64 + 0.5), y)
            })
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"{dash} points=\"{}\"/>\n",
            path.join(" ")
        )
    };
    for (i, (kind, v)) in kinds.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        out += &line(&numbers(v, "okPerSecondTimeline"), TOP, rate_max, color, "");
        let (latency_top, dashed) = (TOP + PANEL + GAP, " stroke-dasharray=\"4 3\"");
        out += &line(&numbers(v, "p99MsTimeline"), latency_top, ms_max, color, "");
        out += &line(
            &numbers(v, "p50MsTimeline"),
            latency_top,
            ms_max,
            color,
            dashed,
        );
        let _ = writeln!(
            out,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            WIDTH - RIGHT + 14.0,
            TOP + 20.0 * i as f64,
            WIDTH - RIGHT + 32.0,
            TOP + 20.0 * i as f64 + 11.0,
            escape(kind)
        );
    }
    for mark in report["marks"].as_array().into_iter().flatten() {
        let at = mark["atSeconds"].as_f64().unwrap_or(0.0);
        let what = mark["what"].as_str().unwrap_or_default();
        let _ = writeln!(
            out,
            "<line x1=\"{0}\" y1=\"{TOP}\" x2=\"{0}\" y2=\"{bottom}\" stroke=\"#c00\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{1}\" y=\"{2}\" fill=\"#c00\">{3}</text>",
            x(at),
            x(at) + 4.0,
            TOP + 14.0,
            escape(what)
        );
    }
    out + "</svg>\n"
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `v`.
fn nice(v: f64) -> f64 {
    let power = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|x| *x >= v)
        .unwrap_or(v)
}

/// An axis for values up to `max`: its step on a 1-2-5 value (about five
/// steps) and its top, a whole number of steps at or above `max`.
fn axis(max: f64) -> (f64, f64) {
    let step = nice(max.max(1e-9) / 5.0);
    ((max / step).ceil().max(1.0) * step, step)
}

/// The tick values of an axis: 0, `step`, 2 × `step`, … up to `max`.
fn ticks(max: f64, step: f64) -> Vec<f64> {
    let n = (max / step).round() as u32;
    (0..=n).map(|i| step * f64::from(i)).collect()
}

/// A tick's label: the value itself, in thousands as `k` from 1,000 on
/// (`2.5k`, never rounded to another tick's value).
fn label(v: f64) -> String {
    /// With as many decimals as the value has (a tick is a whole number of
    /// a 1-2-5 step, so a few at most), without trailing zeros.
    fn plain(v: f64) -> String {
        let decimals = (0..12)
            .find(|d| {
                let scaled = v * 10f64.powi(*d);
                (scaled - scaled.round()).abs() <= 1e-6 * scaled.abs().max(1.0)
            })
            .unwrap_or(12) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    }
    if v >= 1000.0 {
        format!("{}k", plain(v / 1000.0))
    } else {
        plain(v)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_line_per_kind_and_series_and_the_marks() {
        let report = serde_json::json!({
            "seconds": 3.0,
            "kinds": {
                "join": {"okPerSecondTimeline": [10, 20, 30], "p99MsTimeline": [1.0, 2.0, 3.0], "p50MsTimeline": [0.5, 1.0, 1.5]},
                "a<b": {"okPerSecondTimeline": [1, 2, 3], "p99MsTimeline": [4.0, 5.0, 6.0], "p50MsTimeline": [1.0, 1.0, 1.0]},
            },
            "marks": [{"atSeconds": 1.5, "what": "spike start"}],
        });
        let svg = svg(&report);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 6);
        assert!(svg.contains("spike start"));
        assert!(svg.contains("a&lt;b"));
        assert_eq!(nice(37.0), 50.0);
        assert_eq!(nice(0.7), 1.0);
    }

    fn labels(max: f64) -> Vec<String> {
        let (top, step) = axis(max);
        ticks(top, step).into_iter().map(label).collect()
    }

    #[test]
    fn ticks_sit_on_round_values_and_say_what_they_are() {
        // The celebrity chat's 2,460 reads/s: ticks every 500, labelled as such.
        assert_eq!(labels(2460.0), ["0", "500", "1k", "1.5k", "2k", "2.5k"]);
        assert_eq!(labels(4900.0), ["0", "1k", "2k", "3k", "4k", "5k"]);
        assert_eq!(labels(37.0), ["0", "10", "20", "30", "40"]);
        assert_eq!(labels(0.7), ["0", "0.2", "0.4", "0.6", "0.8"]);
        assert_eq!(labels(13.0), ["0", "5", "10", "15"]);
        // Every step is 1, 2 or 5 times a power of ten, the top at or above
        // the data.
        for max in [0.3, 1.0, 7.0, 99.0, 1234.0, 250_000.0] {
            let (top, step) = axis(max);
            assert!(top >= max, "{max}");
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-9),
                "{max}: {step}"
            );
        }
        assert_eq!(
            labels(0.0009),
            ["0", "0.0002", "0.0004", "0.0006", "0.0008", "0.001"]
        );
    }

    /// A label read back: `2.5k` is 2,500.
    fn read_back(label: &str) -> f64 {
        match label.strip_suffix('k') {
            Some(thousands) => thousands.parse::<f64>().unwrap_or(f64::NAN) * 1000.0,
            None => label.parse().unwrap_or(f64::NAN),
        }
    }

    proptest::proptest! {
        #[test]
        fn every_axis_has_three_to_six_round_ticks_that_say_their_value(
            max in 1e-3f64..1e8,
        ) {
            let (top, step) = axis(max);
            let values = ticks(top, step);
            proptest::prop_assert!(top >= max);
            // About five steps: the top is at most one step above the data.
            proptest::prop_assert!(top - step < max);
            proptest::prop_assert!((3..=6).contains(&values.len()), "{values:?}");
            let mantissa = step / 10f64.powf(step.log10().floor());
            proptest::prop_assert!(
                [1.0, 2.0, 5.0, 10.0].iter().any(|m| (mantissa - m).abs() < 1e-9),
                "{step}"
            );
            let labels: Vec<String> = values.iter().copied().map(label).collect();
            for (value, label) in values.iter().zip(&labels) {
                let back = read_back(label);
                proptest::prop_assert!(
                    (back - value).abs() <= 1e-9 * value.abs().max(1.0),
                    "{label} for {value}"
                );
            }
            let mut distinct = labels.clone();
            distinct.dedup();
            proptest::prop_assert_eq!(distinct.len(), labels.len());
        }
    }
}
