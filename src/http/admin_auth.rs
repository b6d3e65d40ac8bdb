//! Who may call the admin API (`/admin/...` and the Java proxy's `/mq/*/queue/offset` views).
//!
//! Every request through a same-host reverse proxy arrives from loopback, and a bare
//! `proxy_pass` adds no forwarding header, so neither the socket address nor the headers tell
//! a local operator from a stranger on the public port. The listener does: the admin listener
//! (`admin_listen`, loopback by default) is one no reverse proxy of the public port reaches.
//! - `admin_token` set: every admin request needs it (`Authorization: Bearer TOKEN` or a
//!   `token` query parameter, compared in constant time), on either listener.
//! - no `admin_token`: the public listener refuses every admin request; the admin listener
//!   serves loopback clients whose request carries no forwarding header (a proxy put in front
//!   of the admin listener too still needs the token).

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What the rule above means for this server, in one sentence for the start-up log.
pub(crate) fn describe_rule(has_token: bool, admin_listener: Option<SocketAddr>) -> String {
    match (has_token, admin_listener) {
        (true, Some(addr)) => {
            format!("admin access: the admin API and console on the public listener and on the admin listener {addr}, admin_token required on both")
        }
        (true, None) => "admin access: the admin API and console on the public listener, admin_token required (admin_listen = \"off\")".into(),
        (false, Some(addr)) => format!(
            "admin access: the admin API and console only on the admin listener {addr}, for loopback clients whose request has no forwarding header; the public listener refuses them (set admin_token to serve them there)"
        ),
        (false, None) => "admin access: the admin API and console are unreachable (admin_listen = \"off\" and no admin_token; set admin_token to serve them on the public listener)".into(),
    }
}

/// Which listener a router serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerRole {
    /// The port clients (and reverse proxies) reach.
    Public,
    /// `admin_listen`: for operators on the machine.
    Admin,
}

/// The admin API's access rule on one listener.
#[derive(Debug, Clone)]
pub(crate) struct AdminAccess {
    token: Option<String>,
    role: ListenerRole,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No token presented where one is required (401).
    MissingToken,
    /// A wrong token (403).
    WrongToken,
    /// No admin token is configured and the request came to the public listener (403).
    PublicListener,
    /// No admin token is configured and the request came through a proxy (403).
    Forwarded,
    /// No admin token is configured and the caller is not on loopback (403).
    NotLoopback,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Self::MissingToken => StatusCode::UNAUTHORIZED,
            Self::WrongToken | Self::PublicListener | Self::Forwarded | Self::NotLoopback => StatusCode::FORBIDDEN,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::MissingToken => "the admin API needs a token: Authorization: Bearer TOKEN, or token=TOKEN",
            Self::WrongToken => "wrong admin token",
            Self::PublicListener => {
                "the admin API is served on the admin listener (admin_listen, loopback) until admin_token is configured"
            }
            Self::Forwarded => "an admin request that came through a proxy needs admin_token",
            Self::NotLoopback => "the admin API answers loopback clients only until admin_token is configured",
        }
    }
}

/// True for the paths the admin rule guards.
pub fn is_admin_path(path: &str) -> bool {
    // The prefix too: an /admin/ path the spec does not know is refused before it is a 404.
    path.starts_with("/admin/") || super::api::ADMIN_PATHS.contains(&path)
}

/// Headers a proxy adds on the way (RFC 7239, the de-facto `X-Forwarded-*`, nginx's
/// `X-Real-IP`, HTTP's `Via`).
const FORWARDING_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
];

/// True when the request says it came through a proxy.
pub(crate) fn is_forwarded(headers: &HeaderMap) -> bool {
    FORWARDING_HEADERS.iter().any(|h| headers.contains_key(*h))
}

