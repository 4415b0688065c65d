//! GraphQL over HTTP (and, for `websocket` endpoints in GraphQL mode, the
//! payload of a `subscribe`/`start` message): a request is one operation,
//! or a batch of them, each decided by its type, name and root fields.
//! A refusal is a GraphQL response with `errors`, whose `extensions` name
//! the policy, rule and reason.
//!
//! The document is parsed by apollo-parser with a recursion and a token
//! limit. The operation decided is the one the server will run (by
//! `operationName`, or the only one); root fields are field names, not
//! aliases, with inline fragments and fragment spreads at the root expanded.
//! A request with only a persisted query's hash (`extensions.persistedQuery
//! .sha256Hash`) or id is decided as its registered operation, or denied
//! as unregistered. Anything that cannot be read this way is refused before
//! any rule, even under `enforcement: audit`: a parser that disagrees with
//! the server's must fail closed.

use std::collections::{BTreeMap, BTreeSet};

use apollo_parser::{cst, Parser};
use serde_json::{json, Map, Value};

use super::{Call, Classified, Refusal, Rejected, Room};
use crate::{
    conn::refuse::Response,
    http1::{field_values, RequestHead},
    policy::{Inspection, Message, Operation},
    wire::path::CanonicalTarget,
};

/// As OpenShell's: deep enough for real documents, bounded for hostile ones.
const RECURSION_LIMIT: usize = 128;
const TOKEN_LIMIT: usize = 20_000;
/// Fragments expanded into the root selection at most (each once).
const MAX_FRAGMENTS: usize = 256;
/// GET parameters that may appear once at most.
const SINGLE_PARAMETERS: [&str; 6] = ["query", "operationName", "extensions", "id", "documentId", "queryId"];
const PERSISTED_ID_KEYS: [&str; 3] = ["id", "documentId", "queryId"];

pub struct GraphQl;

impl Room for GraphQl {
    fn reads_body(&self, head: &RequestHead) -> bool {
        head.method.eq_ignore_ascii_case("POST")
    }

    fn classify(
        &self,
        head: &RequestHead,
        target: &CanonicalTarget,
        body: &[u8],
        inspection: &Inspection,
    ) -> Result<Classified, Rejected> {
        let rejected = |reason: String| Rejected::invalid(format!("GraphQL request rejected: {reason}"));
        if let Some(coding) = field_values(&head.headers, "content-encoding")
            .find(|value| !value.is_empty() && !value.eq_ignore_ascii_case(b"identity"))
        {
            return Err(rejected(format!(
                "GraphQL request content-encoding \"{}\" is not supported",
                String::from_utf8_lossy(coding).escape_debug()
            )));
        }
        if field_values(&head.headers, "content-type")
            .any(|value| value.to_ascii_lowercase().starts_with(b"multipart/"))
        {
            return Err(rejected("GraphQL multipart requests are not supported".into()));
        }
        let registry = inspection.messages.persisted.as_ref();
        let (envelopes, batch) = if head.method.eq_ignore_ascii_case("GET") {
            (vec![get_envelope(target).map_err(rejected)?], false)
        } else if head.method.eq_ignore_ascii_case("POST") {
            post_envelopes(body).map_err(rejected)?
        } else {
            return Err(rejected(format!("unsupported GraphQL HTTP method {}", head.method.escape_debug())));
        };
        let calls = envelopes
            .iter()
            .map(|envelope| classify_envelope(envelope, registry).map(|message| Call { message, id: None }))
            .collect::<Result<_, _>>()
            .map_err(rejected)?;
        Ok(Classified { calls, batch })
    }

