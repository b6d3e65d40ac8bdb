//! Who may call the admin API (`/admin/...` and the Java proxy's `/mq/*/queue/offset` views):
//! with `admin_token` set, callers presenting it (`Authorization: Bearer TOKEN` or a `token`
//! query parameter, compared in constant time); without one, loopback clients only.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The admin API's access rule.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    token: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token presented where one is required (401).
    MissingToken,
    /// A wrong token (403).
    WrongToken,
    /// No admin token is configured and the caller is not on loopback (403).
    NotLoopback,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Self::MissingToken => StatusCode::UNAUTHORIZED,
            Self::WrongToken | Self::NotLoopback => StatusCode::FORBIDDEN,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::MissingToken => "the admin API needs a token: Authorization: Bearer TOKEN, or token=TOKEN",
            Self::WrongToken => "wrong admin token",
            Self::NotLoopback => "the admin API answers loopback clients only until admin_token is configured",
        }
    }
}

/// True for the paths the admin rule guards.
pub fn is_admin_path(path: &str) -> bool {
    path.starts_with("/admin/") || path == "/mq/clustering/queue/offset" || path == "/mq/broadcast/queue/offset"
}

impl AdminAccess {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// The rule itself: `presented` is the token the request carries, `peer` its socket.
    pub fn check(&self, presented: Option<&str>, peer: SocketAddr) -> Result<(), Refusal> {
        match (&self.token, presented) {
            (Some(_), None) => Err(Refusal::MissingToken),
            (Some(expected), Some(given)) => {
                if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
                    Ok(())
                } else {
                    Err(Refusal::WrongToken)
                }
            }
            (None, _) if peer.ip().is_loopback() => Ok(()),
            (None, _) => Err(Refusal::NotLoopback),
        }
    }
}

/// The token a request presents: the bearer header first, then the `token` query parameter.
fn presented_token(req: &Request) -> Option<String> {
    let bearer = super::support::bearer_token(req.headers()).map(str::to_owned);
    bearer.or_else(|| {
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    })
}

/// Middleware: guards the admin paths, passes every other request through.
pub async fn guard(
    State(access): State<Arc<AdminAccess>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !is_admin_path(req.uri().path()) {
        return next.run(req).await;
    }
    match access.check(presented_token(&req).as_deref(), peer) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            // Logged without the token.
            tracing::warn!(%peer, path = req.uri().path(), reason = ?refusal, "admin request refused");
            let body = serde_json::json!({"status": refusal.status().as_u16(), "message": refusal.message()});
            (refusal.status(), axum::Json(body)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 40000)
    }

    #[test]
    fn without_a_token_only_loopback_passes() {
        let open = AdminAccess::new(None);
        assert_eq!(open.check(None, peer("127.0.0.1")), Ok(()));
        assert_eq!(open.check(None, peer("::1")), Ok(()));
        assert_eq!(open.check(None, peer("10.1.2.3")), Err(Refusal::NotLoopback));
        assert_eq!(open.check(Some("x"), peer("10.1.2.3")), Err(Refusal::NotLoopback));
    }

    #[test]
    fn with_a_token_everyone_needs_it() {
        let guarded = AdminAccess::new(Some("s3cret".into()));
        assert_eq!(guarded.check(None, peer("127.0.0.1")), Err(Refusal::MissingToken));
        assert_eq!(
            guarded.check(Some("s3cre"), peer("127.0.0.1")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(guarded.check(Some("s3cret"), peer("10.1.2.3")), Ok(()));
    }

    #[test]
    fn guarded_paths() {
        assert!(is_admin_path("/admin/consumer/config"));
        assert!(is_admin_path("/mq/clustering/queue/offset"));
        assert!(!is_admin_path("/mq/message"));
        assert!(!is_admin_path("/administrator"));
    }
}
