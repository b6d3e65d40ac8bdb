//! TLS on the one port: HTTPS for REST and gRPC over TLS (h2 by ALPN), with a self-signed
//! certificate made at test time (rcgen); plain text to a TLS port gets nowhere; bad files
//! stop the start with a message naming them.

use crate::common::*;
use mqproxy::grpc::pb;
use pb::messaging_service_client::MessagingServiceClient;
use std::path::Path;

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM into `dir`:
/// (cert path, key path, cert PEM).
fn self_signed(dir: &Path) -> (String, String, String) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("rcgen");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, signing_key.serialize_pem()).expect("write key");
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
        cert.pem(),
    )
}

fn tls_toml(cert: &str, key: &str) -> String {
    format!("[listener.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n{}", one_queue(""))
}

fn port_of(s: &TestServer) -> String {
    s.base.rsplit(':').next().expect("port").to_owned()
}

#[tokio::test]
async fn rest_and_grpc_share_the_tls_port() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert, key, pem) = self_signed(certs.path());
    let s = TestServer::with_toml(&tls_toml(&cert, &key)).await;
    let https = format!("https://localhost:{}", port_of(&s));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("root"))
        .build()
        .expect("client");

    let v = post_json(
        &client,
        &format!("{https}/mq/produce"),
        &[("producer", PRODUCER), ("message", "over https")],
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");

    // gRPC over TLS on the same port: sees the message REST produced, produces one more.
    let channel = tonic::transport::Channel::from_shared(https.clone())
        .expect("uri")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&pem))
                .domain_name("localhost"),
        )
        .expect("tls config")
        .connect()
        .await
        .expect("gRPC over TLS connects");
    let mut grpc = MessagingServiceClient::new(channel);
    grpc.produce(pb::ProduceRequest {
        producer: PRODUCER.into(),
        body: b"over grpcs".to_vec(),
        ..Default::default()
    })
    .await
    .expect("gRPC produce over TLS");
    let fetched = grpc
        .fetch(pb::FetchRequest {
            target: Some(pb::ConsumeTarget {
                topic: TOPIC.into(),
                consumer: "c".into(),
                client_id: None,
                lite_topic: None,
            }),
            ..Default::default()
        })
        .await
        .expect("gRPC fetch over TLS")
        .into_inner();
    let bodies: Vec<&[u8]> = fetched.messages.iter().map(|m| m.body.as_slice()).collect();
    assert_eq!(bodies, [b"over https".as_slice(), b"over grpcs".as_slice()]);

    // The gRPC peer address is the socket's (recorded with the queue the batch locked). The
    // admin listener speaks TLS too.
    let admin_port = s.admin_base.rsplit(':').next().expect("port");
    let offsets = get_json(
        &client,
        &format!("https://localhost:{admin_port}/admin/consumer/offsets"),
        &[("consumer", "c")],
    )
    .await;
    let ip = &offsets["result"]["clients"][0]["queues"][0]["lastConsumeClientIp"];
    assert_eq!(ip, "127.0.0.1", "{offsets}");

    // Plain text to the TLS port is not served.
    let plain = reqwest::Client::new().get(format!("{}/healthz", s.base)).send().await;
    assert!(
        plain.as_ref().map_or(true, |r| !r.status().is_success()),
        "plain HTTP answered on the TLS port: {plain:?}"
    );
    // ... and a client that does not trust the certificate refuses it.
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .expect("client")
        .get(format!("{https}/healthz"))
        .send()
        .await;
    assert!(untrusting.is_err(), "{untrusting:?}");
}

#[tokio::test]
async fn unreadable_tls_files_stop_the_start_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _key, _) = self_signed(dir.path());
    let missing_key = dir.path().join("nope.pem").display().to_string();
    for (cert, key, named) in [
        (cert.as_str(), missing_key.as_str(), missing_key.as_str()),
        (missing_key.as_str(), cert.as_str(), missing_key.as_str()),
        // A certificate where the key should be: no private key in it.
        (cert.as_str(), cert.as_str(), cert.as_str()),
    ] {
        let mut config = config(Some(&tls_toml(cert, key)));
        let data = tempfile::tempdir().expect("tempdir");
        config.data_dir = data.path().to_path_buf();
        config.listen = "127.0.0.1:0".into();
        let listeners = mqproxy::server::Listeners::bind(&config).await.expect("bind");
        let err = mqproxy::server::run(config, listeners, std::future::pending())
            .await
            .expect_err("the start fails");
        assert!(err.to_string().contains(named), "{err}");
    }
}