    fn refuse(&self, refusal: &Refusal, classified: Option<&Classified>) -> Response {
        let response = json!({
            "errors": [{
                "message": format!("{}: {}", refusal.detail, refusal.reason),
                "extensions": {
                    "code": "FORBIDDEN",
                    "error": refusal.kind,
                    "policy": refusal.policy,
                    "rule": refusal.rule,
                    "reason": refusal.reason,
                },
            }],
        });
        // A batch is answered with one response per operation, as its client reads it.
        let body = match classified.filter(|classified| classified.batch) {
            Some(batch) => Value::Array(vec![response; batch.calls.len()]),
            None => response,
        };
        super::json_refusal(refusal, &body)
    }
}

/// A GraphQL-over-WebSocket operation's payload: one envelope.
pub fn classify_payload(payload: &Value, inspection: &Inspection) -> Result<Message, String> {
    let envelope = payload.as_object().ok_or("GraphQL WebSocket operation message missing object payload")?;
    classify_envelope(envelope, inspection.messages.persisted.as_ref())
}

/// The request's query parameters as an envelope (`extensions` parsed as
/// JSON, or ignored if it is not).
fn get_envelope(target: &CanonicalTarget) -> Result<Map<String, Value>, String> {
    let mut envelope = Map::new();
    for name in SINGLE_PARAMETERS {
        let values: Vec<&String> =
            target.query.get(name).into_iter().flatten().filter(|value| !value.is_empty()).collect();
        match values.as_slice() {
            [] => {}
            [value] => {
                let value = if name == "extensions" {
                    match serde_json::from_str(value) {
                        Ok(parsed) => parsed,
                        Err(_) => continue,
                    }
                } else {
                    Value::String((*value).clone())
                };
                envelope.insert(name.to_owned(), value);
            }
            _ => return Err(format!("GraphQL GET parameter \"{name}\" must not appear more than once")),
        }
    }
    let ids: Vec<&str> = PERSISTED_ID_KEYS.into_iter().filter(|key| envelope.contains_key(*key)).collect();
    if let [first, second, ..] = ids.as_slice() {
        return Err(format!(
            "GraphQL GET persisted-query id parameters \"{first}\" and \"{second}\" must not be combined"
        ));
    }
    Ok(envelope)
}

fn post_envelopes(body: &[u8]) -> Result<(Vec<Map<String, Value>>, bool), String> {
    if body.is_empty() {
        return Err("GraphQL POST body is empty".into());
    }
    let parsed: Value =
        serde_json::from_slice(body).map_err(|error| format!("GraphQL request body is not valid JSON: {error}"))?;
    match parsed {
        Value::Object(envelope) => Ok((vec![envelope], false)),
        Value::Array(items) if items.is_empty() => Err("GraphQL batch request is empty".into()),
        Value::Array(items) => {
            let envelopes = items
                .into_iter()
                .map(|item| match item {
                    Value::Object(envelope) => Ok(envelope),
                    _ => Err("GraphQL batch item must be an object".to_owned()),
                })
                .collect::<Result<_, _>>()?;
            Ok((envelopes, true))
        }
        _ => Err("GraphQL JSON envelope must be an object or array".into()),
    }
}

/// One envelope's operation: its document's selected operation, else its
/// persisted query as registered.
fn classify_envelope(
    envelope: &Map<String, Value>,
    registry: Option<&BTreeMap<String, Operation>>,
) -> Result<Message, String> {
    let document = envelope.get("query").and_then(Value::as_str).filter(|query| !query.trim().is_empty());
    let operation_name = envelope.get("operationName").and_then(Value::as_str).unwrap_or_default();
    if let Some(document) = document {
        return select_operation(document, operation_name).map(Message::GraphQl);
    }
    let hash = envelope
        .get("extensions")
        .and_then(|extensions| extensions.get("persistedQuery"))
        .and_then(|persisted| persisted.get("sha256Hash"))
        .and_then(Value::as_str)
        .filter(|hash| !hash.is_empty());
    // The first id key present is the id, whatever its value.
    let id = PERSISTED_ID_KEYS.into_iter().find_map(|key| envelope.get(key)).and_then(Value::as_str);
    let Some(key) = hash.or(id) else {
        return Err("GraphQL request has no query document or persisted query identifier".into());
    };
    Ok(match registry.and_then(|registry| registry.get(key)) {
        Some(operation) => Message::GraphQl(operation.clone()),
        None => Message::GraphQlUnregistered,
    })
}

