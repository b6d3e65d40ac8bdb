//! Wiring: opens the store, builds the engine and the HTTP app, serves one listener until the
//! shutdown future resolves, lets in-flight requests finish, then closes the store (flush).

use crate::config::{Backend, Config, ConsumerConfig, ProducerConfig, TopicConfig};
use crate::engine::{ConsumeMode, Engine, EngineConfig, EngineError};
use crate::http;
use crate::http::admin_auth::ListenerRole;
use crate::listener::{self, TlsError};
use crate::store::consumer_state::{ConsumerStateKind, ConsumerStateStore, LocalConsumerState};
use crate::store::embedded::{EmbeddedConfig, EmbeddedStore};
use crate::store::redis::RedisConsumerState;
use crate::store::registry_file::RegistryFile;
#[cfg(feature = "rocketmq")]
use crate::store::rocketmq::{RocketMqStartError, RocketMqStore};
use crate::store::{MessageStore, StoreError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// What the embedded store opens with: the config's `[store]` section, where, and which queues.
pub fn embedded_config(config: &Config) -> EmbeddedConfig {
    EmbeddedConfig {
        data_dir: config.data_dir.clone(),
        topics: topic_queues(config),
        broker_name: config.broker_name.clone(),
        settings: config.store.clone(),
    }
}

/// The registered topics and their queue counts, as the stores take them.
fn topic_queues(config: &Config) -> Vec<(String, u32)> {
    config.topics.iter().map(|t| (t.name.clone(), t.queues)).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the store in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error("cannot start the engine: {0}")]
    Engine(#[from] EngineError),
    #[error("cannot reach the consumer state store at {url}: {source}")]
    ConsumerState { url: String, source: StoreError },
    #[cfg(feature = "rocketmq")]
    #[error(transparent)]
    RocketMq(#[from] RocketMqStartError),
    #[cfg(not(feature = "rocketmq"))]
    #[error(
        "backend = \"rocketmq\" needs a server built with the `rocketmq` feature (the default); this one was built without it"
    )]
    RocketMqNotBuilt,
    #[error("cannot build the gRPC services: {0}")]
    Grpc(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// `ip(4) port(4)` of the listener, the first half of offsetMsgIds.
fn store_host(addr: SocketAddr) -> [u8; 8] {
    let mut host = [0u8; 8];
    if let SocketAddr::V4(v4) = addr {
        host[..4].copy_from_slice(&v4.ip().octets());
    }
    host[4..].copy_from_slice(&u32::from(addr.port()).to_be_bytes());
    host
}

/// The consumer state store the config asks for.
async fn consumer_state(
    config: &Config,
    store: &EmbeddedStore,
    messages: &Arc<dyn MessageStore>,
) -> Result<Arc<dyn ConsumerStateStore>, ServeError> {
    let state = &config.consumer_state;
    Ok(match (state.kind, state.url.as_deref()) {
        (ConsumerStateKind::Redis, Some(url)) => {
            // Hash fields name queues `<broker>:<queueId>` as the route does (Java layout).
            let (messages, broker_name) = (messages.clone(), config.broker_name.clone());
            let queue_names = Arc::new(move |topic: &str, queue: u32| {
                messages.queues(topic).get(queue as usize).map_or_else(
                    || format!("{broker_name}:{queue}"),
                    |q| format!("{}:{}", q.broker_name, q.queue_id),
                )
            });
            let redis = RedisConsumerState::connect(
                url,
                &state.prefix,
                &config.broker_name,
                Duration::from_millis(state.timeout_ms),
            )
            .await
            .map_err(|source| ServeError::ConsumerState {
                url: url.to_owned(),
                source,
            })?
            .with_queue_names(queue_names);
            tracing::info!(url, prefix = %state.prefix, "consumer state in Redis");
            Arc::new(redis)
        }
        _ => Arc::new(
            LocalConsumerState::load(Arc::new(store.clone())).map_err(|source| ServeError::Store {
                dir: config.data_dir.display().to_string(),
                source,
            })?,
        ),
    })
}

/// The message store the config asks for: the embedded one, or a RocketMQ cluster.
/// Boxed: the RocketMQ client's futures nest so deeply that proving them `Send` needs a raised
/// recursion limit, which every crate awaiting `run` would need too.
type BoxedStart<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Arc<dyn MessageStore>, ServeError>> + Send + 'a>>;

fn message_store<'a>(config: &'a Config, embedded: &'a EmbeddedStore) -> BoxedStart<'a> {
    Box::pin(message_store_unboxed(config, embedded))
}

async fn message_store_unboxed(config: &Config, embedded: &EmbeddedStore) -> Result<Arc<dyn MessageStore>, ServeError> {
    Ok(match config.backend {
        Backend::Embedded => Arc::new(embedded.clone()),
        #[cfg(not(feature = "rocketmq"))]
        Backend::Rocketmq => return Err(ServeError::RocketMqNotBuilt),
        #[cfg(feature = "rocketmq")]
        Backend::Rocketmq => {
            let r = &config.rocketmq;
            let store = RocketMqStore::start(
                r.clone(),
                &topic_queues(config),
                crate::engine::limits::MAX_MESSAGE_BYTES,
                embedded.identity().clone(),
            )
            .await?;
            tracing::info!(namesrv = %r.namesrv_addr, "messages on the RocketMQ cluster");
            Arc::new(store)
        }
    })
}

/// The config plus what the admin API registered in earlier runs: the config wins for the
/// names it defines (a topic keeps the larger queue count: queues are never taken away).
fn with_saved_registry(mut config: Config, file: &RegistryFile) -> Result<Config, ServeError> {
    let saved = file.load().map_err(|source| ServeError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    })?;
    let Some(saved) = saved else { return Ok(config) };
    for t in saved.topics {
        match config.topics.iter_mut().find(|c| c.name == t.name) {
            Some(c) => {
                c.queues = c.queues.max(t.queues);
                c.lite |= t.lite;
            }
            None => config.topics.push(TopicConfig {
                name: t.name,
                queues: t.queues,
                lite: t.lite,
            }),
        }
    }
    for p in saved.producers {
        if !config.producers.iter().any(|c| c.name == p.name) {
            config.producers.push(ProducerConfig {
                name: p.name,
                topic: p.topic,
                token: None,
                token_sha256: p.token_sha256,
            });
        }
    }
    for c in saved.consumers {
        if !config.consumers.iter().any(|k| k.name == c.name) {
            config.consumers.push(ConsumerConfig {
                name: c.name,
                topic: c.topic,
                mode: if c.broadcast {
                    ConsumeMode::Broadcast
                } else {
                    ConsumeMode::Clustering
                },
                consume_timeout_ms: c.consume_timeout_ms,
                max_pull_size: c.max_pull_size,
                token: None,
                token_sha256: c.token_sha256,
            });
        }
    }
    Ok(config)
}

/// The sockets a server serves: the public one, and the admin listener unless it is off.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `listen` and `admin_listen` of a checked config.
    ///
    /// # Errors
    /// An address is taken or invalid.
    pub async fn bind(config: &Config) -> Result<Self, ServeError> {
        let bind = |addr: String| async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })
        };
        let public = bind(config.listen.clone()).await?;
        let admin = match config.admin_listen_addr().map_err(|reason| ServeError::Bind {
            addr: config.admin_listen.clone().unwrap_or_default(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
        })? {
            Some(addr) => Some(bind(addr.to_string()).await?),
            None => None,
        };
        Ok(Self { public, admin })
    }

    /// The line scripts and tests wait for (one line: a reader may stop after it).
    ///
    /// # Errors
    /// A socket's address cannot be read.
    pub fn listening_line(&self) -> std::io::Result<String> {
        let addr = self.public.local_addr()?;
        let admin = match &self.admin {
            Some(l) => format!("admin API and console: http://{}/console/", l.local_addr()?),
            None => "admin listener off".to_owned(),
        };
        Ok(format!(
            "mqproxy listening on http://{addr} (Swagger UI: http://{addr}/swagger-ui/; {admin})"
        ))
    }
}

