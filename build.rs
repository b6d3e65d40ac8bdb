//! Generates the REST contract's Rust side from `openapi/mqproxy.yaml`:
//! reply types (from the schemas the responses use), one `XxxParams` struct per handler with
//! its parsing and validation (required, integer ranges, booleans; the string rules the spec
//! documents are the engine's, see `PARAM_KEYS_CHECKED_BY_THE_ENGINE`), the `MqApi` handler trait
//! (no default bodies: an unimplemented handler is a compile error) and the axum router.
//!
//! It supports exactly the constructs the spec uses and panics with the JSON pointer on
//! anything else, so a spec change it cannot express fails the build instead of drifting.

use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt::Write as _;

const SPEC: &str = "openapi/mqproxy.yaml";

const PROTO: &str = "proto/mqproxy/v1/messaging.proto";

fn main() {
    println!("cargo:rerun-if-changed={SPEC}");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    compile_proto();
    let text = std::fs::read_to_string(SPEC).expect("read openapi/mqproxy.yaml");
    let doc: Value = yaml_serde::from_str(&text).expect("openapi/mqproxy.yaml is not valid YAML");
    let code = Generator { doc: &doc }.generate();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("rest_api.rs");
    std::fs::write(out, code).expect("write rest_api.rs");
}

/// proto/ -> prost messages and the tonic service (protox: no `protoc` needed), plus the
/// descriptor set that server reflection serves.
fn compile_proto() {
    use prost::Message as _;
    let fds = protox::compile([PROTO], ["proto"]).unwrap_or_else(|e| panic!("{PROTO}: {e}"));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("mqproxy_descriptor.bin"), fds.encode_to_vec()).expect("write descriptor set");
    tonic_prost_build::configure()
        .build_client(true)
        .compile_fds(fds)
        .expect("generate the gRPC code");
}

/// Parameter schema keys the generated parsing enforces.
const PARAM_KEYS_CHECKED_HERE: &[&str] = &["type", "format", "minimum", "maximum"];
/// Parameter schema keys that document a rule the engine enforces (names, clientIds, msgIds,
/// modes, JSON bodies): generating a second check would be a second definition.
/// `tests/contract.rs` `spec_string_rules_are_the_servers` holds the spec and the engine equal.
const PARAM_KEYS_CHECKED_BY_THE_ENGINE: &[&str] = &["pattern", "minLength", "maxLength", "enum", "contentMediaType"];

#[derive(Clone, PartialEq, Debug)]
enum ParamType {
    Str,
    I32,
    I64,
    Bool,
}

#[derive(Clone, PartialEq, Debug)]
struct Param {
    name: String,
    ty: ParamType,
    required: bool,
    min: Option<i64>,
    max: Option<i64>,
}

struct Operation {
    method: String,
    path: String,
    operation_id: String,
    handler: String,
    summary: String,
    params: Vec<Param>,
    reply: String,
}

struct Generator<'a> {
    doc: &'a Value,
}

