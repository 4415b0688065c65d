#!/usr/bin/env python3
"""A grpcio client (raw bytes, no generated code) for the demo.Repo service
of grpc_server.py, run in the sandbox: `grpc_client.py TARGET CA_FILE
STEP...`, each step on one channel, in order, one JSON line per result on
stdout: {"step", "ok": true, "messages": [...]} or {"step", "ok": false,
"code": "PERMISSION_DENIED", "details": "..."}.

Steps: get, delete, fail (unary); get-with-auth:VALUE (unary Get with
`authorization: VALUE` metadata); watch (server-streaming: prints each
message as it arrives, {"step": "watch", "received": "1"}, and after the
first one calls Release, so the rest can only come after the first got
here); echo (bidi: sends a, b, c one at a time, each after the echo of the
one before); wait (reads one line from stdin: the test's go-ahead).
"""
import json
import queue
import sys

import grpc

TIMEOUT = 20


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def result(step, call):
    try:
        messages = call()
        emit(step=step, ok=True, messages=[message.decode() for message in messages])
    except grpc.RpcError as error:
        emit(step=step, ok=False, code=error.code().name, details=error.details())


def main():
    target, ca_file, *steps = sys.argv[1:]
    with open(ca_file, "rb") as ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())
    channel = grpc.secure_channel(target, credentials)
    get = channel.unary_unary("/demo.Repo/Get")
    for step in steps:
        if step == "wait":
            sys.stdin.readline()
        elif step.startswith("get-with-auth:"):
            auth = step.split(":", 1)[1]
            result("get-with-auth", lambda: [get(b"x", timeout=TIMEOUT, metadata=(("authorization", auth),))])
        elif step in ("get", "delete", "fail"):
            method = channel.unary_unary(f"/demo.Repo/{step.capitalize()}")
            result(step, lambda: [method(b"x", timeout=TIMEOUT)])
        elif step == "watch":
            release = channel.unary_unary("/demo.Repo/Release")

            def watch():
                received = []
                for message in channel.unary_stream("/demo.Repo/Watch")(b"", timeout=TIMEOUT):
                    emit(step="watch", received=message.decode())
                    received.append(message)
                    if message == b"1":
                        release(b"", timeout=TIMEOUT)
                return received

            result("watch", watch)
        elif step == "echo":
            echoed = queue.Queue()

            def requests():
                for message in (b"a", b"b", b"c"):
                    yield message
                    # The next is sent only once this one came back.
                    echoed.get(timeout=TIMEOUT)

            def echo():
                replies = []
                for reply in channel.stream_stream("/demo.Repo/Echo")(requests(), timeout=TIMEOUT):
                    replies.append(reply)
                    echoed.put(reply)
                return replies

            result("echo", echo)
        else:
            raise SystemExit(f"unknown step {step}")
    channel.close()


if __name__ == "__main__":
    main()
