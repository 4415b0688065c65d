//! Harness for end-to-end tests on the real kernel, as root: a real cgroup v2
//! sandbox, the real agent binary with its eBPF programs, "remote" servers in
//! a network namespace the test creates, and real client processes.
//!
//! Every resource is released by `Drop`, so a failing test cleans up too.
//! Nothing leaves the machine: test hosts live on veth pairs, and the
//! documentation/benchmark ranges they use are blackholed while tests run.

use std::{
    ffi::CString,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStderr, ChildStdout, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// Debian's interpreter: a pyenv shim would fork helpers inside the sandbox.
pub const PYTHON: &str = "/usr/bin/python3";
pub const HTTP_PORT: u16 = 8080;
pub const EXCHANGE_PORT: u16 = 9000;
pub const TLS_PORT: u16 = 8443;
pub const WS_PORT: u16 = 8765;
pub const PROVIDER_HTTP_PORT: u16 = 8000;
pub const PROVIDER_TLS_PORT: u16 = 8001;
/// The fake REST API of [`TestNet::start_rest_api`]: plain HTTP, and HTTPS
/// with a certificate for [`REST_API_HOST`] and the host's addresses.
pub const REST_HTTP_PORT: u16 = 9080;
pub const REST_TLS_PORT: u16 = 9443;
pub const REST_API_HOST: &str = "api.rest.test";
/// The git server of [`TestNet::start_git_server`]: HTTPS, [`GIT_HOST`].
pub const GIT_TLS_PORT: u16 = 9444;
pub const GIT_HOST: &str = "git.rest.test";
/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(15);

/// The ranges test hosts live in: routed nowhere but to the test's veth
/// while tests run, so a mistake cannot reach a real network. (Not the
/// other documentation ranges: this VM's own uplink may sit in 192.0.2.0/24.)
const BLACKHOLED: [&str; 4] = ["198.18.0.0/15", "2001:db8::/32", "10.231.0.0/16", "fd5e:231::/32"];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn support_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("support").join(name)
}

/// The agent binary: `$SANDBOX_EGRESS_BIN` (set by `cargo xtask test`) or the debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("SANDBOX_EGRESS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/sandbox-egress"))
}

