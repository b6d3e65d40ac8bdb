//! The HTTP adapter (axum): the seed's REST endpoints (generated from `openapi/mqproxy.yaml`),
//! the OpenAPI document at `/openapi.json`, Swagger UI at `/swagger-ui/`, CORS.
//! Holds an [`Engine`]; never touches a store.

pub mod admin_auth;
pub mod api;
mod assets;
mod cors;
mod handlers;
pub(crate) mod metrics;
mod sse;
pub mod support;

pub(crate) use handlers::HttpAdapter;

use crate::engine::limits::Bounds;
use crate::engine::{Engine, SettingError};
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use support::{RouterSettings, RouterState};

/// The REST contract, exactly as checked in.
const OPENAPI_YAML: &str = include_str!("../../openapi/mqproxy.yaml");

/// The contract as JSON (the document served at `/openapi.json`).
///
/// # Panics
/// Never at run time: `build.rs` parsed the same file, so the build fails first.
fn openapi_json() -> serde_json::Value {
    yaml_serde::from_str(OPENAPI_YAML)
        .unwrap_or_else(|e| unreachable!("openapi/mqproxy.yaml was checked at build time: {e}"))
}

/// The answer policy of the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpStatusPolicy {
    /// Always 200, the outcome in the body's `status` (the Java proxy's behaviour).
    Body,
    /// The HTTP status follows the body's `status` (400, 500).
    Mirror,
}

/// The `[http]` section: REST answers, request sizes (gRPC's too) and CORS.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub status: HttpStatusPolicy,
    /// Largest request body, a REST body or a gRPC message (above 4 MiB so an oversize message
    /// gets the documented answer rather than a 413).
    pub max_request_bytes: u64,
    /// Allowed CORS origins; `["*"]` (the default) allows any, `[]` turns CORS off.
    pub cors_allowed_origins: Vec<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            status: HttpStatusPolicy::Body,
            max_request_bytes: 64 * 1024 * 1024,
            cors_allowed_origins: vec!["*".into()],
        }
    }
}

impl HttpSettings {
    /// # Errors
    /// A value out of its range, named by its key in the section.
    pub fn check(&self) -> Result<(), SettingError> {
        Bounds::new(8 * 1024 * 1024, 1 << 31).setting("max_request_bytes", self.max_request_bytes)
    }

    pub fn max_request_bytes(&self) -> usize {
        usize::try_from(self.max_request_bytes).unwrap_or(usize::MAX)
    }
}

/// The whole HTTP application, as served on one listener (the admin rule depends on which).
/// It has no fallback of its own: the server sets one after merging the gRPC routes
/// ([`support::no_such_endpoint`] for REST requests).
/// `admin_token` guards the admin API (None: loopback clients of the admin listener only);
/// `body_timeout` is the time a REST request body may take to arrive.
pub(crate) fn router(
    engine: Engine,
    settings: &HttpSettings,
    admin_token: Option<String>,
    body_timeout: Duration,
    role: admin_auth::ListenerRole,
) -> Router {
    let metrics = Router::new()
        .route("/metrics", axum::routing::get(metrics::serve))
        .with_state(engine.clone());
    let state = RouterState {
        api: Arc::new(HttpAdapter { engine }),
        settings: Arc::new(RouterSettings {
            mirror_http_status: settings.status == HttpStatusPolicy::Mirror,
            max_request_bytes: settings.max_request_bytes(),
            body_timeout,
        }),
    };
    let swagger =
        utoipa_swagger_ui::SwaggerUi::new("/swagger-ui").external_url_unchecked("/openapi.json", openapi_json());
    let access = admin_auth::AdminAccess::new(admin_token, role);
    let app = api::router(state)
        .merge(metrics)
        .merge(assets::router())
        .merge(swagger)
        // After every route: it applies to the routes registered so far.
        .method_not_allowed_fallback(support::method_not_allowed)
        .layer(admin_auth::AdminGuardLayer::new(access));
    // A span per request only when debug logging is on (the filter is fixed at start): the
    // layer's bookkeeping cost a few percent of a small request otherwise.
    let app = if tracing::enabled!(tracing::Level::DEBUG) {
        // Spans name the path only: query strings may carry tokens (`token=`), never logged.
        app.layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &axum::extract::Request| {
                tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
            }),
        )
    } else {
        app
    };
    match cors::layer(&settings.cors_allowed_origins) {
        Some(layer) => app.layer(layer),
        None => app,
    }
}
