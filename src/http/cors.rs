//! CORS for browsers only: a request with an `Origin` header (every cross-origin browser
//! request and preflight has one) goes through tower-http's CORS layer; any other gets the
//! same headers that layer would have added to it, as fixed values, so answers are identical
//! and a plain client's request does not pay the layer's per-response header work.

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_http::cors::{AllowOrigin, Any, Cors, CorsLayer};

/// The `Vary` value tower-http's layer sets on every answer.
const VARY: &str = "origin, access-control-request-method, access-control-request-headers";

/// The CORS layer for `origins` (`*`: any); None for an empty list (no CORS headers at all).
pub(crate) fn layer(origins: &[String]) -> Option<BrowserCorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    let mut fixed = HeaderMap::new();
    fixed.insert(header::VARY, HeaderValue::from_static(VARY));
    let cors = if origins.iter().any(|o| o == "*") {
        // Any origin: the layer answers `*` whether or not the request names one.
        fixed.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    };
    Some(BrowserCorsLayer {
        cors,
        fixed: Arc::new(fixed),
    })
}

#[derive(Clone)]
pub(crate) struct BrowserCorsLayer {
    cors: CorsLayer,
    /// What the CORS layer adds to an answer to a request without `Origin`.
    fixed: Arc<HeaderMap>,
}

impl<S: Clone> tower::Layer<S> for BrowserCorsLayer {
    type Service = BrowserCors<S>;

    fn layer(&self, inner: S) -> BrowserCors<S> {
        BrowserCors {
            cors: self.cors.layer(inner.clone()),
            plain: inner,
            fixed: self.fixed.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct BrowserCors<S> {
    cors: Cors<S>,
    plain: S,
    fixed: Arc<HeaderMap>,
}

impl<S> tower::Service<Request> for BrowserCors<S>
where
    S: tower::Service<Request, Response = Response> + Clone,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BrowserCorsFuture<<Cors<S> as tower::Service<Request>>::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        match self.cors.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.plain.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if req.headers().contains_key(header::ORIGIN) {
            BrowserCorsFuture::Browser {
                inner: self.cors.call(req),
            }
        } else {
            BrowserCorsFuture::Plain {
                inner: self.plain.call(req),
                fixed: self.fixed.clone(),
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = BrowserCorsProjection]
    pub(crate) enum BrowserCorsFuture<C, P> {
        Browser { #[pin] inner: C },
        Plain { #[pin] inner: P, fixed: Arc<HeaderMap> },
    }
}

impl<C, P, E> Future for BrowserCorsFuture<C, P>
where
    C: Future<Output = Result<Response, E>>,
    P: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BrowserCorsProjection::Browser { inner } => inner.poll(cx),
            BrowserCorsProjection::Plain { inner, fixed } => {
                let mut result = std::task::ready!(inner.poll(cx));
                if let Ok(response) = &mut result {
                    let headers = response.headers_mut();
                    for (name, value) in fixed.iter() {
                        headers.append(name, value.clone());
                    }
                }
                Poll::Ready(result)
            }
        }
    }
}
