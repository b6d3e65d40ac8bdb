//! What the generated REST code (`api.rs`) stands on: reading parameters from the query string
//! and form body, the reply envelope, and the HTTP status policy.

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;

/// What a handler may need of the HTTP request besides its parameters.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub headers: HeaderMap,
    pub peer: Option<SocketAddr>,
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The message bodies of `/mq/produce/batch`'s `messages`: a JSON array whose string elements
/// are sent as they are and any other element as its compact JSON text. None when `messages`
/// is not a JSON array.
pub fn batch_bodies(messages: &str) -> Option<Vec<Vec<u8>>> {
    let serde_json::Value::Array(elements) = serde_json::from_str::<serde_json::Value>(messages).ok()? else {
        return None;
    };
    Some(
        elements
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s.into_bytes(),
                other => other.to_string().into_bytes(),
            })
            .collect(),
    )
}

/// A handler's answer: the envelope and, optionally, the `rid` cookie to set.
#[derive(Debug, Clone)]
pub struct Reply<T> {
    pub body: T,
    pub set_cookie: Option<String>,
    /// Make the HTTP status follow the body whatever the configured policy (probes).
    pub always_mirror: bool,
}

impl<T> Reply<T> {
    pub fn new(body: T) -> Self {
        Self {
            body,
            set_cookie: None,
            always_mirror: false,
        }
    }
}

/// Every reply type is an envelope `{status, message?, ...}`.
pub trait Envelope {
    fn status(&self) -> i32;
    /// The envelope of a failure: the status, the message, nothing else.
    fn error(status: i32, message: String) -> Self;
}

/// HTTP-level settings of the generated router.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// HTTP status = body status (400/500) instead of always 200.
    pub mirror_http_status: bool,
    /// Largest request body read; above it the answer is 413.
    pub max_request_bytes: usize,
    /// Time the whole request body may take to arrive; after it the answer is 408.
    pub body_timeout: std::time::Duration,
}

/// The state the generated handlers get.
pub struct RouterState<A> {
    pub api: Arc<A>,
    pub settings: Arc<RouterSettings>,
}

impl<A> Clone for RouterState<A> {
    fn clone(&self) -> Self {
        Self {
            api: self.api.clone(),
            settings: self.settings.clone(),
        }
    }
}

/// A missing or malformed parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter {param}: {reason}")]
pub struct ParamError {
    pub param: &'static str,
    pub reason: String,
}

impl ParamError {
    pub fn new(param: &'static str, reason: impl Into<String>) -> Self {
        Self {
            param,
            reason: reason.into(),
        }
    }

    pub fn missing(param: &'static str) -> Self {
        Self::new(param, "is required")
    }
}

/// A request that could not be read at all.
#[derive(Debug, Clone)]
pub struct RequestError {
    pub status: i32,
    pub message: String,
}

/// The first non-blank value of `name` (query string first, then the body).
pub fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, v)| k == name && !v.trim().is_empty())
        .map(|(_, v)| v.as_str())
}

pub fn parse_bool(name: &'static str, value: &str) -> Result<bool, ParamError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ParamError::new(name, format!("must be true or false, got {value:?}"))),
    }
}

pub fn parse_int(name: &'static str, value: &str, min: Option<i64>, max: Option<i64>) -> Result<i64, ParamError> {
    let n: i64 = value
        .trim()
        .parse()
        .map_err(|_| ParamError::new(name, format!("must be an integer, got {value:?}")))?;
    if min.is_some_and(|m| n < m) || max.is_some_and(|m| n > m) {
        let range = match (min, max) {
            (Some(a), Some(b)) => format!("between {a} and {b}"),
            (Some(a), None) => format!("at least {a}"),
            (None, Some(b)) => format!("at most {b}"),
            (None, None) => String::new(),
        };
        return Err(ParamError::new(name, format!("must be {range}, got {n}")));
    }
    Ok(n)
}

fn is_form(headers: &HeaderMap) -> Option<bool> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?.to_ascii_lowercase();
    Some(ct.starts_with("application/x-www-form-urlencoded"))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"))
}

