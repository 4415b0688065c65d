//! First-bytes stream classification: TLS ClientHello, HTTP/1.x request head, opaque TCP.
