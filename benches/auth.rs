//! What checking a caller costs per request, side by side in one run:
//!
//! - `authorize/open`: no client configured (the check returns at once);
//! - `authorize/{1,16,64}_clients`: a bearer token hashed (SHA-256) and
//!   compared, in constant time, with every configured client's digest.
//!
//! Run with `cargo bench --bench auth`; docs/benchmarks.md has results.

use chatshard::config::{ApiClient, Scope};
use chatshard::http::auth::Callers;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sha2::{Digest, Sha256};

fn client(i: usize) -> ApiClient {
    let token = format!("token-of-client-{i}-0123456789abcdef0123456789abcdef");
    ApiClient {
        name: format!("client-{i}"),
        token_sha256: Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        scopes: vec![Scope::Read, Scope::Write],
        ..ApiClient::default()
    }
}

fn authorize(c: &mut Criterion) {
    let mut group = c.benchmark_group("authorize");
    let open = Callers::new(&[]);
    group.bench_function(BenchmarkId::from_parameter("open"), |b| {
        b.iter(|| std::hint::black_box(open.is_open()))
    });
    for n in [1usize, 16, 64] {
        let clients: Vec<ApiClient> = (0..n).map(client).collect();
        let callers = Callers::new(&clients);
        // The last client's token: every digest is compared either way.
        let header = format!(
            "Bearer token-of-client-{}-0123456789abcdef0123456789abcdef",
            n - 1
        );
        group.bench_function(BenchmarkId::from_parameter(format!("{n}_clients")), |b| {
            b.iter(|| {
                std::hint::black_box(callers.authorize(Some(header.as_str()), None, Scope::Write))
                    .is_ok()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, authorize);
criterion_main!(benches);
