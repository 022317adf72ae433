//! What an instance says about itself: `/metrics` samples and admin requests.

use serde_json::Value;

/// A request to the admin API with `token`.
pub fn admin(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    http.request(method, format!("{base}{path}"))
        .bearer_auth(token)
}

/// `GET` of an admin route, asserting 200; the JSON body.
pub async fn admin_get(http: &reqwest::Client, base: &str, token: &str, path: &str) -> Value {
    let r = admin(http, base, token, reqwest::Method::GET, path)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.expect("admin json")
}

/// Prometheus samples of `/metrics` named `metric`: labels and value.
pub async fn metric_samples(
    http: &reqwest::Client,
    base: &str,
    metric: &str,
) -> Vec<(String, f64)> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    samples_of(&text, metric)
}

/// The samples named `metric` of a Prometheus text exposition.
pub fn samples_of(text: &str, metric: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of the samples whose labels contain every one of `labels`
/// (each `key="value"`).
pub fn sum_where(samples: &[(String, f64)], labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(l, _)| labels.iter().all(|want| l.contains(want)))
        .map(|(_, v)| v)
        .sum()
}
