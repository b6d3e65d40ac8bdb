//! `GET /metrics` (Prometheus text format) and the request-latency middleware that feeds the
//! engine's `request_duration_seconds` histogram for both protocols on the port.

use crate::engine::Engine;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
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
/// by their content type. A plain tower layer: no boxed future per request.
#[derive(Clone)]
pub(crate) struct ObserveLayer {
    engine: Engine,
}

impl ObserveLayer {
    pub(crate) fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            engine: self.engine.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    engine: Engine,
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The matched pattern is shared (an `Arc<str>` inside): no copy per request.
        let operation = req.extensions().get::<MatchedPath>().cloned();
        let grpc = super::support::is_grpc_request(req.headers());
        ObserveFuture {
            inner: self.inner.call(req),
            engine: self.engine.clone(),
            operation,
            grpc,
            started: Instant::now(),
        }
    }
}

pin_project_lite::pin_project! {
    pub(crate) struct ObserveFuture<F> {
        #[pin]
        inner: F,
        engine: Engine,
        operation: Option<MatchedPath>,
        grpc: bool,
        started: Instant,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for ObserveFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &result
            && (*this.grpc || response.status() != StatusCode::NOT_FOUND)
        {
            let protocol = if *this.grpc { "grpc" } else { "http" };
            let operation = this.operation.as_ref().map_or("(unmatched)", MatchedPath::as_str);
            this.engine
                .observe_request(protocol, operation, this.started.elapsed().as_secs_f64());
        }
        Poll::Ready(result)
    }
}
