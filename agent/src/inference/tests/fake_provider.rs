//! A provider on 127.0.0.1 speaking HTTP/1.1 (optionally over TLS with a
//! test CA), recording every request it gets. What it answers to a POST is
//! chosen by the body's `fake` field, which the agent passes through:
//!
//! - absent / `json`: a JSON echo of the model and path, Content-Length;
//! - `sse`: chunked SSE `data: 1`, then waits for [`FakeProvider::gate`],
//!   then `data: 2`, `data: [DONE]`;
//! - `stall`: chunked SSE, one event, then silence;
//! - `stall_partial`: chunked SSE, half an event, then silence;
//! - `stall_json`: JSON promising 100 bytes, 10 sent, then silence;
//! - `big`: chunked SSE of 20 events of 1000 bytes;
//! - `silent`: no response at all;
//! - `json_then_vanish`: a JSON response, then the connection is closed
//!   without notice, as an idle-timeout would;
//! - `hints`: `103 Early Hints`, then the JSON echo.
//!
//! GET answers a JSON model list. A request whose User-Agent is
//! [`EARLY_401`] gets a 401 as soon as its head is in, and its body is
//! never read.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{pki_types::PrivateKeyDer, ServerConfig};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::Notify,
    task::JoinHandle,
    time::sleep,
};
use tokio_rustls::TlsAcceptor;

use crate::http1::{copy_body, request_framing, BodyLimits, HeadReader};

const FOREVER: Duration = Duration::from_secs(3600);
/// The User-Agent that gets a 401 before the body is read.
pub const EARLY_401: &str = "fake-early-401";
const PATIENT: Duration = Duration::from_secs(10);

/// One request as the provider received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which accepted connection (0-based) carried it.
    pub connection: usize,
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(field, _)| field.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    pub fn header_names(&self) -> Vec<String> {
        self.headers.iter().map(|(name, _)| name.to_ascii_lowercase()).collect()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the provider got JSON")
    }
}

pub struct FakeProvider {
    pub address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    /// Lets a `sse` response go on past its first event.
    pub gate: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeProvider {
    pub async fn start(tls: Option<Arc<ServerConfig>>) -> FakeProvider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let (task_seen, task_connections, task_gate) = (seen.clone(), connections.clone(), gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let connection = task_connections.fetch_add(1, Ordering::SeqCst);
                let (seen, gate, tls) = (task_seen.clone(), task_gate.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(config) => {
                            if let Ok(stream) = TlsAcceptor::from(config).accept(stream).await {
                                serve(stream, connection, seen, gate).await;
                            }
                        }
                        None => serve(stream, connection, seen, gate).await,
                    }
                });
            }
        });
        FakeProvider { address, seen, connections, gate, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    connection: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<Notify>,
) {
    let mut reader = HeadReader::new(stream);
    while let Ok(Some(head)) = reader.read_request_head(FOREVER, PATIENT).await {
        let user_agent = head.headers.iter().find(|(name, _)| name.eq_ignore_ascii_case("user-agent"));
        if user_agent.is_some_and(|(_, value)| value == EARLY_401.as_bytes()) {
            let body = r#"{"error":{"type":"unauthorized","message":"early"}}"#;
            let response = format!("HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            let _ = send(reader.get_mut(), response.as_bytes()).await;
            // Neither reads the body nor closes.
            sleep(FOREVER).await;
        }
        let mut body = Vec::new();
        let limits = BodyLimits { max_body: None, idle: PATIENT };
        if copy_body(&mut reader, &mut body, request_framing(&head), &limits).await.is_err() {
            return;
        }
        let request = Seen {
            connection,
            method: head.method.clone(),
            target: head.target.clone(),
            headers: head
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
                .collect(),
            body,
        };
        seen.lock().unwrap().push(request.clone());
        let behaviour = match request.method.as_str() {
            "POST" => request.json()["fake"].as_str().unwrap_or("json").to_owned(),
            _ => "models".to_owned(),
        };
        let client = reader.get_mut();
        if respond(client, &behaviour, &request, &gate).await.is_err() || behaviour == "json_then_vanish" {
            return;
        }
    }
}

fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";

async fn send<W: AsyncWrite + Unpin>(client: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    client.write_all(bytes).await?;
    client.flush().await
}

async fn respond<W: AsyncWrite + Unpin>(
    client: &mut W,
    behaviour: &str,
    request: &Seen,
    gate: &Notify,
) -> std::io::Result<()> {
    let json_response = |body: Value| {
        let body = body.to_string();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: req-1\r\nKeep-Alive: timeout=5\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    match behaviour {
        "models" => {
            send(
                client,
                json_response(json!({"object": "list", "data": [{"id": "m1"}], "path": request.target})).as_bytes(),
            )
            .await
        }
        "hints" => {
            send(client, b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n").await?;
            let model = request.json()["model"].clone();
            send(client, json_response(json!({"model": model, "path": request.target})).as_bytes()).await
        }
        "json" | "json_then_vanish" => {
            let model = request.json()["model"].clone();
            send(client, json_response(json!({"model": model, "path": request.target})).as_bytes()).await
        }
        "sse" => {
            send(client, &[SSE_HEAD.as_bytes(), &chunk(b"data: 1\n\n")].concat()).await?;
            gate.notified().await;
            send(client, &[chunk(b"data: 2\n\n"), chunk(b"data: [DONE]\n\n"), b"0\r\n\r\n".to_vec()].concat()).await
        }
        "stall" => {
            send(client, &[SSE_HEAD.as_bytes(), &chunk(b"data: 1\n\n")].concat()).await?;
            sleep(FOREVER).await;
            Ok(())
        }
        "stall_partial" => {
            send(client, &[SSE_HEAD.as_bytes(), &chunk(b"data: {\"par")].concat()).await?;
            sleep(FOREVER).await;
            Ok(())
        }
        "stall_json" => {
            send(
                client,
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\"",
            )
            .await?;
            sleep(FOREVER).await;
            Ok(())
        }
        "big" => {
            send(client, SSE_HEAD.as_bytes()).await?;
            for _ in 0..20 {
                let event = format!("data: {}\n\n", "x".repeat(992));
                send(client, &chunk(event.as_bytes())).await?;
            }
            send(client, b"0\r\n\r\n").await
        }
        "silent" => {
            sleep(FOREVER).await;
            Ok(())
        }
        other => panic!("unknown fake behaviour {other}"),
    }
}

/// A CA, the PEM to trust it, and a server config for `localhost` signed by it.
pub struct TestCa {
    pub ca_pem: String,
    pub server_config: Arc<ServerConfig>,
}

pub fn test_ca() -> TestCa {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "sandbox-egress test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &ca).unwrap();
    let server_config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![server_cert.der().clone()], PrivateKeyDer::Pkcs8(server_key.serialize_der().into()))
        .unwrap();
    TestCa { ca_pem: ca.pem(), server_config: Arc::new(server_config) }
}