/// Parameters from the query string, then from a form body (or a JSON object body, whose
/// string values are taken as they are and other values as JSON text).
/// The pairs of an `application/x-www-form-urlencoded` body, exactly as
/// `form_urlencoded::parse` gives them, decoded a run at a time: its byte-by-byte passes
/// (plus, percent, lossy UTF-8) were a tenth of a 1 KiB produce's CPU and a fifth of a batch's.
pub fn form_pairs(bytes: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    // Split at `&` by memchr (a batch's body is ~100 KiB: `slice::split` tests it bytewise).
    let mut rest = Some(bytes);
    let pairs = std::iter::from_fn(move || {
        let current = rest?;
        let (pair, next) = match memchr::memchr(b'&', current) {
            Some(at) => (&current[..at], Some(&current[at + 1..])),
            None => (current, None),
        };
        rest = next;
        Some(pair)
    });
    pairs.filter(|pair| !pair.is_empty()).map(|pair| {
        let (name, value) = match memchr::memchr(b'=', pair) {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        (form_component(name), form_component(value))
    })
}

/// One decoded name or value of a form: the runs between escapes are copied whole and the
/// result is checked as UTF-8 once (a plain-text value is one run).
fn form_component(raw: &[u8]) -> String {
    let mut decoded = Vec::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = memchr::memchr2(b'%', b'+', rest) {
        decoded.extend_from_slice(&rest[..at]);
        let (byte, taken) = match rest[at] {
            b'+' => (b' ', 1),
            // A `%` not followed by two hex digits stays as it is.
            _ => percent_byte(&rest[at + 1..]).map_or((b'%', 1), |byte| (byte, 3)),
        };
        decoded.push(byte);
        rest = &rest[at + taken..];
    }
    decoded.extend_from_slice(rest);
    String::from_utf8(decoded).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The byte two hex digits at the start of `after` name.
fn percent_byte(after: &[u8]) -> Option<u8> {
    let digit = |i: usize| {
        char::from(*after.get(i)?)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    Some((digit(0)? << 4) | digit(1)?)
}

pub async fn read_request(
    req: Request,
    settings: &RouterSettings,
) -> Result<(Vec<(String, String)>, RequestContext), RequestError> {
    let limit = settings.max_request_bytes;
    let (parts, body) = req.into_parts();
    let mut pairs: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    // One deadline for the whole body: a client trickling bytes cannot hold the request.
    let read = tokio::time::timeout(settings.body_timeout, axum::body::to_bytes(body, limit)).await;
    let bytes = match read.map(|r| r.map_err(axum::Error::into_inner)) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(RequestError {
                status: 413,
                message: format!("request body larger than {limit} bytes ([http] max_request_bytes)"),
            });
        }
        Ok(Err(_)) => {
            return Err(RequestError {
                status: 400,
                message: "the request body could not be read (the client stopped sending it)".into(),
            });
        }
        Err(_) => {
            return Err(RequestError {
                status: 408,
                message: format!(
                    "the request body did not arrive within {} ms ([listener] header_timeout_ms)",
                    settings.body_timeout.as_millis()
                ),
            });
        }
    };
    if !bytes.is_empty() {
        if is_json(&parts.headers) {
            let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| RequestError {
                status: 400,
                message: format!("request body is not valid JSON: {e}"),
            })?;
            let object = value.as_object().ok_or_else(|| RequestError {
                status: 400,
                message: "a JSON request body must be an object".into(),
            })?;
            for (k, v) in object {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                pairs.push((k.clone(), text));
            }
        } else if is_form(&parts.headers).unwrap_or(true) {
            pairs.extend(form_pairs(&bytes));
        } else {
            return Err(RequestError {
                status: 415,
                message: "send parameters in the query string or as application/x-www-form-urlencoded".into(),
            });
        }
    }
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    Ok((
        pairs,
        RequestContext {
            headers: parts.headers,
            peer,
        },
    ))
}

