// An HTTP/2-only REST origin over TLS (Node's http2, ALPN h2 and nothing
// else), run in a test network namespace: every request is answered 200
// with a JSON body {method, path, version} and printed as one JSON line on
// stdout, {"kind": "request", "method", "path", "version", "authorization"}.
// Usage: node h2_server.js PORT CERT KEY
"use strict";
const fs = require("fs");
const http2 = require("http2");

const [port, cert, key] = process.argv.slice(2);
const server = http2.createSecureServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
server.on("stream", (stream, headers) => {
  const method = headers[":method"];
  const path = headers[":path"];
  const event = { kind: "request", method, path, version: "2", authorization: headers["authorization"] || null };
  console.log(JSON.stringify(event));
  stream.respond({ ":status": 200, "content-type": "application/json" });
  stream.end(JSON.stringify({ method, path, version: "2" }));
});
server.listen(Number(port), "::", () => console.log(JSON.stringify({ kind: "ready" })));
