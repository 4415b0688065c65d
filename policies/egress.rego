# Egress decision for one TCP connection out of the sandbox.
#
# Semantics are documented in agent/src/policy/mod.rs; this file implements
# them. The agent normalises the YAML policy before it gets here, so the data
# document holds every endpoint filed under the key a request is looked up
# by (exact host, wildcard domain, the fixed suffix of a wildcard with `*`
# past the first label, IP literal, or hostless), each endpoint carrying its
# policy name, position, expanded ports and its policy's binaries. Lookups
# replace scans: an evaluation touches only the endpoints that can match.
#
# input:
#   host          lower-cased DNS name, absent for opaque TCP
#   host_domains  the host's parent domains, each with a leading dot
#   literal       what IP-literal hosts are compared with: the request's host
#                 if it is an IP literal, the destination address if there is
#                 no host; canonical text form, absent for a DNS name
#   ip            destination address (the literal host without one),
#                 canonical text form
#   port          destination port
#   binary        executable of the connecting process, if known
#   exe_paths     that executable, then its ancestors' executables
#   uid, cgroup_id
#   request       for request_decision only: one message of one HTTP request
#                 on an inspected connection: method (as sent, or
#                 WEBSOCKET_TEXT for a client text message after an
#                 upgrade), path (canonical, see agent/src/wire/path.rs),
#                 query (decoded name -> values), via_gate (plain HTTP
#                 decided request by request, not a TLS or CONNECT stream),
#                 message: what the endpoint's protocol read of it:
#                   {kind: http}             the request itself (REST)
#                   {kind: jsonrpc, method, tool}  one JSON-RPC/MCP call
#                                            (tool: a tools/call's name)
#                   {kind: jsonrpc_response} a response frame the client sent
#                   {kind: receive_stream}   an MCP GET for server events
#                   {kind: session_end}      an MCP DELETE ending the session
#                   {kind: graphql, operation_type, operation_name, fields}
#                   {kind: graphql_unregistered}  a persisted query's hash
#                                            or id the endpoint does not know
#
# Variable-key lookups go through a local binding (by_host := data...):
# indexing data directly makes regorus build rule paths on every access.
package sandbox_egress

import rego.v1

# Endpoints whose host (exact or wildcard) names input.host, whatever their
# ports: the agent's DNS answers a name only if this is not empty.
host_endpoints contains endpoint if {
	by_host := data.endpoints_by_host
	some endpoint in by_host[input.host]
}

host_endpoints contains endpoint if {
	by_domain := data.endpoints_by_domain
	some domain in input.host_domains
	some endpoint in by_domain[domain]
	wildcard_matches(endpoint)
}

# The suffix is one of the host's parent domains, or empty for a pattern
# ending in `*`.
host_endpoints contains endpoint if {
	by_suffix := data.endpoints_by_suffix
	some suffix in array.concat(input.host_domains, [""])
	some endpoint in by_suffix[suffix]
	labels_match(endpoint)
}

host_named := count(host_endpoints) > 0

matching_endpoints contains endpoint if {
	some endpoint in host_endpoints
	input.port in endpoint.ports
}

matching_endpoints contains endpoint if {
	by_ip := data.endpoints_by_ip
	some endpoint in by_ip[input.literal]
	input.port in endpoint.ports
}

matching_endpoints contains endpoint if {
	some endpoint in data.hostless_endpoints
	input.port in endpoint.ports
	some cidr in endpoint.allowed_ips
	net.cidr_contains(cidr, input.ip)
}

# `**.domain`: the host is found under one of its parent domains, so one or
# more labels precede the domain.
wildcard_matches(endpoint) if endpoint.multi_label

# `*.domain`, `api-*.domain`: exactly one label before the domain, with the
# fixed text around the `*`.
wildcard_matches(endpoint) if {
	not endpoint.multi_label
	label := trim_suffix(input.host, endpoint.domain)
	not contains(label, ".")
	count(label) >= endpoint.min_label_len
	startswith(label, endpoint.label_prefix)
	endswith(label, endpoint.label_suffix)
}