impl Generator<'_> {
    fn resolve<'v>(&'v self, v: &'v Value) -> &'v Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("only local $ref: {r}"));
                self.doc.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {r}"))
            }
            None => v,
        }
    }

    fn ref_name(v: &Value) -> Option<String> {
        v.get("$ref")?.as_str()?.rsplit('/').next().map(str::to_owned)
    }

    fn param_type(schema: &Value, at: &str) -> ParamType {
        match (schema["type"].as_str(), schema["format"].as_str()) {
            (Some("string"), _) => ParamType::Str,
            (Some("boolean"), _) => ParamType::Bool,
            (Some("integer"), Some("int32")) => ParamType::I32,
            (Some("integer"), _) => ParamType::I64,
            other => panic!("{at}: unsupported parameter type {other:?}"),
        }
    }

    fn param_from_schema(name: &str, schema: &Value, required: bool, at: &str) -> Param {
        for key in schema.as_object().into_iter().flat_map(|o| o.keys()) {
            assert!(
                PARAM_KEYS_CHECKED_HERE.contains(&key.as_str())
                    || PARAM_KEYS_CHECKED_BY_THE_ENGINE.contains(&key.as_str())
                    || key == "description"
                    || key == "example",
                "{at}: parameter {name}: unsupported schema key {key:?}"
            );
        }
        Param {
            name: name.to_owned(),
            ty: Self::param_type(schema, at),
            required,
            min: schema["minimum"].as_i64(),
            max: schema["maximum"].as_i64(),
        }
    }

    fn operations(&self) -> Vec<Operation> {
        let mut ops = Vec::new();
        let paths = self.doc["paths"].as_object().expect("paths");
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                let at = format!("paths.{path}.{method}");
                let mut params = Vec::new();
                for p in op["parameters"].as_array().into_iter().flatten() {
                    let p = self.resolve(p);
                    assert_eq!(p["in"], "query", "{at}: only query parameters are supported");
                    let name = p["name"].as_str().expect("parameter name");
                    params.push(Self::param_from_schema(
                        name,
                        self.resolve(&p["schema"]),
                        p["required"].as_bool().unwrap_or(false),
                        &at,
                    ));
                }
                if let Some(body) = op.get("requestBody") {
                    let schema = self.resolve(
                        body.pointer("/content/application~1x-www-form-urlencoded/schema")
                            .unwrap_or_else(|| panic!("{at}: only form bodies are supported")),
                    );
                    for key in schema.as_object().into_iter().flat_map(|o| o.keys()) {
                        // `not`: a combination the engine refuses (documented, checked there).
                        assert!(
                            ["type", "required", "properties", "not"].contains(&key.as_str()),
                            "{at}: unsupported form schema key {key:?}"
                        );
                    }
                    let required: BTreeSet<&str> = required_names(schema).collect();
                    for (name, prop) in schema["properties"].as_object().expect("form properties") {
                        params.push(Self::param_from_schema(
                            name,
                            self.resolve(prop),
                            required.contains(name.as_str()),
                            &at,
                        ));
                    }
                }
                let reply = Self::ref_name(
                    op.pointer("/responses/200/content/application~1json/schema")
                        .unwrap_or_else(|| panic!("{at}: a 200 application/json response is required")),
                )
                .unwrap_or_else(|| panic!("{at}: the 200 response must be a $ref"));
                ops.push(Operation {
                    method: method.clone(),
                    path: path.clone(),
                    operation_id: op["operationId"].as_str().expect("operationId").to_owned(),
                    handler: op["x-handler"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{at}: x-handler"))
                        .to_owned(),
                    summary: op["summary"].as_str().unwrap_or_default().to_owned(),
                    params,
                    reply,
                });
            }
        }
        ops
    }

    fn generate(&self) -> String {
        let ops = self.operations();
        let mut out = String::from("// @generated by build.rs from openapi/mqproxy.yaml. Do not edit.\n\n");

        // Reply types: every schema reachable from a 200 response.
        let mut types = Vec::new();
        let mut pending: Vec<String> = ops.iter().map(|o| o.reply.clone()).collect();
        let mut seen = BTreeSet::new();
        while let Some(name) = pending.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let schema = &self.doc["components"]["schemas"][&name];
            for prop in schema["properties"].as_object().into_iter().flat_map(|m| m.values()) {
                if let Some(r) = Self::ref_name(prop).or_else(|| Self::ref_name(&prop["items"])) {
                    pending.push(r);
                }
            }
            types.push(name);
        }
        types.sort();
        for name in &types {
            self.emit_struct(&mut out, name);
        }
        let reply_types: BTreeSet<&str> = ops.iter().map(|o| o.reply.as_str()).collect();
        for name in reply_types {
            self.emit_envelope(&mut out, name);
        }

        // One params struct and one trait method per handler, in order of first appearance.
        let mut handlers: Vec<&Operation> = Vec::new();
        for op in &ops {
            match handlers.iter().find(|h| h.handler == op.handler) {
                Some(first) => {
                    assert_eq!(
                        first.params, op.params,
                        "{}: GET and POST of one handler must take the same parameters",
                        op.operation_id
                    );
                    assert_eq!(
                        first.reply, op.reply,
                        "{}: one handler, one reply type",
                        op.operation_id
                    );
                }
                None => handlers.push(op),
            }
        }
        for h in &handlers {
            emit_params(&mut out, h);
        }

        out.push_str("/// The REST API, one method per `x-handler` of the spec. No default bodies: a handler\n/// the spec names and the server lacks is a compile error.\npub trait MqApi: Send + Sync + 'static {\n");
        for h in &handlers {
            let _ = writeln!(
                out,
                "    /// {}\n    fn {}(&self, params: {}, ctx: crate::http::support::RequestContext) -> impl std::future::Future<Output = crate::http::support::Reply<{}>> + Send;",
                h.summary,
                snake(&h.handler),
                params_name(&h.handler),
                h.reply
            );
        }
        out.push_str("}\n\n");

        for h in &handlers {
            let _ = write!(
                out,
                "async fn handle_{fn_name}<A: MqApi>(axum::extract::State(state): axum::extract::State<crate::http::support::RouterState<A>>, req: axum::extract::Request) -> axum::response::Response {{
    let (pairs, ctx) = match crate::http::support::read_request(req, &state.settings).await {{
        Ok(v) => v,
        Err(e) => return crate::http::support::respond(&state.settings, crate::http::support::Reply::new(<{reply} as crate::http::support::Envelope>::error(e.status, e.message))),
    }};
    let reply = match {params}::from_pairs(&pairs) {{
        Ok(params) => state.api.{fn_name}(params, ctx).await,
        Err(e) => crate::http::support::Reply::new(<{reply} as crate::http::support::Envelope>::error(400, e.to_string())),
    }};
    crate::http::support::respond(&state.settings, reply)
}}\n\n",
                fn_name = snake(&h.handler),
                reply = h.reply,
                params = params_name(&h.handler),
            );
        }

        out.push_str("/// The routes of every operation in the spec.\npub fn router<A: MqApi>(state: crate::http::support::RouterState<A>) -> axum::Router {\n    axum::Router::new()\n");
        let mut paths: Vec<&str> = Vec::new();
        for op in &ops {
            if !paths.contains(&op.path.as_str()) {
                paths.push(&op.path);
            }
        }
        for path in paths {
            let mut chain = String::new();
            for op in ops.iter().filter(|o| o.path == path) {
                let sep = if chain.is_empty() { "axum::routing::" } else { "." };
                let _ = write!(chain, "{sep}{}(handle_{}::<A>)", op.method, snake(&op.handler));
            }
            let _ = writeln!(out, "        .route({path:?}, {chain})");
        }
        out.push_str("        .with_state(state)\n}\n\n");

        out.push_str("/// Every operation of the spec: (method, path, operationId, handler).\npub const OPERATIONS: &[(&str, &str, &str, &str)] = &[\n");
        for op in &ops {
            let _ = writeln!(
                out,
                "    ({:?}, {:?}, {:?}, {:?}),",
                op.method.to_uppercase(),
                op.path,
                op.operation_id,
                op.handler
            );
        }
        out.push_str("];\n");
        out
    }

    fn rust_type(&self, prop: &Value, at: &str) -> String {
        if let Some(r) = Self::ref_name(prop) {
            return r;
        }
        match (prop["type"].as_str(), prop["format"].as_str()) {
            (Some("string"), _) => "String".into(),
            (Some("boolean"), _) => "bool".into(),
            (Some("integer"), Some("int32")) => "i32".into(),
            (Some("integer"), _) => "i64".into(),
            (Some("array"), _) => format!("Vec<{}>", self.rust_type(&prop["items"], at)),
            (Some("object"), _) if prop["additionalProperties"].is_object() => format!(
                "std::collections::BTreeMap<String, {}>",
                self.rust_type(&prop["additionalProperties"], at)
            ),
            other => panic!("{at}: unsupported schema type {other:?}"),
        }
    }

    fn emit_struct(&self, out: &mut String, name: &str) {
        let schema = &self.doc["components"]["schemas"][name];
        let required: BTreeSet<&str> = required_names(schema).collect();
        let _ = writeln!(
            out,
            "#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]\n#[serde(rename_all = \"camelCase\")]\npub struct {name} {{"
        );
        for (prop_name, prop) in schema["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("schema {name}: properties"))
        {
            let ty = self.rust_type(prop, &format!("components.schemas.{name}.{prop_name}"));
            if let Some(d) = prop["description"].as_str() {
                let _ = writeln!(out, "    /// {}", d.replace('\n', " "));
            }
            if required.contains(prop_name.as_str()) {
                let _ = writeln!(out, "    pub {}: {ty},", snake(prop_name));
            } else {
                let _ = writeln!(
                    out,
                    "    #[serde(default, skip_serializing_if = \"Option::is_none\")]\n    pub {}: Option<{ty}>,",
                    snake(prop_name)
                );
            }
        }
        out.push_str("}\n\n");
    }

    /// Reply types are envelopes: `status` (required int32), optional `message`, and optional
    /// everything else, so the router can answer a parameter error in the reply's own type.
    fn emit_envelope(&self, out: &mut String, name: &str) {
        let schema = &self.doc["components"]["schemas"][name];
        let required: Vec<&str> = required_names(schema).collect();
        assert_eq!(
            required,
            ["status"],
            "reply schema {name}: only `status` may be required"
        );
        let props = schema["properties"].as_object().expect("properties");
        assert!(props.contains_key("message"), "reply schema {name}: needs `message`");
        let others: String = props
            .keys()
            .filter(|k| *k != "status" && *k != "message")
            .map(|k| format!(" {}: None,", snake(k)))
            .collect();
        let _ = writeln!(
            out,
            "impl crate::http::support::Envelope for {name} {{
    fn status(&self) -> i32 {{ self.status }}
    fn error(status: i32, message: String) -> Self {{ Self {{ status, message: Some(message),{others} }} }}
}}\n"
        );
    }
}

