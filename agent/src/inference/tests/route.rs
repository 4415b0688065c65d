//! The route: changed through the control socket, persisted, validated;
//! the config's errors; credentials kept out of every output.

use std::{os::unix::fs::MetadataExt, path::Path};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::control::{self, request as control_request, ControlRequest};

use super::{
    super::{
        config::{Config, DEFAULT_MAX_REQUEST_BODY, DEFAULT_STREAM_IDLE_TIMEOUT},
        Route, RouteChange,
    },
    fake_provider::test_ca,
    *,
};

fn route(provider: &str, model: &str) -> Route {
    Route { provider: provider.into(), model: model.into() }
}

/// The daemon's dispatch, for one sandbox's route.
struct RouteOnly(Arc<Inference>);

impl control::Answer for RouteOnly {
    fn answer(self: Arc<Self>, request: ControlRequest) -> control::BoxFuture<anyhow::Result<serde_json::Value>> {
        let change = match request {
            ControlRequest::Get { .. } => RouteChange::Get,
            ControlRequest::Set { provider, model, .. } => RouteChange::Set { provider, model },
            ControlRequest::Update { provider, model, .. } => RouteChange::Update { provider, model },
            _ => return Box::pin(async { anyhow::bail!("not a route request") }),
        };
        Box::pin(self.0.clone().answer_control(change))
    }
}

/// Starts the control socket for `allowed_uid` and waits until it accepts.
async fn control_socket(world: &World, allowed_uid: u32) -> PathBuf {
    let socket = world.temp.path().join("run/control.sock");
    let answer = Arc::new(RouteOnly(world.inference.clone()));
    control::spawn(&socket, allowed_uid, answer, None).await.unwrap();
    socket
}

fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[tokio::test]
async fn route_changes_over_the_control_socket_are_validated_and_persisted() {
    let world = World::start(ROUTED_OPENAI).await;
    let socket = control_socket(&world, current_uid()).await;
    assert_eq!(std::fs::metadata(&socket).unwrap().mode() & 0o777, 0o600);

    let reply = control_request(&socket, &ControlRequest::Get { sandbox: None }).await.unwrap();
    assert_eq!(
        reply,
        json!({"ok": true, "route": {"provider": "openai", "model": "gpt-routed"}, "providers": ["claude", "openai"]})
    );

    let set = ControlRequest::Set { provider: "claude".into(), model: "claude-x".into(), sandbox: None };
    assert_eq!(
        control_request(&socket, &set).await.unwrap()["route"],
        json!({"provider": "claude", "model": "claude-x"})
    );
    let update = ControlRequest::Update { provider: None, model: Some("claude-y".into()), sandbox: None };
    assert_eq!(control_request(&socket, &update).await.unwrap()["route"]["model"], "claude-y");
    assert_eq!(world.inference.route(), Some(route("claude", "claude-y")));

    let unknown = ControlRequest::Update { provider: Some("nope".into()), model: None, sandbox: None };
    let error = control_request(&socket, &unknown).await.unwrap_err().to_string();
    assert!(error.contains("no provider named \"nope\" (configured: claude, openai)"), "{error}");
    assert_eq!(world.inference.route(), Some(route("claude", "claude-y")), "a refused change changes nothing");

    // Persisted: private, reloadable, the rest of the config intact, no credential value.
    assert_eq!(std::fs::metadata(&world.config_path).unwrap().mode() & 0o777, 0o600);
    let written = std::fs::read_to_string(&world.config_path).unwrap();
    assert_no_secret(&written);
    assert!(written.starts_with("# Rewritten by sandbox-egress"), "{written}");
    let reloaded = Inference::load(&world.config_path).unwrap();
    assert_eq!(reloaded.route(), Some(route("claude", "claude-y")));
    assert_eq!(reloaded.limits, world.inference.limits);
    assert_eq!(reloaded.provider_names(), ["claude", "openai"]);
    assert_eq!(reloaded.providers["openai"].headers, [("openai-project".to_string(), "proj_test".to_string())]);

    // Bad lines get an error line, and the connection goes on until closed.
    let stream = UnixStream::connect(&socket).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"{\"op\":\"launch\"}\n{\"op\":\"get\"}\n").await.unwrap();
    let first: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(first["ok"], false);
    assert!(first["error"].as_str().unwrap().contains("unknown variant `launch`"), "{first}");
    let second: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(second["route"]["provider"], "claude");
    write.write_all(&vec![b'x'; 5000]).await.unwrap();
    let too_long: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert!(too_long["error"].as_str().unwrap().contains("longer than 4096 bytes"), "{too_long}");
    assert_eq!(lines.next_line().await.unwrap(), None, "closed after an overlong line");
}

