#!/usr/bin/env python3
"""A GraphQL server (graphql-core) over TLS, run in a test network
namespace: POST bodies (one operation or a batch array) and GET query
parameters are executed against a small schema; a persisted query is found
by its sha256 hash. Every operation it executes is printed as one JSON line
{"kind": "operation", "type", "name", "document"}, so a test can assert that
a denied one never arrived; "ready" is printed once it listens.
"""
import argparse
import hashlib
import http.server
import json
import socket
import ssl
import sys
import urllib.parse

from graphql import build_schema, graphql_sync, parse, get_operation_ast

SCHEMA = build_schema("""
type User { login: String }
type Repository { name: String }
type Issue { title: String }
type Query { viewer: User, repository(name: String): Repository, secrets: String }
type Mutation { createIssue(title: String): Issue, deleteRepository(name: String): Boolean }
""")

ROOT = {
    "viewer": {"login": "sandbox"},
    "repository": lambda _info, name=None: {"name": name},
    "secrets": "s3cr3t",
    "createIssue": lambda _info, title=None: {"title": title},
    "deleteRepository": lambda _info, name=None: True,
}

PERSISTED = {}


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def execute(envelope):
    document = envelope.get("query")
    if not document:
        digest = ((envelope.get("extensions") or {}).get("persistedQuery") or {}).get("sha256Hash")
        document = PERSISTED.get(digest)
        if document is None:
            return {"errors": [{"message": "PersistedQueryNotFound"}]}
    operation = get_operation_ast(parse(document), envelope.get("operationName"))
    emit(kind="operation", type=operation.operation.value if operation else None,
         name=operation.name.value if operation and operation.name else None, document=document)
    result = graphql_sync(SCHEMA, document, root_value=ROOT, variable_values=envelope.get("variables"),
                          operation_name=envelope.get("operationName"))
    return result.formatted


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def reply(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        payload = json.loads(self.rfile.read(length) or b"null")
        if isinstance(payload, list):
            self.reply([execute(envelope) for envelope in payload])
        else:
            self.reply(execute(payload))

    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        envelope = {key: values[0] for key, values in query.items()}
        if "extensions" in envelope:
            envelope["extensions"] = json.loads(envelope["extensions"])
        self.reply(execute(envelope))


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--persisted", action="append", default=[], help="a document served by its sha256 hash")
    args = parser.parse_args()
    for document in args.persisted:
        PERSISTED[hashlib.sha256(document.encode()).hexdigest()] = document
    server = Server(("::", args.port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    emit(kind="ready", port=args.port)
    server.serve_forever()


if __name__ == "__main__":
    main()