# `*.s3.*.amazonaws.com`: the host less the suffix has one label per
# pattern label, each matching it, but a first `**` takes one or more.
labels_match(endpoint) if {
	host_labels := split(trim_suffix(input.host, endpoint.suffix), ".")
	patterns := endpoint.labels
	extra := count(host_labels) - count(patterns)
	leading_labels_fit(patterns[0], extra)
	label_matches(patterns[0], host_labels[0])
	every i, pattern in array.slice(patterns, 1, count(patterns)) {
		label_matches(pattern, host_labels[(extra + i) + 1])
	}
}

leading_labels_fit(pattern, extra) if {
	pattern.multi_label
	extra >= 0
}

leading_labels_fit(pattern, 0) if not pattern.multi_label

label_matches(pattern, _) if pattern.multi_label

label_matches(pattern, label) if label == pattern.label

label_matches(pattern, label) if {
	count(label) >= pattern.min_label_len
	startswith(label, pattern.label_prefix)
	endswith(label, pattern.label_suffix)
}

# Binary entries matching the executable or an ancestor, each as
# [exe_paths position, binaries position, entry, matched path]: the smallest
# is the entry matching the process nearest the connection.
binary_hits(binaries) := exact_hits | glob_hits if {
	exact := binaries.exact
	exact_hits := {[path_index, entry_index, entry, path] |
		some path_index, path in input.exe_paths
		[entry_index, entry] := exact[path]
	}
	glob_hits := {[path_index, entry.index, entry.path, path] |
		some entry in binaries.globs
		some path_index, path in input.exe_paths
		sandbox_egress.path_glob(entry.path, path)
	}
}

checked_endpoints contains [endpoint, binary_hits(endpoint.binaries)] if {
	some endpoint in matching_endpoints
}

allowing contains [endpoint.policy, endpoint.index, min(hits)] if {
	some [endpoint, hits] in checked_endpoints
	count(hits) > 0
}

binary_denied contains endpoint if {
	some [endpoint, hits] in checked_endpoints
	count(hits) == 0
}

binary_deny_reason := concat("; ", [reason |
	some name in {endpoint.policy | some endpoint in binary_denied}
	reason := sprintf("binary '%s' not allowed in policy '%s'", [object.get(input, "binary", "(unknown)"), name])
])

destination := input.host if {
	input.host
} else := sprintf("[%s]", [input.literal]) if {
	contains(input.literal, ":")
} else := input.literal

# The inspected endpoints among those allowing the connection, in order,
# or null: with one, each HTTP request is then decided by request_decision.
inspected_endpoints := {[endpoint.policy, endpoint.index] |
	some [endpoint, hits] in checked_endpoints
	count(hits) > 0
	endpoint.l7
}

inspected := sort(inspected_endpoints) if {
	count(inspected_endpoints) > 0
} else := null

# Allowed, else denied. Ties go to the smallest policy name, then endpoint
# position. `enforcement: audit` applies to L7 requests only, as in
# OpenShell: a connection is never allowed by it, so `audit` stays false.
decision := {
	"allow": true,
	"audit": false,
	"policy": name,
	"endpoint": index,
	"binary": binary,
	"exe": exe,
	"inspect": inspected,
} if {
	count(allowing) > 0
	[name, index, [_, _, binary, exe]] := min(allowing)
} else := {
	"allow": false,
	"audit": false,
	"reason": binary_deny_reason,
} if {
	count(binary_denied) > 0
} else := {
	"allow": false,
	"audit": false,
	"reason": sprintf("endpoint %s:%d is not allowed by any policy", [destination, input.port]),
}

# --- L7: one message of one HTTP request on an inspected connection ---
#
# OpenShell's semantics: the message is allowed when an inspected endpoint
# of a policy allowing the connection (host, port and binary), whose `path`
# selects the request, has an allow rule (or profile) matching it, and no
# such endpoint has a deny rule matching it. Deny rules win. A rule matches
# by its kind: REST-shaped rules the request's method, path and query;
# JSON-RPC and MCP rules a call; GraphQL rules an operation. A GraphQL
# endpoint is authoritative: an operation it does not allow is denied there,
# whatever another endpoint's REST rules say. An `enforcement: audit`
# endpoint allows what it would deny, and says why.

