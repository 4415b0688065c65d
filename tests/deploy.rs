//! The deployment files (deploy/): the systemd unit passes `systemd-analyze
//! verify` and its capability set is enough to run the agent; the Kubernetes
//! manifests pass a schema validator (kubernetes-validate, from PyPI, which
//! ships the schemas); register-pod.sh passes `bash -n` and shellcheck and
//! finds a pod's cgroup and network namespace; the seccomp profile refuses
//! every socket family but unix, inet, inet6 and netlink in a runc container,
//! and the DaemonSet installs it where the example pod's Localhost profile is.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{ensure, Context, Result};
use e2e::*;
use serde_json::Value;

const UNIT: &str = "deploy/systemd/sandbox-egress.service";
const INSTALLED_BIN: &str = "/usr/local/bin/sandbox-egress";
const KUBERNETES: &str = "deploy/kubernetes";
const REGISTER_POD: &str = "deploy/kubernetes/register-pod.sh";
const SECCOMP_PROFILE: &str = "deploy/seccomp/socket-families.json";
const KUBELET_SECCOMP_ROOT: &str = "/var/lib/kubelet/seccomp/";

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn unit() -> Result<String> {
    std::fs::read_to_string(workspace_root().join(UNIT)).context(UNIT)
}

/// `systemd-analyze verify` of `unit` under the name sandbox-egress.service:
/// (exited 0, what it printed).
fn verify(dir: &TempDir, unit: &str) -> Result<(bool, String)> {
    let path = dir.file("sandbox-egress.service");
    std::fs::write(&path, unit)?;
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no", &path])
        .output()
        .context("systemd-analyze (Debian package systemd: run `cargo xtask setup`)")?;
    Ok((output.status.success(), text(&output)))
}

/// The unit as shipped but for the program of ExecStart= and ExecReload=:
/// verify checks that it exists and is executable, and this machine has no
/// /usr/local/bin/sandbox-egress (installing one there would outlive the
/// test). So the copy names the binary under test, at its own path, and every
/// other line is verified as shipped.
fn unit_for_verify() -> Result<String> {
    let mut unit = unit()?;
    for key in ["ExecStart", "ExecReload"] {
        let command = format!("{key}={INSTALLED_BIN} ");
        ensure!(unit.matches(&command).count() == 1, "the unit's {key}= runs {INSTALLED_BIN} once");
        unit = unit.replace(&command, &format!("{key}={} ", agent_bin().display()));
    }
    Ok(unit)
}

#[test]
fn the_systemd_unit_follows_an_upgraded_daemon_and_reloads_by_upgrading() -> Result<()> {
    let unit = unit()?;
    let lines: Vec<&str> = unit.lines().collect();
    for line in ["Type=notify", "NotifyAccess=all", "ExecReload=/usr/local/bin/sandbox-egress upgrade"] {
        ensure!(lines.contains(&line), "the unit has no {line:?}");
    }
    Ok(())
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_without_a_warning() -> Result<()> {
    require_root();
    let dir = TempDir::new("deploy-unit")?;
    let unit = unit_for_verify()?;
    let (ok, printed) = verify(&dir, &unit)?;
    ensure!(ok && printed.trim().is_empty(), "systemd-analyze verify: {printed}");

    // The check can fail: a misspelt key is printed (verify still exits 0,
    // hence the test on the output), a missing program fails it.
    let (_, printed) = verify(&dir, &unit.replace("\nRestart=on-failure", "\nRestrat=on-failure"))?;
    ensure!(printed.contains("Unknown key 'Restrat'"), "a misspelt key went unnoticed: {printed}");
    let (ok, printed) = verify(&dir, &unit.replace(&agent_bin().display().to_string(), "/nonexistent/sandbox-egress"))?;
    ensure!(!ok && printed.contains("/nonexistent/sandbox-egress"), "a missing ExecStart program passed: {printed}");
    Ok(())
}

/// The unit's CapabilityBoundingSet= as setpriv arguments ("+bpf,+perfmon,...").
fn unit_capabilities() -> Result<Vec<String>> {
    let unit = unit()?;
    let lines: Vec<&str> = unit.lines().filter_map(|line| line.strip_prefix("CapabilityBoundingSet=")).collect();
    ensure!(lines.len() == 1, "one CapabilityBoundingSet= line, found {}", lines.len());
    lines[0]
        .split_whitespace()
        .map(|name| {
            let name = name.strip_prefix("CAP_").with_context(|| format!("{name} does not start with CAP_"))?;
            Ok(name.to_ascii_lowercase())
        })
        .collect()
}

#[test]
fn the_units_capabilities_are_names_the_kernel_knows() -> Result<()> {
    // systemd 252's verify says nothing about an unknown capability name (it
    // is dropped when the unit starts): check the names against setpriv's list.
    let known = run("setpriv", &["--list-caps"])?;
    let known: Vec<String> = String::from_utf8(known.stdout)?.lines().map(str::to_owned).collect();
    let capabilities = unit_capabilities()?;
    ensure!(!capabilities.is_empty(), "no capability in the unit");
    for capability in &capabilities {
        ensure!(known.contains(capability), "CAP_{} is no capability setpriv knows", capability.to_uppercase());
    }
    Ok(())
}

/// The agent in `sandbox` limited to `capabilities` as the unit limits it:
/// as root, its permitted and effective sets become the bounding set.
fn start_limited_agent(sandbox: &Sandbox, policy: &PolicyFile, capabilities: &[String]) -> Result<LimitedAgent> {
    let bounding: Vec<String> =
        std::iter::once("-all".to_owned()).chain(capabilities.iter().map(|c| format!("+{c}"))).collect();
    let mut child = Command::new("setpriv")
        .arg(format!("--bounding-set={}", bounding.join(",")))
        .args(["--inh-caps=-all", "--ambient-caps=-all", "--"])
        .arg(agent_bin())
        .args(["--log-format", "json", "run", "--cgroup", sandbox.path_str(), "--listen-port", "0", "--policy"])
        .arg(&policy.path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let log = JsonLines::follow_stderr(child.stderr.take().unwrap());
    let agent = LimitedAgent { child, log, cgroup: sandbox.path_str().to_owned() };
    agent.log.wait_for("agent ready", |e| e["event"] == "ready")?;
    Ok(agent)
}

struct LimitedAgent {
    child: std::process::Child,
    log: JsonLines,
    cgroup: String,
}

impl Drop for LimitedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        detach(&self.cgroup);
    }
}