pub fn require_root() {
    assert!(
        nix_is_root(),
        "end-to-end tests attach eBPF programs to cgroups and need root: run `cargo xtask test` as root"
    );
    assert!(agent_bin().exists(), "{} missing: run `cargo xtask test`", agent_bin().display());
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command to completion, failing with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let output = Command::new(program).args(args).output().with_context(|| format!("spawn {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// Same as `run` but ignoring failure (for cleanup).
fn run_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Held (shared) by every test process while it has test networks, so
/// test binaries run side by side (by developers; CI runs them in turn)
/// neither remove each other's blackhole routes nor leave them behind.
const BLACKHOLE_LOCK: &str = "/run/lock/se-test-blackholes.lock";

static BLACKHOLE_USERS: Mutex<Option<(usize, std::fs::File)>> = Mutex::new(None);

struct Blackholes;

impl Blackholes {
    fn acquire() -> Result<Self> {
        let mut users = BLACKHOLE_USERS.lock().unwrap();
        match &mut *users {
            Some((count, _)) => *count += 1,
            None => {
                let lock = lock_file(BLACKHOLE_LOCK, libc::LOCK_SH)?.context("shared lock never fails to wait")?;
                for range in BLACKHOLED {
                    run("ip", &["route", "replace", "blackhole", range])?;
                }
                *users = Some((1, lock));
            }
        }
        Ok(Self)
    }
}

impl Drop for Blackholes {
    fn drop(&mut self) {
        let mut users = BLACKHOLE_USERS.lock().unwrap();
        let Some((count, _)) = &mut *users else { return };
        *count -= 1;
        if *count == 0 {
            // Last user here: remove the routes unless another process still holds the lock.
            drop(users.take());
            if let Ok(Some(_exclusive)) = lock_file(BLACKHOLE_LOCK, libc::LOCK_EX | libc::LOCK_NB) {
                for range in BLACKHOLED {
                    run_quiet("ip", &["route", "del", "blackhole", range]);
                }
            }
        }
    }
}

/// flock(2) on `path` (created if absent): `None` if a non-blocking lock is taken.
fn lock_file(path: &str, operation: i32) -> Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {path}"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        return Ok(Some(file));
    }
    let error = std::io::Error::last_os_error();
    if error.kind() == std::io::ErrorKind::WouldBlock {
        return Ok(None);
    }
    Err(error).with_context(|| format!("flock {path}"))
}

/// Takes the lowest free test-network number, held until drop, so test
/// processes running at once get distinct namespaces and subnets.
fn claim_network_number() -> Result<(u32, std::fs::File)> {
    for k in 1..250 {
        if let Some(lock) = lock_file(&format!("/run/lock/se-test-net-{k}.lock"), libc::LOCK_EX | libc::LOCK_NB)? {
            return Ok((k, lock));
        }
    }
    bail!("no free test network number (1..250)")
}

/// A "remote" host: a network namespace behind a veth pair, with public
/// addresses 198.18.K.2 and 2001:db8:5e:K::2 and private ones 10.231.K.2 and
/// fd5e:231:0:K::2 (the host side of each subnet ends in .1/::1).
pub struct TestNet {
    pub netns: String,
    host_if: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub private_v4: Ipv4Addr,
    pub private_v6: Ipv6Addr,
    _blackholes: Blackholes,
    _number: std::fs::File,
}

impl TestNet {
    pub fn new() -> Result<Self> {
        let (k, number) = claim_network_number()?;
        let blackholes = Blackholes::acquire()?;
        let netns = format!("se-test-{k}");
        let host_if = format!("se{k}h");
        let ns_if = format!("se{k}n");
        // A crashed earlier run may have left these behind.
        run_quiet("ip", &["netns", "del", &netns]);
        run_quiet("ip", &["link", "del", &host_if]);
        let net = Self {
            netns: netns.clone(),
            host_if: host_if.clone(),
            v4: Ipv4Addr::new(198, 18, k as u8, 2),
            v6: format!("2001:db8:5e:{k:x}::2").parse()?,
            private_v4: Ipv4Addr::new(10, 231, k as u8, 2),
            private_v6: format!("fd5e:231:0:{k:x}::2").parse()?,
            _blackholes: blackholes,
            _number: number,
        };
        run("ip", &["netns", "add", &netns])?;
        run("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &netns])?;
        for subnet in [
            format!("198.18.{k}."),
            format!("10.231.{k}."),
            format!("2001:db8:5e:{k:x}::"),
            format!("fd5e:231:0:{k:x}::"),
        ] {
            let prefix_len = if subnet.contains(':') { 64 } else { 24 };
            add_address(None, &host_if, &format!("{subnet}1/{prefix_len}"))?;
            add_address(Some(&netns), &ns_if, &format!("{subnet}2/{prefix_len}"))?;
        }
        run("ip", &["link", "set", &host_if, "up"])?;
        run("ip", &["-n", &netns, "link", "set", &ns_if, "up"])?;
        run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(net)
    }

    /// A policy that allows every test port of this host, by address, to any
    /// binary: its public addresses as IP-literal endpoints, its private ones
    /// also with `allowed_ips`, as the plain-HTTP gate wants. Its endpoint
    /// list comes last, so callers may append endpoints.
    pub fn allow_all_policy(&self) -> String {
        let mut endpoints = String::new();
        for host in [self.v4.to_string(), self.v6.to_string()] {
            endpoints += &format!("      - host: \"{host}\"\n        ports: [{HTTP_PORT}, {EXCHANGE_PORT}]\n");
        }
        for (host, subnet) in [
            (self.private_v4.to_string(), format!("{}/24", self.private_v4)),
            (self.private_v6.to_string(), format!("{}/64", self.private_v6)),
        ] {
            endpoints += &format!("      - host: \"{host}\"\n        ports: [{HTTP_PORT}, {EXCHANGE_PORT}]\n        allowed_ips: [\"{subnet}\"]\n");
        }
        format!("version: 1\nnetwork_policies:\n  test-host:\n    binaries: [{{ path: \"/**\" }}]\n    endpoints:\n{endpoints}")
    }

    /// Runs dnsmasq in the namespace, answering `records` (name, address)
    /// and nothing else; the agent asks it with `--dns-server`.
    pub fn start_dns(&self, records: &[(&str, IpAddr)]) -> Result<Dns> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts"]);
        command.args(["--no-poll", "--bind-interfaces", "--pid-file", "--port=53", "--log-facility=-"]);
        command.arg(format!("--listen-address={}", self.v4));
        for (name, ip) in records {
            command.arg(format!("--address=/{name}/{ip}"));
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("spawn dnsmasq")?;
        let dns = Dns { child, server: SocketAddr::new(self.v4.into(), 53) };
        // Ready when it answers: a plain UDP query would do, but TCP is simpler to probe.
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect_timeout(&dns.server, Duration::from_millis(200)).is_err() {
            ensure!(Instant::now() < deadline, "dnsmasq did not start");
            thread::sleep(Duration::from_millis(20));
        }
        Ok(dns)
    }

    /// Starts the HTTP, HTTPS (self-signed) and exchange servers inside the namespace.
    pub fn start_servers(&self) -> Result<Servers> {
        let cert_dir = std::env::temp_dir().join(format!("{}-{}", self.netns, std::process::id()));
        std::fs::create_dir_all(&cert_dir)?;
        let (cert, key) = (cert_dir.join("cert.pem"), cert_dir.join("key.pem"));
        run(
            "openssl",
            &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
                .into_iter()
                .chain([
                    "-subj",
                    "/CN=sandbox-egress-test",
                    "-keyout",
                    key.to_str().unwrap(),
                    "-out",
                    cert.to_str().unwrap(),
                ])
                .collect::<Vec<_>>(),
        )?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, PYTHON, "-u"]).arg(support_file("servers.py"));
        command.args(["--http-port", &HTTP_PORT.to_string(), "--exchange-port", &EXCHANGE_PORT.to_string()]);
        command.args([
            "--tls-port",
            &TLS_PORT.to_string(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ]);
        Servers::start(command, Some(cert_dir))
    }

    /// Starts the fake inference provider (tests/support/fake_provider.py)
    /// on [`PROVIDER_HTTP_PORT`] and, with a certificate for this host's
    /// public IPv4 address signed by a test CA, [`PROVIDER_TLS_PORT`].
    /// Returns the servers and the test CA's PEM file (for `ca_file`).
    pub fn start_fake_provider(&self, dir: &TempDir) -> Result<(Servers, PathBuf)> {
        let TestCertificate { ca, cert, key } = TestCertificate::new(dir, "provider", vec![self.v4.to_string()])?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, PYTHON, "-u"]).arg(support_file("fake_provider.py"));
        command.args(["--http-port", &PROVIDER_HTTP_PORT.to_string(), "--tls-port", &PROVIDER_TLS_PORT.to_string()]);
        command.args(["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]);
        Ok((Servers::start(command, None)?, ca))
    }

    /// Starts the fake REST API (tests/support/rest_api.py) on
    /// [`REST_HTTP_PORT`] and [`REST_TLS_PORT`]; the latter with a certificate
    /// for [`REST_API_HOST`], this host's public IPv4 and IPv6 addresses,
    /// signed by a test CA (files in `dir`). Returns the servers and the test
    /// CA's PEM file (for the agent's `--upstream-ca`, or a client's `--cacert`).
    ///
    /// Every request is answered 200 with a JSON body, and printed as an
    /// event `{"kind": "request", "scheme": "http"|"https", "peer", "method",
    /// "target", "path", "query", "headers", "header_list", "body"}`: the raw
    /// request target, its path and query (null without "?"), headers by
    /// lower-cased name (repeats joined with ", "), the same in order as
    /// [name, value] pairs, and the body as text. The response body holds the
    /// same fields. Keep-alive works; a WebSocket upgrade on a path starting
    /// with `/ws` gets a 101, then every message is echoed and printed as
    /// `{"kind": "ws_message", "opcode", "text", "length"}`.
    pub fn start_rest_api(&self, dir: &TempDir) -> Result<(Servers, PathBuf)> {
        let names = vec![REST_API_HOST.to_owned(), self.v4.to_string(), self.v6.to_string()];
        let TestCertificate { ca, cert, key } = TestCertificate::new(dir, "rest-api", names)?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, PYTHON, "-u"]).arg(support_file("rest_api.py"));
        command.args(["--http-port", &REST_HTTP_PORT.to_string(), "--tls-port", &REST_TLS_PORT.to_string()]);
        command.args(["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]);
        Ok((Servers::start(command, None)?, ca))
    }

    /// Starts `git http-backend` behind tests/support/git_server.py on
    /// [`GIT_TLS_PORT`], with a certificate for [`GIT_HOST`] signed by a test
    /// CA (files in `dir`), serving the bare repositories under `root` to
    /// requests with Basic credentials whose password is the contents of
    /// `token_file` (else 401). Each request is printed as an event
    /// `{"kind": "request", "method", "path", "query", "authorization", "status"}`.
    /// Returns the servers and the test CA's PEM file.
    pub fn start_git_server(&self, dir: &TempDir, root: &Path, token_file: &Path) -> Result<(Servers, PathBuf)> {
        let TestCertificate { ca, cert, key } = TestCertificate::new(dir, "git", vec![GIT_HOST.to_owned()])?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, PYTHON, "-u"]).arg(support_file("git_server.py"));
        command.args(["--port", &GIT_TLS_PORT.to_string(), "--cert", cert.to_str().unwrap()]);
        command.args(["--key", key.to_str().unwrap(), "--root"]).arg(root).arg("--token-file").arg(token_file);
        Ok((Servers::start(command, None)?, ca))
    }

    /// Starts a WebSocket echo server (`ws-peer`, from the test's own
    /// binaries) on [`WS_PORT`]; with a greeting, the 101 and a first frame
    /// leave in one segment.
    pub fn start_websocket_server(&self, ws_peer: &str, greeting: Option<&str>) -> Result<Servers> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, ws_peer, "server", &WS_PORT.to_string()]);
        command.args(greeting);
        Servers::start(command, None)
    }
}

