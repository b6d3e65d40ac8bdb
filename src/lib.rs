//! mqproxy: RocketMQ-style produce and consume over plain HTTP (the REST API of Sohu MQCloud's
//! HTTP proxy), on a durable embedded store.
//!
//! - [`engine`]: the core semantics, protocol-free.
//! - [`store`]: where messages and consumer state live (the embedded redb store).
//! - [`http`]: the axum adapter, generated from `openapi/mqproxy.yaml`.
//! - [`grpc`]: the tonic adapter, generated from `proto/mqproxy/v1/messaging.proto`.
//! - [`config`]: the TOML configuration and the demo registry.
//! - [`listener`]: accepting connections: TLS, the connection cap, slow-client timeouts.
//! - [`server`]: wiring and graceful shutdown.

pub mod config;
pub use mqproxy_core as engine;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod server;
pub use mqproxy_store as store;
