//! The gRPC adapter (tonic): `mqproxy.v1.MessagingService` from `proto/`, with server
//! reflection and the standard health service. Holds an [`Engine`]; never touches a store.

mod service;

use crate::engine::Engine;

/// The generated messages and service (used only by this adapter and its tests).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("mqproxy.v1");
}

/// The descriptor set of `proto/`, served by reflection.
const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mqproxy_descriptor.bin"));

/// The answer to a gRPC request for a service or method not served: `UNIMPLEMENTED`.
pub(crate) fn unimplemented(path: &str) -> axum::response::Response {
    tonic::Status::unimplemented(format!("no such gRPC method: {path}")).into_http()
}

/// The gRPC services as an axum router, to share the REST port (HTTP/1.1 and h2c).
/// `max_message_bytes` bounds a request message, as `max_request_bytes` bounds a REST body.
///
/// # Errors
/// Never for the checked-in descriptor set; reflection refuses a broken one.
pub(crate) fn router(
    engine: Engine,
    max_message_bytes: usize,
) -> Result<axum::Router, tonic_reflection::server::Error> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl and Python's grpcio-reflection still ask v1alpha first.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let messaging = pb::messaging_service_server::MessagingServiceServer::new(service::GrpcAdapter { engine })
        .max_decoding_message_size(max_message_bytes);
    tokio::spawn(async move {
        health_reporter
            .set_serving::<pb::messaging_service_server::MessagingServiceServer<service::GrpcAdapter>>()
            .await;
    });
    Ok(tonic::service::Routes::new(messaging)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router())
}
