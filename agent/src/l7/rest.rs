//! REST (and WebSocket upgrades): a request is its method, canonical path
//! and query; a refusal is the agent's JSON error body.

use super::{Classified, Refusal, Rejected, Room};
use crate::{
    conn::refuse::{ErrorBody, Response},
    http1::RequestHead,
    policy::{Inspection, Message},
    wire::path::CanonicalTarget,
};

pub struct Rest;

impl Room for Rest {
    fn classify(&self, _: &RequestHead, _: &CanonicalTarget, _: &[u8], _: &Inspection) -> Result<Classified, Rejected> {
        Ok(Classified::single(Message::Http))
    }

    fn refuse(&self, refusal: &Refusal, _classified: Option<&Classified>) -> Response {
        let body = ErrorBody {
            policy: refusal.policy,
            rule: refusal.rule,
            ..ErrorBody::new(refusal.kind, refusal.detail, refusal.reason)
        };
        body.response(refusal.status)
    }
}
