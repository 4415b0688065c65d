//! REST (and WebSocket upgrades): a request is its method, canonical path
//! and query; a refusal is the agent's JSON error body.

use super::{Classified, Refusal, Room};
use crate::{
    conn::refuse::{ErrorBody, Response},
    http1::RequestHead,
    policy::Inspection,
    wire::path::canonicalize,
};

pub struct Rest;

impl Room for Rest {
    fn classify(&self, head: &RequestHead, inspection: &Inspection) -> Result<Classified, String> {
        let request_target = head.origin_form_target();
        let canonical = canonicalize(&request_target, inspection.allow_encoded_slash)
            .map_err(|reason| format!("{} {request_target} refused: {reason}", head.method))?;
        Ok(Classified {
            method: head.method.clone(),
            target: canonical.origin_form(),
            path: canonical.path,
            query: canonical.query,
        })
    }

    fn refuse(&self, refusal: &Refusal) -> Response {
        let body = ErrorBody {
            policy: refusal.policy,
            rule: refusal.rule,
            ..ErrorBody::new(refusal.kind, refusal.detail, refusal.reason)
        };
        body.response(refusal.status)
    }
}