#[tokio::test]
async fn a_peer_with_another_uid_is_refused() {
    let world = World::start(ROUTED_OPENAI).await;
    // The socket admits one uid: a fake one, so this test's own uid is "not root".
    let socket = control_socket(&world, current_uid().wrapping_add(1)).await;
    let set = ControlRequest::Set { provider: "claude".into(), model: "m".into(), sandbox: None };
    let error = control_request(&socket, &set).await.unwrap_err().to_string();
    assert!(error.contains("permission denied"), "{error}");
    assert_eq!(world.inference.route(), Some(route("openai", "gpt-routed")));
}

#[tokio::test]
async fn update_keeps_the_other_half_and_needs_both_without_a_route() {
    let world = World::start(Setup { route: None, ..ROUTED_OPENAI }).await;
    let error = world.inference.update_route(None, Some("m")).unwrap_err().to_string();
    assert!(error.contains("give both a provider and a model"), "{error}");
    assert!(world.inference.update_route(None, None).unwrap_err().to_string().contains("nothing to update"));
    assert_eq!(world.inference.update_route(Some("openai"), Some("m1")).unwrap(), route("openai", "m1"));
    assert_eq!(world.inference.update_route(Some("claude"), None).unwrap(), route("claude", "m1"));
    let error = world.inference.set_route("openai", "bad\nmodel").unwrap_err().to_string();
    assert!(error.contains("model: must be 1 to 256 characters"), "{error}");
    assert_eq!(Inference::load(&world.config_path).unwrap().route(), Some(route("claude", "m1")));
}

#[tokio::test]
async fn a_route_carried_over_an_upgrade_replaces_the_files_if_its_provider_is_configured() {
    let world = World::start(ROUTED_OPENAI).await;
    let before = std::fs::read_to_string(&world.config_path).unwrap();
    world.inference.carry_route(route("claude", "m2")).unwrap();
    assert_eq!(world.inference.route(), Some(route("claude", "m2")));
    let error = world.inference.carry_route(route("gone", "m")).unwrap_err().to_string();
    assert!(error.contains("no provider named \"gone\""), "{error}");
    assert_eq!(world.inference.route(), Some(route("claude", "m2")));
    assert_eq!(std::fs::read_to_string(&world.config_path).unwrap(), before, "the file is left as it is");
}

fn load_error(yaml: &str) -> String {
    match Config::from_yaml(yaml) {
        Ok(config) => panic!("loaded {config:?} from\n{yaml}"),
        Err(error) => format!("{error:#}"),
    }
}

const PROVIDER: &str = "providers:\n  - name: a\n    type: openai-compatible\n    base_url: http://127.0.0.1:1\n    credential: { env: KEY }\n";

#[test]
fn config_errors_name_the_key() {
    for (yaml, expected) in [
        ("provider: []\n".to_string(), "unknown field `provider`"),
        (format!("{PROVIDER}    api_key: sk-1\n"), "providers[0]: unknown field `api_key`"),
        (PROVIDER.replace("openai-compatible", "azure"), "providers[0].type: unknown variant `azure`"),
        (
            PROVIDER.replace("{ env: KEY }", "{ env: KEY, file: /k }"),
            "providers[0]: credential: needs exactly one of env and file",
        ),
        (PROVIDER.replace("{ env: KEY }", "{ vault: k }"), "providers[0].credential: unknown field `vault`"),
        (
            PROVIDER.replace("    base_url: http://127.0.0.1:1\n", ""),
            "providers[0]: base_url: required for type openai-compatible",
        ),
        (
            PROVIDER.replace("http://127.0.0.1:1", "ftp://h"),
            "providers[0]: base_url: must start with https:// or http://",
        ),
        (PROVIDER.replace("http://127.0.0.1:1", "http://h/v1"), "providers[0]: base_url: ends in /v1"),
        (
            format!("{PROVIDER}    ca_file: /nonexistent.pem\n"),
            "providers[0]: ca_file: only meaningful for an https:// base_url",
        ),
        (
            format!("{}    ca_file: /nonexistent.pem\n", PROVIDER.replace("http://127.0.0.1:1", "https://h")),
            "providers[0]: ca_file: cannot read /nonexistent.pem",
        ),
        (
            format!("{PROVIDER}    headers: {{ Authorization: x }}\n"),
            "providers[0]: headers.Authorization: set by the agent itself",
        ),
        (
            format!("{PROVIDER}{}", &PROVIDER["providers:\n".len()..]),
            "providers[1].name: 'a' is used by an earlier provider",
        ),
        (PROVIDER.replace("name: a", "name: a b"), "providers[0]: name: \"a b\" must be"),
        (
            format!("{PROVIDER}route: {{ provider: b, model: m }}\n"),
            "route: provider: no provider named \"b\" (configured: a)",
        ),
        (format!("{PROVIDER}route: {{ provider: a, modle: m }}\n"), "route: unknown field `modle`"),
        (format!("{PROVIDER}limits: {{ max_request_body: 0 }}\n"), "limits.max_request_body: must be at least 1"),
        (
            format!("{PROVIDER}limits: {{ stream_idle_timeout: 60 }}\n"),
            "limits.stream_idle_timeout: duration \"60\" needs a unit",
        ),
        (
            format!("{PROVIDER}limits: {{ connect_timeout: 2d }}\n"),
            "limits.connect_timeout: duration \"2d\" needs a unit",
        ),
    ] {
        let error = load_error(&yaml);
        assert!(error.contains(expected), "expected {expected:?} in {error:?}\nfrom\n{yaml}");
    }
}