impl TestNet {
    /// Runs a server of a Debian package (`program ARGS`) in the namespace
    /// until dropped; ready once `listen` accepts TCP connections.
    pub fn start_daemon(&self, program: &str, args: &[&str], listen: SocketAddr) -> Result<Daemon> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]).args(args);
        let mut child =
            command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().with_context(|| format!("spawn {program}"))?;
        let log = JsonLines::follow_stderr(child.stderr.take().context("stderr piped")?);
        let mut daemon = Daemon { child, log };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("{program} exited ({status}): {}", daemon.log.raw_lines().join("\n"));
            }
            ensure!(Instant::now() < deadline, "{program} did not listen on {listen}");
            thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

/// A server process of [`TestNet::start_daemon`], killed on drop.
pub struct Daemon {
    child: Child,
    /// Its stderr, line by line (`raw_lines`).
    pub log: JsonLines,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a server certificate it signed, as PEM files in a test's
/// directory: `{stem}-ca.pem`, `{stem}.pem` and `{stem}-key.pem`.
pub struct TestCertificate {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCertificate {
    /// `names`: DNS names or IP addresses the certificate is for.
    pub fn new(dir: &TempDir, stem: &str, names: Vec<String>) -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("sandbox-egress test {stem} CA"));
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(names)?.signed_by(&leaf_key, &issuer)?;
        let files = Self {
            ca: dir.path.join(format!("{stem}-ca.pem")),
            cert: dir.path.join(format!("{stem}.pem")),
            key: dir.path.join(format!("{stem}-key.pem")),
        };
        std::fs::write(&files.ca, ca_cert.pem())?;
        std::fs::write(&files.cert, leaf.pem())?;
        std::fs::write(&files.key, leaf_key.serialize_pem())?;
        Ok(files)
    }
}

