//! HTTP/1.1 in full duplex through the agent (issue #30): a request body
//! goes upstream while the responses come back. Real clients in the
//! sandbox: curl uploads with `Expect: 100-continue` to nginx (behind the
//! private-IP gate) without waiting for their 1 s timeout, see a 413 nginx
//! sends after the head before their body has gone, and a policy's 403 at
//! once; boto3 uploads to an S3-compatible server (moto) through a
//! TLS-terminated endpoint; a `103 Early Hints` reaches the client before
//! the body it answers has been sent.
//!
//! Times bounded here are behaviour checks (the 1 s wait of curl and
//! botocore does not happen), not performance figures: those are
//! `cargo xtask bench`'s.

use std::{net::SocketAddr, path::Path, process::Output};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

/// Uploads big enough that curl asks `Expect: 100-continue` (over 1 MiB).
const UPLOAD_BYTES: usize = 8 << 20;
/// nginx (plain HTTP, WebDAV PUT) in the test namespace.
const NGINX_PORT: u16 = HTTP_PORT;
/// The early-hints server.
const HINTS_PORT: u16 = EXCHANGE_PORT;
/// moto's S3 over TLS, as [`S3_HOST`].
const S3_PORT: u16 = 9446;
const S3_HOST: &str = "s3.rest.test";
/// Longer than the uploads take here, shorter than the 1 s clients wait for
/// a `100 Continue` that does not come.
const NO_STALL: f64 = 0.5;

/// nginx serving `dir/www` on the namespace's private address: PUT stores a
/// file (up to 64 MiB), PUT under /small/ takes 1 KiB at most (nginx
/// answers 413 from the head alone). Requests are logged to `dir/access.log`.
fn start_nginx(net: &TestNet, dir: &TempDir) -> Result<Daemon> {
    let root = &dir.path;
    for sub in ["www", "temp"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    let root = root.to_str().context("utf-8 path")?;
    let config = format!(
        "daemon off;\nmaster_process off;\nuser root;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log stderr;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log {root}/access.log;\n  client_body_temp_path {root}/temp/body;\n\
         proxy_temp_path {root}/temp/proxy;\n  fastcgi_temp_path {root}/temp/fastcgi;\n\
         uwsgi_temp_path {root}/temp/uwsgi;\n  scgi_temp_path {root}/temp/scgi;\n  client_max_body_size 64m;\n\
           server {{\n    listen {ip}:{NGINX_PORT};\n    root {root}/www;\n\
             location /small/ {{ client_max_body_size 1k; dav_methods PUT; }}\n\
             location / {{ dav_methods PUT; create_full_put_path on; }}\n  }}\n}}\n",
        ip = net.private_v4,
    );
    std::fs::write(dir.file("nginx.conf"), config)?;
    net.start_daemon(
        "/usr/sbin/nginx",
        &["-e", "stderr", "-p", root, "-c", &dir.file("nginx.conf")],
        SocketAddr::new(net.private_v4.into(), NGINX_PORT),
    )
}

/// Bytes that no compression or pattern makes look right by accident.
fn upload_file(dir: &TempDir, name: &str) -> Result<String> {
    let mut data = vec![0u8; UPLOAD_BYTES];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let path = dir.file(name);
    std::fs::write(&path, data)?;
    Ok(path)
}

/// What curl printed with `-w` (see [`CURL_FORMAT`]) and on stderr with `-v`.
struct Curl {
    pid: u32,
    status: u16,
    seconds: f64,
    uploaded: u64,
    verbose: String,
}

const CURL_FORMAT: &str = "%{http_code} %{time_total} %{size_upload}";

/// `curl -v ARGS` in `sandbox`, or outside it (direct) with `None`.
fn curl(sandbox: Option<&Sandbox>, args: &[&str]) -> Result<Curl> {
    let mut command = match sandbox {
        Some(sandbox) => sandbox.command("curl"),
        None => std::process::Command::new("curl"),
    };
    command.args(["-sS", "-v", "--noproxy", "*", "-m", "20", "-o", "/dev/null", "-w", CURL_FORMAT]).args(args);
    let child = command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    let pid = child.id();
    let output = child.wait_with_output()?;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    let verbose = String::from_utf8_lossy(&output.stderr).into_owned();
    let fields: Vec<&str> = printed.split_whitespace().collect();
    let [status, seconds, uploaded] = fields[..] else { anyhow::bail!("curl {args:?} printed {printed:?}: {verbose}") };
    Ok(Curl { pid, status: status.parse()?, seconds: seconds.parse()?, uploaded: uploaded.parse()?, verbose })
}

fn same_file(a: &Path, b: &str) -> Result<bool> {
    Ok(std::fs::read(a)? == std::fs::read(b)?)
}

#[test]
fn curl_uploads_through_the_gate_without_waiting_for_its_expect_timeout() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let dir = TempDir::new("duplex-nginx")?;
    let _nginx = start_nginx(&net, &dir)?;
    let sandbox = Sandbox::new("duplex-gate")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let file = upload_file(&dir, "upload.bin")?;
    let url = |name: &str| format!("http://{}:{NGINX_PORT}/{name}", net.private_v4);

    let direct = curl(None, &["-T", &file, &url("direct.bin")])?;
    assert_eq!(direct.status, 201, "{}", direct.verbose);
    for run in 0..3 {
        let name = format!("agent-{run}.bin");
        let through = curl(Some(&sandbox), &["-T", &file, &url(&name)])?;
        assert_eq!(through.status, 201, "{}", through.verbose);
        eprintln!(
            "curl -T of {UPLOAD_BYTES} bytes: {:.3} s direct, {:.3} s through the agent",
            direct.seconds, through.seconds
        );
        // curl asked, and nginx's own 100 came back through the agent.
        ensure!(through.verbose.contains("> Expect: 100-continue"), "{}", through.verbose);
        ensure!(through.verbose.contains("< HTTP/1.1 100 Continue"), "{}", through.verbose);
        ensure!(
            through.seconds < NO_STALL,
            "the upload took {:.3} s through the agent ({:.3} s direct): curl waited for a 100 Continue",
            through.seconds,
            direct.seconds
        );
        assert_eq!(through.uploaded, UPLOAD_BYTES as u64);
        ensure!(same_file(&dir.path.join("www").join(&name), &file)?, "{name} arrived changed");
        let connection = agent.wait_connection_of(through.pid)?;
        assert_eq!(connection["verdict"], "relayed", "{connection}");
        assert_eq!(connection["protocol"], "http", "{connection}");
    }
    Ok(())
}