#[test]
fn defaults_fill_what_the_config_leaves_out() {
    let temp = TempDir::new("defaults");
    let ca_path = temp.path().join("ca.pem");
    std::fs::write(&ca_path, test_ca().ca_pem).unwrap();
    let yaml = format!(
        "providers:\n  - name: nv\n    type: nvidia\n    credential: {{ env: NVIDIA_API_KEY }}\n    ca_file: {}\n",
        ca_path.display()
    );
    let config = Config::from_yaml(&yaml).unwrap();
    assert_eq!(config.providers["nv"].base_url.to_string(), "https://integrate.api.nvidia.com");
    assert_eq!(config.limits.max_request_body, DEFAULT_MAX_REQUEST_BODY);
    assert_eq!(config.limits.stream_idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT);
    assert_eq!(config.file.route, None);
}

#[test]
fn credentials_never_appear_in_debug_output_or_errors() {
    let variable = format!("SANDBOX_EGRESS_TEST_KEY_{}", std::process::id());
    let value = "sk-env-secret-4242";
    std::env::set_var(&variable, value);
    let temp = TempDir::new("secrets");
    let config_path = temp.path().join("inference.yaml");
    std::fs::write(
        &config_path,
        format!("providers:\n  - name: a\n    type: openai-compatible\n    base_url: http://127.0.0.1:1\n    credential: {{ env: {variable} }}\nroute: {{ provider: a, model: m }}\n"),
    )
    .unwrap();
    let inference = Inference::load(&config_path).unwrap();
    let secret = inference.providers["a"].credential.read().unwrap();
    assert_eq!(secret.expose(), value);
    for output in [format!("{inference:?}"), format!("{secret:?}"), format!("{:?}", inference.providers["a"])] {
        assert!(!output.contains(value), "{output}");
        assert!(!output.is_empty());
    }
    inference.set_route("a", "m2").unwrap();
    assert!(!std::fs::read_to_string(&config_path).unwrap().contains(value));

    std::env::set_var(&variable, format!("{value}\r\nX-Injected: 1"));
    let error = inference.providers["a"].credential.read().unwrap_err();
    assert!(error.contains(&variable) && !error.contains(value), "{error}");
    std::env::remove_var(&variable);
    let error = inference.providers["a"].credential.read().unwrap_err();
    assert_eq!(error, format!("environment variable {variable} is not set"));

    let with_userinfo = "providers:\n  - name: a\n    type: openai\n    base_url: https://u:sk-url-secret@h\n    credential: { env: K }\n";
    let error = load_error(with_userinfo);
    assert!(error.contains("userinfo") && !error.contains("sk-url-secret"), "{error}");
}

#[test]
fn persisted_file_is_replaced_atomically_and_private() {
    let temp = TempDir::new("atomic");
    let path = temp.path().join("config.yaml");
    std::fs::write(&path, "old").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    super::super::config::write_atomic(&path, b"new").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(temp.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("config.yaml")], "no temporary file left");
    assert!(super::super::config::write_atomic(Path::new("/nonexistent-dir/x.yaml"), b"x").is_err());
}
