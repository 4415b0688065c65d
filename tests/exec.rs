//! `sandbox-egress exec` end to end: programs started by it run as the
//! user, in the sandbox's cgroup (and network namespace), with no_new_privs
//! and only unix, inet, inet6 and netlink sockets, and trust the agent's CA
//! in every common runtime with no flag of their own: curl, Python urllib,
//! Node fetch, Java HttpClient and git reach an inspected HTTPS endpoint; the
//! bundle keeps the system roots for passthrough endpoints.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const GIT_TOKEN: &str = "exec-git-token-3e1f";

/// A test host serving the REST API as api.rest.test and git as
/// git.rest.test, both inspected (the agent trusts their CAs upstream), and
/// the REST API by address as a passthrough endpoint.
struct Setup {
    // Dropped first: the agent detaches while the cgroup still exists.
    agent: Agent,
    sandbox: Sandbox,
    api: Servers,
    _git: Servers,
    socket: String,
    rest_ca: PathBuf,
    trust_dir: String,
    ca_dir: String,
    net: TestNet,
    dir: TempDir,
    _dns: Dns,
    _policy: PolicyFile,
}

impl Setup {
    fn new(name: &str) -> Result<Self> {
        let net = TestNet::new()?;
        let dir = TempDir::new(name)?;
        let dns = net.start_dns(&[(REST_API_HOST, net.v4.into()), (GIT_HOST, net.v4.into())])?;
        let (api, rest_ca) = net.start_rest_api(&dir)?;
        let (git, git_ca) = start_git(&net, &dir)?;
        let upstream_ca = dir.file("upstream-cas.pem");
        std::fs::write(&upstream_ca, std::fs::read_to_string(&rest_ca)? + &std::fs::read_to_string(git_ca)?)?;
        let policy = PolicyFile::new(&format!(
            "version: 1\nnetwork_policies:\n  exec:\n    binaries: [{{ path: \"/**\" }}]\n    endpoints:\n      \
             - {{ host: {REST_API_HOST}, port: {REST_TLS_PORT}, protocol: rest, access: full, enforcement: enforce }}\n      \
             - {{ host: {GIT_HOST}, port: {GIT_TLS_PORT}, protocol: rest, access: full, enforcement: enforce }}\n      \
             - {{ host: \"{}\", port: {REST_TLS_PORT} }}\n",
            net.v4
        ))?;
        let sandbox = Sandbox::new(name)?;
        let socket = unique_control_socket();
        let ca_dir = dir.file("ca");
        let dns_args = dns.agent_args();
        let args = [
            dns_args[0].as_str(),
            &dns_args[1],
            "--ca-dir",
            &ca_dir,
            "--upstream-ca",
            &upstream_ca,
            "--control-socket",
            &socket,
        ];
        let agent = Agent::start(&sandbox, &policy, &args)?;
        let trust_dir = dir.file("trust");
        Ok(Self {
            agent,
            sandbox,
            api,
            _git: git,
            socket,
            rest_ca,
            trust_dir,
            ca_dir,
            net,
            dir,
            _dns: dns,
            _policy: policy,
        })
    }

    /// `exec --sandbox default --trust-dir <the test's> OPTIONS -- PROGRAM ARGS`.
    fn exec(&self, options: &[&str], program: &str, args: &[&str]) -> Command {
        let options = [&["--trust-dir", &self.trust_dir][..], options].concat();
        exec_command(&self.socket, "default", &options, program, args)
    }

    /// The same, as nobody, run to completion: (pid, output).
    fn exec_as_nobody(&self, options: &[&str], program: &str, args: &[&str]) -> Result<(u32, Output)> {
        spawn_and_wait(self.exec(&[&["--user", "nobody"][..], options].concat(), program, args))
    }

    fn inspected_url(&self, path: &str) -> String {
        format!("https://{REST_API_HOST}:{REST_TLS_PORT}{path}")
    }

    /// The one directory under the trust dir (one per agent CA).
    fn trust_files(&self) -> Result<(PathBuf, PathBuf)> {
        let mut dirs = std::fs::read_dir(&self.trust_dir)?.collect::<Result<Vec<_>, _>>()?;
        ensure!(dirs.len() == 1, "one directory per agent CA: {dirs:?}");
        let dir = dirs.remove(0).path();
        Ok((dir.join("ca-bundle.pem"), dir.join("truststore.p12")))
    }
}

