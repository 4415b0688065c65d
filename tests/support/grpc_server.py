#!/usr/bin/env python3
"""A gRPC server over TLS (grpcio, raw bytes: no generated code), run in a
test network namespace as the origin of an inspected gRPC endpoint.

Service demo.Repo: Get and Delete (unary, answer b"got:" + the request),
Fail (unary, always NOT_FOUND with a message and trailing metadata), Watch
(server-streaming: sends "1", then waits until Release is called, then
"2" and "3"), Release (unary), Echo (bidi: each message echoed at once).
Every call is printed as one JSON line on stdout, {"kind": "call",
"method", "metadata"} (metadata as a dict of text values), and each message
Watch sends as {"kind": "sent", "message"}, so tests can tell what reached
the origin and when.
"""
import argparse
import json
import sys
import threading
from concurrent import futures

import grpc


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


released = threading.Event()


def record(method, context):
    metadata = {key: value for key, value in context.invocation_metadata() if not key.endswith("-bin")}
    emit(kind="call", method=method, metadata=metadata)


def unary(name):
    def handle(request, context):
        record(f"/demo.Repo/{name}", context)
        return b"got:" + request

    return grpc.unary_unary_rpc_method_handler(handle)


def fail(request, context):
    record("/demo.Repo/Fail", context)
    context.set_trailing_metadata((("x-origin", "fail-trailer"),))
    context.abort(grpc.StatusCode.NOT_FOUND, "no such repo")


def release(request, context):
    record("/demo.Repo/Release", context)
    released.set()
    return b"released"


def watch(request, context):
    record("/demo.Repo/Watch", context)
    released.clear()
    for message in (b"1", b"2", b"3"):
        emit(kind="sent", message=message.decode())
        yield message
        if message == b"1" and not released.wait(timeout=30):
            return


def echo(requests, context):
    record("/demo.Repo/Echo", context)
    for message in requests:
        yield b"echo:" + message


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    with open(args.cert, "rb") as cert, open(args.key, "rb") as key:
        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
    handlers = {
        "Get": unary("Get"),
        "Delete": unary("Delete"),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Release": grpc.unary_unary_rpc_method_handler(release),
        "Watch": grpc.unary_stream_rpc_method_handler(watch),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Repo", handlers),))
    server.add_secure_port(f"[::]:{args.port}", credentials)
    server.start()
    emit(kind="ready")
    server.wait_for_termination()


if __name__ == "__main__":
    main()