l7_endpoints contains endpoint if {
	some [endpoint, hits] in checked_endpoints
	count(hits) > 0
	endpoint.l7
	path_selects(endpoint.l7.path)
}

path_selects(pattern) if pattern == null

path_selects(pattern) if {
	pattern != null
	path_matches(input.request.path, pattern)
}

path_matches(_, "**") if true

path_matches(path, pattern) if {
	pattern != "**"
	glob.match(pattern, ["/"], path)
}

message := object.get(input.request, "message", {"kind": "http"})

graphql_message if message.kind in {"graphql", "graphql_unregistered"}

# A JSON-RPC call counts only in a POST (OpenShell's transport rule).
jsonrpc_call if {
	message.kind == "jsonrpc"
	upper(input.request.method) == "POST"
}

# `*` any method; else the same method in any case; a GET rule covers HEAD.
method_matches(_, "*") if true

method_matches(method, expected) if upper(method) == upper(expected)

method_matches(method, expected) if {
	upper(method) == "HEAD"
	upper(expected) == "GET"
}

http_rule_matches(rule) if {
	rule.kind == "http"
	not graphql_message
	method_matches(input.request.method, rule.method)
	path_matches(input.request.path, rule.path)
}

# An allow rule's query matcher needs the name present and every value of
# it to match; a deny rule's, the name present and any one value to match.
allow_query_matches(rule) if {
	every name, globs in rule.query {
		values := object.get(input.request.query, name, [])
		count(values) > 0
		every value in values {
			query_value_matches(value, globs)
		}
	}
}

deny_query_matches(rule) if {
	every name, globs in rule.query {
		values := object.get(input.request.query, name, [])
		some value in values
		query_value_matches(value, globs)
	}
}

query_value_matches(value, globs) if {
	some pattern in globs
	glob.match(pattern, [], value)
}

# JSON-RPC: the method exactly, or `*`.
call_matches(rule) if {
	rule.kind == "jsonrpc"
	jsonrpc_call
	rule.method in {"*", message.method}
}

# MCP: the method as a glob (`tools/*`), and the tool if the rule names one.
call_matches(rule) if {
	rule.kind == "mcp"
	jsonrpc_call
	glob.match(rule.method, [], message.method)
	tool_matches(rule.tool)
}

tool_matches(null) if true

tool_matches(globs) if {
	globs != null
	is_string(message.tool)
	some pattern in globs
	glob.match(pattern, [], message.tool)
}

# GraphQL: the type (`*` any), the name if the rule has one (an anonymous
# operation's name is ""), then the root fields: for an allow rule every
# field must match one of its globs, for a deny rule any one.
operation_matches(rule) if {
	rule.kind == "graphql"
	message.kind == "graphql"
	rule.operation_type in {"*", lower(message.operation_type)}
	operation_name_matches(rule.operation_name)
}

operation_name_matches(null) if true

operation_name_matches(pattern) if {
	pattern != null
	glob.match(pattern, [], message.operation_name)
}

allow_fields_match(rule) if rule.fields == null

allow_fields_match(rule) if {
	rule.fields != null
	count(message.fields) > 0
	every field in message.fields {
		some pattern in rule.fields
		glob.match(pattern, [], field)
	}
}

deny_fields_match(rule) if rule.fields == null

deny_fields_match(rule) if {
	rule.fields != null
	some field in message.fields
	some pattern in rule.fields
	glob.match(pattern, [], field)
}

allow_rule_matches(rule) if {
	http_rule_matches(rule)
	allow_query_matches(rule)
}

allow_rule_matches(rule) if call_matches(rule)

allow_rule_matches(rule) if {
	operation_matches(rule)
	allow_fields_match(rule)
}

deny_rule_matches(rule) if {
	http_rule_matches(rule)
	deny_query_matches(rule)
}

deny_rule_matches(rule) if call_matches(rule)

deny_rule_matches(rule) if {
	operation_matches(rule)
	deny_fields_match(rule)
}

# What an MCP endpoint allows without a rule: every call under
# `mcp.allow_all_known_mcp_methods` (but a tools/call must match a tool rule
# when some rule names a tool), the client's response frames (answers to
# the server's requests), the receive stream, and the end of a session.
profile_allows(endpoint) := "mcp.allow_all_known_mcp_methods" if {
	endpoint.l7.protocol == "mcp"
	endpoint.l7.mcp_allow_all
	jsonrpc_call
	message.method != ""
	not tool_narrowed(endpoint)
}

