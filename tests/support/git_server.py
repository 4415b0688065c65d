#!/usr/bin/env python3
"""A git server over HTTPS, run in a test network namespace: `git
http-backend` as a CGI program, behind Basic authentication with one token.

Every request prints one JSON line on stdout with what arrived: {"kind":
"request", "method", "path", "query", "authorization" (the header as sent,
or null), "status"}. A request without `Authorization: Basic` of any user
and the token as password gets 401 with `WWW-Authenticate: Basic`, as a git
host answers, and git http-backend never runs for it.
"""
import argparse
import base64
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading

MAX_BODY = 64 << 20


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address, handler, context, root, token):
        self.context, self.root, self.token = context, root, token
        super().__init__(address, handler)

    def get_request(self):
        # The handshake runs in the connection's own thread (setup).
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request, client_address):
        emit(kind="server_error", peer=client_address[0], error=repr(sys.exc_info()[1]))


class GitHttp(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        self.request.do_handshake()
        super().setup()

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
                if len(body) > MAX_BODY:
                    raise ValueError("body too large")
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return body
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def user(self):
        """The user of valid Basic credentials, else None."""
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except ValueError:
            return None
        return user if password == self.server.token else None

    def serve(self):
        path, _, query = self.path.partition("?")
        body = self.read_body()
        user = self.user()
        status = self.cgi(path, query, body, user) if user else self.unauthorized()
        emit(kind="request", method=self.command, path=path, query=query,
             authorization=self.headers.get("Authorization"), status=status)

    def unauthorized(self):
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return 401

    def cgi(self, path, query, body, user):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.server.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": user,
            "REMOTE_ADDR": self.client_address[0],
        }
        # Git-Protocol (v2), Content-Encoding (gzip bodies) and the rest, as CGI passes them.
        for name, value in self.headers.items():
            env["HTTP_" + name.upper().replace("-", "_")] = value
        output = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=True).stdout
        head, _, content = output.partition(b"\r\n\r\n") if b"\r\n\r\n" in output else output.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            else:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)
        return status


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--root", required=True, help="GIT_PROJECT_ROOT: the bare repositories served")
    parser.add_argument("--token-file", required=True, help="the password every request must carry")
    args = parser.parse_args()
    with open(args.token_file) as file:
        token = file.read().strip()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    context.set_alpn_protocols(["http/1.1"])
    server = Server(("::", args.port), GitHttp, context, args.root, token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    emit(kind="ready")
    threading.Event().wait()


if __name__ == "__main__":
    main()
