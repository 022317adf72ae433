//! OTLP over gRPC: a collector's gRPC services run inside this test and receive
//! chatshard's traces and metrics. (Its own test binary: the tracing subscriber
//! is global to the process.)
#![cfg(feature = "otlp-grpc")]

#[path = "common/mod.rs"]
mod common;

use common::Wait;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatshard::telemetry::{OtlpProtocol, TelemetrySettings};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// A span's name and its events' names.
type SpanNames = (String, Vec<String>);

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<SpanNames>>>,
    metrics: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push((s.name, s.events.into_iter().map(|e| e.name).collect()));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.metrics.lock().unwrap();
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                metrics.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_and_metrics_reach_a_grpc_collector() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let services = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .add_service(MetricsServiceServer::new(collector.clone()));
    tokio::spawn(async move {
        services
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap()
    });

    let settings = TelemetrySettings {
        otlp_endpoint: format!("http://{addr}"),
        otlp_protocol: Some(OtlpProtocol::Grpc),
        ..Default::default()
    };
    let export = settings.export().unwrap().unwrap();
    assert_eq!(export.protocol, OtlpProtocol::Grpc);
    let tracing = chatshard::telemetry::init(&settings).unwrap();
    let metrics = chatshard::metrics::Metrics::new(Some(&export)).unwrap();

    tracing::info_span!("grpc_probe").in_scope(|| tracing::info!("grpc_event"));
    metrics.record_http(0.004, "/probe".to_owned(), &axum::http::Method::GET, 200);
    // A graceful stop exports the metrics; traces are flushed by the guard.
    tokio::task::spawn_blocking(move || metrics.shutdown())
        .await
        .unwrap();

    Wait::new(Duration::from_secs(20), "a span over gRPC")
        .every(Duration::from_millis(50))
        .until(|| async {
            tracing.flush().await;
            let spans = collector.spans.lock().unwrap().clone();
            match spans.iter().find(|(name, _)| name == "grpc_probe") {
                Some((_, events)) => {
                    assert!(events.iter().any(|e| e == "grpc_event"), "{events:?}");
                    Ok(())
                }
                None => Err(format!("{spans:?}")),
            }
        })
        .await;
    let names = collector.metrics.lock().unwrap().clone();
    assert!(
        names.iter().any(|n| n == "http.server.request.duration"),
        "{names:?}"
    );
    tracing.shutdown().await;
}
