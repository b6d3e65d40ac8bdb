//! The server's generated code: the REST side from `openapi/mqproxy.yaml` (by
//! `crates/codegen`, which has the rules and the tests) and the gRPC side from `proto/`.

const SPEC: &str = "openapi/mqproxy.yaml";
const PROTO: &str = "proto/mqproxy/v1/messaging.proto";
/// The module the generated REST code calls for parsing and answering.
const SUPPORT: &str = "crate::http::support";

fn main() {
    println!("cargo:rerun-if-changed={SPEC}");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    compile_proto(&out);
    let text = std::fs::read_to_string(SPEC).expect("read openapi/mqproxy.yaml");
    let doc: serde_json::Value = yaml_serde::from_str(&text).expect("openapi/mqproxy.yaml is not valid YAML");
    std::fs::write(out.join("rest_api.rs"), mqproxy_codegen::rest_api(&doc, SUPPORT)).expect("write rest_api.rs");
}

/// proto/ -> prost messages and the tonic service (protox: no `protoc` needed), plus the
/// descriptor set that server reflection serves.
fn compile_proto(out: &std::path::Path) {
    use prost::Message as _;
    let fds = protox::compile([PROTO], ["proto"]).unwrap_or_else(|e| panic!("{PROTO}: {e}"));
    std::fs::write(out.join("mqproxy_descriptor.bin"), fds.encode_to_vec()).expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .compile_fds(fds)
        .expect("generate the gRPC code");
}