/// IPv6 addresses skip duplicate address detection so they work at once.
fn add_address(netns: Option<&str>, device: &str, cidr: &str) -> Result<()> {
    let mut args = vec![];
    if let Some(netns) = netns {
        args.extend(["-n", netns]);
    }
    args.extend(["addr", "add", cidr, "dev", device]);
    if cidr.contains(':') {
        args.push("nodad");
    }
    run("ip", &args).map(drop)
}

impl TestNet {
    /// The host side of the veth pair (in the agent's namespace).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The namespace side of the veth pair.
    pub fn ns_if(&self) -> String {
        self.host_if.replace('h', "n")
    }

    /// The host side's addresses on the public subnets (198.18.K.1, 2001:db8:5e:K::1).
    pub fn host_side(&self) -> (Ipv4Addr, Ipv6Addr) {
        let [a, b, c, _] = self.v4.octets();
        let mut v6 = self.v6.segments();
        v6[7] = 1;
        (Ipv4Addr::new(a, b, c, 1), Ipv6Addr::from(v6))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        run_quiet("ip", &["netns", "del", &self.netns]);
        run_quiet("ip", &["link", "del", &self.host_if]);
    }
}

pub struct Dns {
    child: Child,
    pub server: SocketAddr,
}

impl Dns {
    /// The agent argument that makes it ask this server.
    pub fn agent_args(&self) -> [String; 2] {
        ["--dns-server".into(), self.server.to_string()]
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static NEXT_TEMP: AtomicU32 = AtomicU32::new(1);

/// A private temporary directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(name: &str) -> Result<Self> {
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("se-test-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    pub fn file(&self, name: &str) -> String {
        self.path.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

static NEXT_POLICY: AtomicU32 = AtomicU32::new(1);

/// A policy file for the agent, removed on drop; `write` replaces it (the
/// agent reloads on change).
pub struct PolicyFile {
    pub path: PathBuf,
}

impl PolicyFile {
    pub fn new(yaml: &str) -> Result<Self> {
        let n = NEXT_POLICY.fetch_add(1, Ordering::Relaxed);
        let file = Self { path: std::env::temp_dir().join(format!("se-test-{}-policy-{n}.yaml", std::process::id())) };
        file.write(yaml)?;
        Ok(file)
    }

    /// Atomically, so the agent never reads half a file.
    pub fn write(&self, yaml: &str) -> Result<()> {
        let staged = self.path.with_extension("staged");
        std::fs::write(&staged, yaml)?;
        std::fs::rename(&staged, &self.path)?;
        Ok(())
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Server processes printing JSON lines; killed (and their files removed) on drop.
pub struct Servers {
    child: Child,
    pub events: JsonLines,
    files: Option<PathBuf>,
}

impl Servers {
    /// Spawns `command` (a server printing JSON lines, the first
    /// `{"kind": "ready"}`) and waits until it is ready; `files` are removed
    /// when it is dropped.
    pub fn start(mut command: Command, files: Option<PathBuf>) -> Result<Self> {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
        let events = JsonLines::follow_stdout(child.stdout.take().unwrap());
        let servers = Self { child, events, files };
        servers.events.wait_for("server ready", |e| e["kind"] == "ready")?;
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(files) = &self.files {
            let _ = std::fs::remove_dir_all(files);
        }
    }
}

/// JSON lines read from a child's output by a background thread.
#[derive(Clone, Default)]
pub struct JsonLines {
    inner: Arc<(Mutex<Vec<Value>>, Condvar)>,
    raw: Arc<Mutex<Vec<String>>>,
}

impl JsonLines {
    pub fn follow_stdout(stdout: ChildStdout) -> Self {
        Self::follow(BufReader::new(stdout))
    }

    pub fn follow_stderr(stderr: ChildStderr) -> Self {
        Self::follow(BufReader::new(stderr))
    }

    fn follow<R: BufRead + Send + 'static>(reader: R) -> Self {
        let lines = Self::default();
        let sink = lines.clone();
        thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { break };
                sink.raw.lock().unwrap().push(line.clone());
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    let (events, ready) = &*sink.inner;
                    events.lock().unwrap().push(value);
                    ready.notify_all();
                }
            }
        });
        lines
    }

