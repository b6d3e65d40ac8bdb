//! `GET /metrics` (Prometheus text format) and the request-latency middleware that feeds the
//! engine's `request_duration_seconds` histogram for both protocols on the port.

use crate::engine::Engine;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Instant;

/// `GET /metrics`.
pub(crate) async fn serve(State(engine): State<Engine>) -> Response {
    match engine.render_metrics().await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("metrics failed: {e}\n")).into_response()
        }
    }
}

/// Times every request to a known route (the route pattern is the label; any path no route
/// matched is `(unmatched)`, so clients cannot grow the label set); gRPC calls are told apart
/// by their content type.
pub(crate) async fn observe(State(engine): State<Engine>, req: Request, next: Next) -> Response {
    let operation = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "(unmatched)".to_owned(), |p| p.as_str().to_owned());
    let grpc = super::support::is_grpc_request(req.headers());
    let started = Instant::now();
    let response = next.run(req).await;
    if grpc || response.status() != StatusCode::NOT_FOUND {
        let protocol = if grpc { "grpc" } else { "http" };
        engine.observe_request(protocol, &operation, started.elapsed().as_secs_f64());
    }
    response
}
