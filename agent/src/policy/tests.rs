use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
};

use ipnet::IpNet;

use super::{Decision, Enforcement, Policy, Request};

const FIXTURE: &str = r#"
version: 1
network_policies:
  github:
    endpoints:
      - host: api.github.com
        port: 443
      - host: "*.githubusercontent.com"
        ports: [443, 80]
    binaries:
      - path: /usr/bin/git
      - path: /usr/lib/git-core/*
  wildcards:
    endpoints:
      - host: "*.example.com"
        port: 443
      - host: "**.deep.example.org"
        port: 443
      - host: "api-*.example.net"
        port: 443
      - host: "*.s3.*.amazonaws.com"
        port: 443
      - host: "**.svc.*.example.io"
        port: 443
      - host: "img-*.*.example.biz"
        port: 443
      - host: "static.example.*"
        port: 443
    binaries:
      - path: "/**"
  addresses:
    endpoints:
      - host: 192.0.2.10
        port: 22
      - host: "2001:db8::1"
        port: 22
      - allowed_ips: [10.0.0.0/8, 192.168.1.7]
        port: 5432
    binaries:
      - path: "/**"
  tools:
    endpoints:
      - host: tools.internal.test
        port: 8080
        tls: skip
        allowed_ips: [172.16.0.0/12]
    binaries:
      - path: /usr/bin/*
      - path: /opt/**
      - path: /usr/local/bin/node
  audited:
    endpoints:
      - host: audit.internal.test
        port: 443
        enforcement: audit
    binaries:
      - path: /usr/bin/curl
"#;

fn fixture() -> Policy {
    Policy::from_yaml(FIXTURE).expect("fixture loads")
}

fn load_error(yaml: &str) -> String {
    match Policy::from_yaml(yaml) {
        Ok(_) => panic!("expected an error loading:\n{yaml}"),
        Err(error) => format!("{error:#}"),
    }
}

/// One connection and what must come of it.
struct Case {
    name: &'static str,
    host: Option<&'static str>,
    ip: Option<&'static str>,
    port: u16,
    binary: Option<&'static str>,
    ancestors: &'static [&'static str],
    allow: bool,
    policy: Option<&'static str>,
    reason: Option<&'static str>,
    matched_binary: Option<&'static str>,
}

const DEFAULT_CASE: Case = Case {
    name: "",
    host: None,
    ip: None,
    port: 443,
    binary: None,
    ancestors: &[],
    allow: false,
    policy: None,
    reason: None,
    matched_binary: None,
};

fn evaluate(policy: &Policy, case: &Case) -> Decision {
    let ancestors: Vec<PathBuf> = case.ancestors.iter().map(PathBuf::from).collect();
    let ip: Option<IpAddr> = case.ip.map(|ip| ip.parse().expect("test ip parses"));
    let request = Request {
        host: case.host,
        ip,
        port: case.port,
        binary: case.binary.map(Path::new),
        ancestors: &ancestors,
        uid: 1000,
        cgroup_id: 42,
    };
    policy.evaluate(&request).expect("evaluation runs")
}

#[test]
fn decisions_follow_the_documented_semantics() {
    let cases = [
        Case {
            name: "exact host",
            host: Some("api.github.com"),
            binary: Some("/usr/bin/git"),
            allow: true,
            policy: Some("github"),
            matched_binary: Some("/usr/bin/git"),
            ..DEFAULT_CASE
        },
        Case {
            name: "host case-insensitive, trailing dot",
            host: Some("API.GitHub.COM."),
            binary: Some("/usr/bin/git"),
            allow: true,
            policy: Some("github"),
            matched_binary: Some("/usr/bin/git"),
            ..DEFAULT_CASE
        },
        Case {
            name: "exact host, other port",
            host: Some("api.github.com"),
            port: 8443,
            binary: Some("/usr/bin/git"),
            reason: Some("endpoint api.github.com:8443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "no policy matches",
            host: Some("unknown.test"),
            ip: Some("198.51.100.1"),
            binary: Some("/usr/bin/git"),
            reason: Some("endpoint unknown.test:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "binary denied",
            host: Some("api.github.com"),
            binary: Some("/usr/bin/python3"),
            reason: Some("binary '/usr/bin/python3' not allowed in policy 'github'"),
            ..DEFAULT_CASE
        },
        Case {
            name: "unknown binary denied",
            host: Some("api.github.com"),
            reason: Some("binary '(unknown)' not allowed in policy 'github'"),
            ..DEFAULT_CASE
        },
        Case {
            name: "ports list, first",
            host: Some("raw.githubusercontent.com"),
            port: 443,
            binary: Some("/usr/lib/git-core/git-remote-https"),
            allow: true,
            policy: Some("github"),
            matched_binary: Some("/usr/lib/git-core/*"),
            ..DEFAULT_CASE
        },
        Case {
            name: "ports list, second",
            host: Some("raw.githubusercontent.com"),
            port: 80,
            binary: Some("/usr/bin/git"),
            allow: true,
            policy: Some("github"),
            matched_binary: Some("/usr/bin/git"),
            ..DEFAULT_CASE
        },
        Case {
            name: "ports list, unlisted port",
            host: Some("raw.githubusercontent.com"),
            port: 8080,
            binary: Some("/usr/bin/git"),
            reason: Some("endpoint raw.githubusercontent.com:8080 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "single-label wildcard",
            host: Some("a.example.com"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "single-label wildcard excludes the domain itself",
            host: Some("example.com"),
            reason: Some("endpoint example.com:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "single-label wildcard excludes two labels",
            host: Some("a.b.example.com"),
            reason: Some("endpoint a.b.example.com:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "multi-label wildcard, one label",
            host: Some("x.deep.example.org"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "multi-label wildcard, several labels",
            host: Some("a.b.deep.example.org"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "multi-label wildcard excludes the domain itself",
            host: Some("deep.example.org"),
            reason: Some("endpoint deep.example.org:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "wildcard within a label",
            host: Some("api-eu.example.net"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "wildcard within a label, other text",
            host: Some("web.example.net"),
            reason: Some("endpoint web.example.net:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "whole-label `*` past the first label",
            host: Some("bucket.s3.us-east-1.amazonaws.com"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "whole-label `*` past the first label, any case",
            host: Some("Bucket.S3.US-East-1.AmazonAWS.com."),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`*` past the first label is one label, not two",
            host: Some("bucket.s3.a.b.amazonaws.com"),
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint bucket.s3.a.b.amazonaws.com:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`*` past the first label is one label, not none",
            host: Some("bucket.s3.amazonaws.com"),
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint bucket.s3.amazonaws.com:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "first `*` is one label before a `*` past it",
            host: Some("a.b.s3.us-east-1.amazonaws.com"),
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint a.b.s3.us-east-1.amazonaws.com:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "fixed labels between `*` labels",
            host: Some("bucket.s4.us-east-1.amazonaws.com"),
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint bucket.s4.us-east-1.amazonaws.com:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`**` first, `*` past it",
            host: Some("a.b.svc.eu.example.io"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`**` first takes at least one label",
            host: Some("svc.eu.example.io"),
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint svc.eu.example.io:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`*` within the first label, `*` past it",
            host: Some("img-7.eu.example.biz"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`*` within the first label, other text",
            host: Some("img.eu.example.biz"),
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint img.eu.example.biz:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`*` as the last label",
            host: Some("static.example.fr"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("wildcards"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`*` as the last label is one label",
            host: Some("static.example.co.uk"),
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint static.example.co.uk:443 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "`/**` needs a known executable",
            host: Some("a.example.com"),
            reason: Some("binary '(unknown)' not allowed in policy 'wildcards'"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IP-literal endpoint, opaque TCP",
            ip: Some("192.0.2.10"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IP-literal endpoint, IPv6",
            ip: Some("2001:db8:0::1"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IP-literal endpoint, IPv4-mapped address",
            ip: Some("::ffff:192.0.2.10"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IP literal given as host",
            host: Some("192.0.2.10"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "a name is not an IP-literal endpoint, whatever it resolves to",
            host: Some("ssh.example.test"),
            ip: Some("192.0.2.10"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint ssh.example.test:22 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IP literal given as host, compared as written",
            host: Some("192.0.2.10"),
            ip: Some("198.51.100.9"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IP literal given as host, another address",
            host: Some("192.0.2.99"),
            ip: Some("192.0.2.10"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint 192.0.2.99:22 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IPv4-mapped literal host is its IPv4 address",
            host: Some("::ffff:192.0.2.10"),
            ip: Some("192.0.2.10"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "IPv6 literal host bracketed in the reason",
            host: Some("2001:db8::2"),
            port: 22,
            binary: Some("/usr/bin/curl"),
            reason: Some("endpoint [2001:db8::2]:22 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "hostless endpoint, address in allowed_ips",
            ip: Some("10.1.2.3"),
            port: 5432,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "hostless endpoint, single address in allowed_ips",
            ip: Some("192.168.1.7"),
            port: 5432,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "hostless endpoint, a name to an address in allowed_ips",
            host: Some("db.test"),
            ip: Some("10.1.2.3"),
            port: 5432,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "hostless endpoint, IPv4-mapped literal host and its address",
            host: Some("::ffff:10.1.2.3"),
            ip: Some("10.1.2.3"),
            port: 5432,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "hostless endpoint, IPv4-mapped literal host alone",
            host: Some("::ffff:10.1.2.3"),
            port: 5432,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("addresses"),
            matched_binary: Some("/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "hostless endpoint, address outside allowed_ips",
            ip: Some("11.0.0.1"),
            port: 5432,
            reason: Some("endpoint 11.0.0.1:5432 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "no host, IPv6 address bracketed in the reason",
            ip: Some("2001:db8::2"),
            port: 5432,
            reason: Some("endpoint [2001:db8::2]:5432 is not allowed by any policy"),
            ..DEFAULT_CASE
        },
        Case {
            name: "glob `*` matches one segment",
            host: Some("tools.internal.test"),
            port: 8080,
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("tools"),
            matched_binary: Some("/usr/bin/*"),
            ..DEFAULT_CASE
        },
        Case {
            name: "glob `*` does not cross segments",
            host: Some("tools.internal.test"),
            port: 8080,
            binary: Some("/usr/bin/x/y"),
            reason: Some("binary '/usr/bin/x/y' not allowed in policy 'tools'"),
            ..DEFAULT_CASE
        },
        Case {
            name: "glob `**` matches deep paths",
            host: Some("tools.internal.test"),
            port: 8080,
            binary: Some("/opt/vendor/tool/bin/run"),
            allow: true,
            policy: Some("tools"),
            matched_binary: Some("/opt/**"),
            ..DEFAULT_CASE
        },
        Case {
            name: "ancestor matches",
            host: Some("tools.internal.test"),
            port: 8080,
            binary: Some("/home/user/.venv/python3"),
            ancestors: &["/bin/sh", "/usr/local/bin/node"],
            allow: true,
            policy: Some("tools"),
            matched_binary: Some("/usr/local/bin/node"),
            ..DEFAULT_CASE
        },
        Case {
            name: "no ancestor matches",
            host: Some("tools.internal.test"),
            port: 8080,
            binary: Some("/home/user/.venv/python3"),
            ancestors: &["/bin/sh", "/sbin/init"],
            reason: Some("binary '/home/user/.venv/python3' not allowed in policy 'tools'"),
            ..DEFAULT_CASE
        },
        Case {
            name: "audit endpoint, binary listed",
            host: Some("audit.internal.test"),
            binary: Some("/usr/bin/curl"),
            allow: true,
            policy: Some("audited"),
            matched_binary: Some("/usr/bin/curl"),
            ..DEFAULT_CASE
        },
        Case {
            name: "audit endpoint, binary not listed: audit is for L7 requests",
            host: Some("audit.internal.test"),
            binary: Some("/usr/bin/wget"),
            reason: Some("binary '/usr/bin/wget' not allowed in policy 'audited'"),
            ..DEFAULT_CASE
        },
        Case {
            name: "host that is not a DNS name",
            host: Some("evil.test/x"),
            ip: Some("198.51.100.1"),
            reason: Some("host 'evil.test/x' is not a valid DNS name"),
            ..DEFAULT_CASE
        },
    ];
    let policy = fixture();
    for case in &cases {
        let decision = evaluate(&policy, case);
        assert_eq!(decision.allow, case.allow, "{}: {decision:?}", case.name);
        assert!(!decision.audit, "{}: {decision:?}", case.name);
        assert_eq!(decision.policy.as_deref(), case.policy, "{}: {decision:?}", case.name);
        assert_eq!(decision.reason.as_deref(), case.reason, "{}: {decision:?}", case.name);
        assert_eq!(decision.matched_binary.as_deref(), case.matched_binary, "{}: {decision:?}", case.name);
        assert_eq!(decision.endpoint.is_some(), case.allow, "{}: {decision:?}", case.name);
    }
}

#[test]
fn decision_carries_the_matched_endpoint_and_path() {
    let decision = evaluate(
        &fixture(),
        &Case {
            host: Some("tools.internal.test"),
            port: 8080,
            binary: Some("/home/user/.venv/python3"),
            ancestors: &["/bin/sh", "/usr/local/bin/node"],
            ..DEFAULT_CASE
        },
    );
    assert_eq!(decision.matched_exe.as_deref(), Some("/usr/local/bin/node"));
    let endpoint = decision.endpoint.expect("allowed decisions carry their endpoint");
    assert_eq!(endpoint.host.as_deref(), Some("tools.internal.test"));
    assert_eq!(endpoint.ports, [8080]);
    assert!(endpoint.tls_skip);
    assert_eq!(endpoint.enforcement, Enforcement::Enforce);
    assert_eq!(endpoint.allowed_ips, ["172.16.0.0/12".parse::<IpNet>().expect("valid net")]);
}

#[test]
fn executable_match_is_preferred_over_ancestor() {
    let decision = evaluate(
        &fixture(),
        &Case {
            host: Some("tools.internal.test"),
            port: 8080,
            binary: Some("/usr/local/bin/node"),
            ancestors: &["/usr/bin/bash"],
            ..DEFAULT_CASE
        },
    );
    assert_eq!(decision.matched_binary.as_deref(), Some("/usr/local/bin/node"));
    assert_eq!(decision.matched_exe.as_deref(), Some("/usr/local/bin/node"));
}

#[test]
fn every_policy_denying_the_binary_is_named() {
    let policy = Policy::from_yaml(
        r#"
version: 1
network_policies:
  b-second:
    endpoints: [{ host: api.test, port: 443 }]
    binaries: [{ path: /usr/bin/curl }]
  a-first:
    endpoints: [{ host: api.test, port: 443 }]
    binaries: [{ path: /usr/bin/wget }]
"#,
    )
    .expect("loads");
    let decision = evaluate(&policy, &Case { host: Some("api.test"), binary: Some("/bin/nc"), ..DEFAULT_CASE });
    assert_eq!(
        decision.reason.as_deref(),
        Some("binary '/bin/nc' not allowed in policy 'a-first'; binary '/bin/nc' not allowed in policy 'b-second'")
    );
}

#[test]
fn absent_or_empty_binaries_allow_no_binary() {
    for binaries in ["", "    binaries: []\n"] {
        let policy = Policy::from_yaml(&format!(
            "version: 1\nnetwork_policies:\n  locked:\n    endpoints: [{{ host: api.test, port: 443 }}]\n{binaries}"
        ))
        .expect("loads");
        let decision =
            evaluate(&policy, &Case { host: Some("api.test"), binary: Some("/usr/bin/curl"), ..DEFAULT_CASE });
        assert_eq!(decision.reason.as_deref(), Some("binary '/usr/bin/curl' not allowed in policy 'locked'"));
        let warning = "policy 'locked' has no `binaries`: no binary may use its endpoints";
        assert_eq!(policy.warnings, [warning], "{binaries:?}");
        let summary = policy.summary();
        assert!(summary.contains("  binaries: none\n") && summary.contains(warning), "{summary}");
    }
}

#[test]
fn ancestors_are_needed_unless_every_policy_takes_any_binary() {
    let load = |yaml: &str| Policy::from_yaml(&format!("version: 1\nnetwork_policies:\n{yaml}")).expect("loads");
    let any = "  any:\n    endpoints: [{ host: a.test, port: 443 }]\n    binaries: [{ path: /usr/bin/git }, { path: '/**' }]\n";
    let git = "  git:\n    endpoints: [{ host: g.test, port: 443 }]\n    binaries: [{ path: /usr/bin/git }]\n";
    let unused = "  unused:\n    endpoints: []\n    binaries: [{ path: /usr/bin/git }]\n";
    assert!(!load("  {}").matches_binaries());
    assert!(!load(any).matches_binaries());
    assert!(!load(&format!("{any}{unused}")).matches_binaries());
    assert!(load(&format!("{any}{git}")).matches_binaries());
    // `/**` matches an executable before any of its ancestors.
    let decision = evaluate(
        &load(any),
        &Case { host: Some("a.test"), binary: Some("/usr/bin/curl"), ancestors: &["/usr/bin/git"], ..DEFAULT_CASE },
    );
    assert_eq!(
        (decision.matched_binary.as_deref(), decision.matched_exe.as_deref()),
        (Some("/**"), Some("/usr/bin/curl"))
    );
}

#[test]
fn an_exact_binary_path_also_matches_where_its_symlinks_lead() {
    let dir = std::env::temp_dir().join(format!("sandbox-egress-symlink-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir created");
    let target = dir.join("python3.11");
    std::fs::write(&target, "").expect("target written");
    let link = dir.join("python3");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).expect("symlink made");
    let policy = Policy::from_yaml(&format!(
        "version: 1\nnetwork_policies:\n  py:\n    endpoints: [{{ host: api.test, port: 443 }}]\n    binaries: [{{ path: '{}' }}]\n",
        link.display()
    ));
    let resolved = std::fs::canonicalize(&target).expect("target resolves");
    std::fs::remove_dir_all(&dir).expect("temp dir removed");
    let policy = policy.expect("loads");
    let resolved = resolved.to_str().expect("UTF-8 path");
    let link = link.to_str().expect("UTF-8 path");

    let decide = |policy: &Policy, binary: &str, ancestors: &[&str]| {
        let ancestors: Vec<PathBuf> = ancestors.iter().map(PathBuf::from).collect();
        let request = Request {
            host: Some("api.test"),
            ip: None,
            port: 443,
            binary: Some(Path::new(binary)),
            ancestors: &ancestors,
            uid: 1000,
            cgroup_id: 42,
        };
        policy.evaluate(&request).expect("evaluation runs")
    };
    for (binary, ancestors) in [(resolved, &[][..]), ("/usr/bin/bash", &[resolved][..]), (link, &[][..])] {
        let decision = decide(&policy, binary, ancestors);
        assert!(decision.allow, "{binary}: {decision:?}");
        // The entry as written, and the path it matched.
        assert_eq!(decision.matched_binary.as_deref(), Some(link), "{binary}");
        let exe = if binary == link { link } else { resolved };
        assert_eq!(decision.matched_exe.as_deref(), Some(exe), "{binary}");
    }
    // An entry of its own for the target is named as written.
    let both = Policy::from_yaml(&format!(
        "version: 1\nnetwork_policies:\n  py:\n    endpoints: [{{ host: api.test, port: 443 }}]\n    binaries: [{{ path: '{link}' }}, {{ path: '{resolved}' }}]\n"
    ))
    .expect("loads");
    assert_eq!(decide(&both, resolved, &[]).matched_binary.as_deref(), Some(resolved));
}

#[test]
fn request_without_host_or_address_is_an_error() {
    let request = Request { host: None, ip: None, port: 443, binary: None, ancestors: &[], uid: 0, cgroup_id: 0 };
    assert!(fixture().evaluate(&request).is_err());
}

#[test]
fn bare_and_top_level_wildcards_are_rejected() {
    for (host, expected) in [
        ("*", "would match every host"),
        ("**", "would match every host"),
        ("*.com", "top-level domain"),
        ("**.com", "top-level domain"),
        ("example.*", "top-level domain"),
        ("a.b*c.example.com", "a wildcard must be a whole label `*`"),
        ("*.s3.us-*.amazonaws.com", "a wildcard must be a whole label `*`"),
        ("a.**.example.com", "a wildcard must be a whole label `*`"),
        ("*a*.example.com", "a single `*`"),
        ("*.s3.*.a_b$.com", "not a valid DNS name"),
    ] {
        let error = load_error(&format!(
            "version: 1\nnetwork_policies:\n  p:\n    endpoints: [{{ host: '{host}', port: 443 }}]\n"
        ));
        assert!(error.contains("network_policies.p.endpoints[0].host"), "{host}: {error}");
        assert!(error.contains(expected), "{host}: {error}");
    }
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let error = load_error("version: 1\nnetwork_policies:\n  p:\n    endpoints: [{ hots: api.test, port: 443 }]\n");
    assert!(error.contains("unknown field `hots`"), "{error}");
    assert!(error.contains("network_policies.p.endpoints[0]"), "{error}");

    let error = load_error("version: 1\nnetwork_policy: {}\n");
    assert!(error.contains("unknown field `network_policy`"), "{error}");

    let error =
        load_error("version: 1\nnetwork_policies:\n  p:\n    endpoints: []\n    binaries: [{ pth: /bin/sh }]\n");
    assert!(error.contains("unknown field `pth`"), "{error}");

    for (options, key) in [
        ("json_rpc: { max_body_bytes: 1024, max_bytes: 1 }", "max_bytes"),
        ("mcp: { strict_tool_names: false, allow_all: true }", "allow_all"),
        ("credential_binding: { provider: github, scope: repo }", "scope"),
    ] {
        let error = load_error(&format!(
            "version: 1\nnetwork_policies:\n  p:\n    endpoints: [{{ host: api.test, port: 443, {options} }}]\n"
        ));
        assert!(error.contains(&format!("unknown field `{key}`")), "{options}: {error}");
        assert!(error.contains("network_policies.p.endpoints[0]"), "{options}: {error}");
    }
}

#[test]
fn invalid_values_are_errors_naming_the_value() {
    for (endpoint, expected) in [
        ("{ host: api.test }", "`port` or `ports` is required"),
        ("{ host: api.test, ports: [] }", "must not be empty"),
        ("{ host: api.test, port: 0 }", "port 0"),
        ("{ host: api.test, ports: [443, 0] }", "port 0"),
        ("{ host: api.test, port: 70000 }", "70000"),
        ("{ host: api.test, port: 443, protocol: ftp }", "unknown variant `ftp`"),
        ("{ host: api.test, port: 443, json_rpc: { max_body_bytes: -1 } }", "max_body_bytes"),
        ("{ host: api.test, port: 443, mcp: { strict_tool_names: maybe } }", "strict_tool_names"),
        ("{ host: 'api test', port: 443 }", "'api test' is not a valid DNS name"),
        ("{ port: 443 }", "needs a `host`, or `allowed_ips`"),
    ] {
        let error = load_error(&format!("version: 1\nnetwork_policies:\n  p:\n    endpoints: [{endpoint}]\n"));
        assert!(error.contains("network_policies.p.endpoints[0]"), "{endpoint}: {error}");
        assert!(error.contains(expected), "{endpoint}: {error}");
    }
    let error = load_error("version: 2\n");
    assert!(error.contains("unsupported policy version 2"), "{error}");
}

#[test]
fn allowed_ips_must_parse() {
    for net in ["10.0.0.0/33", "not-an-ip", "10.0.0.0/8/8", "300.1.2.3"] {
        let error = load_error(&format!(
            "version: 1\nnetwork_policies:\n  p:\n    endpoints: [{{ port: 443, allowed_ips: [192.0.2.0/24, '{net}'] }}]\n"
        ));
        assert!(error.contains("network_policies.p.endpoints[0].allowed_ips[1]"), "{net}: {error}");
        assert!(error.contains(&format!("'{net}' is not an IP address or CIDR")), "{net}: {error}");
    }
}

#[test]
fn allowed_ips_are_normalised() {
    let policy = Policy::from_yaml(
        "version: 1\nnetwork_policies:\n  db:\n    endpoints: [{ port: 5432, allowed_ips: [10.1.2.3/8, '2001:db8::7'] }]\n    binaries: [{ path: /usr/bin/psql }]\n",
    )
    .expect("loads");
    let case = Case { ip: Some("10.200.0.1"), port: 5432, binary: Some("/usr/bin/psql"), ..DEFAULT_CASE };
    let decision = evaluate(&policy, &case);
    let expected: Vec<IpNet> =
        ["10.0.0.0/8", "2001:db8::7/128"].iter().map(|net| net.parse().expect("valid net")).collect();
    assert_eq!(decision.endpoint.expect("allowed").allowed_ips, expected);
}

#[test]
fn binary_paths_must_be_absolute_and_globs_valid() {
    let error = load_error("version: 1\nnetwork_policies:\n  p:\n    endpoints: []\n    binaries: [{ path: curl }]\n");
    assert!(error.contains("network_policies.p.binaries: 'curl' is not an absolute path"), "{error}");
    let error =
        load_error("version: 1\nnetwork_policies:\n  p:\n    endpoints: []\n    binaries: [{ path: '/usr/bin/[*' }]\n");
    assert!(error.contains("'/usr/bin/[*' is not a valid glob"), "{error}");
}

#[test]
fn other_openshell_sections_are_accepted_and_reported() {
    let policy = Policy::from_yaml(
        r#"
version: 1
filesystem_policy:
  include_workdir: true
  read_only: [/usr, /lib]
  read_write: [/sandbox, /tmp]
landlock:
  compatibility: best_effort
process:
  run_as_user: sandbox
  run_as_group: sandbox
network_policies: {}
"#,
    )
    .expect("loads");
    for section in ["filesystem_policy", "landlock", "process"] {
        let reports = policy.warnings.iter().filter(|warning| warning.contains(&format!("`{section}`"))).count();
        assert_eq!(reports, 1, "{section}: {:?}", policy.warnings);
    }
    assert!(policy.summary().contains("section `landlock` is not enforced"));
}

#[test]
fn fields_not_yet_enforced_are_reported_once_per_field_and_policy() {
    let policy = Policy::from_yaml(
        r#"
version: 1
network_policies:
  data:
    endpoints:
      - host: db.example.test
        port: 5432
        protocol: sql
        rules:
          - allow: { command: SELECT }
        credential_signing: { service: s3 }
      - host: replica.example.test
        port: 5432
        protocol: sql
        access: read-only
      - host: api.github.com
        port: 443
        protocol: graphql
        access: read-only
        request_body_credential_rewrite: true
      - host: codeload.github.com
        port: 443
        protocol: REST
        access: read-only
    binaries: [{ path: /usr/bin/gh }]
"#,
    )
    .expect("loads");
    let warnings_for = |field: &str| {
        policy.warnings.iter().filter(|warning| warning.contains(&format!("`{field}` is not yet enforced"))).count()
    };
    assert_eq!(warnings_for("protocol"), 1, "{:?}", policy.warnings);
    assert_eq!(warnings_for("access"), 1, "{:?}", policy.warnings);
    assert_eq!(warnings_for("rules"), 1, "{:?}", policy.warnings);
    assert_eq!(warnings_for("credential_signing"), 1, "{:?}", policy.warnings);
    assert!(policy.warnings.iter().any(|warning| warning.contains("`protocol` is not yet enforced (endpoints 0, 1)")));
    assert!(
        policy.warnings.iter().any(|warning| warning
            .contains("endpoint 2 has `request_body_credential_rewrite`, which only rest endpoints read: ignored")),
        "{:?}",
        policy.warnings
    );

    let gh = Some("/usr/bin/gh");
    let case = |host| Case { host: Some(host), port: 5432, binary: gh, ..DEFAULT_CASE };
    let decision = evaluate(&policy, &case("db.example.test"));
    assert!(decision.inspect.is_none(), "SQL is decided at L4 only");
    let endpoint = decision.endpoint.expect("allowed");
    assert_eq!(endpoint.not_enforced, ["protocol", "rules", "credential_signing"]);
    assert_eq!(endpoint.protocol.as_deref(), Some("sql"));
    let graphql = evaluate(&policy, &Case { host: Some("api.github.com"), binary: gh, ..DEFAULT_CASE });
    assert_eq!(graphql.inspect.expect("GraphQL is inspected").protocol, "graphql");
    let codeload = evaluate(&policy, &Case { host: Some("codeload.github.com"), binary: gh, ..DEFAULT_CASE });
    assert!(codeload.inspect.is_some(), "REST, in any case, is inspected");
    assert!(codeload.endpoint.expect("allowed").not_enforced.is_empty());

    let summary = policy.summary();
    assert!(
        summary.contains("db.example.test:5432 protocol sql (not yet enforced: protocol, rules, credential_signing)"),
        "{summary}"
    );
    assert!(
        summary.contains("api.github.com:443 protocol graphql inspected (graphql, access: read-only)"),
        "{summary}"
    );
    assert!(summary.contains("codeload.github.com:443 protocol rest inspected (rest, access: read-only)"), "{summary}");
}

#[test]
fn ports_win_over_port_as_in_openshell() {
    let policy = Policy::from_yaml(
        "version: 1\nnetwork_policies:\n  p:\n    endpoints:\n      - { host: a.test, port: 443, ports: [8443, 9443] }\n      - { host: b.test, port: 443, ports: [] }\n    binaries: [{ path: '/**' }]\n",
    )
    .expect("loads");
    let allowed = |host: &'static str, port: u16| {
        evaluate(&policy, &Case { host: Some(host), port, binary: Some("/usr/bin/curl"), ..DEFAULT_CASE }).allow
    };
    assert!(allowed("a.test", 8443) && allowed("a.test", 9443) && !allowed("a.test", 443));
    assert!(allowed("b.test", 443), "an empty `ports` leaves `port`");
    assert_eq!(
        policy.warnings,
        ["policy 'p': `port` is ignored where `ports` is set too (endpoint 0), as in OpenShell"]
    );
}

#[test]
fn tls_and_enforcement_values_are_compared_exactly_as_in_openshell() {
    let policy = Policy::from_yaml(
        r#"
version: 1
network_policies:
  p:
    endpoints:
      - { host: a.test, port: 443, tls: skip, enforcement: audit }
      - { host: b.test, port: 443, tls: SKIP, enforcement: Enforce }
      - { host: c.test, port: 443, tls: terminate, enforcement: enforce }
      - { host: d.test, port: 443, tls: maybe, enforcement: block }
      - { host: e.test, port: 443 }
    binaries: [{ path: "/**" }]
"#,
    )
    .expect("loads");
    let endpoint = |host: &'static str| {
        let decision = evaluate(&policy, &Case { host: Some(host), binary: Some("/usr/bin/curl"), ..DEFAULT_CASE });
        let endpoint = decision.endpoint.expect("allowed");
        (endpoint.tls_skip, endpoint.enforcement)
    };
    assert_eq!(endpoint("a.test"), (true, Enforcement::Audit));
    assert_eq!(endpoint("b.test"), (false, Enforcement::Audit));
    assert_eq!(endpoint("c.test"), (false, Enforcement::Enforce));
    assert_eq!(endpoint("d.test"), (false, Enforcement::Audit));
    assert_eq!(endpoint("e.test"), (false, Enforcement::Enforce));
    assert_eq!(
        policy.warnings,
        [
            "policy 'p': `tls: SKIP` has no effect: OpenShell compares exactly, and only `skip` does anything",
            "policy 'p': `tls: maybe` has no effect: OpenShell compares exactly, and only `skip` does anything",
            "policy 'p': `tls: terminate` is deprecated and has no effect",
            "policy 'p': `enforcement: Enforce` means `audit`: OpenShell compares exactly, and only `enforce` enforces",
            "policy 'p': `enforcement: block` means `audit`: OpenShell compares exactly, and only `enforce` enforces",
        ]
    );
}

#[test]
fn l7_options_of_openshells_schema_load() {
    let policy = Policy::from_yaml(
        r#"
version: 1
network_policies:
  p:
    endpoints:
      - host: rpc.test
        port: 443
        protocol: JSON-RPC
        json_rpc: { max_body_bytes: 131072 }
        rules: [{ allow: { method: "*" } }]
      - host: mcp.test
        port: 443
        protocol: MCP
        mcp: { max_body_bytes: 131072, strict_tool_names: false, allow_all_known_mcp_methods: true }
    binaries: [{ path: "/**" }]
"#,
    )
    .expect("loads");
    let summary = policy.summary();
    assert!(summary.contains("rpc.test:443 protocol json-rpc inspected (json-rpc, 1 rule)"), "{summary}");
    assert!(
        summary.contains("mcp.test:443 protocol mcp inspected (mcp, mcp.allow_all_known_mcp_methods)"),
        "{summary}"
    );
    let endpoints = &policy.policies["p"].endpoints;
    let limits: Vec<usize> =
        endpoints.iter().map(|endpoint| endpoint.inspection.as_ref().unwrap().messages.max_body_bytes).collect();
    assert_eq!(limits, [131072, 131072]);
    assert!(!endpoints[1].inspection.as_ref().unwrap().messages.strict_tool_names);
}

#[test]
fn summary_lists_policies_endpoints_and_binaries() {
    let summary = fixture().summary();
    assert!(summary.starts_with("5 network policies, 14 endpoints\n"), "{summary}");
    assert!(summary.contains("policy 'github'\n  endpoint api.github.com:443\n"), "{summary}");
    assert!(summary.contains("  endpoint *.githubusercontent.com:80,443\n"), "{summary}");
    assert!(summary.contains("  endpoint [2001:db8::1]:22\n"), "{summary}");
    assert!(summary.contains("  endpoint (any host):5432 allowed_ips 10.0.0.0/8,192.168.1.7/32\n"), "{summary}");
    assert!(summary.contains("  endpoint audit.internal.test:443 audit\n"), "{summary}");
    assert!(summary.contains("  binaries: /usr/bin/git, /usr/lib/git-core/*\n"), "{summary}");
    assert!(summary.contains("policy 'wildcards'\n"), "{summary}");
    assert!(summary.contains("  endpoint *.s3.*.amazonaws.com:443\n"), "{summary}");
    assert!(summary.contains("  binaries: /**\n"), "{summary}");
}

#[test]
fn file_errors_name_the_file() {
    let path = std::env::temp_dir().join(format!("sandbox-egress-policy-test-{}.yaml", std::process::id()));
    std::fs::write(&path, "version: 1\nnetwork_policies:\n  p:\n    endpoints: [{ host: '*', port: 443 }]\n")
        .expect("temp file written");
    let error = Policy::from_file(&path).err().map(|error| format!("{error:#}"));
    std::fs::remove_file(&path).expect("temp file removed");
    let error = error.expect("loading fails");
    assert!(error.contains(&path.display().to_string()), "{error}");
    assert!(error.contains("network_policies.p.endpoints[0].host"), "{error}");

    let missing = Path::new("/nonexistent/sandbox-egress/policy.yaml");
    let error = Policy::from_file(missing).err().map(|error| format!("{error:#}")).expect("loading fails");
    assert!(error.contains("/nonexistent/sandbox-egress/policy.yaml"), "{error}");
}

#[test]
fn shipped_policies_load() {
    let default = Policy::from_yaml(include_str!("../../../policies/default.yaml")).expect("default.yaml loads");
    let decision =
        evaluate(&default, &Case { host: Some("example.com"), binary: Some("/usr/bin/curl"), ..DEFAULT_CASE });
    assert!(!decision.allow, "the default policy allows nothing: {decision:?}");

    let openshell = Policy::from_yaml(include_str!("../../../policies/examples/openshell.yaml"))
        .expect("examples/openshell.yaml loads");
    let decision =
        evaluate(&openshell, &Case { host: Some("api.github.com"), binary: Some("/usr/bin/git"), ..DEFAULT_CASE });
    assert!(decision.allow, "{decision:?}");
    assert!(!openshell.warnings.is_empty());
}

#[test]
fn policy_is_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();

    let policy = Arc::new(fixture());
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let policy = Arc::clone(&policy);
            thread::spawn(move || {
                (0..50).all(|round| {
                    let allowed_host = (worker + round) % 2 == 0;
                    let host = if allowed_host { "api.github.com" } else { "unknown.test" };
                    let case = Case { host: Some(host), binary: Some("/usr/bin/git"), ..DEFAULT_CASE };
                    evaluate(&policy, &case).allow == allowed_host
                })
            })
        })
        .collect();
    for worker in workers {
        assert!(worker.join().expect("worker finishes"));
    }
}

#[test]
fn names_host_follows_the_connection_matcher_without_ports_or_binaries() {
    let policy = fixture();
    for named in [
        "api.github.com",
        "API.GitHub.com.",
        "raw.githubusercontent.com",
        "a.example.com",
        "x.y.deep.example.org",
        "api-v2.example.net",
        "bucket.s3.eu-west-1.amazonaws.com",
        "static.example.fr",
        "tools.internal.test",
        "audit.internal.test",
    ] {
        assert!(policy.names_host(named).unwrap(), "{named}");
    }
    for other in [
        "github.com",
        "example.com",
        "a.b.example.com",
        "deep.example.org",
        "web-v2.example.net",
        "bucket.s3.amazonaws.com",
        "static.example.co.uk",
        "192.0.2.10",
        "2001:db8::1",
        "evil.test",
        "bad\nname.example.com",
        "",
    ] {
        assert!(!policy.names_host(other).unwrap(), "{other:?}");
    }
}

fn opaque(ip: &str, port: u16, binary: &'static str) -> Request<'static> {
    Request {
        host: None,
        ip: Some(ip.parse().unwrap()),
        port,
        binary: Some(Path::new(binary)),
        ancestors: &[],
        uid: 1000,
        cgroup_id: 7,
    }
}

#[test]
fn streams_without_a_host_are_decided_by_the_names_resolved_to_the_address() {
    let policy = fixture();
    let names = |list: &[&str]| list.iter().map(|name| name.to_string()).collect::<Vec<_>>();
    let git = opaque("203.0.113.5", 443, "/usr/bin/git");

    let (decision, host) = policy.evaluate_resolved(&git, &names(&["api.github.com"])).unwrap();
    assert!(decision.allow, "{decision:?}");
    assert_eq!((decision.policy.as_deref(), host.as_deref()), (Some("github"), Some("api.github.com")));

    // Any allowed name allows the address; the one that did is returned.
    let (decision, host) =
        policy.evaluate_resolved(&git, &names(&["blocked.test", "raw.githubusercontent.com"])).unwrap();
    assert!(decision.allow);
    assert_eq!(host.as_deref(), Some("raw.githubusercontent.com"));

    // Each name is still held to its endpoint's ports and binaries.
    let (decision, host) =
        policy.evaluate_resolved(&opaque("203.0.113.5", 22, "/usr/bin/git"), &names(&["api.github.com"])).unwrap();
    assert!(!decision.allow && host.is_none());
    assert_eq!(decision.reason.as_deref(), Some("endpoint api.github.com:22 is not allowed by any policy"));
    let (decision, _) = policy
        .evaluate_resolved(&opaque("203.0.113.5", 443, "/usr/bin/python3"), &names(&["api.github.com", "blocked.test"]))
        .unwrap();
    assert_eq!(
        decision.reason.as_deref(),
        Some("binary '/usr/bin/python3' not allowed in policy 'github'; endpoint blocked.test:443 is not allowed by any policy")
    );

    // An audit endpoint allows no unlisted binary: the next name may.
    let python = opaque("203.0.113.5", 443, "/usr/bin/python3");
    let (decision, host) =
        policy.evaluate_resolved(&python, &names(&["audit.internal.test", "a.example.com"])).unwrap();
    assert!(decision.allow && !decision.audit);
    assert_eq!(host.as_deref(), Some("a.example.com"));
    let (decision, host) = policy.evaluate_resolved(&python, &names(&["audit.internal.test"])).unwrap();
    assert!(!decision.allow && !decision.audit && host.is_none());

    // The address's own IP-literal endpoint still matches along the names.
    let ssh = opaque("192.0.2.10", 22, "/usr/bin/ssh");
    let (decision, host) = policy.evaluate_resolved(&ssh, &names(&["blocked.test"])).unwrap();
    assert!(decision.allow, "{decision:?}");
    assert_eq!((decision.policy.as_deref(), host.as_deref()), (Some("addresses"), Some("blocked.test")));

    // No names: the address alone, as for any opaque stream.
    let (decision, host) = policy.evaluate_resolved(&git, &[]).unwrap();
    assert!(!decision.allow && host.is_none());
    assert_eq!(decision.reason.as_deref(), Some("endpoint 203.0.113.5:443 is not allowed by any policy"));
    let (decision, host) = policy.evaluate_resolved(&opaque("10.1.2.3", 5432, "/usr/bin/psql"), &[]).unwrap();
    assert!(decision.allow && host.is_none(), "allowed_ips still allow by address");
}

#[test]
fn only_the_most_recent_names_of_an_address_are_tried() {
    let policy = fixture();
    let mut resolved: Vec<String> = (0..super::MAX_RESOLVED_NAMES).map(|i| format!("n{i}.blocked.test")).collect();
    resolved.push("api.github.com".into());
    let (decision, _) = policy.evaluate_resolved(&opaque("203.0.113.5", 443, "/usr/bin/git"), &resolved).unwrap();
    assert!(!decision.allow);
    resolved.rotate_right(1);
    let (decision, _) = policy.evaluate_resolved(&opaque("203.0.113.5", 443, "/usr/bin/git"), &resolved).unwrap();
    assert!(decision.allow);
}

#[test]
fn cached_decisions_are_the_engines_and_the_cache_is_bounded() {
    let hosts = [Some("api.github.com"), Some("API.GitHub.COM."), Some("evil.example"), None];
    let ips = [None, Some("140.82.112.5"), Some("10.0.0.1")];
    let binaries = [None, Some("/usr/bin/git"), Some("/usr/bin/curl"), Some("/usr/bin/python3")];
    let cases: Vec<Case> = hosts
        .iter()
        .flat_map(|&host| ips.iter().map(move |&ip| (host, ip)))
        .filter(|(host, ip)| host.is_some() || ip.is_some())
        .flat_map(|(host, ip)| binaries.iter().map(move |&binary| (host, ip, binary)))
        .flat_map(|(host, ip, binary)| {
            [443, 22].map(|port| Case { name: "generated", host, ip, port, binary, ..DEFAULT_CASE })
        })
        .collect();
    let cached = fixture();
    let first: Vec<Decision> = cases.iter().map(|case| evaluate(&cached, case)).collect();
    let again: Vec<Decision> = cases.iter().map(|case| evaluate(&cached, case)).collect();
    // A fresh policy (as after a reload) decides anew, in the other order.
    let fresh = fixture();
    let mut anew: Vec<Decision> = cases.iter().rev().map(|case| evaluate(&fresh, case)).collect();
    anew.reverse();
    assert_eq!(first, again, "a cached decision differs from the one first made");
    assert_eq!(first, anew, "decisions depend on what was decided before");
    assert!(first.iter().any(|d| d.allow) && first.iter().any(|d| !d.allow), "the table has both outcomes");

    for port in 1..=(super::MAX_CACHED_DECISIONS as u16 + 10) {
        evaluate(&cached, &Case { host: Some("api.github.com"), port, ..DEFAULT_CASE });
    }
    assert!(cached.decisions.lock().unwrap().len() <= super::MAX_CACHED_DECISIONS);
}