/// A bare repository `repo.git` with one commit, served by git http-backend
/// to Basic credentials whose password is [`GIT_TOKEN`].
fn start_git(net: &TestNet, dir: &TempDir) -> Result<(Servers, PathBuf)> {
    let work = dir.file("work");
    let root = dir.path.join("git");
    std::fs::create_dir_all(&work)?;
    std::fs::write(dir.path.join("work/README"), "exec\n")?;
    let git = |args: &[&str]| {
        run("git", &[&["-C", &work, "-c", "user.name=t", "-c", "user.email=t@example.test"], args].concat())
    };
    git(&["init", "-q", "-b", "main"])?;
    git(&["add", "README"])?;
    git(&["commit", "-q", "-m", "one commit"])?;
    git(&["clone", "-q", "--bare", ".", root.join("repo.git").to_str().context("utf-8 path")?])?;
    let token_file = dir.path.join("git-server.token");
    std::fs::write(&token_file, format!("{GIT_TOKEN}\n"))?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    net.start_git_server(dir, &root, &token_file)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Java's HttpClient: prints the status of a GET of `args[0]`.
const JAVA_CLIENT: &str = r#"
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Fetch {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0])).build();
        System.out.println(client.send(request, HttpResponse.BodyHandlers.ofString()).statusCode());
    }
}
"#;

#[test]
fn every_runtime_trusts_an_inspected_endpoint_through_exec_with_no_ca_flag() -> Result<()> {
    require_root();
    let setup = Setup::new("exec-runtimes")?;
    let java_file = setup.dir.file("Fetch.java");
    std::fs::write(&java_file, JAVA_CLIENT)?;
    let git_url = format!("https://x-access-token:{GIT_TOKEN}@{GIT_HOST}:{GIT_TLS_PORT}/repo.git");
    let node = "fetch(process.argv[1]).then(r => console.log(r.status), e => { console.error(e); process.exit(1) })";
    let python = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)";
    let clients: [(&str, &str, Vec<String>); 4] = [
        (
            "curl",
            "curl",
            vec![
                "-sS".into(),
                "-m".into(),
                "10".into(),
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{http_code}".into(),
                setup.inspected_url("/curl"),
            ],
        ),
        ("python urllib", PYTHON, vec!["-c".into(), python.into(), setup.inspected_url("/python")]),
        ("node fetch", "node", vec!["-e".into(), node.into(), setup.inspected_url("/node")]),
        ("java HttpClient", "java", vec![java_file.clone(), setup.inspected_url("/java")]),
    ];
    for (client, program, args) in &clients {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (pid, output) = setup.exec_as_nobody(&[], program, &args)?;
        ensure!(output.status.success(), "{client} failed: {}{}", stdout(&output), stderr(&output));
        assert_eq!(stdout(&output), "200", "{client}: {}", stderr(&output));
        let connection = setup.agent.wait_connection_of(pid)?;
        assert_eq!(connection["protocol"], "tls-inspected", "{client}: {connection}");
        assert_eq!(connection["uid"], 65534, "{client}: {connection}");
    }
    let (_, output) = setup.exec_as_nobody(&[], "git", &["ls-remote", &git_url])?;
    ensure!(output.status.success(), "git ls-remote failed: {}", stderr(&output));
    assert!(stdout(&output).ends_with("refs/heads/main"), "{}", stdout(&output));
    let paths: Vec<Value> =
        setup.api.events.matching(|e| e["kind"] == "request").iter().map(|e| e["path"].clone()).collect();
    assert_eq!(paths, ["/curl", "/python", "/node", "/java"], "each runtime's request reached the origin");

    // The trust variables are what made it work: without them curl does
    // not trust the agent's certificate.
    let (_, output) =
        setup.exec_as_nobody(&["--no-ca-env"], "curl", &["-sS", "-m", "10", &setup.inspected_url("/x")])?;
    assert_eq!(output.status.code(), Some(60), "curl without the bundle: {}", stderr(&output));

    // The files: root's, readable by the user, not writable by it; the
    // truststore's entries are trusted certificates to Java, one for each
    // certificate of the bundle, the agent's CA among them.
    let (bundle, truststore) = setup.trust_files()?;
    for path in [&bundle, &truststore, &bundle.parent().unwrap().to_path_buf()] {
        let metadata = std::fs::metadata(path)?;
        assert_eq!(metadata.uid(), 0, "{}", path.display());
        let expected = if metadata.is_dir() { 0o755 } else { 0o644 };
        assert_eq!(metadata.mode() & 0o777, expected, "{}", path.display());
    }
    let (_, output) =
        setup.exec_as_nobody(&[], "sh", &["-c", "cat \"$SSL_CERT_FILE\" >/dev/null && echo x >>\"$SSL_CERT_FILE\""])?;
    ensure!(!output.status.success() && stderr(&output).contains("Permission denied"), "{}", stderr(&output));
    let pem = std::fs::read_to_string(&bundle)?;
    let agent_ca = run(agent_bin().to_str().unwrap(), &["ca", "export", "--ca-dir", &setup.ca_dir])?;
    assert!(pem.ends_with(&*String::from_utf8_lossy(&agent_ca.stdout)), "the agent CA closes the bundle");
    let entries = keytool_trusted_entries(&truststore)?;
    assert_eq!(entries.len(), pem.matches("BEGIN CERTIFICATE").count());
    assert!(entries.iter().any(|alias| alias == "sandbox-egress-agent-ca"), "{entries:?}");
    Ok(())
}