profile_allows(endpoint) := "mcp: response frame" if {
	endpoint.l7.protocol == "mcp"
	message.kind == "jsonrpc_response"
	upper(input.request.method) == "POST"
}

profile_allows(endpoint) := "mcp: receive stream" if {
	endpoint.l7.protocol == "mcp"
	message.kind == "receive_stream"
}

profile_allows(endpoint) := "mcp: session end" if {
	endpoint.l7.protocol == "mcp"
	message.kind == "session_end"
}

tool_narrowed(endpoint) if {
	message.method == "tools/call"
	endpoint.l7.mcp_tool_narrowed
}

# [policy, endpoint, rule label, audit, reason]: the reason says what
# denied, as OpenShell words it.
l7_denied contains [endpoint.policy, endpoint.index, rule.label, endpoint.l7.audit, reason] if {
	some endpoint in l7_endpoints
	some rule in endpoint.l7.deny_rules
	deny_rule_matches(rule)
	reason := sprintf("%s blocked by deny rule", [request_line])
}

l7_denied contains [endpoint.policy, endpoint.index, null, endpoint.l7.audit, reason] if {
	some endpoint in l7_endpoints
	endpoint.l7.graphql_authoritative
	graphql_message
	not endpoint_allows(endpoint)
	reason := graphql_deny_reason
}

graphql_deny_reason := "GraphQL persisted query is not registered" if {
	message.kind == "graphql_unregistered"
} else := "GraphQL operation blocked by endpoint policy"

endpoint_allows(endpoint) if {
	some rule in endpoint.l7.rules
	allow_rule_matches(rule)
}

l7_allowed contains [endpoint.policy, endpoint.index, rule.label] if {
	some endpoint in l7_endpoints
	some rule in endpoint.l7.rules
	allow_rule_matches(rule)
}

l7_allowed contains [endpoint.policy, endpoint.index, label] if {
	some endpoint in l7_endpoints
	label := profile_allows(endpoint)
}

l7_unmatched contains [endpoint.policy, endpoint.index, endpoint.l7.audit] if {
	some endpoint in l7_endpoints
}

request_line := sprintf("%s %s", [input.request.method, input.request.path])

unmatched_reason := "GraphQL operation not permitted by policy" if {
	graphql_message
} else := sprintf("%s not permitted by policy", [request_line])

# Outside every inspected endpoint's `path`: on a TLS or CONNECT stream
# allowed by exactly one inspected endpoint, its enforcement decides (so an
# audit endpoint audits), as in OpenShell; otherwise, and for plain HTTP
# through the gate, the request is denied.
lone_inspected := [name, index, endpoint.l7.audit] if {
	not input.request.via_gate
	count(inspected_endpoints) == 1
	some [endpoint, hits] in checked_endpoints
	count(hits) > 0
	endpoint.l7
	[name, index] := [endpoint.policy, endpoint.index]
}

request_decision := {
	"allow": audit,
	"audit": audit,
	"policy": name,
	"endpoint": index,
	"rule": label,
	"reason": reason,
} if {
	count(l7_denied) > 0
	[name, index, label, audit, reason] := min(l7_denied)
} else := {
	"allow": true,
	"audit": false,
	"policy": name,
	"endpoint": index,
	"rule": label,
} if {
	count(l7_allowed) > 0
	[name, index, label] := min(l7_allowed)
} else := {
	"allow": audit,
	"audit": audit,
	"policy": name,
	"endpoint": index,
	"reason": unmatched_reason,
} if {
	count(l7_unmatched) > 0
	[name, index, audit] := min(l7_unmatched)
} else := {
	"allow": audit,
	"audit": audit,
	"policy": name,
	"endpoint": index,
	"reason": unmatched_reason,
} if {
	[name, index, audit] := lone_inspected
} else := {
	"allow": false,
	"audit": false,
	"reason": sprintf("%s not permitted by policy: no inspected endpoint's path selects it", [request_line]),
}