#[test]
fn a_413_sent_after_the_head_reaches_the_client_before_its_body_has_gone() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let dir = TempDir::new("duplex-413")?;
    let _nginx = start_nginx(&net, &dir)?;
    let sandbox = Sandbox::new("duplex-413")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let _agent = Agent::start(&sandbox, &policy, &[])?;
    let file = upload_file(&dir, "upload.bin")?;
    let url = format!("http://{}:{NGINX_PORT}/small/too-big.bin", net.private_v4);

    for way in [None, Some(&sandbox)] {
        // Waiting for 100 Continue, curl gets the 413 instead and sends no body.
        let waiting = curl(way, &["-T", &file, &url])?;
        assert_eq!(waiting.status, 413, "{}", waiting.verbose);
        assert_eq!(waiting.uploaded, 0, "{}", waiting.verbose);
        ensure!(waiting.seconds < NO_STALL, "{:.3} s for a 413: {}", waiting.seconds, waiting.verbose);

        // Sending at 2 MB/s without waiting (the whole body would take 4 s):
        // curl stops at the 413.
        let sending = curl(way, &["-H", "Expect:", "--limit-rate", "2M", "-T", &file, &url])?;
        assert_eq!(sending.status, 413, "{}", sending.verbose);
        ensure!(
            sending.uploaded < UPLOAD_BYTES as u64 / 2,
            "{} of {UPLOAD_BYTES} bytes sent before the 413 arrived ({})",
            sending.uploaded,
            if way.is_some() { "through the agent" } else { "direct" }
        );
    }
    ensure!(!dir.path.join("www/small/too-big.bin").exists());
    Ok(())
}

