//! The HTTP adapter (axum): the seed's REST endpoints (generated from `openapi/mqproxy.yaml`),
//! the OpenAPI document at `/openapi.json`, Swagger UI at `/swagger-ui/`, CORS.
//! Holds an [`Engine`]; never touches a store.

pub mod admin_auth;
pub mod api;
mod assets;
mod handlers;
pub mod metrics;
pub mod support;

pub use handlers::HttpAdapter;

use crate::engine::Engine;
use axum::Router;
use axum::http::HeaderValue;
use std::sync::Arc;
use support::{RouterSettings, RouterState};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

/// The REST contract, exactly as checked in.
pub const OPENAPI_YAML: &str = include_str!("../../openapi/mqproxy.yaml");

/// The contract as JSON (the document served at `/openapi.json`).
///
/// # Panics
/// Never at run time: `build.rs` parsed the same file, so the build fails first.
pub fn openapi_json() -> serde_json::Value {
    yaml_serde::from_str(OPENAPI_YAML)
        .unwrap_or_else(|e| unreachable!("openapi/mqproxy.yaml was checked at build time: {e}"))
}

/// HTTP settings of the adapter.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub mirror_http_status: bool,
    pub max_request_bytes: usize,
    /// Allowed CORS origins; `["*"]` allows any, empty turns CORS off.
    pub cors_allowed_origins: Vec<String>,
    /// The admin API's token; None: loopback clients of the admin listener only.
    pub admin_token: Option<String>,
    /// Time a REST request body may take to arrive.
    pub body_timeout: std::time::Duration,
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    Some(if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    })
}

/// The whole HTTP application, as served on one listener (the admin rule depends on which).
/// It has no fallback of its own: the server sets one after merging the gRPC routes
/// ([`support::no_such_endpoint`] for REST requests).
pub fn router(engine: Engine, settings: &HttpSettings, role: admin_auth::ListenerRole) -> Router {
    let metrics = Router::new()
        .route("/metrics", axum::routing::get(metrics::serve))
        .with_state(engine.clone());
    let state = RouterState {
        api: Arc::new(HttpAdapter { engine }),
        settings: Arc::new(RouterSettings {
            mirror_http_status: settings.mirror_http_status,
            max_request_bytes: settings.max_request_bytes,
            body_timeout: settings.body_timeout,
        }),
    };
    let swagger =
        utoipa_swagger_ui::SwaggerUi::new("/swagger-ui").external_url_unchecked("/openapi.json", openapi_json());
    let access = Arc::new(admin_auth::AdminAccess::new(settings.admin_token.clone(), role));
    let app = api::router(state)
        .merge(metrics)
        .merge(assets::router())
        .merge(swagger)
        // After every route: it applies to the routes registered so far.
        .method_not_allowed_fallback(support::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(access, admin_auth::guard))
        // Spans name the path only: query strings may carry tokens (`token=`), never logged.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &axum::extract::Request| {
                tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
            }),
        );
    match cors(&settings.cors_allowed_origins) {
        Some(layer) => app.layer(layer),
        None => app,
    }
}
