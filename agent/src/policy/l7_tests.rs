//! L7 decisions: a table of requests against rules, presets, deny rules,
//! endpoint paths, query matchers and audit, with paths canonicalised as the
//! agent does before deciding.

use std::path::{Path, PathBuf};

use super::{HttpRequest, Message, Policy, Request};
use crate::wire::path::canonicalize;

const RULES: &str = r#"
version: 1
network_policies:
  github:
    endpoints:
      - host: api.github.com
        port: 443
        protocol: rest
        access: read-write
        deny_rules:
          - method: POST
            path: "/repos/*/*/pulls/*/reviews"
          - method: "*"
            path: "/repos/*/rulesets"
          - method: DELETE
            path: "/**"
            query:
              force: "true"
    binaries:
      - path: /usr/bin/curl
  readonly:
    endpoints:
      - host: ro.example.test
        ports: [443, 8080]
        access: read-only
    binaries:
      - path: /usr/bin/curl
  full:
    endpoints:
      - host: full.example.test
        port: 443
        protocol: rest
        access: full
        deny_rules:
          - method: GET
            path: /admin/**
    binaries:
      - path: /usr/bin/curl
  git:
    endpoints:
      - host: git.example.test
        port: 443
        protocol: rest
        rules:
          - allow:
              method: GET
              path: /**/info/refs*
              query:
                service: "git-*"
          - allow:
              method: POST
              path: /**/git-upload-pack
          - allow:
              method: GET
              path: /tags
              query:
                tag:
                  any: ["v1.*", "v2.*"]
    binaries:
      - path: /usr/bin/curl
  split:
    endpoints:
      - host: split.example.test
        port: 443
        path: /v1/**
        access: read-only
      - host: split.example.test
        port: 443
        path: /upload/**
        rules:
          - allow: { method: PUT, path: "/upload/*" }
    binaries:
      - path: /usr/bin/curl
  audited:
    endpoints:
      - host: audit.example.test
        port: 443
        protocol: rest
        access: read-only
        enforcement: audit
        deny_rules:
          - method: GET
            path: /secret
    binaries:
      - path: /usr/bin/curl
  slashes:
    endpoints:
      - host: registry.example.test
        port: 443
        access: read-only
        allow_encoded_slash: true
    binaries:
      - path: /usr/bin/curl
"#;

/// `(allow, audit, rule)`; `rule` is the label that decided, or the
/// endpoint's rules when none matched, or `None` when no rule was reached.
type Expected = (bool, bool, Option<String>);

fn decide(
    policy: &Policy,
    host: &str,
    port: u16,
    method: &str,
    target: &str,
    binary: &str,
) -> Result<Expected, String> {
    let request = Request {
        host: Some(host),
        ip: None,
        port,
        binary: Some(Path::new(binary)),
        ancestors: &[] as &[PathBuf],
        uid: 1000,
        cgroup_id: 7,
    };
    let connection = policy.evaluate(&request).expect("evaluation runs");
    let inspection = connection.inspect.ok_or_else(|| format!("not inspected: {:?}", connection.reason))?;
    let canonical = canonicalize(target, inspection.allow_encoded_slash)?;
    let http = HttpRequest {
        method,
        path: &canonical.path,
        query: &canonical.query,
        message: &Message::Http,
        via_gate: false,
    };
    let decision = policy.evaluate_request(&request, &http).expect("evaluation runs");
    Ok((decision.allow, decision.audit, decision.rule))
}

#[test]
fn requests_are_decided_as_openshell_decides_them() {
    let policy = Policy::from_yaml(RULES).expect("loads");
    let allow = |rule: &str| Ok((true, false, Some(rule.to_owned())));
    let deny = |rule: &str| Ok((false, false, Some(rule.to_owned())));
    let audit = |rule: &str| Ok((true, true, Some(rule.to_owned())));
    // (host, port, method, target, outcome)
    type Case<'a> = (&'a str, u16, &'a str, &'a str, Result<Expected, String>);
    let cases: &[Case] = &[
        // Presets: read-write is GET, HEAD, OPTIONS, POST, PUT, PATCH.
        ("api.github.com", 443, "GET", "/repos/o/r", allow("access: read-write")),
        ("api.github.com", 443, "patch", "/repos/o/r", allow("access: read-write")),
        ("api.github.com", 443, "DELETE", "/repos/o/r", deny("access: read-write")),
        // Deny rules win over the preset; `*` in one segment only.
        ("api.github.com", 443, "POST", "/repos/o/r/pulls/1/reviews", deny("deny_rules[0]")),
        ("api.github.com", 443, "POST", "/repos/o/r/pulls/1/comments", allow("access: read-write")),
        ("api.github.com", 443, "PUT", "/repos/o/rulesets", deny("deny_rules[1]")),
        ("api.github.com", 443, "PUT", "/repos/o/x/rulesets", allow("access: read-write")),
        // A deny query matcher fires on any one matching value.
        ("ro.example.test", 443, "GET", "/a", allow("access: read-only")),
        ("ro.example.test", 8080, "OPTIONS", "/a", allow("access: read-only")),
        ("ro.example.test", 443, "POST", "/a", deny("access: read-only")),
        ("full.example.test", 443, "DELETE", "/x", allow("access: full")),
        ("full.example.test", 443, "HEAD", "/admin/users", deny("deny_rules[0]")),
        // Canonical paths: dot segments, doubled slashes and ;params cannot dodge a rule.
        ("full.example.test", 443, "GET", "/public/../admin/x", deny("deny_rules[0]")),
        ("full.example.test", 443, "GET", "//admin//x", deny("deny_rules[0]")),
        ("full.example.test", 443, "GET", "/admin;a=b/x", deny("deny_rules[0]")),
        ("full.example.test", 443, "GET", "/%61dmin/x", deny("deny_rules[0]")),
        ("full.example.test", 443, "GET", "/admin%2Fx", Err("encoded slash".into())),
        ("registry.example.test", 443, "GET", "/@scope%2Fname", allow("access: read-only")),
        // `**` across segments; allow query matchers need every value to match.
        ("git.example.test", 443, "GET", "/org/repo.git/info/refs?service=git-upload-pack", allow("rules[0]")),
        ("git.example.test", 443, "GET", "/org/repo.git/info/refs?service=evil", deny("3 rules")),
        ("git.example.test", 443, "GET", "/org/repo.git/info/refs", deny("3 rules")),
        ("git.example.test", 443, "GET", "/org/repo.git/info/refs?service=git-upload-pack&service=x", deny("3 rules")),
        ("git.example.test", 443, "POST", "/a/b/c/git-upload-pack", allow("rules[1]")),
        ("git.example.test", 443, "POST", "/a/b/c/git-receive-pack", deny("3 rules")),
        ("git.example.test", 443, "GET", "/tags?tag=v2.1", allow("rules[2]")),
        ("git.example.test", 443, "GET", "/tags?tag=v3.0", deny("3 rules")),
        // A GET rule covers HEAD.
        ("git.example.test", 443, "HEAD", "/tags?tag=v1.0", allow("rules[2]")),
        // An endpoint's `path` selects which rules apply.
        ("split.example.test", 443, "GET", "/v1/items", allow("access: read-only")),
        ("split.example.test", 443, "PUT", "/upload/a", allow("rules[0]")),
        ("split.example.test", 443, "PUT", "/v1/items", deny("access: read-only")),
        ("split.example.test", 443, "GET", "/other", Ok((false, false, None))),
        // Audit allows what it would deny, deny rules included.
        ("audit.example.test", 443, "GET", "/open", allow("access: read-only")),
        ("audit.example.test", 443, "POST", "/open", audit("access: read-only")),
        ("audit.example.test", 443, "GET", "/secret", audit("deny_rules[0]")),
    ];
    for (host, port, method, target, expected) in cases {
        let got = decide(&policy, host, *port, method, target, "/usr/bin/curl");
        match (expected, &got) {
            (Err(expected), Err(error)) => assert!(error.contains(expected), "{method} {host}{target}: {error}"),
            _ => assert_eq!(&got, expected, "{method} {host}:{port}{target}"),
        }
    }
}

#[test]
fn a_binary_the_policy_does_not_list_never_reaches_the_rules() {
    let policy = Policy::from_yaml(RULES).expect("loads");
    let got = decide(&policy, "api.github.com", 443, "GET", "/", "/usr/bin/wget");
    assert!(got.is_err_and(|error| error.contains("not inspected")));
}

#[test]
fn l7_rules_are_checked_at_load() {
    let load = |endpoint: &str| {
        let yaml = format!(
            "version: 1\nnetwork_policies:\n  p:\n    endpoints:\n      - host: a.example.test\n        port: 443\n{endpoint}    binaries: [{{path: /usr/bin/curl}}]\n"
        );
        Policy::from_yaml(&yaml).map(drop).map_err(|error| format!("{error:#}"))
    };
    for (endpoint, error) in [
        ("        protocol: rest\n", "needs `access`"),
        ("        access: full\n        rules: [{allow: {method: GET, path: /}}]\n", "either `access` or `rules`"),
        ("        rules: []\n", "empty list"),
        ("        rules: [{}]\n", "no entry has an `allow`"),
        ("        access: full\n        deny_rules: []\n", "deny_rules: an empty list"),
        ("        rules: [{allow: {path: /}}]\n", "`method` is required"),
        ("        rules: [{allow: {method: GET}}]\n", "`path` is required"),
        ("        rules: [{allow: {method: GET, path: /, bogus: 1}}]\n", "unknown field `bogus`"),
        ("        rules: [{allow: {method: GET, path: /, query: {a: {glob: x, nope: y}}}}]\n", "unknown field `nope`"),
        ("        deny_rules: [{method: GET, path: /, extra: 1}]\n        access: full\n", "unknown field `extra`"),
        ("        rules: [{allow: {method: GET, path: relative}}]\n", "must start with `/`"),
        ("        rules: [{allow: {method: \"GE T\", path: /}}]\n", "not an HTTP method"),
        ("        access: everything\n", "unknown variant `everything`"),
        ("        rules: [{allow: {method: GET, path: /, operation_type: query}}]\n", "another protocol"),
    ] {
        match load(endpoint) {
            Ok(()) => panic!("loaded:\n{endpoint}"),
            Err(message) => assert!(message.contains(error), "{endpoint}: {message}"),
        }
    }
}

#[test]
fn inspected_endpoints_of_one_host_and_path_must_agree() {
    let yaml = r#"
version: 1
network_policies:
  a:
    endpoints:
      - { host: api.example.test, port: 443, access: read-only }
    binaries: [{path: /usr/bin/curl}]
  b:
    endpoints:
      - { host: api.example.test, port: 443, access: full, enforcement: audit }
    binaries: [{path: /usr/bin/git}]
"#;
    let error = format!("{:#}", Policy::from_yaml(yaml).err().expect("refused"));
    assert!(error.contains("both inspect api.example.test:443") && error.contains("`enforcement`"), "{error}");
    // Different paths select different endpoints: no conflict.
    let separate = yaml.replace("access: full, enforcement: audit", "access: full, enforcement: audit, path: /b/**");
    Policy::from_yaml(&separate).expect("endpoints with their own paths load");
}

#[test]
fn a_reload_decides_the_next_request_by_the_new_rules() {
    let before = Policy::from_yaml(RULES).expect("loads");
    let after = Policy::from_yaml(&RULES.replace("access: read-write", "access: read-only")).expect("loads");
    let post = |policy: &Policy| decide(policy, "api.github.com", 443, "POST", "/repos/o/r/issues", "/usr/bin/curl");
    assert_eq!(post(&before), Ok((true, false, Some("access: read-write".to_owned()))));
    assert_eq!(post(&before), Ok((true, false, Some("access: read-write".to_owned()))), "cached");
    assert_eq!(post(&after), Ok((false, false, Some("access: read-only".to_owned()))));
}

#[test]
fn rules_without_enforcement_are_enforced_and_the_difference_from_openshell_is_warned() {
    let policy = Policy::from_yaml(RULES).expect("loads");
    let implicit: Vec<&String> = policy.warnings.iter().filter(|w| w.contains("but no `enforcement`")).collect();
    // Every inspected endpoint of RULES but the audited one leaves `enforcement` out.
    assert_eq!(implicit.len(), 7, "{implicit:?}");
    assert!(implicit[0].starts_with("policy 'full': endpoint 0 has rules but no `enforcement`"), "{implicit:?}");
    assert_eq!(
        decide(&policy, "ro.example.test", 443, "POST", "/", "/usr/bin/curl"),
        Ok((false, false, Some("access: read-only".into())))
    );
}

const BOUND: &str = r#"
version: 1
network_policies:
  git:
    endpoints:
      - host: git.example.test
        port: 443
        credential_binding: { provider: github }
      - host: api.example.test
        port: 443
        path: /uploads/**
        credential_binding: { provider: uploads }
        access: read-only
      - host: api.example.test
        port: 443
        path: /other/**
        access: full
    binaries:
      - path: /usr/bin/git
"#;

/// The request's decision on `host`, by /usr/bin/git.
fn bound_decision(policy: &Policy, host: &str, method: &str, path: &str) -> super::RequestDecision {
    let request = Request {
        host: Some(host),
        ip: None,
        port: 443,
        binary: Some(Path::new("/usr/bin/git")),
        ancestors: &[],
        uid: 0,
        cgroup_id: 1,
    };
    assert!(policy.evaluate(&request).unwrap().inspect.is_some(), "{host} is inspected");
    let canonical = canonicalize(path, false).unwrap();
    let http = HttpRequest {
        method,
        path: &canonical.path,
        query: &canonical.query,
        message: &Message::Http,
        via_gate: false,
    };
    policy.evaluate_request(&request, &http).unwrap()
}

#[test]
fn a_bound_endpoint_is_inspected_and_names_its_provider() {
    let policy = Policy::from_yaml(BOUND).expect("loads");
    assert!(!policy.warnings.iter().any(|w| w.contains("endpoint 0 has rules")), "{:?}", policy.warnings);
    // A binding alone allows every request: it is inspected only to apply the credential.
    let any = bound_decision(&policy, "git.example.test", "POST", "/o/r.git/git-upload-pack");
    assert_eq!((any.allow, any.rule.as_deref()), (true, Some("credential_binding (no rules)")));
    assert_eq!(any.credential_provider.as_deref(), Some("github"));
    // The endpoint that decides (here by its `path`) brings its provider, or none.
    let uploads = bound_decision(&policy, "api.example.test", "GET", "/uploads/a");
    assert_eq!((uploads.allow, uploads.credential_provider.as_deref()), (true, Some("uploads")));
    let denied = bound_decision(&policy, "api.example.test", "PUT", "/uploads/a");
    assert_eq!((denied.allow, denied.rule.as_deref()), (false, Some("access: read-only")));
    let other = bound_decision(&policy, "api.example.test", "PUT", "/other/a");
    assert_eq!((other.allow, other.credential_provider), (true, None));
    let bindings: Vec<(&str, usize, &str)> = policy.credential_bindings().collect();
    assert_eq!(bindings, [("git", 0, "github"), ("git", 1, "uploads")]);
    assert!(
        policy.summary().contains(
            "git.example.test:443 inspected (rest, credential_binding (no rules), credential provider github)"
        ),
        "{}",
        policy.summary()
    );
}

#[test]
fn bindings_must_name_a_configured_provider() {
    let policy = Policy::from_yaml(BOUND).expect("loads");
    policy.check_credential_bindings(["github", "uploads", "more"].into_iter()).expect("all known");
    let error = policy.check_credential_bindings(["github"].into_iter()).unwrap_err().to_string();
    assert_eq!(
        error,
        "network_policies.git.endpoints[1].credential_binding.provider: no credential provider 'uploads' \
         (--credentials has github)"
    );
    let error = policy.check_credential_bindings([].into_iter()).unwrap_err().to_string();
    assert!(error.ends_with("no credential provider 'github' (the agent runs without --credentials)"), "{error}");
}

#[test]
fn bindings_that_cannot_be_applied_are_refused_at_load() {
    for (endpoint, error) in [
        ("protocol: sql, credential_binding: { provider: gh }", "sandbox-egress does not inspect `protocol: sql`"),
        ("tls: skip, credential_binding: { provider: gh }", "remove `tls: skip`"),
        ("credential_binding: { provider: 'a b' }", "credential_binding.provider: \"a b\" must be"),
    ] {
        let yaml = format!("version: 1\nnetwork_policies:\n  p:\n    endpoints:\n      - {{ host: a.example.test, port: 443, {endpoint} }}\n");
        let message = format!("{:#}", Policy::from_yaml(&yaml).err().expect("refused"));
        assert!(
            message.contains(error) && message.contains("network_policies.p.endpoints[0]"),
            "{endpoint}: {message}"
        );
    }
    // Two policies binding one host and path to different providers.
    let yaml = "version: 1\nnetwork_policies:\n  a:\n    endpoints: [{ host: a.example.test, port: 443, credential_binding: { provider: x } }]\n  b:\n    endpoints: [{ host: a.example.test, port: 443, credential_binding: { provider: y } }]\n";
    let message = format!("{:#}", Policy::from_yaml(yaml).err().expect("refused"));
    assert!(message.contains("differ in `credential_binding`"), "{message}");
}
