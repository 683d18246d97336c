// The web console in a real browser (headless Debian chromium through playwright-core), against
// a running platform. Driven by cloudphone/tests/cloudphone/console.rs, which starts
// `cloudphone serve` on a fresh database, registers a user with one stopped device, and passes:
//
//   CONSOLE_URL   the query API's base URL (the console is its `/`)
//   COMMAND_URL   the command API's base URL
//   USER_TOKEN    a `user` token of that user; USER_ID its subject
//   DEVICE_ID     the user's device (stopped)
//   CHROMIUM      the browser's executable (default /usr/bin/chromium)
//   ARTIFACTS_DIR where screenshots go (default target/browser-artifacts)
//
// Every request to a host other than the query API is blocked and fails the test. A failed step
// is reported and the next ones still run (they do not depend on it). Waits are
// Playwright's (`waitFor`, `waitForFunction`, `waitForResponse`) with timeouts, never sleeps.
// Exits 0 when every step passed; otherwise prints the failed step and exits 1.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const CONSOLE_URL = env("CONSOLE_URL").replace(/\/$/, "");
const COMMAND_URL = env("COMMAND_URL").replace(/\/$/, "");
const USER_TOKEN = env("USER_TOKEN");
const USER_ID = env("USER_ID");
const DEVICE_ID = env("DEVICE_ID");
const ARTIFACTS = env("ARTIFACTS_DIR", "target/browser-artifacts");
// How fast a change must reach the page: the platform's "fresh within a second".
const LIVE_WITHIN_MS = Number(env("LIVE_WITHIN_MS", "1000"));
const origin = new URL(CONSOLE_URL).origin;
mkdirSync(ARTIFACTS, { recursive: true });

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await context.newPage();

// Nothing but the query API: every other request is aborted and remembered.
const foreign = [];
await context.route("**/*", (route) => {
  const url = route.request().url();
  if (new URL(url).origin === origin) return route.continue();
  foreign.push(url);
  return route.abort("blockedbyclient");
});
const sockets = [];
page.on("websocket", (socket) => sockets.push(socket.url()));
const problems = []; // script errors and policy violations, by page
page.on("pageerror", (error) => problems.push(`${page.url()}: ${error.message}`));
page.on("console", (message) => {
  const text = message.text();
  if (message.type() === "error" && /Content.Security.Policy|Refused to/i.test(text)) problems.push(`${page.url()}: ${text}`);
});

let failures = 0;
async function step(name, body) {
  const started = Date.now();
  try {
    await body();
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (error) {
    failures++;
    console.log(`FAIL ${name} (${Date.now() - started} ms)\n     ${String(error.stack || error).split("\n").join("\n     ")}`);
    await shot(`failed-${name.replace(/\W+/g, "-")}`);
  }
}
async function shot(name) {
  await page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true }).catch(() => {});
}
function check(condition, message) {
  if (!condition) throw new Error(message);
}
const row = (root, device, status) =>
  page.locator(`${root} tr[data-device-id="${device}"]${status ? `[data-status="${status}"]` : ""}`);

