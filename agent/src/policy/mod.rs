//! Egress policy: OpenShell-schema YAML evaluated by Rego (regorus).
