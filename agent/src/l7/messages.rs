//! WebSocket client text messages as the rules see them, after an upgrade
//! on a `protocol: websocket` endpoint: each is decided as method
//! `WEBSOCKET_TEXT` against the upgrade's path and query; on an endpoint in
//! GraphQL mode (rules with `operation_type`...), a graphql-transport-ws
//! `subscribe` or graphql-ws `start` is decided as the GraphQL operation in
//! its payload, control messages pass undecided, anything else is refused.

use serde_json::Value;

use super::graphql;
use crate::policy::{Inspection, Message};

/// The method a client text message is decided as.
pub const WEBSOCKET_TEXT: &str = "WEBSOCKET_TEXT";

/// graphql-transport-ws and graphql-ws messages that carry no operation.
const CONTROL_TYPES: [&str; 6] = ["connection_init", "connection_terminate", "ping", "pong", "complete", "stop"];

/// What decides a text message: `Ok(None)` for a GraphQL control message
/// (allowed undecided), `Err` for one that cannot be read (refused, even
/// under audit).
pub fn classify_text(text: &str, inspection: &Inspection) -> Result<Option<Message>, String> {
    if !inspection.messages.websocket_graphql {
        return Ok(Some(Message::Http));
    }
    let parsed: Value =
        serde_json::from_str(text).map_err(|error| format!("GraphQL WebSocket message is not valid JSON: {error}"))?;
    let object = parsed.as_object().ok_or("GraphQL WebSocket message must be a JSON object")?;
    let Some(Value::String(kind)) = object.get("type") else {
        return Err("GraphQL WebSocket message missing string type".into());
    };
    if CONTROL_TYPES.contains(&kind.as_str()) {
        return Ok(None);
    }
    if kind != "subscribe" && kind != "start" {
        return Err(format!("unsupported GraphQL WebSocket client message type \"{}\"", kind.escape_debug()));
    }
    if object.get("id").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err("GraphQL WebSocket operation message missing non-empty id".into());
    }
    let payload = object.get("payload").unwrap_or(&Value::Null);
    graphql::classify_payload(payload, inspection).map(Some)
}