    pub fn all(&self) -> Vec<Value> {
        self.inner.0.lock().unwrap().clone()
    }

    /// Every line as read, JSON or not.
    pub fn raw_lines(&self) -> Vec<String> {
        self.raw.lock().unwrap().clone()
    }

    /// Waits (bounded) for the first raw line matching `predicate` (for text logs).
    pub fn wait_for_raw(&self, what: &str, predicate: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.raw.lock().unwrap().iter().find(|line| predicate(line)) {
                return Ok(line.clone());
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what}; output so far:\n{}", self.raw_lines().join("\n"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn matching(&self, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.all().into_iter().filter(|v| predicate(v)).collect()
    }

    /// Waits (bounded) for the first event matching `predicate`.
    pub fn wait_for(&self, what: &str, predicate: impl Fn(&Value) -> bool) -> Result<Value> {
        Ok(self.wait_for_count(what, 1, predicate)?.swap_remove(0))
    }

    /// Waits (bounded) until at least `count` events match `predicate`; returns them all.
    pub fn wait_for_count(&self, what: &str, count: usize, predicate: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
        let deadline = Instant::now() + WAIT;
        let (events, ready) = &*self.inner;
        let mut guard = events.lock().unwrap();
        loop {
            let found: Vec<Value> = guard.iter().filter(|v| predicate(v)).cloned().collect();
            if found.len() >= count {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out waiting for {what}; output so far:\n{}", self.raw.lock().unwrap().join("\n"));
            }
            guard = ready.wait_timeout(guard, left).unwrap().0;
        }
    }
}

/// A cgroup v2 directory that test processes are started in.
pub struct Sandbox {
    pub path: PathBuf,
    procs: CString,
}