/// curl as nobody in `sandbox` (a sandboxed user other than the agent's);
/// returns the agent's connection line.
fn curl_as_nobody(net: &TestNet, sandbox: &Sandbox, agent: &LimitedAgent) -> Result<Value> {
    let url = format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4);
    let (pid, output) = run_in(
        sandbox,
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "curl",
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            &url,
        ],
    )?;
    let connection = agent.log.wait_for("the connection line", |e| e["event"] == "connection" && e["pid"] == pid)?;
    ensure!(output.status.success(), "curl failed: {}\n{connection}", text(&output));
    Ok(connection)
}

#[test]
fn the_units_capabilities_are_enough_to_serve_a_sandbox() -> Result<()> {
    require_root();
    let capabilities = unit_capabilities()?;
    let net = TestNet::new()?;
    let _servers = net.start_servers()?;
    let sandbox = Sandbox::new("deploy-caps")?;
    let policy = PolicyFile::new(&net.allow_all_policy())?;
    let curl = std::fs::canonicalize("/usr/bin/curl")?.display().to_string();
    {
        let agent = start_limited_agent(&sandbox, &policy, &capabilities)?;
        let connection = curl_as_nobody(&net, &sandbox, &agent)?;
        assert_eq!(connection["verdict"], "relayed", "{connection}");
        assert_eq!(connection["exe"], curl, "{connection}");
    }
    // The limit is real: without CAP_SYS_PTRACE the agent cannot read
    // /proc/PID/exe of another user's process.
    let fewer: Vec<String> = capabilities.into_iter().filter(|c| c != "sys_ptrace").collect();
    let agent = start_limited_agent(&sandbox, &policy, &fewer)?;
    let url = format!("http://{}:{HTTP_PORT}/bytes/10", net.private_v4);
    let (pid, _) = run_in(
        &sandbox,
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "curl",
            "-sS",
            "-m",
            "10",
            "-o",
            "/dev/null",
            &url,
        ],
    )?;
    let connection = agent.log.wait_for("the connection line", |e| e["event"] == "connection" && e["pid"] == pid)?;
    ensure!(connection["exe"] != curl, "without CAP_SYS_PTRACE the agent still read the exe: {connection}");
    Ok(())
}

fn manifests() -> Result<Vec<PathBuf>> {
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(workspace_root().join(KUBERNETES))?
        .map(|entry| entry.map(|entry| entry.path()))
        .filter(|path| path.as_ref().map_or(true, |path| path.extension().is_some_and(|e| e == "yaml")))
        .collect::<Result<_, _>>()?;
    manifests.sort();
    ensure!(manifests.len() >= 2, "deploy/kubernetes has the namespace and the DaemonSet");
    Ok(manifests)
}

