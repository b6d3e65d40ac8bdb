// `pub` only for what another crate uses; the rest is `pub(crate)` (the lint keeps it so).
#![warn(unreachable_pub)]
//! mqproxy: RocketMQ-style produce and consume over plain HTTP (the REST API of Sohu MQCloud's
//! HTTP proxy) and gRPC, on a durable embedded store or in front of a RocketMQ cluster.
//!
//! - [`engine`] (`crates/core`): the MQCloud rules, protocol-free.
//! - [`store`] (`crates/store`): where messages and consumer state live (embedded redb,
//!   Redis, RocketMQ).
//! - [`http`]: the axum adapter, generated from `openapi/mqproxy.yaml`.
//! - [`grpc`]: the tonic adapter, generated from `proto/mqproxy/v1/messaging.proto`.
//! - [`config`]: the TOML configuration (the server's keys, each part's section) and the demo
//!   registry.
//! - [`listener`]: accepting connections: TLS, the connection cap, slow-client timeouts.
//! - [`server`]: wiring and graceful shutdown.
//!
//! What is `pub` has a user outside this crate: the `mqproxy` binary (`config`, `server`),
//! the integration tests (`tests/it`: `config`, `server`, the protobuf types of `grpc`,
//! `http::api`, `http::admin_auth::is_admin_path`), the bench (`crates/bench`: `config`, the
//! protobuf types, `server::embedded_config`, `store::embedded`) and the fuzz targets
//! (`http::support`, `http::api`, `engine::request_id`); the settings types are `pub` as
//! fields of the public `Config`. Everything else is `pub(crate)` (`unreachable_pub` keeps it
//! so).

pub mod config;
pub use mqproxy_core as engine;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod server;
pub use mqproxy_store as store;
