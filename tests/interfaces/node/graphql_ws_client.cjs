// The reference graphql-ws client (graphql-ws 6 on the `ws` package), driven by the interface
// tests: one operation, every outcome printed as one JSON line on stdout, then exit.
// Usage: node graphql_ws_client.cjs URL TOKEN|- QUERY
const { createClient } = require("graphql-ws");
const WebSocket = require("ws");

const [url, token, query] = process.argv.slice(2);
const print = (o) => console.log(JSON.stringify(o));
let done = false;
const finish = (code) => {
  if (done) return;
  done = true;
  client.dispose();
  setTimeout(() => process.exit(code), 50);
};
const client = createClient({
  url,
  webSocketImpl: WebSocket,
  retryAttempts: 0,
  connectionParams: token && token !== "-" ? { Authorization: `Bearer ${token}` } : undefined,
  on: { closed: (e) => print({ closed: { code: e.code, reason: e.reason } }) },
});
setTimeout(() => { print({ timeout: true }); finish(2); }, 25000);
client.subscribe({ query }, {
  next: (value) => { print({ next: value }); finish(0); },
  error: (err) => {
    if (err && typeof err.code === "number") print({ error: { code: err.code, reason: err.reason } });
    else print({ error: Array.isArray(err) ? err : String(err) });
    finish(0);
  },
  complete: () => { print({ complete: true }); finish(0); },
});