/// `kubernetes-validate --strict` (unknown fields are errors) on `files`.
fn kubernetes_validate(files: &[PathBuf]) -> Result<Output> {
    Command::new(PYTHON)
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .output()
        .context("python3 -m kubernetes_validate (PyPI kubernetes-validate: run `cargo xtask setup`)")
}

#[test]
fn the_kubernetes_manifests_pass_the_schema_validator() -> Result<()> {
    let manifests = manifests()?;
    let output = kubernetes_validate(&manifests)?;
    let printed = text(&output);
    ensure!(output.status.success(), "kubernetes-validate: {printed}");
    // It validated each file, each against a schema.
    for manifest in &manifests {
        let name = manifest.file_name().unwrap().to_string_lossy();
        ensure!(
            printed.lines().any(|line| line.contains(&*name) && line.contains(" passed for resource ")),
            "kubernetes-validate did not report {name} as validated: {printed}"
        );
    }

    // The check can fail: a misspelt field of the DaemonSet is an error.
    let dir = TempDir::new("deploy-manifests")?;
    let daemonset = std::fs::read_to_string(workspace_root().join(KUBERNETES).join("daemonset.yaml"))?;
    let broken = dir.file("daemonset.yaml");
    std::fs::write(&broken, daemonset.replace("hostPID: true", "hostPid: true"))?;
    let output = kubernetes_validate(&[broken.into()])?;
    ensure!(!output.status.success() && text(&output).contains("'hostPid' was unexpected"), "{}", text(&output));
    Ok(())
}

