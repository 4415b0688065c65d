#!/usr/bin/env python3
"""An MCP client built with the official Python SDK, run in the sandbox:
initialize, tools/list, then each tool call given on the command line
(`NAME=ARG`), printing one JSON line per step: {"step", "ok", ...} with the
tool names listed, a call's text result, or the error the SDK raised (its
message and data, as an agent would see them)."""
import argparse
import asyncio
import json
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("calls", nargs="*", help="TOOL=ARGUMENT")
    args = parser.parse_args()
    async with httpx2.AsyncClient(verify=args.cafile, timeout=20) as http:
        async with streamable_http_client(args.url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                result = await session.initialize()
                emit(step="initialize", ok=True, server=result.server_info.name)
                tools = await session.list_tools()
                emit(step="tools/list", ok=True, tools=sorted(tool.name for tool in tools.tools))
                for call in args.calls:
                    name, _, argument = call.partition("=")
                    key = "query" if name == "search" else "name"
                    try:
                        result = await session.call_tool(name, {key: argument})
                        text = "".join(getattr(part, "text", "") for part in result.content)
                        emit(step=f"tools/call {name}", ok=not result.is_error, text=text)
                    except MCPError as error:
                        emit(step=f"tools/call {name}", ok=False, code=error.error.code,
                             message=error.error.message, data=error.error.data)


if __name__ == "__main__":
    asyncio.run(main())
