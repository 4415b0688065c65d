//! JSON-RPC 2.0 and MCP (its Streamable HTTP transport): a POST body is
//! one message or a batch, each call decided on its own; an MCP `GET` that
//! accepts `text/event-stream` is the receive stream, an MCP `DELETE`
//! without a body the end of a session. A refusal is a
//! JSON-RPC error object carrying each call's `id`, the policy, rule and
//! reason in its `data`.
//!
//! What is refused before any rule (even under `enforcement: audit`):
//! a body that is not JSON, a message without `"jsonrpc": "2.0"`, an empty
//! batch, a message that is both a call and a response, a malformed
//! response; on `protocol: json-rpc`, any response frame the client sends;
//! on `protocol: mcp`, a call whose `id` or `params` do not have the shape
//! the MCP schema gives its method, and (with `strict_tool_names`) a tool
//! name outside `^[A-Za-z0-9_.-]{1,128}$`.

use serde_json::{json, Map, Value};

use super::{Call, Cause, Classified, Refusal, Rejected, Room};
use crate::{
    conn::refuse::Response,
    http1::{list_elements, request_framing, BodyFraming, RequestHead},
    policy::{Inspection, Message},
    wire::path::CanonicalTarget,
};

/// JSON-RPC error codes: the spec's parse error and invalid request, and one
/// of the range left to servers for a policy denial.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const DENIED_BY_POLICY: i64 = -32001;
const MAX_TOOL_NAME: usize = 128;

pub struct JsonRpc {
    /// MCP's typed checks and profile, over the same framing.
    pub mcp: bool,
}

impl JsonRpc {
    fn protocol(&self) -> &'static str {
        if self.mcp {
            "MCP"
        } else {
            "JSON-RPC"
        }
    }
}

impl Room for JsonRpc {
    fn reads_body(&self, head: &RequestHead) -> bool {
        !(is_receive_stream(head) || self.mcp && is_session_end(head))
    }

    fn classify(
        &self,
        head: &RequestHead,
        _: &CanonicalTarget,
        body: &[u8],
        inspection: &Inspection,
    ) -> Result<Classified, Rejected> {
        if is_receive_stream(head) {
            return Ok(Classified::single(Message::ReceiveStream));
        }
        if self.mcp && is_session_end(head) {
            return Ok(Classified::single(Message::SessionEnd));
        }
        let rejected = |detail: String| format!("JSON-RPC request rejected: {detail}");
        let parsed: Value =
            serde_json::from_slice(body).map_err(|_| Rejected::unparsable(rejected("invalid JSON".into())))?;
        let (items, batch) = match parsed {
            Value::Array(items) if items.is_empty() => return Err(Rejected::invalid(rejected("empty batch".into()))),
            Value::Array(items) => (items, true),
            single => (vec![single], false),
        };
        let mut calls = Vec::with_capacity(items.len());
        let mut responses = false;
        for item in &items {
            let message = read_message(item, self.mcp, inspection.messages.strict_tool_names).map_err(|detail| {
                Rejected::invalid(rejected(if batch { format!("batch item invalid: {detail}") } else { detail }))
            })?;
            match message {
                Read::Response => responses = true,
                Read::Call { method, tool, id } => {
                    calls.push(Call { message: Message::JsonRpcCall { method, tool }, id: Some(id) })
                }
            }
        }
        if responses {
            if !self.mcp {
                return Err(Rejected::invalid(
                    "JSON-RPC response frames are not permitted from client to server".into(),
                ));
            }
            // Answers to the server's own requests: decided once for the body.
            calls.insert(0, Call { message: Message::JsonRpcResponse, id: None });
        }
        Ok(Classified { calls, batch })
    }

