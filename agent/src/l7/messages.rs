//! WebSocket client text messages as the rules see them, after an upgrade
//! on a `protocol: websocket` endpoint: each is decided as method
//! `WEBSOCKET_TEXT` against the upgrade's path and query; on an endpoint in
//! GraphQL mode (rules with `operation_type`...), a graphql-transport-ws
//! `subscribe` or graphql-ws `start` is decided as the GraphQL operation in
//! its payload, control messages pass undecided, anything else is refused.

use serde_json::Value;

use super::{
    graphql,
    log::{describe_call, log_request},
    target::Target,
    websocket::{Inspector, TextVerdict, POLICY_VIOLATION},
    Call, WEBSOCKET_TEXT,
};
use crate::{
    conn::{CloseLog, Context, Origin},
    policy::{HttpRequest, Inspection, Message, RequestDecision},
    wire::path::CanonicalTarget,
};

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

/// Decides each client text message of an inspected WebSocket session: one
/// log line each, a refusal closing both sides with 1008 and the reason,
/// the bound provider's placeholders replaced when the endpoint says so.
pub struct MessageInspector<'a> {
    pub target: &'a Target,
    pub origin: &'a Origin,
    pub context: &'a Context,
    /// The session's connection: denied messages are kept for `policy suggest`.
    pub log: &'a mut CloseLog,
    /// The endpoint that allowed the upgrade.
    pub inspection: Inspection,
    /// The upgrade's canonical path and query, which text messages are decided against.
    pub upgrade: CanonicalTarget,
    /// The bound provider, for `websocket_credential_rewrite`.
    pub credential_provider: Option<String>,
    /// Messages decided, and denied.
    pub decided: u64,
    pub denied: u64,
}

impl Inspector for MessageInspector<'_> {
    fn text(&mut self, text: &str) -> TextVerdict {
        let call = match classify_text(text, &self.inspection) {
            Ok(Some(message)) => Call { message, id: None },
            // A GraphQL control message: undecided.
            Ok(None) => return self.forward(text),
            Err(reason) => {
                let generation = self.context.decider.policies.current().generation;
                let refused = RequestDecision::denied(Some(reason.clone()));
                let call = Call { message: Message::Http, id: None };
                self.log(&call, generation, &refused);
                return self.refuse(reason);
            }
        };
        let http = HttpRequest {
            method: WEBSOCKET_TEXT,
            path: &self.upgrade.path,
            query: &self.upgrade.query,
            message: &call.message,
            via_gate: self.target.via_gate,
        };
        let (generation, decision) =
            self.context.decider.request(self.origin, &self.target.name, self.target.upstream, &http);
        self.log(&call, generation, &decision);
        if !decision.allow {
            let reason = decision
                .reason
                .unwrap_or_else(|| format!("{WEBSOCKET_TEXT} {} not permitted by policy", self.upgrade.path));
            return self.refuse(reason);
        }
        self.forward(text)
    }
}

impl MessageInspector<'_> {
    fn log(&mut self, call: &Call, generation: u64, decision: &RequestDecision) {
        self.decided += 1;
        self.denied += u64::from(!decision.allow);
        if !decision.allow {
            self.log.request_denied(WEBSOCKET_TEXT, &self.upgrade.path, describe_call(&call.message));
        }
        log_request(
            self.origin,
            self.target,
            WEBSOCKET_TEXT,
            &self.upgrade.path,
            call,
            generation,
            decision,
            None,
            None,
            None,
        );
    }

    fn refuse(&self, reason: String) -> TextVerdict {
        TextVerdict::Close { code: POLICY_VIOLATION, reason }
    }

    /// The message as it goes on: placeholders replaced on an endpoint that
    /// rewrites them, refused where they cannot be.
    fn forward(&mut self, text: &str) -> TextVerdict {
        if !self.inspection.messages.rewrite_websocket {
            return TextVerdict::Forward(text.to_owned());
        }
        let provider = self.credential_provider.as_deref();
        match self.context.credentials.rewrite_text(text, provider, &self.target.name, self.target.tls) {
            Ok(rewritten) => TextVerdict::Forward(rewritten.to_string()),
            Err(refusal) => {
                tracing::warn!(
                    event = "credential_refused",
                    error = refusal.kind,
                    provider = refusal.provider,
                    host = self.target.name,
                    pid = self.origin.pid,
                    "{}: {}",
                    refusal.detail,
                    refusal.reason,
                );
                self.denied += 1;
                self.refuse(format!("{}: {}", refusal.detail, refusal.reason))
            }
        }
    }
}