/// The aliases `keytool -list` shows as trustedCertEntry (all of them: it
/// fails if any entry is of another kind).
fn keytool_trusted_entries(truststore: &Path) -> Result<Vec<String>> {
    let output = run(
        "keytool",
        &["-list", "-keystore", truststore.to_str().unwrap(), "-storetype", "PKCS12", "-storepass", "changeit"],
    )?;
    let text = stdout(&output);
    let count: usize = text
        .lines()
        .find_map(|line| line.strip_prefix("Your keystore contains ")?.split(' ').next()?.parse().ok())
        .context(text.clone())?;
    let trusted: Vec<String> = text
        .lines()
        .filter(|line| line.contains(", trustedCertEntry,"))
        .map(|line| line.split(',').next().unwrap_or_default().to_owned())
        .collect();
    ensure!(trusted.len() == count, "not every entry is a trusted certificate: {text}");
    Ok(trusted)
}

#[test]
fn the_bundle_keeps_the_system_roots_for_passthrough_endpoints_and_follows_them() -> Result<()> {
    require_root();
    let setup = Setup::new("exec-passthrough")?;
    // The endpoint by address has no L7 content: TLS passes through, and
    // curl sees the origin's own certificate, signed by the test's CA. The
    // host's trust store is left alone: --system-roots stands for it.
    let url = format!("https://{}:{REST_TLS_PORT}/passthrough", setup.net.v4);
    let curl = ["-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url.as_str()];
    let roots = setup.rest_ca.to_str().unwrap();
    let (pid, output) = setup.exec_as_nobody(&["--system-roots", roots], "curl", &curl)?;
    assert_eq!(stdout(&output), "200", "{}", stderr(&output));
    let connection = setup.agent.wait_connection_of(pid)?;
    assert_eq!(connection["protocol"], "tls", "{connection}");
    let (bundle, truststore) = setup.trust_files()?;
    let test_ca = std::fs::read_to_string(&setup.rest_ca)?;
    let with_test_ca = std::fs::read_to_string(&bundle)?;
    assert!(with_test_ca.starts_with(&test_ca), "the system roots come first");
    assert_eq!(keytool_trusted_entries(&truststore)?.len(), 2);

    // With the real system roots the test CA is not trusted, and the files
    // are rebuilt for them.
    let (_, output) = setup.exec_as_nobody(&[], "curl", &curl)?;
    assert_eq!(output.status.code(), Some(60), "{}", stderr(&output));
    let with_system_roots = std::fs::read_to_string(&bundle)?;
    assert!(!with_system_roots.contains(test_ca.trim()), "the bundle was rebuilt without the test CA");
    let system_count = with_system_roots.matches("BEGIN CERTIFICATE").count();
    assert!(system_count > 2, "the system's roots and the agent CA: {system_count}");
    assert_eq!(keytool_trusted_entries(&truststore)?.len(), system_count, "the truststore was rebuilt too");
    Ok(())
}

/// Prints one line per family: `NAME ok` or `NAME errno N`.
const FAMILY_PROBE: &str = r#"
import errno, socket
families = [("unix", socket.AF_UNIX, socket.SOCK_STREAM), ("inet", socket.AF_INET, socket.SOCK_STREAM),
            ("inet6", socket.AF_INET6, socket.SOCK_STREAM), ("netlink", socket.AF_NETLINK, socket.SOCK_RAW),
            ("vsock", socket.AF_VSOCK, socket.SOCK_STREAM), ("packet", socket.AF_PACKET, socket.SOCK_RAW),
            ("bluetooth", socket.AF_BLUETOOTH, socket.SOCK_STREAM), ("alg", socket.AF_ALG, socket.SOCK_SEQPACKET),
            ("tipc", socket.AF_TIPC, socket.SOCK_RDM)]
for name, family, kind in families:
    try:
        socket.socket(family, kind).close()
        print(name, "ok")
    except OSError as error:
        print(name, "errno", error.errno)
for name, family in [("unix-pair", socket.AF_UNIX), ("vsock-pair", socket.AF_VSOCK)]:
    try:
        [s.close() for s in socket.socketpair(family, socket.SOCK_STREAM)]
        print(name, "ok")
    except OSError as error:
        print(name, "errno", error.errno)
"#;

fn probe_lines(output: &Output) -> Vec<String> {
    stdout(output).lines().map(str::to_owned).collect()
}

#[test]
fn exec_closes_every_socket_family_but_unix_inet_inet6_and_netlink() -> Result<()> {
    require_root();
    let setup = Setup::new("exec-families")?;
    let allowed = ["unix ok", "inet ok", "inet6 ok", "netlink ok"];
    let refused = ["vsock errno 1", "packet errno 1", "bluetooth errno 1", "alg errno 1", "tipc errno 1"];
    let expected: Vec<String> =
        allowed.iter().chain(&refused).chain(&["unix-pair ok", "vsock-pair errno 1"]).map(|s| s.to_string()).collect();
    let (_, as_nobody) = setup.exec_as_nobody(&[], PYTHON, &["-c", FAMILY_PROBE])?;
    assert_eq!(probe_lines(&as_nobody), expected, "{}", stderr(&as_nobody));
    // Root's capabilities (CAP_NET_RAW for packet sockets) do not get past the filter either.
    let (_, as_root) = spawn_and_wait(setup.exec(&[], PYTHON, &["-c", FAMILY_PROBE]))?;
    assert_eq!(probe_lines(&as_root), expected, "{}", stderr(&as_root));

    // The gap exec closes: in the same cgroup, started some other way, vsock
    // and (for root) packet sockets are created.
    let (_, outside_exec) = run_in(&setup.sandbox, PYTHON, &["-c", FAMILY_PROBE])?;
    let lines = probe_lines(&outside_exec);
    assert!(lines.contains(&"vsock ok".into()) && lines.contains(&"packet ok".into()), "{lines:?}");
    Ok(())
}

#[test]
fn exec_runs_as_the_user_in_the_cgroup_with_no_new_privileges() -> Result<()> {
    require_root();
    let setup = Setup::new("exec-identity")?;
    let script =
        "id -u; id -g; id -G; cat /proc/self/cgroup; grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status";
    let (_, output) = setup.exec_as_nobody(&[], "sh", &["-c", script])?;
    let cgroup = setup.sandbox.path.strip_prefix(CGROUP2_ROOT)?.display().to_string();
    let text = stdout(&output);
    assert!(text.contains(&format!("0::/{cgroup}\n")), "{text}");
    for status in ["NoNewPrivs:\t1", "Seccomp:\t2", "CapEff:\t0000000000000000"] {
        assert!(text.contains(status), "{status}: {text}");
    }
    assert_eq!(text.lines().take(3).collect::<Vec<_>>(), ["65534", "65534", "65534"], "{text}");

    // UID:GID without a passwd entry: that group alone.
    let (_, output) = spawn_and_wait(setup.exec(&["--user", "4242:4343"], "sh", &["-c", "id -u; id -g; id -G"]))?;
    assert_eq!(stdout(&output), "4242\n4343\n4343", "{}", stderr(&output));

    // A setuid-root binary does not make the user root: no_new_privs.
    let setuid_id = setup.dir.file("setuid-id");
    std::fs::copy("/usr/bin/id", &setuid_id)?;
    std::fs::set_permissions(&setuid_id, std::fs::Permissions::from_mode(0o4755))?;
    let (_, output) = setup.exec_as_nobody(&[], &setuid_id, &["-u"])?;
    assert_eq!(stdout(&output), "65534", "{}", stderr(&output));
    // Without no_new_privs it would: the same binary as nobody started by setpriv.
    let (_, output) =
        run_in(&setup.sandbox, "setpriv", &["--reuid=65534", "--regid=65534", "--clear-groups", &setuid_id, "-u"])?;
    assert_eq!(stdout(&output), "0", "the setuid bit works on this file system: {}", stderr(&output));

    // CMD's exit status is exec's.
    let (_, output) = setup.exec_as_nobody(&[], "sh", &["-c", "exit 7"])?;
    assert_eq!(output.status.code(), Some(7));
    let (_, output) = setup.exec_as_nobody(&[], "/nonexistent/program", &[])?;
    assert_eq!(output.status.code(), Some(127), "{}", stderr(&output));
    assert!(stderr(&output).contains("cannot run /nonexistent/program"), "{}", stderr(&output));
    Ok(())
}

#[test]
fn an_unknown_sandbox_or_user_or_no_daemon_is_an_error_and_runs_nothing() -> Result<()> {
    require_root();
    let setup = Setup::new("exec-errors")?;
    let marker = setup.dir.file("ran");
    let touch = |command: Command| -> Result<String> {
        let (_, output) = spawn_and_wait(command)?;
        ensure!(output.status.code() == Some(1), "exit {:?}: {}", output.status, stderr(&output));
        ensure!(!Path::new(&marker).exists(), "the program ran");
        Ok(stderr(&output))
    };
    let error = touch(exec_command(&setup.socket, "nope", &["--user", "nobody"], "touch", &[&marker]))?;
    assert!(error.contains("no sandbox named nope"), "{error}");
    let error = touch(setup.exec(&["--user", "no-such-user-x"], "touch", &[&marker]))?;
    assert!(error.contains("unknown user no-such-user-x"), "{error}");
    let error = touch(exec_command("/run/sandbox-egress-tests/none.sock", "default", &[], "touch", &[&marker]))?;
    assert!(error.contains("cannot connect to the agent's control socket"), "{error}");
    assert!(error.contains("is the agent running"), "{error}");
    Ok(())
}

#[test]
fn exec_enters_the_network_namespace_of_a_sandbox_that_has_one() -> Result<()> {
    require_root();
    let net = TestNet::new()?;
    let sandbox = Sandbox::new("exec-netns")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let mut daemon = AgentDaemon::start(&[])?;
    let netns_path = format!("/run/netns/{}", net.netns);
    daemon.add("isolated", &sandbox, &policy, &["--netns", &netns_path])?;
    let (_, output) = spawn_and_wait(daemon.exec(
        "isolated",
        &["--user", "nobody", "--no-ca-env"],
        "readlink",
        &["/proc/self/ns/net"],
    ))?;
    let inode = std::fs::metadata(&netns_path)?.ino();
    assert_eq!(stdout(&output), format!("net:[{inode}]"), "{}", stderr(&output));
    let (_, output) =
        spawn_and_wait(daemon.exec("isolated", &["--user", "nobody", "--no-ca-env"], "cat", &["/proc/self/cgroup"]))?;
    let cgroup = sandbox.path.strip_prefix(CGROUP2_ROOT)?.display().to_string();
    assert!(stdout(&output).ends_with(&format!("0::/{cgroup}")), "{}", stdout(&output));
    Ok(())
}

#[test]
fn ca_bundle_and_truststore_write_the_same_certificates_for_images() -> Result<()> {
    require_root();
    let dir = TempDir::new("exec-ca-files")?;
    let ca_dir = dir.file("ca");
    let roots = TestCertificate::new(&dir, "roots", vec!["roots.test".into()])?;
    let bin = agent_bin();
    let bin = bin.to_str().unwrap();
    let (bundle, truststore) = (dir.file("bundle.pem"), dir.file("truststore.p12"));
    let source = ["--ca-dir", &ca_dir, "--system-roots", roots.ca.to_str().unwrap()];
    run(bin, &[&["ca", "bundle", "--output", &bundle][..], &source].concat())?;
    run(bin, &[&["ca", "truststore", "--output", &truststore][..], &source].concat())?;
    let printed = run(bin, &[&["ca", "bundle"][..], &source].concat())?;
    let pem = std::fs::read_to_string(&bundle)?;
    assert_eq!(String::from_utf8(printed.stdout)?, pem, "stdout and --output agree");
    let agent_ca = run(bin, &["ca", "export", "--ca-dir", &ca_dir])?;
    assert_eq!(pem, std::fs::read_to_string(&roots.ca)? + &String::from_utf8(agent_ca.stdout)?);
    assert_eq!(keytool_trusted_entries(Path::new(&truststore))?, ["sandbox-egress-agent-ca", "system-1"]);
    for file in [&bundle, &truststore] {
        assert_eq!(std::fs::metadata(file)?.mode() & 0o777, 0o644, "{file}");
    }
    Ok(())
}
