// An HTTP/2 client (Node's http2) opening several streams at once on one
// connection: `node h2_client.js ORIGIN CA_FILE PATH...`. All requests are
// sent before any response is read; a PATH starting with `~` is reset
// (RST_STREAM CANCEL) as soon as it is sent. Prints one JSON line per
// stream, in the order of PATH, {"path", "status", "body"}, {"path",
// "reset": true} or {"path", "error"}.
"use strict";
const fs = require("fs");
const http2 = require("http2");

const [origin, ca, ...paths] = process.argv.slice(2);
const session = http2.connect(origin, { ca: fs.readFileSync(ca) });
session.on("error", (error) => {
  console.log(JSON.stringify({ error: String(error) }));
  process.exit(1);
});
const results = paths.map(
  (path) =>
    new Promise((resolve) => {
      const reset = path.startsWith("~");
      const stream = session.request({ ":path": reset ? path.slice(1) : path, ":method": "GET" });
      if (reset) {
        stream.on("close", () => resolve({ path, reset: true }));
        stream.on("error", () => {});
        stream.close(http2.constants.NGHTTP2_CANCEL);
        return;
      }
      let status = null;
      let body = "";
      stream.on("response", (headers) => (status = headers[":status"]));
      stream.setEncoding("utf8");
      stream.on("data", (chunk) => (body += chunk));
      stream.on("end", () => resolve({ path, status, body }));
      stream.on("error", (error) => resolve({ path, error: String(error) }));
      stream.end();
    }),
);
Promise.all(results).then((done) => {
  for (const result of done) console.log(JSON.stringify(result));
  session.close();
});
