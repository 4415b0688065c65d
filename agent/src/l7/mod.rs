//! L7: HTTP requests on connections to inspected endpoints, each decided by
//! the endpoint's REST or WebSocket rules before it goes upstream.

pub mod path;
