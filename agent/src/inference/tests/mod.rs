//! End-to-end tests of inference.local: a client writing raw HTTP over a
//! duplex pipe to [`Inference::serve_connection`], a fake provider on
//! loopback, a config file in a temporary directory.

mod fake_provider;
mod route;
mod serve;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream},
    task::JoinHandle,
    time::timeout,
};

use self::fake_provider::{test_ca, FakeProvider, EARLY_401};
use super::Inference;
use crate::{
    conn::InferenceLog,
    http1::{response_framing, BodySource, HeadReader, Piece, ResponseHead},
};

pub const OPENAI_KEY: &str = "sk-test-openai-0123456789";
pub const ANTHROPIC_KEY: &str = "sk-ant-test-9876543210";
/// Every wait in these tests; a hang fails instead of blocking the suite.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("se-{label}-{}-{unique}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct World {
    pub temp: TempDir,
    pub fake: FakeProvider,
    pub inference: Arc<Inference>,
    pub config_path: PathBuf,
}

/// How a test world is set up.
pub struct Setup {
    pub route: Option<(&'static str, &'static str)>,
    /// YAML lines under `limits:`, indented by two spaces.
    pub limits: &'static str,
    pub tls: bool,
}

pub const ROUTED_OPENAI: Setup = Setup {
    route: Some(("openai", "gpt-routed")),
    limits: "  stream_idle_timeout: 300ms\n  response_timeout: 500ms\n",
    tls: false,
};

impl World {
    /// Providers `openai` (type openai, under the path prefix /api) and
    /// `claude` (type anthropic), both at the fake provider.
    pub async fn start(setup: Setup) -> World {
        let temp = TempDir::new("inference");
        let ca = setup.tls.then(test_ca);
        let fake = FakeProvider::start(ca.as_ref().map(|ca| ca.server_config.clone())).await;
        std::fs::write(temp.path().join("openai.key"), format!("{OPENAI_KEY}\n")).unwrap();
        std::fs::write(temp.path().join("anthropic.key"), ANTHROPIC_KEY).unwrap();
        let port = fake.address.port();
        let (scheme, host, ca_line) = match &ca {
            Some(ca) => {
                let ca_path = temp.path().join("ca.pem");
                std::fs::write(&ca_path, &ca.ca_pem).unwrap();
                ("https", "localhost", format!("    ca_file: {}\n", ca_path.display()))
            }
            None => ("http", "127.0.0.1", String::new()),
        };
        let route = setup.route.map_or_else(String::new, |(provider, model)| {
            format!("route:\n  provider: {provider}\n  model: {model}\n")
        });
        let dir = temp.path().display();
        let yaml = format!(
            "providers:\n\
             \x20 - name: openai\n    type: openai\n    base_url: {scheme}://{host}:{port}/api\n\
             \x20   credential: {{ file: {dir}/openai.key }}\n{ca_line}\
             \x20   headers:\n      OpenAI-Project: proj_test\n\
             \x20 - name: claude\n    type: anthropic\n    base_url: {scheme}://{host}:{port}\n\
             \x20   credential: {{ file: {dir}/anthropic.key }}\n{ca_line}\
             {route}limits:\n{}",
            setup.limits
        );
        let config_path = temp.path().join("inference.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let inference = Arc::new(Inference::load(&config_path).unwrap());
        World { temp, fake, inference, config_path }
    }

    /// A new client connection, served by the agent.
    pub fn connect(&self) -> Client {
        let (client, server) = duplex(64 * 1024);
        let inference = self.inference.clone();
        let session = tokio::spawn(async move {
            let mut log = InferenceLog::default();
            inference.serve_connection(server, &test_dns(), &mut log).await;
            log
        });
        Client { reader: HeadReader::new(client), session }
    }

    /// One request on its own connection: the response and the log.
    pub async fn exchange(&self, raw: &[u8]) -> (Response, InferenceLog) {
        let mut client = self.connect();
        client.send(raw).await;
        let response = client.response("POST").await;
        (response, client.finish().await)
    }
}

pub struct Client {
    pub reader: HeadReader<DuplexStream>,
    session: JoinHandle<InferenceLog>,
}

pub struct Response {
    pub head: ResponseHead,
    /// De-chunked.
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head
            .headers
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("{error}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// `(type, message)` of an error document.
    pub fn error(&self) -> (String, String) {
        let json = self.json();
        let text = |value: &Value| value.as_str().unwrap_or_else(|| panic!("no error in {json}")).to_owned();
        (text(&json["error"]["type"]), text(&json["error"]["message"]))
    }
}

impl Client {
    pub async fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).await.unwrap();
    }

    pub async fn head(&mut self) -> ResponseHead {
        timeout(TEST_TIMEOUT, self.reader.read_response_head(TEST_TIMEOUT)).await.unwrap().unwrap()
    }

    /// The next piece of a body, as the agent sent it.
    pub async fn piece(&mut self, source: &mut BodySource) -> Piece {
        timeout(TEST_TIMEOUT, source.next(&mut self.reader, TEST_TIMEOUT)).await.unwrap().unwrap()
    }

    pub async fn response(&mut self, method: &str) -> Response {
        let head = self.head().await;
        let mut source = BodySource::new(response_framing(method, &head));
        let mut body = Vec::new();
        while let Piece::Data(data) = self.piece(&mut source).await {
            body.extend(data);
        }
        Response { head, body }
    }

    /// Every byte until the agent closes the connection, framing included.
    pub async fn rest(&mut self) -> Vec<u8> {
        let mut rest = self.reader.buffered().to_vec();
        self.reader.consume(rest.len());
        timeout(TEST_TIMEOUT, self.reader.get_mut().read_to_end(&mut rest)).await.unwrap().unwrap();
        rest
    }

    /// Ends the connection from the client side; the agent's log of it.
    pub async fn finish(mut self) -> InferenceLog {
        let _ = self.reader.get_mut().shutdown().await;
        let log = timeout(TEST_TIMEOUT, self.session).await.expect("the session ends").unwrap();
        assert_no_secret(&format!("{log:?}"));
        log
    }
}

/// A resolver for the tests' providers, which are IP literals (never asked).
pub fn test_dns() -> crate::dns::Resolver {
    crate::dns::Resolver::new(Some("127.0.0.1:9".parse().unwrap()), Duration::from_secs(1)).unwrap()
}

pub fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

/// Fails if `text` holds either test credential.
pub fn assert_no_secret(text: &str) {
    for secret in [OPENAI_KEY, ANTHROPIC_KEY] {
        assert!(!text.contains(secret), "a credential leaked: {text}");
    }
}

pub fn post(path: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: inference.local\r\n{extra_headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