/// Serves `config` on `listeners` until `shutdown` resolves.
///
/// # Errors
/// The store cannot be opened, or a listener fails.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let Listeners {
        public: listener,
        admin: admin_listener,
    } = listeners;
    let addr = listener.local_addr()?;
    let registry_file = RegistryFile::new(&config.data_dir);
    let config = with_saved_registry(config, &registry_file)?;
    let store = EmbeddedStore::open(embedded_config(&config)).map_err(|source| ServeError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    })?;
    // The embedded store always opens: it keeps the identity (msgId node, requestId key) and,
    // without Redis, the consumer state; with the RocketMQ backend it holds no messages.
    let messages = message_store(&config, &store).await?;
    let state = consumer_state(&config, &store, &messages).await?;
    let kept_secret = state
        .shared_secret()
        .await
        .map_err(|source| ServeError::ConsumerState {
            url: config.consumer_state.url.clone().unwrap_or_default(),
            source,
        })?
        .unwrap_or(store.identity().secret);
    let keys = config.request_id.keys(kept_secret);
    let backend = messages.clone();
    let engine = Engine::new(
        EngineConfig {
            region_id: config.region_id.clone(),
            store_host: store_host(addr),
            produce: config.produce,
            consume: config.consume,
            topics: config.topic_specs(),
            producers: config.producer_specs(),
            consumers: config.consumer_specs(),
        },
        messages,
        state,
        keys,
        Arc::new(registry_file),
    );
    // The config's entries are created at start-up: saved along with the admin API's.
    engine.save_registry().await?;
    let idle_client_sweep = engine.spawn_idle_client_sweep();
    let lite_topic_sweep = engine.spawn_lite_topic_sweep();
    let grpc = crate::grpc::router(engine.clone(), config.http.max_request_bytes())
        .map_err(|e| ServeError::Grpc(e.to_string()))?;
    let http_router = |role| {
        http::router(
            engine.clone(),
            &config.http,
            config.admin_token.clone(),
            config.listener.header_timeout(),
            role,
        )
    };
    let observed = |app: axum::Router| app.layer(http::metrics::ObserveLayer::new(engine.clone()));
    let app = observed(http_router(ListenerRole::Public).merge(grpc).fallback(unmatched));
    let admin_app = observed(http_router(ListenerRole::Admin).fallback(unmatched));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let tls = match &config.listener.tls {
        Some(t) => {
            let tls = listener::tls_config(&t.cert, &t.key)?;
            tracing::info!(cert = %t.cert.display(), "TLS on: HTTPS and gRPC over TLS on one port");
            Some(tls)
        }
        None => None,
    };
    let settings = &config.listener;
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let admin_addr = admin_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let has_token = config.admin_token.as_deref().is_some_and(|t| !t.is_empty());
    tracing::info!("{}", http::admin_auth::describe_rule(has_token, admin_addr));
    let admin_stop = stop_rx.clone();
    let admin_tls = tls.clone();
    let admin_server = async {
        match admin_listener {
            // TLS too when configured: admin_listen may be set to a non-loopback address.
            Some(admin) => listener::serve(admin, admin_app, settings, admin_tls, stopped(admin_stop)).await,
            None => Ok(()),
        }
    };
    let public_stop = stop_rx.clone();
    let server = async {
        let (public, admin) = tokio::join!(
            listener::serve(listener, app, settings, tls, stopped(public_stop)),
            admin_server
        );
        public.and(admin)
    };
    let mut stop_rx = stop_rx;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    tokio::select! {
        served = server => served?,
        () = async {
            let _ = stop_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(grace_ms = config.shutdown_grace_ms, "in-flight requests did not finish within the grace period"),
    }
    idle_client_sweep.abort();
    lite_topic_sweep.abort();
    backend.shutdown().await;
    tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!("stopped");
    Ok(())
}

/// A request no route matches: gRPC clients (by content type) get `UNIMPLEMENTED`, REST
/// clients a 404 envelope, so a mistyped REST path never reads as a success.
async fn unmatched(req: axum::extract::Request) -> axum::response::Response {
    if http::support::is_grpc_request(req.headers()) {
        crate::grpc::unimplemented(req.uri().path())
    } else {
        http::support::no_such_endpoint(req).await
    }
}