    fn refuse(&self, refusal: &Refusal, classified: Option<&Classified>) -> Response {
        let code = match refusal.cause {
            Cause::Unparsable => PARSE_ERROR,
            Cause::Invalid => INVALID_REQUEST,
            Cause::Policy | Cause::Credential => DENIED_BY_POLICY,
        };
        let error = |id: &Value| {
            json!({
                "jsonrpc": "2.0",
                "id": id,
                "error": {
                    "code": code,
                    "message": format!("{}: {}", refusal.detail, refusal.reason),
                    "data": {
                        "error": refusal.kind,
                        "protocol": self.protocol(),
                        "policy": refusal.policy,
                        "rule": refusal.rule,
                        "reason": refusal.reason,
                    },
                },
            })
        };
        // A batch gets an answer per call (notifications included, so that
        // nothing goes unanswered), a single message one answer.
        let ids: Vec<&Value> = classified
            .into_iter()
            .flat_map(|classified| &classified.calls)
            .filter_map(|call| call.id.as_ref())
            .collect();
        let body = match (classified.is_some_and(|classified| classified.batch), ids.as_slice()) {
            (true, several) if !several.is_empty() => Value::Array(several.iter().map(|id| error(id)).collect()),
            (_, [id, ..]) => error(id),
            (_, []) => error(&Value::Null),
        };
        super::json_refusal(refusal, &body)
    }
}

/// An MCP `DELETE` without a body: the Streamable HTTP transport's end of
/// a session (OpenShell refuses it as invalid JSON; the MCP SDKs send it
/// when a client closes).
fn is_session_end(head: &RequestHead) -> bool {
    head.method.eq_ignore_ascii_case("DELETE") && has_no_body(head)
}

fn has_no_body(head: &RequestHead) -> bool {
    matches!(request_framing(head), BodyFraming::Empty | BodyFraming::Length(0))
}

/// An MCP `GET` that asks for the server's event stream: no body, and
/// `text/event-stream` among the media types it accepts.
fn is_receive_stream(head: &RequestHead) -> bool {
    head.method.eq_ignore_ascii_case("GET")
        && has_no_body(head)
        && list_elements(&head.headers, "accept").any(|media| {
            let media = media.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
            media.eq_ignore_ascii_case(b"text/event-stream")
        })
}

enum Read {
    Call { method: String, tool: Option<String>, id: Value },
    Response,
}

/// One message of the body, checked as OpenShell checks it.
fn read_message(item: &Value, mcp: bool, strict_tool_names: bool) -> Result<Read, String> {
    let Some(object) = item.as_object() else { return Err("missing or non-string 'jsonrpc' field".into()) };
    match object.get("jsonrpc") {
        Some(Value::String(version)) if version == "2.0" => {}
        Some(Value::String(version)) => return Err(format!("unsupported JSON-RPC version '{}'", escaped(version))),
        _ => return Err("missing or non-string 'jsonrpc' field".into()),
    }
    let is_response = object.contains_key("result") || object.contains_key("error");
    if object.contains_key("method") && is_response {
        return Err("JSON-RPC message includes both method and result/error".into());
    }
    if is_response {
        return read_response(object).map(|()| Read::Response);
    }
    let Some(Value::String(method)) = object.get("method") else {
        return Err("missing or non-string 'method' field".into());
    };
    let id = object.get("id");
    let params = object.get("params");
    let tool = if mcp { check_mcp_call(method, id, params, strict_tool_names)? } else { None };
    Ok(Read::Call { method: method.clone(), tool, id: id.cloned().unwrap_or(Value::Null) })
}

fn read_response(object: &Map<String, Value>) -> Result<(), String> {
    match (object.get("result"), object.get("error")) {
        (Some(_), Some(_)) => return Err("JSON-RPC response includes both result and error".into()),
        (None, Some(error)) if !error.is_object() => return Err("JSON-RPC response error must be an object".into()),
        _ => {}
    }
    match object.get("id") {
        None => Err("JSON-RPC response missing id".into()),
        Some(Value::String(_) | Value::Number(_) | Value::Null) => Ok(()),
        Some(_) => Err("JSON-RPC response id must be string, number, or null".into()),
    }
}

