//! Static pages compiled into the binary (no CDN, nothing on disk): the console at `/console/`
//! and the seed document's jQuery demos at `/demo/` (jQuery 3.7.1 vendored from npm, MIT).

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// (URL path, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "console/index.html",
        HTML,
        include_bytes!("../../assets/console/index.html"),
    ),
    (
        "console/console.js",
        JS,
        include_bytes!("../../assets/console/console.js"),
    ),
    (
        "console/console.css",
        CSS,
        include_bytes!("../../assets/console/console.css"),
    ),
    ("demo/index.html", HTML, include_bytes!("../../assets/demo/index.html")),
    (
        "demo/produce.html",
        HTML,
        include_bytes!("../../assets/demo/produce.html"),
    ),
    (
        "demo/clustering.html",
        HTML,
        include_bytes!("../../assets/demo/clustering.html"),
    ),
    (
        "demo/broadcast.html",
        HTML,
        include_bytes!("../../assets/demo/broadcast.html"),
    ),
    ("demo/push.html", HTML, include_bytes!("../../assets/demo/push.html")),
    (
        "demo/console-mirror.js",
        JS,
        include_bytes!("../../assets/demo/console-mirror.js"),
    ),
    ("demo/demo.css", CSS, include_bytes!("../../assets/demo/demo.css")),
    (
        "demo/jquery-3.7.1.min.js",
        JS,
        include_bytes!("../../assets/demo/jquery-3.7.1.min.js"),
    ),
];
const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

fn asset(path: &str) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, content_type, bytes)) => ([(header::CONTENT_TYPE, *content_type)], *bytes).into_response(),
        None => (StatusCode::NOT_FOUND, "no such page\n").into_response(),
    }
}

/// `/console/...` and `/demo/...`.
pub(super) fn router() -> Router {
    Router::new()
        .route("/console", get(|| async { Redirect::permanent("/console/") }))
        .route("/console/", get(|| async { asset("console/index.html") }))
        .route(
            "/console/{file}",
            get(|Path(file): Path<String>| async move { asset(&format!("console/{file}")) }),
        )
        .route("/demo", get(|| async { Redirect::permanent("/demo/") }))
        .route("/demo/", get(|| async { asset("demo/index.html") }))
        .route(
            "/demo/{file}",
            get(|Path(file): Path<String>| async move { asset(&format!("demo/{file}")) }),
        )
}