async function run() {
  await step("the console loads from the query API and offers to sign in", async () => {
    const response = await page.goto(`${CONSOLE_URL}/`);
    check(response.status() === 200, `GET / answered ${response.status()}`);
    const policy = response.headers()["content-security-policy"] || "";
    check(policy.includes("script-src 'self'"), `no strict policy: ${policy}`);
    await page.locator("#sign-in").waitFor({ state: "visible", timeout: 5000 });
    // `cloudphone serve` without a secret verifies with the development one: minting is offered.
    await page.locator("#dev-tokens").waitFor({ state: "visible", timeout: 5000 });
  });

  await step("a user signs in with a pasted token and sees their fleet", async () => {
    await page.fill("#token-input", USER_TOKEN);
    await page.click("#token-form button[type=submit]");
    await page.locator("#user-view").waitFor({ state: "visible", timeout: 5000 });
    await row("#my-fleet", DEVICE_ID, "STOPPED").waitFor({ timeout: 10000 });
    await page.waitForFunction(
      () =>
        document.querySelector('#my-fleet dd[data-status="STOPPED"]')?.textContent === "1" &&
        document.querySelector('#my-fleet dd[data-provider="HUAWEI"]')?.textContent === "1",
      null,
      { timeout: 10000 },
    );
    check((await page.textContent("#who")).includes(USER_ID), "the page does not name the signed-in user");
    await shot("1-user-fleet");
  });

  await step("the user's daily usage is drawn as a chart", async () => {
    await page.locator("#usage-chart .uplot canvas").waitFor({ timeout: 10000 });
    await page.waitForFunction(() => /^\d+$/.test(document.querySelector("#usage-minutes").textContent), null, { timeout: 10000 });
  });

  await step(`a device started through the command API shows as running within ${LIVE_WITHIN_MS} ms, without a reload`, async () => {
    // Needs GraphQL subscriptions (graphql-transport-ws at /graphql) on the query API.
    await page.locator('#live-state[data-state="live"]').waitFor({ timeout: 10000 });
    await page.evaluate(() => (window.notReloaded = true));
    let queries = 0;
    const countQueries = (request) => request.method() === "POST" && request.url().endsWith("/graphql") && queries++;
    page.on("request", countQueries);
    const response = await fetch(`${COMMAND_URL}/v1/devices/${DEVICE_ID}/start`, {
      method: "POST",
      headers: { authorization: `Bearer ${USER_TOKEN}` },
    });
    check(response.ok, `starting the device answered ${response.status}: ${await response.text()}`);
    const accepted = Date.now();
    await row("#my-fleet", DEVICE_ID, "RUNNING").waitFor({ timeout: LIVE_WITHIN_MS });
    const elapsed = Date.now() - accepted;
    await page.waitForFunction(() => document.querySelector('#my-fleet dd[data-status="RUNNING"]')?.textContent === "1", null, {
      timeout: LIVE_WITHIN_MS,
    });
    page.off("request", countQueries);
    check(await page.evaluate(() => window.notReloaded === true), "the page was reloaded");
    check(queries === 0, `the page asked ${queries} queries over HTTP: the change was not pushed`);
    check(sockets.some((url) => url === `${origin.replace(/^http/, "ws")}/graphql`), `no WebSocket to /graphql: ${sockets}`);
    console.log(`     running on the page ${elapsed} ms after the command was accepted`);
    await shot("2-user-device-running");
  });

  await step("an admin signs in with a minted development token and sees projection lag", async () => {
    await page.click("#sign-out");
    await page.locator("#dev-tokens").waitFor({ state: "visible", timeout: 5000 });
    await page.click("#dev-admin");
    await page.locator("#admin-view").waitFor({ state: "visible", timeout: 5000 });
    await page.waitForFunction(
      () => {
        const rows = [...document.querySelectorAll("#projections tr[data-projection]")];
        return rows.length >= 2 && rows.every((row) => /^\d+$/.test(row.querySelector(".lag-events").textContent));
      },
      null,
      { timeout: 10000 },
    );
    // The log and replays (newer fields): a value, or "n/a" where the server has not got them.
    await page.waitForFunction(() => document.querySelector("#log-head").textContent.trim() !== "", null, { timeout: 10000 });
    await shot("3-admin-projections");
  });

  await step("an admin looks at any user's fleet", async () => {
    await page.fill("#lookup-user", USER_ID);
    await page.click("#user-lookup button[type=submit]");
    await row("#user-fleet", DEVICE_ID).waitFor({ timeout: 10000 });
    await shot("4-admin-user-fleet");
  });

  await step("GraphiQL loads the schema from this server alone, with the console's token", async () => {
    const token = await page.evaluate(() => sessionStorage.getItem("cloudphone.token"));
    check(token, "no token in the console's storage");
    const introspection = page.waitForResponse(
      (response) => response.url() === `${CONSOLE_URL}/graphql` && (response.request().postData() || "").includes("__schema"),
      { timeout: 20000 },
    );
    const response = await page.goto(`${CONSOLE_URL}/graphql`);
    check(response.status() === 200, `GET /graphql answered ${response.status()}`);
    check((response.headers()["content-security-policy"] || "").includes("script-src 'self'"), "GraphiQL's page has no strict policy");
    const answer = await introspection;
    check(answer.request().headers()["authorization"] === `Bearer ${token}`, "introspection was sent without the console's token");
    check(answer.status() === 200, `introspection answered ${answer.status()}`);
    const body = await answer.json();
    check(body.data?.__schema?.queryType?.name === "Query", `introspection failed: ${JSON.stringify(body).slice(0, 300)}`);
    await page.locator(".graphiql-container").waitFor({ timeout: 20000 });
    // The default document asks projectionStatus: run it and see the answer.
    await page.locator(".graphiql-execute-button").click();
    await page.waitForFunction(() => (document.querySelector(".graphiql-response")?.textContent || "").includes("lagEvents"), null, {
      timeout: 10000,
    });
    await shot("5-graphiql");
  });

  await step("no request left the query API's origin, and no script error or policy violation", async () => {
    check(foreign.length === 0, `requests to other hosts: ${foreign.join(", ")}`);
    check(problems.length === 0, `problems:\n${problems.join("\n")}`);
  });
}

try {
  await run();
} finally {
  await browser.close();
}
console.log(failures ? "console test: FAILED" : "console test: passed");
process.exit(failures ? 1 : 0);