#[test]
fn a_denied_upload_is_answered_at_once_and_its_body_never_reaches_the_origin() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let dir = TempDir::new("duplex-denied")?;
    let _nginx = start_nginx(&net, &dir)?;
    let sandbox = Sandbox::new("duplex-denied")?;
    let ip = net.private_v4;
    let policy = PolicyFile::new(&format!(
        "version: 1\nnetwork_policies:\n  nginx:\n    endpoints:\n      - host: \"{ip}\"\n        port: {NGINX_PORT}\n\
         \x20       allowed_ips: [\"{ip}/32\"]\n        protocol: rest\n        access: read-only\n\
         \x20   binaries: [{{ path: \"/**\" }}]\n"
    ))?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let file = upload_file(&dir, "upload.bin")?;
    let url = format!("http://{ip}:{NGINX_PORT}/denied.bin");

    // Waiting for 100 Continue, and sending the body at once: either way the
    // 403 comes at once, and reaches the client (the agent reads what it
    // sends before closing, so no reset destroys the answer).
    for (run, expect) in [&[][..], &["-H", "Expect:"]].into_iter().cycle().take(6).enumerate() {
        let args = [expect, &["-T", file.as_str(), url.as_str()][..]].concat();
        let denied = curl(Some(&sandbox), &args)?;
        assert_eq!(denied.status, 403, "run {run}: {}", denied.verbose);
        ensure!(denied.seconds < NO_STALL, "run {run}: {:.3} s for a 403", denied.seconds);
        let connection = agent.wait_connection_of(denied.pid)?;
        assert_eq!(connection["requests_denied"], 1, "{connection}");
    }
    let allowed = curl(Some(&sandbox), &[&format!("http://{ip}:{NGINX_PORT}/nothing.txt")])?;
    assert_eq!(allowed.status, 404, "a GET is allowed: {}", allowed.verbose);
    let access = std::fs::read_to_string(dir.file("access.log"))?;
    ensure!(!access.contains("PUT"), "a denied request reached nginx:\n{access}");
    ensure!(!dir.path.join("www/denied.bin").exists());
    Ok(())
}

/// Answers every request with `103 Early Hints` as soon as its head is in,
/// then reads its body (Content-Length) and answers 200 with the number of
/// body bytes; prints `{"kind": "request", "body_bytes"}`.
const EARLY_HINTS_SERVER: &str = r#"
import json, socket, sys, threading
def serve(conn):
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return
            data += more
        head, body = data.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        while len(body) < length:
            more = conn.recv(65536)
            if not more:
                return
            body += more
        print(json.dumps({"kind": "request", "body_bytes": len(body)}), flush=True)
        text = b"got %d bytes" % len(body)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(text), text))
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"kind": "ready"}), flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// Sends a request head announcing a body, then the body only once a
/// `103` has arrived; prints each status line received, in order.
const BODY_AFTER_HINTS_CLIENT: &str = r#"
import socket, sys
body = b"x" * 100000
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
head = "POST /upload HTTP/1.1\r\nHost: %s:%s\r\nContent-Length: %d\r\n\r\n" % (sys.argv[1], sys.argv[2], len(body))
conn.sendall(head.encode())
received = b""
while b"\r\n\r\n" not in received:
    more = conn.recv(65536)
    if not more:
        sys.exit("closed before the 103")
    received += more
print(received.split(b"\r\n")[0].decode(), flush=True)
conn.sendall(body)
received = received.split(b"\r\n\r\n", 1)[1]
while True:
    more = conn.recv(65536)
    if not more:
        break
    received += more
print(received.split(b"\r\n")[0].decode())
print(received.split(b"\r\n\r\n", 1)[1].decode())
"#;

#[test]
fn early_hints_reach_the_client_in_order_and_before_the_body_it_answers() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let server =
        net.start_python_servers(EARLY_HINTS_SERVER, &[&net.private_v4.to_string(), &HINTS_PORT.to_string()])?;
    let sandbox = Sandbox::new("duplex-hints")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let agent = Agent::start(&sandbox, &policy, &[])?;
    let ip = net.private_v4.to_string();

    // The client sends its body only after the 103: a relay that read no
    // response before the body was complete would leave both waiting.
    let (pid, output) = run_in(&sandbox, PYTHON, &["-c", BODY_AFTER_HINTS_CLIENT, &ip, &HINTS_PORT.to_string()])?;
    ensure!(
        output.status.success(),
        "{}{}: {:?}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        agent.wait_connection_of(pid)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "HTTP/1.1 103 Early Hints\nHTTP/1.1 200 OK\ngot 100000 bytes\n"
    );
    assert_eq!(agent.wait_connection_of(pid)?["verdict"], "relayed");

    // curl shows both responses, the hints first.
    let response = curl_i(&sandbox, &["--noproxy", "*", &format!("http://{ip}:{HINTS_PORT}/page")])?;
    let heads: Vec<&str> = response.headers.lines().filter(|line| line.starts_with("HTTP/")).collect();
    assert_eq!(heads, ["HTTP/1.1 103 Early Hints"], "{}", response.headers);
    ensure!(response.headers.contains("Link: </style.css>; rel=preload"), "{}", response.headers);
    let (status_line, body) = response.body.split_once("\r\n").context("the 200 after the 103")?;
    assert_eq!(status_line, "HTTP/1.1 200 OK");
    ensure!(body.ends_with("got 0 bytes"), "{body:?}");
    let requests = server.events.wait_for_count("both requests", 2, |e| e["kind"] == "request")?;
    assert_eq!(requests.iter().map(|e| e["body_bytes"].as_u64()).collect::<Vec<_>>(), [Some(100000), Some(0)]);
    Ok(())
}