/// The `required` list of a schema object.
fn required_names(schema: &Value) -> impl Iterator<Item = &str> {
    schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

fn params_name(handler: &str) -> String {
    let mut c = handler.chars();
    let first = c.next().map(|f| f.to_ascii_uppercase()).unwrap_or_default();
    format!("{first}{}Params", c.as_str())
}

fn snake(name: &str) -> String {
    let mut s = String::new();
    for ch in name.chars() {
        if ch.is_ascii_uppercase() {
            s.push('_');
            s.push(ch.to_ascii_lowercase());
        } else {
            s.push(ch);
        }
    }
    s
}

fn emit_params(out: &mut String, op: &Operation) {
    let name = params_name(&op.handler);
    let _ = writeln!(
        out,
        "/// Parameters of `{}` (query string or form body).\n#[derive(Debug, Clone, PartialEq)]\npub struct {name} {{",
        op.handler
    );
    for p in &op.params {
        let ty = match p.ty {
            ParamType::Str => "String",
            ParamType::I32 => "i32",
            ParamType::I64 => "i64",
            ParamType::Bool => "bool",
        };
        if p.required {
            let _ = writeln!(out, "    pub {}: {ty},", snake(&p.name));
        } else {
            let _ = writeln!(out, "    pub {}: Option<{ty}>,", snake(&p.name));
        }
    }
    let _ = writeln!(
        out,
        "}}\n\nimpl {name} {{\n    /// Reads and validates the parameters; the error names the first bad one.\n    #[allow(unused_variables)]\n    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Self, crate::http::support::ParamError> {{\n        Ok(Self {{"
    );
    for p in &op.params {
        let raw = format!("crate::http::support::param(pairs, {:?})", p.name);
        let parse = match p.ty {
            ParamType::Str => "map(|v| Ok(v.to_owned()))".to_string(),
            ParamType::Bool => {
                format!("map(|v| crate::http::support::parse_bool({:?}, v))", p.name)
            }
            ParamType::I32 | ParamType::I64 => format!(
                "map(|v| crate::http::support::parse_int({:?}, v, {:?}, {:?}){})",
                p.name,
                p.min,
                p.max,
                if p.ty == ParamType::I32 {
                    ".and_then(|n| i32::try_from(n).map_err(|_| crate::http::support::ParamError::new(".to_string()
                        + &format!("{:?}, \"out of range\")))", p.name)
                } else {
                    String::new()
                }
            ),
        };
        let tail = if p.required {
            format!(
                ".ok_or_else(|| crate::http::support::ParamError::missing({:?}))?",
                p.name
            )
        } else {
            String::new()
        };
        let _ = writeln!(out, "            {}: {raw}.{parse}.transpose()?{tail},", snake(&p.name));
    }
    out.push_str("        })\n    }\n}\n\n");
}