impl AdminAccess {
    pub(crate) fn new(token: Option<String>, role: ListenerRole) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()),
            role,
        }
    }

    /// The rule itself: `presented` is the token the request carries, `peer` its socket,
    /// `forwarded` whether it carries a forwarding header.
    pub(crate) fn check(&self, presented: Option<&str>, peer: SocketAddr, forwarded: bool) -> Result<(), Refusal> {
        match (&self.token, presented) {
            (Some(_), None) => Err(Refusal::MissingToken),
            (Some(expected), Some(given)) => {
                if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
                    Ok(())
                } else {
                    Err(Refusal::WrongToken)
                }
            }
            (None, _) if self.role == ListenerRole::Public => Err(Refusal::PublicListener),
            (None, _) if forwarded => Err(Refusal::Forwarded),
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

/// Middleware: guards the admin paths, passes every other request through. A plain tower
/// layer deciding at once (the rule needs no I/O): no boxed future per request.
#[derive(Clone)]
pub(crate) struct AdminGuardLayer {
    access: Arc<AdminAccess>,
}

impl AdminGuardLayer {
    pub(crate) fn new(access: AdminAccess) -> Self {
        Self {
            access: Arc::new(access),
        }
    }
}

impl<S> tower::Layer<S> for AdminGuardLayer {
    type Service = AdminGuard<S>;

    fn layer(&self, inner: S) -> AdminGuard<S> {
        AdminGuard {
            inner,
            access: self.access.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct AdminGuard<S> {
    inner: S,
    access: Arc<AdminAccess>,
}

impl<S> tower::Service<Request> for AdminGuard<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if is_admin_path(req.uri().path()) {
            // The listener always records the peer; without it nothing counts as loopback.
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
            let allowed = self
                .access
                .check(presented_token(&req).as_deref(), peer, is_forwarded(req.headers()));
            if let Err(refusal) = allowed {
                // Logged without the token.
                tracing::warn!(%peer, listener = ?self.access.role, path = req.uri().path(), reason = ?refusal, "admin request refused");
                let refused = super::support::refusal(refusal.status(), refusal.message());
                return GuardFuture::Refused {
                    response: Some(refused),
                };
            }
        }
        GuardFuture::Pass {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer, or the refusal made at once.
    #[project = GuardProjection]
    pub(crate) enum GuardFuture<F> {
        Pass { #[pin] inner: F },
        Refused { response: Option<Response> },
    }
}

impl<F: std::future::Future<Output = Result<Response, Infallible>>> std::future::Future for GuardFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match self.project() {
            GuardProjection::Pass { inner } => inner.poll(cx),
            // Polled once: the refusal is taken then.
            GuardProjection::Refused { response } => std::task::Poll::Ready(Ok(response.take().unwrap_or_default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start-up sentence says what `check` does: where a token is needed, which listener
    /// serves, and that nothing does when neither a token nor an admin listener is there.
    #[test]
    fn the_described_rule_is_the_checked_rule() {
        let addr: SocketAddr = "127.0.0.1:9081".parse().expect("addr");
        let loopback = peer("127.0.0.1");
        let public = |token: Option<&str>| AdminAccess::new(token.map(str::to_owned), ListenerRole::Public);
        let admin = |token: Option<&str>| AdminAccess::new(token.map(str::to_owned), ListenerRole::Admin);

        let text = describe_rule(true, Some(addr));
        assert!(
            text.contains("public listener and on the admin listener 127.0.0.1:9081"),
            "{text}"
        );
        assert!(text.contains("admin_token required"), "{text}");
        assert_eq!(public(Some("t")).check(Some("t"), loopback, true), Ok(()));
        assert_eq!(
            admin(Some("t")).check(None, loopback, false),
            Err(Refusal::MissingToken)
        );

        let text = describe_rule(false, Some(addr));
        assert!(text.contains("only on the admin listener 127.0.0.1:9081"), "{text}");
        assert!(text.contains("public listener refuses"), "{text}");
        assert_eq!(admin(None).check(None, loopback, false), Ok(()));
        assert_eq!(admin(None).check(None, loopback, true), Err(Refusal::Forwarded));
        assert_eq!(
            admin(None).check(None, peer("10.0.0.1"), false),
            Err(Refusal::NotLoopback)
        );
        assert_eq!(public(None).check(None, loopback, false), Err(Refusal::PublicListener));

        let text = describe_rule(false, None);
        assert!(text.contains("unreachable"), "{text}");
        assert_eq!(
            public(None).check(Some("anything"), loopback, false),
            Err(Refusal::PublicListener)
        );
        assert!(describe_rule(true, None).contains("on the public listener, admin_token required"));
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 40000)
    }

    #[test]
    fn without_a_token_only_direct_loopback_on_the_admin_listener_passes() {
        let admin = AdminAccess::new(None, ListenerRole::Admin);
        assert_eq!(admin.check(None, peer("127.0.0.1"), false), Ok(()));
        assert_eq!(admin.check(None, peer("::1"), false), Ok(()));
        assert_eq!(admin.check(None, peer("127.0.0.1"), true), Err(Refusal::Forwarded));
        assert_eq!(admin.check(None, peer("10.1.2.3"), false), Err(Refusal::NotLoopback));
        assert_eq!(
            admin.check(Some("x"), peer("10.1.2.3"), false),
            Err(Refusal::NotLoopback)
        );
        let public = AdminAccess::new(None, ListenerRole::Public);
        assert_eq!(
            public.check(None, peer("127.0.0.1"), false),
            Err(Refusal::PublicListener)
        );
        assert_eq!(
            public.check(Some("x"), peer("127.0.0.1"), false),
            Err(Refusal::PublicListener)
        );
    }

    #[test]
    fn with_a_token_everyone_needs_it() {
        for role in [ListenerRole::Public, ListenerRole::Admin] {
            let guarded = AdminAccess::new(Some("s3cret".into()), role);
            assert_eq!(
                guarded.check(None, peer("127.0.0.1"), false),
                Err(Refusal::MissingToken)
            );
            assert_eq!(
                guarded.check(Some("s3cre"), peer("127.0.0.1"), false),
                Err(Refusal::WrongToken)
            );
            assert_eq!(guarded.check(Some("s3cret"), peer("10.1.2.3"), true), Ok(()));
        }
    }

    #[test]
    fn forwarding_headers() {
        let mut headers = HeaderMap::new();
        assert!(!is_forwarded(&headers));
        headers.insert("x-real-ip", "10.0.0.1".parse().expect("value"));
        assert!(is_forwarded(&headers));
    }

    #[test]
    fn guarded_paths() {
        assert!(is_admin_path("/admin/consumer/config"));
        assert!(is_admin_path("/mq/clustering/queue/offset"));
        assert!(is_admin_path("/mq/broadcast/pop/ack"));
        assert!(!is_admin_path("/mq/message"));
        assert!(!is_admin_path("/administrator"));
    }
}
