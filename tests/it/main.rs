//! The integration suite, one test crate with a module per area, so the server and its
//! RocketMQ client are linked into one test binary instead of one per file. Every test runs the
//! real server (in-process on 127.0.0.1:0, or the binary as a child) and talks HTTP or gRPC to
//! it. The `#[ignore]`d ones (crash rounds, chaos, floods, a full disk, broker outages) are run
//! by name by `scripts/test`.

// The RocketMQ client's futures nest deeply (see the server's src/lib.rs).
#![recursion_limit = "256"]

mod common;

mod admin;
mod apache_interop;
mod auth;
mod chaos;
mod client_bounds;
mod client_flood;
mod consume;
mod contract;
mod crash;
mod disk_full;
mod grpc;
mod lifecycle;
mod limits;
mod lite;
mod pop;
mod process;
mod produce;
mod reverse_proxy;
mod rocketmq;
mod rocketmq_outage;
mod sse;
mod tls;
mod torn_tail;