impl Sandbox {
    pub fn new(name: &str) -> Result<Self> {
        let path = Path::new(CGROUP2_ROOT).join(format!("se-test-{}-{name}", std::process::id()));
        if path.exists() {
            remove_cgroup(&path);
        }
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        let procs = CString::new(path.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        Ok(Self { path, procs })
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// A cgroup below this one: another sandbox the same agent serves.
    /// (Drop it before its parent.)
    pub fn child(&self, name: &str) -> Result<Self> {
        let path = self.path.join(name);
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        let procs = CString::new(path.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        Ok(Self { path, procs })
    }

    /// A command whose process joins this cgroup before it execs, so the
    /// program is sandboxed from its first instruction.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        let procs = self.procs.clone();
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if written != 2 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

fn remove_cgroup(path: &Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + WAIT;
    while std::fs::remove_dir(path).is_err() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Held (shared) while an agent of this test process starts; see [`Agent::start_alone`].
static ATTACHING: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A running agent with its JSON log.
pub struct Agent {
    child: Child,
    pub log: JsonLines,
    pub port: u16,
    /// Detached when the agent is dropped.
    cgroups: Vec<String>,
}

impl Agent {
    pub fn start(sandbox: &Sandbox, policy: &PolicyFile, extra_args: &[&str]) -> Result<Self> {
        Self::start_with_env(sandbox, policy, extra_args, &[])
    }

    pub fn start_with_env(
        sandbox: &Sandbox,
        policy: &PolicyFile,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_with_format(sandbox, policy, extra_args, env, "json")
    }

    /// With `--log-format FORMAT`: "json" or "ocsf" (the events in `log`),
    /// or "text" (only `log.raw_lines()`; the port read from the ready line).
    pub fn start_with_format(
        sandbox: &Sandbox,
        policy: &PolicyFile,
        extra_args: &[&str],
        env: &[(&str, &str)],
        format: &str,
    ) -> Result<Self> {
        let _attaching = ATTACHING.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::start_unlocked(&[], sandbox, policy, extra_args, env, format)
    }

    /// The agent run by `wrapper` (a command line the agent's own is
    /// appended to: `prlimit ...`, `setpriv ...`).
    pub fn start_under(wrapper: &[&str], sandbox: &Sandbox, policy: &PolicyFile, extra_args: &[&str]) -> Result<Self> {
        let _attaching = ATTACHING.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::start_unlocked(wrapper, sandbox, policy, extra_args, &[], "json")
    }

    /// Runs `before`, then starts an agent, while no other agent of this
    /// test process attaches: every agent removes the pins of cgroups that
    /// no longer exist when it attaches, so a test of that must keep the
    /// others out from the removal to its agent's start.
    pub fn start_alone(sandbox: &Sandbox, policy: &PolicyFile, before: impl FnOnce()) -> Result<Self> {
        let _alone = ATTACHING.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        before();
        Self::start_unlocked(&[], sandbox, policy, &[], &[], "json")
    }

    fn start_unlocked(
        wrapper: &[&str],
        sandbox: &Sandbox,
        policy: &PolicyFile,
        extra_args: &[&str],
        env: &[(&str, &str)],
        format: &str,
    ) -> Result<Self> {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(agent_bin());
                command
            }
            None => Command::new(agent_bin()),
        };
        let mut child = command
            .args(["--log-format", format, "run", "--cgroup", sandbox.path_str(), "--listen-port", "0", "--policy"])
            .arg(&policy.path)
            .args(own_control_socket(extra_args))
            .args(extra_args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = JsonLines::follow_stderr(child.stderr.take().unwrap());
        let mut agent = Self { child, log, port: 0, cgroups: vec![sandbox.path_str().to_owned()] };
        if format == "json" {
            let ready = agent.log.wait_for("agent ready", |e| e["event"] == "ready")?;
            agent.port = ready["listen_port"].as_u64().context("ready line without listen_port")? as u16;
        } else if format == "ocsf" {
            let ready = agent.log.wait_for("agent ready", |e| e["metadata"]["event_code"] == "ready")?;
            agent.port = ready["unmapped"]["listen_port"].as_u64().context("ready event without listen_port")? as u16;
        } else {
            let ready = agent.log.wait_for_raw("agent ready", |line| line.contains("event=\"ready\""))?;
            let port = ready.split("listen_port=").nth(1).context("ready line without listen_port")?;
            agent.port = port.split(|c: char| !c.is_ascii_digit()).next().unwrap_or_default().parse()?;
        }
        Ok(agent)
    }

    /// Connection close lines for `pid`.
    pub fn connections_of(&self, pid: u32) -> Vec<Value> {
        self.log.matching(|e| e["event"] == "connection" && e["pid"] == pid)
    }

    pub fn wait_connection_of(&self, pid: u32) -> Result<Value> {
        self.log.wait_for(&format!("connection log of pid {pid}"), |e| e["event"] == "connection" && e["pid"] == pid)
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded by `within`) for the agent to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "agent did not exit within {within:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait, returning the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "agent did not stop after SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        for cgroup in &self.cgroups {
            detach(cgroup);
        }
    }
}

/// A daemon started with `run ARGS` (no sandbox of its own), its control
/// socket, and the JSON log.
pub struct AgentDaemon {
    pub agent: Agent,
    pub socket: String,
}

impl AgentDaemon {
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let socket = unique_control_socket();
        let mut child = Command::new(agent_bin())
            .args(["--log-format", "json", "run", "--control-socket", &socket])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = JsonLines::follow_stderr(child.stderr.take().unwrap());
        let agent = Agent { child, log, port: 0, cgroups: Vec::new() };
        agent.log.wait_for("agent ready", |e| e["event"] == "ready")?;
        Ok(Self { agent, socket })
    }

    /// `sandbox-egress ARGS --socket <this daemon's>`: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let output = Command::new(agent_bin()).args(args).args(["--socket", &self.socket]).output()?;
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Ok((output.status.success(), text(&output.stdout), text(&output.stderr)))
    }

    /// Adds a sandbox (detached again when the daemon is dropped).
    pub fn add(&mut self, name: &str, sandbox: &Sandbox, policy: &PolicyFile, extra: &[&str]) -> Result<Value> {
        let policy = policy.path.to_str().context("policy path")?;
        let args = [&["sandbox", "add", name, "--cgroup", sandbox.path_str(), "--policy", policy][..], extra].concat();
        let attaching = ATTACHING.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ok, stdout, stderr) = self.cli(&args)?;
        drop(attaching);
        ensure!(ok, "sandbox add {name}: {stderr}");
        self.agent.cgroups.push(sandbox.path_str().to_owned());
        let added =
            self.agent.log.wait_for("sandbox added", |e| e["event"] == "sandbox_added" && e["sandbox"] == name)?;
        ensure!(stdout.starts_with("added: "), "{stdout}");
        Ok(added)
    }