/// Parses `document` and returns the operation the server will run.
fn select_operation(document: &str, operation_name: &str) -> Result<Operation, String> {
    let tree = Parser::new(document).recursion_limit(RECURSION_LIMIT).token_limit(TOKEN_LIMIT).parse();
    if let Some(error) = tree.errors().next() {
        return Err(format!("GraphQL document parse error: {}", error.message().escape_debug()));
    }
    let mut operations = Vec::new();
    let mut fragments = BTreeMap::new();
    for definition in tree.document().definitions() {
        match definition {
            cst::Definition::OperationDefinition(operation) => operations.push(operation),
            cst::Definition::FragmentDefinition(fragment) => {
                if let Some(name) = fragment.fragment_name().and_then(|name| name.name()) {
                    fragments.entry(name.text().to_string()).or_insert(fragment);
                }
            }
            // Type-system definitions execute nothing.
            _ => {}
        }
    }
    let name_of =
        |operation: &cst::OperationDefinition| operation.name().map(|name| name.text().to_string()).unwrap_or_default();
    let selected = match (operations.as_slice(), operation_name) {
        ([], _) => return Err("GraphQL document contains no executable operation".into()),
        (_, name) if !name.is_empty() => operations
            .iter()
            .find(|operation| name_of(operation) == name)
            .ok_or_else(|| format!("GraphQL operationName \"{}\" was not found", name.escape_debug()))?,
        ([only], _) => only,
        _ => return Err("GraphQL document has multiple operations but no operationName".into()),
    };
    let operation_type = match selected.operation_type() {
        None => "query",
        Some(kind) if kind.mutation_token().is_some() => "mutation",
        Some(kind) if kind.subscription_token().is_some() => "subscription",
        Some(_) => "query",
    };
    let selection = selected.selection_set().ok_or("GraphQL operation has no selection set")?;
    let mut fields = BTreeSet::new();
    let mut expanded = BTreeSet::new();
    root_fields(&selection, &fragments, &mut expanded, &mut fields)?;
    Ok(Operation {
        operation_type: operation_type.into(),
        operation_name: name_of(selected),
        fields: fields.into_iter().collect(),
    })
}

/// The field names of a root selection set: inline fragments and named
/// fragments (each once; unknown ones ignored, as the server refuses them)
/// expanded.
fn root_fields(
    selection: &cst::SelectionSet,
    fragments: &BTreeMap<String, cst::FragmentDefinition>,
    expanded: &mut BTreeSet<String>,
    fields: &mut BTreeSet<String>,
) -> Result<(), String> {
    for item in selection.selections() {
        match item {
            cst::Selection::Field(field) => {
                if let Some(name) = field.name() {
                    fields.insert(name.text().to_string());
                }
            }
            cst::Selection::InlineFragment(fragment) => {
                if let Some(inner) = fragment.selection_set() {
                    root_fields(&inner, fragments, expanded, fields)?;
                }
            }
            cst::Selection::FragmentSpread(spread) => {
                let Some(name) = spread.fragment_name().and_then(|name| name.name()) else { continue };
                let name = name.text().to_string();
                if expanded.len() >= MAX_FRAGMENTS {
                    return Err(format!("GraphQL document spreads more than {MAX_FRAGMENTS} fragments at the root"));
                }
                if !expanded.insert(name.clone()) {
                    continue;
                }
                if let Some(inner) = fragments.get(&name).and_then(|fragment| fragment.selection_set()) {
                    root_fields(&inner, fragments, expanded, fields)?;
                }
            }
        }
    }
    Ok(())
}