fn http_status(status: i32) -> StatusCode {
    StatusCode::from_u16(crate::engine::http_status_of_envelope(status)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Whether a request is gRPC: its content type says so (`application/grpc`, `+proto`, ...).
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A refusal made before any handler ran (unknown path, wrong method, admin rule): the
/// envelope `{status, message}` with the same HTTP status whatever the policy, since no seed
/// client expects a 200 for a request that reached no endpoint.
pub fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({"status": status.as_u16(), "message": message.into()});
    (status, axum::Json(body)).into_response()
}

/// The answer to a REST request no route matches: 404 naming the method and path.
pub async fn no_such_endpoint(req: Request) -> Response {
    refusal(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

/// The answer to a known path asked with a method it does not serve (axum adds `Allow`).
pub async fn method_not_allowed(req: Request) -> Response {
    refusal(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Seconds an overloaded server (503) asks clients to wait before retrying.
const RETRY_AFTER_SECONDS: &str = "1";

/// The envelope as JSON; HTTP 200 unless mirroring is on (then the body's status). A 503
/// (overloaded: back off) is always the HTTP status too, with `Retry-After`, so HTTP clients
/// and load balancers see the back-pressure whatever the policy.
pub fn respond<T: Serialize + Envelope>(settings: &RouterSettings, reply: Reply<T>) -> Response {
    let overloaded = reply.body.status() == crate::engine::ErrorKind::Overloaded.status();
    let status = if settings.mirror_http_status || reply.always_mirror || overloaded {
        http_status(reply.body.status())
    } else {
        StatusCode::OK
    };
    // sonic-rs: a serde serializer that escapes strings 16 bytes at a time (SSE2, x86-64's
    // baseline); serde_json's byte-by-byte escaping was a third of a 128-message pull's CPU.
    // The bytes are serde_json's (a test compares them).
    let body = match sonic_rs::to_vec(&reply.body) {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the answer: {e}"),
            )
                .into_response();
        }
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(cookie) = reply.set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    if overloaded {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::form_pairs;
    use crate::http::api::{FetchReply, FetchResult, Message, StatusReply};

    /// The answers' encoder (sonic-rs) writes the bytes serde_json writes: every escape (control
    /// characters, quotes, backslashes, DEL), every UTF-8 length, absent options, negative and
    /// extreme integers.
    #[test]
    fn answers_encode_as_serde_json_does() {
        let every_char: String = (0u32..0x11_0000).step_by(7).filter_map(char::from_u32).collect();
        let texts = [
            String::new(),
            "plain".to_owned(),
            "\"quoted\" \\ back\\slash\u{7f}\u{1f}\n\t\r\u{8}\u{c}/".to_owned(),
            (0u8..0x80).map(char::from).collect(),
            every_char,
            "x".repeat(4099),
        ];
        for (i, text) in texts.iter().enumerate() {
            let message = |offset: i64| Message {
                message_id: format!("{text}{offset}"),
                message: text.clone(),
                timestamp: offset,
            };
            let reply = FetchReply {
                status: 200,
                message: (i % 2 == 0).then(|| text.clone()),
                result: Some(FetchResult {
                    status: "FOUND".into(),
                    request_id: (i % 3 != 0).then(|| text.clone()),
                    msg_list: Some(vec![message(i64::MIN), message(0), message(i64::MAX)]),
                    msg_list_size: i32::MAX,
                    retry_msg_list: None,
                    retry_msg_list_size: i32::MIN,
                    ack_info: Some(StatusReply {
                        status: -1,
                        message: Some(text.clone()),
                    }),
                    queue_info: None,
                }),
            };
            let expected = serde_json::to_vec(&reply).expect("serde_json encodes");
            let actual = sonic_rs::to_vec(&reply).expect("sonic-rs encodes");
            assert!(actual == expected, "text {i} encodes differently");
        }
    }

    /// The fast path gives what `form_urlencoded::parse` gives, on plain text and on every
    /// kind of escape, separator and broken byte (the `params` fuzz target checks the same on
    /// arbitrary input).
    #[test]
    fn form_pairs_decode_as_form_urlencoded_does() {
        let alphabet: &[&[u8]] = &[
            b"a",
            b"Z",
            b"0",
            b"=",
            b"&",
            b"+",
            b"%",
            b"%2",
            b"%41",
            b"%e4%b8%ad",
            b"%zz",
            "中".as_bytes(),
            b"\xff",
            b" ",
            b"~",
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut inputs: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"producer=p&message=hello world".to_vec(),
            vec![b'x'; 1024],
        ];
        for _ in 0..5_000 {
            let mut input = Vec::new();
            for _ in 0..(seed % 24) {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                input.extend_from_slice(alphabet[(seed >> 33) as usize % alphabet.len()]);
            }
            inputs.push(input);
        }
        for input in inputs {
            let fast: Vec<(String, String)> = form_pairs(&input).collect();
            let reference: Vec<(String, String)> = form_urlencoded::parse(&input).into_owned().collect();
            assert_eq!(fast, reference, "input {:?}", String::from_utf8_lossy(&input));
        }
    }
}
