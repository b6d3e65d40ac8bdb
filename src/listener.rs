//! The one listener: accepts TCP connections, caps how many are open, optionally terminates
//! TLS (rustls; ALPN offers h2 and http/1.1, so gRPC and REST share the port as in plain
//! text), and serves each connection with hyper (HTTP/1.1 or h2, detected). Slow clients are
//! bounded: the first byte, the TLS handshake and each HTTP/1.1 request head must arrive
//! within `header_timeout`; a connection with no traffic either way for `idle_timeout` is
//! closed (h2 connections are pinged meanwhile, so a live idle gRPC stream is traffic).

use crate::engine::SettingError;
use crate::engine::limits::Bounds;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tower::Service;

/// The `[listener]` section: how connections are accepted and served.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerSettings {
    /// Connections open at once; more are closed on arrival (and logged).
    pub max_connections: u64,
    /// Time for the first byte, the TLS handshake, each HTTP/1.1 request head, and a REST
    /// request's body (slow clients cannot hold connections).
    pub header_timeout_ms: u64,
    /// A connection without a byte read or written for this long is closed (idle gRPC
    /// streams are pinged four times per period, so they live on).
    pub idle_timeout_ms: u64,
    /// Concurrent HTTP/2 streams (gRPC calls) per connection.
    pub max_h2_streams: u32,
    /// Largest request head: an HTTP/1.1 head (hyper's read buffer), or an HTTP/2 header list
    /// (431 past it).
    pub max_header_bytes: u32,
    /// Serve HTTPS (and gRPC over TLS) instead of plain text.
    pub tls: Option<TlsFiles>,
}

impl Default for ListenerSettings {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            // hyper's own default, made explicit.
            max_h2_streams: 200,
            max_header_bytes: 64 * 1024,
            tls: None,
        }
    }
}

impl ListenerSettings {
    /// # Errors
    /// The first value out of its range, named by its key in the section.
    pub fn check(&self) -> Result<(), SettingError> {
        Bounds::new(1, 1_000_000).setting("max_connections", self.max_connections)?;
        Bounds::new(100, 600_000).setting("header_timeout_ms", self.header_timeout_ms)?;
        Bounds::new(1_000, 86_400_000).setting("idle_timeout_ms", self.idle_timeout_ms)?;
        Bounds::new(1, 100_000).setting("max_h2_streams", u64::from(self.max_h2_streams))?;
        // hyper's floor for its HTTP/1.1 read buffer is 8 KiB (it panics below).
        Bounds::new(8_192, 16 << 20).setting("max_header_bytes", u64::from(self.max_header_bytes))
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    fn max_connections(&self) -> usize {
        usize::try_from(self.max_connections).unwrap_or(usize::MAX)
    }
}

/// TLS on the listener (both files PEM).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate chain {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read the TLS private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the TLS certificate and key do not make a server configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A rustls server configuration from PEM files (certificate chain, private key), offering
/// h2 (gRPC) and http/1.1 by ALPN.
///
/// # Errors
/// Unreadable or malformed files, or a key that does not match the certificate.
pub(crate) fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    // An explicit provider: both rustls providers are compiled in (through dependencies),
    // so there is no unambiguous process default.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Logs refused connections at most once a second (a flood must not flood the log).
struct RefusalLog {
    refused: AtomicU64,
    last_logged_s: AtomicU64,
}

impl RefusalLog {
    fn refused(&self, max: usize) {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.last_logged_s.swap(now_s, Ordering::Relaxed) != now_s {
            tracing::warn!(
                max_connections = max,
                refused_total = total,
                "connection refused: [listener] max_connections are open"
            );
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting and waits for
/// the open connections to finish their requests (the caller bounds that wait).
///
/// # Errors
/// Never for a failed connection (each is logged and dropped); only the listener's own
/// address lookup.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &ListenerSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout())
        // hyper's floor for its read buffer is 8 KiB (it panics below; the check refuses less).
        .max_buf_size((settings.max_header_bytes as usize).max(8192));
    // Pings keep a quiet but live h2 connection (a Consume stream waiting for messages) above
    // the idle timeout: four per idle period.
    let ping = (settings.idle_timeout() / 4).max(Duration::from_millis(100));
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(ping))
        .keep_alive_timeout(ping)
        .max_concurrent_streams(settings.max_h2_streams)
        .max_header_list_size(settings.max_header_bytes);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(settings.max_connections()));
    let refusals = Arc::new(RefusalLog {
        refused: AtomicU64::new(0),
        last_logged_s: AtomicU64::new(0),
    });
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refusals.refused(settings.max_connections());
            drop(tcp);
            continue;
        };
        // No Nagle: small answers (acks, stream batches) must not wait for a delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let (http, watcher, acceptor) = (http.clone(), graceful.watcher(), acceptor.clone());
        let service = connection_service(app.clone(), local, peer);
        let (header_timeout, idle_timeout) = (settings.header_timeout(), settings.idle_timeout());
        tokio::spawn(async move {
            let _permit = permit;
            // hyper's header timer starts at the first byte: a silent client is cut off here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::debug!(%peer, "no request within [listener] header_timeout_ms: closed");
                    return;
                }
            }
            let served = match acceptor {
                None => {
                    let io = TokioIo::new(IdleTimeout::new(tcp, idle_timeout));
                    watcher.watch(http.serve_connection(io, service)).await
                }
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let io = TokioIo::new(IdleTimeout::new(tls, idle_timeout));
                    watcher.watch(http.serve_connection(io, service)).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
    graceful.shutdown().await;
    Ok(())
}

/// The app as a hyper service for one connection: requests carry the peer address as axum's
/// `ConnectInfo` and tonic's `TcpConnectInfo` (its `remote_addr()`).
fn connection_service(
    app: Router,
    local: SocketAddr,
    peer: SocketAddr,
) -> hyper_util::service::TowerToHyperService<
    impl Service<
        hyper::Request<Incoming>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone,
> {
    let service = tower::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(tonic::transport::server::TcpConnectInfo {
            local_addr: Some(local),
            remote_addr: Some(peer),
        });
        app.clone().call(req)
    });
    hyper_util::service::TowerToHyperService::new(service)
}

/// A connection that fails with `TimedOut` once nothing was read or written for `idle`.
/// The timer is re-armed only when it fires (from the last activity), not on every byte.
/// Expiry is final: hyper may meet the error on a read it then ignores (a pipelining client
/// that stopped reading), so every later read and write fails too.
struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    last_activity: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    expired: bool,
}

fn idle_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connection idle for [listener] idle_timeout_ms",
    )
}

impl<T: Unpin> IdleTimeout<T> {
    fn new(inner: T, idle: Duration) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            inner,
            idle,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            expired: false,
        }
    }

    /// Ready(error) when the connection has been idle for the whole period.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_activity + self.idle;
            if deadline <= tokio::time::Instant::now() {
                self.expired = true;
                return Poll::Ready(idle_error());
            }
            self.timer.as_mut().reset(deadline);
        }
    }

    /// One read or write on the inner connection: done counts as activity; waiting (for the
    /// peer to send, or to read what we wrote) counts toward the idle time.
    fn track<R>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if self.expired {
            return Poll::Ready(Err(idle_error()));
        }
        match op(Pin::new(&mut self.inner), cx) {
            Poll::Ready(r) => {
                self.last_activity = tokio::time::Instant::now();
                Poll::Ready(r)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().track(cx, |io, cx| io.poll_read(cx, buf))
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleTimeout<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().track(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().track(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