/// A manifest of deploy/kubernetes, as JSON.
fn manifest(file: &str) -> Result<Value> {
    let script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let path = workspace_root().join(KUBERNETES).join(file);
    let output = run(PYTHON, &["-c", script, path.to_str().unwrap()])?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The DaemonSet's pod spec, as JSON.
fn daemonset_pod_spec() -> Result<Value> {
    let daemonset = manifest("daemonset.yaml")?;
    assert_eq!(daemonset["kind"], "DaemonSet");
    Ok(daemonset["spec"]["template"]["spec"].clone())
}

#[test]
fn the_daemonset_has_what_the_agent_needs_on_a_node() -> Result<()> {
    let spec = daemonset_pod_spec()?;
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["tolerations"][0]["operator"], "Exists", "runs on every node");
    let container = &spec["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);
    let probe = &container["livenessProbe"]["httpGet"];
    assert_eq!(
        (probe["host"].as_str(), probe["port"].as_u64(), probe["path"].as_str()),
        (Some("127.0.0.1"), Some(9464), Some("/metrics"))
    );
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let listen = args.iter().position(|a| *a == "--metrics-listen").context("--metrics-listen")?;
    assert_eq!(args[listen + 1], "127.0.0.1:9464", "the probe asks where the metrics listen");
    let volumes = spec["volumes"].as_array().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    for (host_path, propagation) in [
        ("/sys/fs/bpf", Some("Bidirectional")),
        ("/sys/fs/cgroup", None),
        ("/run/sandbox-egress", None),
        ("/var/lib/sandbox-egress", None),
        ("/etc/sandbox-egress/sandboxes", None),
        ("/run/netns", Some("HostToContainer")),
    ] {
        let volume = volumes.iter().find(|v| v["hostPath"]["path"] == host_path).context(host_path.to_owned())?;
        let mount =
            mounts.iter().find(|m| m["name"] == volume["name"]).with_context(|| format!("mount of {host_path}"))?;
        assert_eq!(mount["mountPath"], host_path, "mounted where the agent looks");
        assert_eq!(mount["mountPropagation"].as_str(), propagation, "{host_path}");
    }
    Ok(())
}

#[test]
fn the_daemonset_installs_the_seccomp_profile_that_the_example_pod_uses() -> Result<()> {
    let spec = daemonset_pod_spec()?;
    let init = &spec["initContainers"][0];
    let command: Vec<&str> = init["command"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let (source, target) = (command[command.len() - 2], command[command.len() - 1]);
    // The image has the profile where the init container copies it from.
    let containerfile = std::fs::read_to_string(workspace_root().join(KUBERNETES).join("Containerfile"))?;
    assert!(containerfile.contains(&format!("COPY {SECCOMP_PROFILE} {source}\n")), "{containerfile}");
    // It lands in the kubelet's profile directory, on the node.
    let mount = &init["volumeMounts"][0];
    let volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).context("volume")?;
    assert_eq!(volume["hostPath"]["path"], mount["mountPath"]);
    let relative = target.strip_prefix(KUBELET_SECCOMP_ROOT).context(target.to_owned())?;
    assert!(target.starts_with(mount["mountPath"].as_str().unwrap()), "{target}");
    // The example pod asks for it by that path, as a non-root user without
    // privilege escalation (no_new_privs).
    let pod = manifest("sandboxed-pod.yaml")?;
    let security = &pod["spec"]["securityContext"];
    assert_eq!(security["seccompProfile"]["type"], "Localhost");
    assert_eq!(security["seccompProfile"]["localhostProfile"], relative);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"], false);
    Ok(())
}

/// Prints `NAME ok` or `NAME errno N` for a socket of each family.
const FAMILY_PROBE: &str = r#"
import socket
for name, family, kind in [("unix", 1, 1), ("inet", 2, 1), ("inet6", 10, 1), ("netlink", 16, 3), ("vsock", 40, 1),
                           ("packet", 17, 3), ("bluetooth", 31, 1), ("alg", 38, 5), ("tipc", 30, 4), ("zero", 0, 1),
                           ("above", 4096, 1), ("ax25", 3, 5), ("x25", 9, 5), ("key", 15, 3), ("rds", 21, 5)]:
    try:
        socket.socket(family, kind).close()
        print(name, "ok")
    except OSError as error:
        print(name, "errno", error.errno)
try:
    [s.close() for s in socket.socketpair(40, socket.SOCK_STREAM)]
    print("vsock-pair ok")
except OSError as error:
    print("vsock-pair errno", error.errno)
"#;

/// Runs the family probe as root in a runc container (a read-only rootfs
/// with the host's /usr), with `seccomp` as its profile; its output lines.
fn runc_probe(dir: &TempDir, name: &str, seccomp: Option<Value>) -> Result<Vec<String>> {
    let bundle = dir.path.join(name);
    let rootfs = bundle.join("rootfs");
    for sub in ["usr", "proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(rootfs.join(sub))?;
    }
    for (link, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        std::os::unix::fs::symlink(target, rootfs.join(link))?;
    }
    let bundle_str = bundle.to_str().unwrap();
    run("runc", &["spec", "--bundle", bundle_str]).context("runc (Debian package runc: run `cargo xtask setup`)")?;
    let path = bundle.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    config["root"] = serde_json::json!({"path": "rootfs", "readonly": true});
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!([PYTHON, "-c", FAMILY_PROBE]);
    config["mounts"].as_array_mut().unwrap().push(serde_json::json!(
        {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}
    ));
    // CAP_NET_RAW: packet sockets are refused by the profile, not for want of it.
    for set in ["bounding", "effective", "permitted"] {
        config["process"]["capabilities"][set].as_array_mut().unwrap().push("CAP_NET_RAW".into());
    }
    if let Some(seccomp) = seccomp {
        config["linux"]["seccomp"] = seccomp;
    }
    std::fs::write(&path, serde_json::to_string(&config)?)?;
    let id = format!("se-test-{}-{name}", std::process::id());
    let output = Command::new("runc").args(["run", "--bundle", bundle_str, &id]).stdin(Stdio::null()).output()?;
    ensure!(output.status.success(), "runc run: {}", text(&output));
    Ok(String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect())
}

#[test]
fn the_seccomp_profile_refuses_every_socket_family_but_four_in_a_runc_container() -> Result<()> {
    require_root();
    let dir = TempDir::new("deploy-seccomp")?;
    let profile: Value = serde_json::from_str(&std::fs::read_to_string(workspace_root().join(SECCOMP_PROFILE))?)?;
    let lines = runc_probe(&dir, "profiled", Some(profile))?;
    let allowed = ["unix ok", "inet ok", "inet6 ok", "netlink ok"];
    for line in &lines {
        let refused = line.ends_with(" errno 1");
        ensure!(allowed.contains(&line.as_str()) != refused, "{line}: {lines:?}");
    }
    assert_eq!(lines.len(), 16, "{lines:?}");
    // Without it, the container creates vsock and packet sockets.
    let lines = runc_probe(&dir, "unprofiled", None)?;
    assert!(lines.contains(&"vsock ok".into()) && lines.contains(&"packet ok".into()), "{lines:?}");
    Ok(())
}

fn register_pod() -> PathBuf {
    workspace_root().join(REGISTER_POD)
}

#[test]
fn register_pod_passes_bash_n_and_shellcheck() -> Result<()> {
    let script = register_pod();
    run("bash", &["-n", script.to_str().unwrap()])?;
    let output = Command::new("shellcheck")
        .arg(&script)
        .output()
        .context("shellcheck (Debian package shellcheck: run `cargo xtask setup`)")?;
    ensure!(output.status.success(), "shellcheck register-pod.sh: {}", text(&output));
    // shellcheck finds what it should.
    let dir = TempDir::new("deploy-shellcheck")?;
    let broken = dir.file("broken.sh");
    std::fs::write(&broken, "#!/bin/bash\nrm -rf $1/*\n")?;
    ensure!(!Command::new("shellcheck").arg(&broken).output()?.status.success(), "shellcheck passed an unquoted $1");
    Ok(())
}

/// register-pod.sh with DRY_RUN=1: (succeeded, stdout, stderr).
fn register_pod_dry_run(env: &[(&str, &str)], policy: &Path) -> Result<(bool, String, String)> {
    let output = Command::new("bash")
        .arg(register_pod())
        .args(["team-a", "agent-box", "box-1"])
        .arg(policy)
        .env("DRY_RUN", "1")
        .env("SANDBOX_EGRESS", "sandbox-egress")
        .envs(env.iter().copied())
        .output()?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

#[test]
fn register_pod_finds_the_pods_cgroup_and_network_namespace() -> Result<()> {
    require_root();
    // A pod as kubelet lays it out with the systemd cgroup driver, one
    // container process in the pod's own network namespace.
    let uid = "0b7d3c9e-5f41-4e2a-9c61-2f0a4b8d7e13";
    let root = Sandbox::new("deploy-kubepods")?;
    let class = root.child("kubepods-besteffort.slice")?;
    let pod = class.child(&format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")))?;
    let container = pod.child("cri-containerd-4f1c.scope")?;
    let mut process = container.command("unshare").args(["--net", "sleep", "60"]).spawn()?;
    let pid = process.id().to_string();
    let dir = TempDir::new("deploy-register")?;
    let policy = PathBuf::from(dir.file("policy.yaml"));
    std::fs::write(&policy, "version: 1\nnetwork_policies: {}\n")?;
    // unshare has made the namespace once its /proc/PID/ns/net differs.
    let host_netns = std::fs::read_link("/proc/self/ns/net")?;
    for _ in 0..100 {
        if std::fs::read_link(format!("/proc/{pid}/ns/net"))? != host_netns {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let expected = format!(
        "sandbox-egress sandbox add box-1 --cgroup {} --policy {} --netns /proc/{pid}/ns/net",
        pod.path_str(),
        policy.display()
    );

    let by_uid = register_pod_dry_run(&[("POD_UID", uid), ("CGROUP_ROOT", root.path_str())], &policy)?;
    let by_pid = register_pod_dry_run(&[("POD_PID", &pid), ("CGROUP_ROOT", CGROUP2_ROOT)], &policy)?;
    // A process outside any pod's cgroup is refused (its parent cgroup could
    // be the root: the whole node).
    let outside = std::process::id().to_string();
    let not_a_pod = register_pod_dry_run(&[("POD_PID", &outside), ("CGROUP_ROOT", CGROUP2_ROOT)], &policy)?;
    // A hostNetwork pod: in this (the node's) namespace, so no --netns.
    let mut host_network = container.command("sleep").arg("60").spawn()?;
    let host_network_pid = host_network.id().to_string();
    let in_node_netns =
        register_pod_dry_run(&[("POD_PID", &host_network_pid), ("CGROUP_ROOT", CGROUP2_ROOT)], &policy)?;
    for child in [&mut process, &mut host_network] {
        let _ = child.kill();
        let _ = child.wait();
    }

    assert_eq!(by_uid, (true, expected.clone(), by_uid.2.clone()), "by POD_UID: {}", by_uid.2);
    assert_eq!(by_pid, (true, expected.clone(), by_pid.2.clone()), "by POD_PID: {}", by_pid.2);
    let without_netns = expected.split(" --netns").next().unwrap().to_owned();
    assert_eq!(in_node_netns, (true, without_netns, in_node_netns.2.clone()), "hostNetwork: {}", in_node_netns.2);
    ensure!(!not_a_pod.0 && not_a_pod.2.contains("is not a pod's cgroup"), "{not_a_pod:?}");
    Ok(())
}