/// MCP's schema for the methods it defines (other methods are extensions,
/// addressable by name); returns the tool of a `tools/call`.
fn check_mcp_call(
    method: &str,
    id: Option<&Value>,
    params: Option<&Value>,
    strict_tool_names: bool,
) -> Result<Option<String>, String> {
    let invalid = |detail: &str| format!("invalid MCP request params: {method}: {detail}");
    match id {
        // A notification.
        None => {
            if method == "notifications/progress" {
                let params = params.and_then(Value::as_object).ok_or_else(|| invalid("params must be an object"))?;
                if !matches!(params.get("progressToken"), Some(Value::String(_)))
                    && !is_integer(params.get("progressToken"))
                {
                    return Err(invalid("progressToken must be a string or an integer"));
                }
                if !params.get("progress").is_some_and(Value::is_number) {
                    return Err(invalid("progress must be a number"));
                }
            }
            return Ok(None);
        }
        Some(Value::String(_)) => {}
        Some(id) if is_integer(Some(id)) => {}
        Some(_) => return Err(format!("invalid MCP request: {method}: id must be a string or an integer")),
    }
    let empty = Map::new();
    let params = match params {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(params)) => params,
        Some(_) => return Err(invalid("params must be an object")),
    };
    let string = |name: &str| params.get(name).and_then(Value::as_str);
    match method {
        "initialize" => {
            if string("protocolVersion").is_none() {
                return Err(invalid("protocolVersion must be a string"));
            }
            if !params.get("capabilities").is_some_and(Value::is_object) {
                return Err(invalid("capabilities must be an object"));
            }
            let client = params.get("clientInfo").and_then(Value::as_object);
            if !client.is_some_and(|client| {
                client.get("name").is_some_and(Value::is_string) && client.get("version").is_some_and(Value::is_string)
            }) {
                return Err(invalid("clientInfo must have a string name and version"));
            }
        }
        "tools/call" => {
            let name = string("name").ok_or_else(|| invalid("name must be a string"))?;
            if strict_tool_names && !is_strict_tool_name(name) {
                return Err("MCP tool name must match ^[A-Za-z0-9_.-]{1,128}$ when strict_tool_names is enabled".into());
            }
            return Ok(Some(name.to_owned()));
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" if string("uri").is_none() => {
            return Err(invalid("uri must be a string"));
        }
        "prompts/get" => {
            if string("name").is_none() {
                return Err(invalid("name must be a string"));
            }
            let arguments_ok = match params.get("arguments") {
                None | Some(Value::Null) => true,
                Some(Value::Object(arguments)) => arguments.values().all(Value::is_string),
                Some(_) => false,
            };
            if !arguments_ok {
                return Err(invalid("arguments must map names to strings"));
            }
        }
        "tasks/get" | "tasks/update" | "tasks/result" | "tasks/cancel" if string("taskId").is_none() => {
            return Err(invalid("taskId must be a string"));
        }
        "logging/setLevel" => {
            let levels = ["emergency", "alert", "critical", "error", "warning", "notice", "info", "debug"];
            if !string("level").is_some_and(|level| levels.contains(&level)) {
                return Err(invalid(
                    "level must be one of emergency, alert, critical, error, warning, notice, info, debug",
                ));
            }
        }
        "completion/complete" => {
            let reference = params.get("ref").and_then(Value::as_object);
            let reference_ok = reference.is_some_and(|reference| match reference.get("type").and_then(Value::as_str) {
                Some("ref/prompt") => reference.get("name").is_some_and(Value::is_string),
                Some("ref/resource") => reference.get("uri").is_some_and(Value::is_string),
                _ => false,
            });
            let argument = params.get("argument").and_then(Value::as_object);
            let argument_ok = argument.is_some_and(|argument| {
                argument.get("name").is_some_and(Value::is_string)
                    && argument.get("value").is_some_and(Value::is_string)
            });
            if !reference_ok || !argument_ok {
                return Err(invalid("ref (prompt name or resource uri) and argument {name, value} are required"));
            }
        }
        _ => {}
    }
    Ok(None)
}

fn is_integer(value: Option<&Value>) -> bool {
    value.and_then(Value::as_number).is_some_and(|number| number.is_i64())
}

fn is_strict_tool_name(name: &str) -> bool {
    (1..=MAX_TOOL_NAME).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A value from the sandbox quoted in a reason: control characters escaped.
fn escaped(text: &str) -> String {
    text.chars().take(64).flat_map(char::escape_debug).collect()
}
