#!/usr/bin/env python3
"""A GraphQL client (gql, with its requests transport) run in the sandbox:
each argument `NAME=DOCUMENT` is executed as one operation, `batch=D1;;D2`
as one batch request, `persisted=HASH` as a request carrying only that
persisted query's sha256 hash (plain requests: gql has no such transport).
Prints one JSON line per argument: {"step", "ok", "data" | "errors"}."""
import argparse
import json
import sys

import requests
from gql import Client, gql
from gql.transport.exceptions import TransportQueryError, TransportServerError
from gql.transport.requests import RequestsHTTPTransport


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("steps", nargs="+", help="NAME=DOCUMENT")
    args = parser.parse_args()
    transport = RequestsHTTPTransport(url=args.url, verify=args.cafile, retries=0, timeout=20)
    client = Client(transport=transport, fetch_schema_from_transport=False)
    for argument in args.steps:
        name, _, document = argument.partition("=")
        try:
            if name == "persisted":
                envelope = {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": document}}}
                response = requests.post(args.url, json=envelope, verify=args.cafile, timeout=20)
                payload = response.json()
                emit(step=name, ok="errors" not in payload, status=response.status_code, **payload)
            elif name.startswith("batch"):
                requests_ = [gql(part) for part in document.split(";;")]
                from gql import GraphQLRequest
                results = client.execute_batch([GraphQLRequest(request) for request in requests_])
                emit(step=name, ok=True, data=results)
            else:
                emit(step=name, ok=True, data=client.execute(gql(document)))
        except TransportQueryError as error:
            emit(step=name, ok=False, errors=error.errors)
        except TransportServerError as error:
            emit(step=name, ok=False, server_error=str(error), status=error.code)


if __name__ == "__main__":
    main()