    /// Detaches `cgroup` when the daemon is dropped (a sandbox it serves from a spec file).
    pub fn detach_on_drop(&mut self, cgroup: &str) {
        self.agent.cgroups.push(cgroup.to_owned());
    }

    pub fn list(&self) -> Result<Vec<Value>> {
        let (ok, stdout, stderr) = self.cli(&["sandbox", "list", "--json"])?;
        ensure!(ok, "sandbox list: {stderr}");
        Ok(serde_json::from_str(&stdout)?)
    }
}

impl AgentDaemon {
    /// `sandbox-egress exec --sandbox NAME --control-socket <this daemon's>
    /// OPTIONS -- PROGRAM ARGS`, run from `/` (a directory any user may enter).
    pub fn exec(&self, sandbox: &str, options: &[&str], program: &str, args: &[&str]) -> Command {
        exec_command(&self.socket, sandbox, options, program, args)
    }
}

/// `sandbox-egress exec --sandbox SANDBOX --control-socket SOCKET OPTIONS --
/// PROGRAM ARGS`, run from `/` (a directory any user may enter).
pub fn exec_command(socket: &str, sandbox: &str, options: &[&str], program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(agent_bin());
    command.args(["exec", "--sandbox", sandbox, "--control-socket", socket]).args(options);
    command.arg("--").arg(program).args(args).current_dir("/");
    command
}

pub fn detach(cgroup: &str) {
    run_quiet(agent_bin().to_str().unwrap(), &["detach", "--cgroup", cgroup]);
}

/// Formats a URL host.
pub fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Runs curl in `sandbox` (or outside it with `None`), returning (pid, output).
pub fn curl(sandbox: Option<&Sandbox>, url: &str) -> Result<(u32, Output)> {
    let mut command = match sandbox {
        Some(sandbox) => sandbox.command("curl"),
        None => Command::new("curl"),
    };
    command.args([
        "-sS",
        "--noproxy",
        "*",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{size_request} %{size_header}",
        url,
    ]);
    spawn_and_wait(command)
}

/// Runs `program` in `sandbox` to completion; returns (pid, output).
pub fn run_in(sandbox: &Sandbox, program: &str, args: &[&str]) -> Result<(u32, Output)> {
    let mut command = sandbox.command(program);
    command.args(args);
    spawn_and_wait(command)
}

