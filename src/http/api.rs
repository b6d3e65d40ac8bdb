//! The REST contract generated at build time from `openapi/mqproxy.yaml` (see `build.rs`):
//! reply types, `XxxParams` with validation, the `MqApi` trait and `router()`.
//! Generated code is used only by the HTTP adapter.

#![allow(clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/rest_api.rs"));