/// boto3's put_object of 5 MiB (which sends `Expect: 100-continue`), timed,
/// then the object read back; prints `{"seconds", "expect", "intact"}`.
const S3_PUT: &str = r#"
import hashlib, json, os, sys, time, warnings
warnings.simplefilter("ignore")
import boto3
from botocore.config import Config
endpoint, ca, bucket = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint, verify=ca, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test",
                  config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
sent = {}
s3.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.update(request.headers))
s3.create_bucket(Bucket=bucket)
data = os.urandom(5 << 20)
started = time.monotonic()
s3.put_object(Bucket=bucket, Key="object.bin", Body=data)
seconds = time.monotonic() - started
stored = s3.get_object(Bucket=bucket, Key="object.bin")["Body"].read()
print(json.dumps({"seconds": seconds, "expect": str(sent.get("Expect")),
                  "intact": hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()}))
"#;

fn s3_put(command: std::process::Command) -> Result<Value> {
    let mut command = command;
    let output: Output = command.output()?;
    ensure!(output.status.success(), "boto3: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| format!("boto3 printed {stdout:?}"))
}

#[test]
fn boto3_puts_an_object_through_a_tls_terminated_endpoint_without_waiting() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let dir = TempDir::new("duplex-s3")?;
    let dns = net.start_dns(&[(S3_HOST, net.v4.into())])?;
    let TestCertificate { ca: s3_ca, cert, key } =
        TestCertificate::new(&dir, "s3", vec![S3_HOST.to_owned(), net.v4.to_string()])?;
    let (cert, key, s3_ca) = (cert.to_str().unwrap(), key.to_str().unwrap(), s3_ca.to_str().unwrap().to_owned());
    // moto takes the first label of a name it does not know for a bucket.
    let endpoint = format!("MOTO_S3_CUSTOM_ENDPOINTS=https://{S3_HOST}:{S3_PORT}");
    let (ip, port) = (net.v4.to_string(), S3_PORT.to_string());
    let _moto = net.start_daemon(
        "env",
        &[&endpoint, PYTHON, "-m", "moto.server", "-H", &ip, "-p", &port, "-c", cert, "-k", key],
        SocketAddr::new(net.v4.into(), S3_PORT),
    )?;
    let sandbox = Sandbox::new("duplex-s3")?;
    let policy = PolicyFile::new(&format!(
        "version: 1\nnetwork_policies:\n  s3:\n    endpoints:\n      - host: {S3_HOST}\n        port: {S3_PORT}\n\
         \x20       protocol: rest\n        access: full\n    binaries: [{{ path: \"/**\" }}]\n"
    ))?;
    let ca_dir = dir.file("agent-ca");
    let dns_args = dns.agent_args();
    let agent = Agent::start(
        &sandbox,
        &policy,
        &[dns_args[0].as_str(), dns_args[1].as_str(), "--ca-dir", &ca_dir, "--upstream-ca", &s3_ca],
    )?;
    let exported = run(agent_bin().to_str().context("utf-8 path")?, &["ca", "export", "--ca-dir", &ca_dir])?;
    let agent_ca = dir.file("agent-ca.pem");
    std::fs::write(&agent_ca, &exported.stdout)?;

    let mut direct = std::process::Command::new(PYTHON);
    direct.args(["-c", S3_PUT, &format!("https://{}:{S3_PORT}", net.v4), &s3_ca, "direct"]);
    let direct = s3_put(direct)?;
    let mut through = sandbox.command(PYTHON);
    through.args(["-c", S3_PUT, &format!("https://{S3_HOST}:{S3_PORT}"), &agent_ca, "through-the-agent"]);
    let through = s3_put(through)?;

    for (way, put) in [("direct", &direct), ("through the agent", &through)] {
        assert_eq!(put["expect"], "b'100-continue'", "{way}: {put}");
        assert_eq!(put["intact"], true, "{way}: {put}");
    }
    let (direct_s, through_s) = (direct["seconds"].as_f64().unwrap(), through["seconds"].as_f64().unwrap());
    eprintln!("put_object of 5 MiB: {direct_s:.3} s direct, {through_s:.3} s through the agent");
    ensure!(
        through_s < direct_s + NO_STALL,
        "put_object took {through_s:.3} s through the agent, {direct_s:.3} s direct: botocore waited for a 100 Continue"
    );
    let put = agent.log.wait_for("the put_object's request line", |e| {
        e["event"] == "request" && e["method"] == "PUT" && e["path"] == "/through-the-agent/object.bin"
    })?;
    assert_eq!(put["verdict"], "allowed", "{put}");
    Ok(())
}
