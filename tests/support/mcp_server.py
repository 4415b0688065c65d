#!/usr/bin/env python3
"""An MCP server built with the official Python SDK (PyPI `mcp`), serving
Streamable HTTP at /mcp over TLS, run in a test network namespace.

Tools: `search(query)` and `delete_repo(name)`. Every tool call that reaches
the server is printed as one JSON line {"kind": "tool_call", "name", "arguments"}
on stdout, so a test can assert that a denied call never arrived; "ready" is
printed once it listens.
"""
import argparse
import json
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--host-name", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()

    server = MCPServer("sandbox-egress test server")

    @server.tool()
    def search(query: str) -> str:
        """Search the repositories."""
        emit(kind="tool_call", name="search", arguments={"query": query})
        return f"3 results for {query}"

    @server.tool()
    def delete_repo(name: str) -> str:
        """Delete a repository."""
        emit(kind="tool_call", name="delete_repo", arguments={"name": name})
        return f"deleted {name}"

    security = TransportSecuritySettings(allowed_hosts=[args.host_name, f"{args.host_name}:{args.port}"])
    app = server.streamable_http_app(json_response=True, transport_security=security, host=args.host_name)
    config = uvicorn.Config(
        app, host=args.bind, port=args.port, ssl_certfile=args.cert, ssl_keyfile=args.key, log_level="warning"
    )
    uvicorn_server = uvicorn.Server(config)
    original_startup = uvicorn_server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        emit(kind="ready", port=args.port)

    uvicorn_server.startup = startup
    uvicorn_server.run()


if __name__ == "__main__":
    main()