/// An HTTP response as printed by `curl -i`.
pub struct HttpResponse {
    pub pid: u32,
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Runs sandboxed `curl -i ARGS` and splits its output into status, headers and body.
pub fn curl_i(sandbox: &Sandbox, args: &[&str]) -> Result<HttpResponse> {
    let (pid, output) = run_in(sandbox, "curl", &[&["-sS", "-i", "-m", "10"], args].concat())?;
    ensure!(output.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (headers, body) = text.split_once("\r\n\r\n").context("no header/body separator")?;
    let status = headers.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status")?;
    Ok(HttpResponse { pid, status, headers: headers.to_owned(), body: body.to_owned() })
}

/// Runs sandboxed curl printing the response body (error bodies included); returns (pid, output).
pub fn curl_body(sandbox: &Sandbox, url: &str) -> Result<(u32, Output)> {
    let mut command = sandbox.command("curl");
    command.args(["-sS", "--noproxy", "*", "-m", "10", url]);
    spawn_and_wait(command)
}

/// Runs the raw exchange client; returns (pid, output).
pub fn exchange(sandbox: Option<&Sandbox>, family: &str, host: &str, send: u64, recv: u64) -> Result<(u32, Output)> {
    let mut command = match sandbox {
        Some(sandbox) => sandbox.command(PYTHON),
        None => Command::new(PYTHON),
    };
    command.arg(support_file("exchange_client.py")).args([
        family,
        host,
        &EXCHANGE_PORT.to_string(),
        &send.to_string(),
        &recv.to_string(),
    ]);
    spawn_and_wait(command)
}

/// Runs `command` to completion; returns (pid, output). The pid of an
/// `exec` command is the program's: exec replaces itself with it.
pub fn spawn_and_wait(mut command: Command) -> Result<(u32, Output)> {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    Ok((pid, child.wait_with_output()?))
}

impl TestNet {
    /// Runs tests/support/`script` inside the namespace with `args`: a
    /// server printing JSON lines, `{"kind": "ready"}` once it listens.
    pub fn start_support_server(&self, script: &str, args: &[&str]) -> Result<Servers> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, PYTHON, "-u"]).arg(support_file(script)).args(args);
        Servers::start(command, None)
    }

    /// Runs `script` (Python source) inside the namespace as a server, with
    /// `args`: it prints JSON lines on stdout, `{"kind": "ready"}` once it
    /// listens, like the servers of [`TestNet::start_servers`]. For servers
    /// that misbehave on purpose (resets, stalls, banners) written by a test.
    pub fn start_python_servers(&self, script: &str, args: &[&str]) -> Result<Servers> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, PYTHON, "-u", "-c", script]).args(args);
        Servers::start(command, None)
    }
}

impl Agent {
    /// The agent's process id (for /proc/<pid>/status and /proc/<pid>/fd).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts an agent listening on `port` rather than any free one: a
    /// restarted agent takes over the port its predecessor's pinned
    /// redirect points at.
    pub fn start_on_port(sandbox: &Sandbox, policy: &PolicyFile, port: u16, extra_args: &[&str]) -> Result<Self> {
        let _attaching = ATTACHING.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut child = Command::new(agent_bin())
            .args([
                "--log-format",
                "json",
                "run",
                "--cgroup",
                sandbox.path_str(),
                "--listen-port",
                &port.to_string(),
                "--policy",
            ])
            .arg(&policy.path)
            .args(own_control_socket(extra_args))
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = JsonLines::follow_stderr(child.stderr.take().unwrap());
        let agent = Self { child, log, port, cgroups: vec![sandbox.path_str().to_owned()] };
        agent.log.wait_for("agent ready", |e| e["event"] == "ready")?;
        Ok(agent)
    }
}

/// `--control-socket` at a path of its own, unless `args` give one: agents
/// of tests running at once must not share the default socket.
pub fn own_control_socket(args: &[&str]) -> Vec<String> {
    if args.contains(&"--control-socket") {
        return Vec::new();
    }
    vec!["--control-socket".into(), unique_control_socket()]
}

/// A control socket path no other agent of this test run uses.
pub fn unique_control_socket() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("/run/sandbox-egress-tests/{}-{n}.sock", std::process::id())
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for the test and the clients it
/// runs, so events in both can be put in order.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Checks `lines` (OCSF events, one per line) against the official OCSF
/// schema with tests/support/ocsf_validate.py; its report when all are valid.
pub fn validate_ocsf(lines: &[String]) -> Result<String> {
    let dir = TempDir::new("ocsf-events")?;
    let file = dir.file("events.jsonl");
    std::fs::write(&file, lines.iter().map(|line| format!("{line}\n")).collect::<String>())?;
    let output = Command::new(PYTHON).arg(support_file("ocsf_validate.py")).arg(&file).output()?;
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "OCSF events not valid against the schema:\n{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(report)
}

/// A connection to a daemon's control socket, for many requests in a row.
pub struct ControlClient {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl ControlClient {
    pub fn connect(socket: &str) -> Result<Self> {
        let writer = std::os::unix::net::UnixStream::connect(socket).with_context(|| format!("connect {socket}"))?;
        writer.set_read_timeout(Some(WAIT))?;
        Ok(Self { reader: BufReader::new(writer.try_clone()?), writer })
    }

    /// Sends one request (a JSON object with its `op`) and returns the reply; an error if not `ok`.
    pub fn request(&mut self, request: &Value) -> Result<Value> {
        writeln!(self.writer, "{request}")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let reply: Value = serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))?;
        ensure!(reply["ok"] == true, "{request}: {}", reply["error"]);
        Ok(reply)
    }
}

/// A process's resident memory (KiB) and open descriptors.
pub fn process_usage(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

/// The `percent`th percentile of `times` (sorted in place).
pub fn percentile(times: &mut [Duration], percent: usize) -> Duration {
    times.sort();
    times.get((times.len() * percent / 100).min(times.len().saturating_sub(1))).copied().unwrap_or_default()
}
