// Smoke check: run every query kind in queries.json against a running server.
//   node check.mjs PORT USER_ID DEVICE_ID FROM TO
// Prints each response; exits 1 if any response has errors or no data.
import { readFileSync } from "node:fs";

const [port, userId, deviceId, from, to] = process.argv.slice(2);
if (!to) {
  console.error("usage: node check.mjs PORT USER_ID DEVICE_ID FROM TO");
  process.exit(64);
}
const subs = { $USER_ID: userId, $DEVICE_ID: deviceId, $FROM: from, $TO: to };
const queries = JSON.parse(readFileSync(new URL("./queries.json", import.meta.url), "utf8"));

let failed = 0;
for (const [kind, { query, variables }] of Object.entries(queries)) {
  const vars = Object.fromEntries(Object.entries(variables).map(([k, v]) => [k, subs[v] ?? v]));
  const res = await fetch(`http://127.0.0.1:${port}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ query, variables: vars }),
  });
  const body = await res.json();
  const ok = res.ok && !body.errors && body.data && Object.values(body.data).every((v) => v !== null);
  if (!ok) failed++;
  console.log(`${ok ? "ok  " : "FAIL"} ${kind} ${JSON.stringify(body)}`);
}
process.exit(failed ? 1 : 0);
