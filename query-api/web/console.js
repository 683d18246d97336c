// The Cloudphone web console: sign in with a bearer token, then a user's fleet and daily usage
// or an operator's view of projections, the log and replays, kept current by GraphQL
// subscriptions (live.js). The role in the token's claims picks the view; the query API still
// decides what each token may read.

import { LiveClient, liveUrl } from "./live.js";
import { RequestError, document, learnMissing, queryTree, show } from "./graphql.js";

const TOKEN_KEY = "cloudphone.token";
const STATUSES = ["RUNNING", "STOPPED", "FAILED"];
const $ = (selector) => window.document.querySelector(selector);

let live = null;
let stops = []; // what to undo on sign-out: unsubscribes, observers

// ---- signing in ----------------------------------------------------------------------------

/** The token's claims (its payload, not verified: the server does that). */
function claimsOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload.padEnd(payload.length + ((4 - (payload.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY);
}

function signIn(token, remember) {
  const claims = claimsOf(token);
  if (!claims || !claims.role) return notice("That is not a JWT with a role claim.");
  if (claims.exp && claims.exp * 1000 < Date.now()) return notice("That token has expired.");
  sessionStorage.setItem(TOKEN_KEY, token);
  if (remember) localStorage.setItem(TOKEN_KEY, token);
  start(token, claims);
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
  stopAll();
  for (const id of ["#user-view", "#admin-view", "#sign-out"]) $(id).hidden = true;
  $("#sign-in").hidden = false;
  $("#who").textContent = "";
  setLiveState("off");
  if (message) notice(message);
}

function stopAll() {
  for (const stop of stops) stop();
  stops = [];
  if (live) live.close();
  live = null;
}

async function offerDevTokens() {
  const response = await fetch("/console/dev-token").catch(() => null);
  if (!response || !response.ok) return;
  $("#dev-tokens").hidden = false;
  for (const role of ["user", "admin"]) {
    $(`#dev-${role}`).addEventListener("click", async () => {
      const subject = $("#dev-subject").value.trim();
      const minted = await fetch("/console/dev-token", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(subject ? { role, subject } : { role }),
      });
      const body = await minted.json().catch(() => ({}));
      if (!minted.ok) return notice(body.errors?.[0]?.message || `minting failed (${minted.status})`);
      signIn(body.token, $("#remember").checked);
    });
  }
}

// ---- the signed-in page -----------------------------------------------------------------------

function start(token, claims) {
  stopAll();
  notice(null);
  $("#sign-in").hidden = true;
  $("#sign-out").hidden = false;
  $("#who").textContent = `${claims.role} ${claims.sub}`;
  live = new LiveClient(liveUrl(), token, setLiveState);
  if (claims.role === "admin") {
    $("#admin-view").hidden = false;
    adminView(token);
  } else {
    $("#user-view").hidden = false;
    stops.push(fleet($("#my-fleet"), token, null));
    usageView(token);
  }
}

function setLiveState(state, detail) {
  const labels = {
    off: "",
    connecting: "live: connecting",
    live: "live",
    offline: `live: offline (${detail || "retrying"})`,
    refused: `live updates refused: ${detail}`,
  };
  $("#live-state").dataset.state = state;
  $("#live-state").textContent = labels[state] ?? state;
}

function notice(message) {
  $("#notice").hidden = !message;
  $("#notice").textContent = message || "";
}

/** Reports a failed request; a refused token signs out. */
function failed(error) {
  if (error instanceof RequestError && error.status === 401) return signOut("The query API refused that token.");
  notice(`${error.message}`);
}

/**
 * Asks `tree` once over HTTP (the page fills at once, even where subscriptions are not
 * served), then subscribes to each of its root fields (a subscription has exactly one);
 * `render(data)` gets every answer. Fields the server lacks are dropped (graphql.js).
 */
function watch(token, tree, variables, declarations, render) {
  let current = {};
  const pushed = new Set(); // fields a subscription answered: newer than the HTTP answer
  const update = (data) => {
    current = { ...current, ...data };
    render(current);
  };
  queryTree(token, tree, variables, declarations)
    .then((answer) => {
      if (answer.errors?.length && !answer.data) return notice(answer.errors[0].message);
      const fresh = Object.entries(answer.data || {}).filter(([field]) => !pushed.has(field));
      update(Object.fromEntries(fresh));
    })
    .catch(failed);
  const onPush = (data) => {
    Object.keys(data).forEach((field) => pushed.add(field));
    update(data);
  };
  const unsubscribes = Object.entries(tree).map(([field, sub]) => subscribeField(token, { [field]: sub }, variables, declarations, onPush));
  return () => unsubscribes.forEach((unsubscribe) => unsubscribe());
}

function subscribeField(token, tree, variables, declarations, update) {
  let unsubscribe = () => {};
  const go = () => {
    const text = document("subscription", tree, declarations);
    if (!text || !live) return;
    unsubscribe = live.subscribe(text, variables, {
      next: (data) => data && update(data),
      // A field this server cannot push (yet): learn what is missing and try once more, else
      // the panel keeps its HTTP answer.
      error: (errors) => (learnMissing(errors) ? go() : null),
    });
  };
  go();
  return () => unsubscribe();
}

// ---- fleet --------------------------------------------------------------------------------

/** A fleet panel in `root` (the caller's own devices, or `userId`'s); returns its stop. */
function fleet(root, token, userId) {
  root.replaceChildren($("#fleet-template").content.cloneNode(true));
  const filter = userId ? { userId } : null;
  const tree = {
    "devices(filter: $filter, first: 50, orderBy: CREATED_AT_DESC)": {
      totalCount: true,
      nodes: { id: true, provider: true, status: true, cpuCores: true, memoryMb: true, lastStartedAt: true, minutesUsed: true },
    },
    "deviceStats(filter: $filter)": {
      rows: { status: true, provider: true, deviceCount: true },
      totals: { deviceCount: true },
    },
  };
  return watch(token, tree, { filter }, "($filter: DeviceFilterInput)", (data) => renderFleet(root, data));
}

function renderFleet(root, { devices, deviceStats }) {
  if (devices) {
    root.querySelector(".total").textContent = show(devices.totalCount);
    const rows = (devices.nodes || []).map((device) => {
      const row = cells([
        device.id,
        show(device.provider),
        show(device.status),
        show(device.cpuCores),
        show(device.memoryMb),
        show(device.lastStartedAt, (t) => new Date(t).toLocaleString()),
        show(device.minutesUsed),
      ]);
      row.dataset.deviceId = device.id;
      row.dataset.status = device.status;
      row.cells[0].className = "id";
      row.cells[2].className = "status";
      return row;
    });
    root.querySelector(".devices tbody").replaceChildren(...rows);
  }
  if (deviceStats) {
    const byStatus = Object.fromEntries(STATUSES.map((s) => [s, 0]));
    const byProvider = {};
    for (const row of deviceStats.rows || []) {
      byStatus[row.status] = (byStatus[row.status] || 0) + Number(row.deviceCount);
      byProvider[row.provider] = (byProvider[row.provider] || 0) + Number(row.deviceCount);
    }
    counts(root.querySelector(".by-status"), byStatus, "status");
    counts(root.querySelector(".by-provider"), byProvider, "provider");
  }
}

function counts(list, values, kind) {
  list.replaceChildren(
    ...Object.entries(values).flatMap(([name, count]) => {
      const term = element("dt", name);
      const value = element("dd", String(count));
      value.dataset[kind] = name;
      return [term, value];
    }),
  );
}

// ---- usage --------------------------------------------------------------------------------

function usageView(token) {
  const to = new Date();
  const from = new Date(to.getTime() - 29 * 86400000);
  $("#usage-from").value = day(from);
  $("#usage-to").value = day(to);
  const chart = usageChart($("#usage-chart"));
  stops.push(chart.destroy);
  let stop = () => {};
  const showRange = () => {
    stop();
    const range = { from: $("#usage-from").value, to: $("#usage-to").value };
    const tree = {
      "dailyUsage(filter: $filter, groupBy: DAY)": {
        rows: { period: true, minutes: true, cost: { amountMinor: true, currency: true } },
        totals: { minutes: true, costs: { amountMinor: true, currency: true } },
      },
    };
    stop = watch(token, tree, { filter: range }, "($filter: UsageFilter!)", ({ dailyUsage }) => {
      if (!dailyUsage) return;
      chart.draw(range, dailyUsage.rows || []);
      $("#usage-minutes").textContent = show(dailyUsage.totals?.minutes);
      const costs = dailyUsage.totals?.costs;
      $("#usage-cost").textContent = costs ? costs.map(money).join(" + ") || "no cost" : "n/a";
    });
  };
  $("#usage-range").onsubmit = (event) => {
    event.preventDefault();
    showRange();
  };
  showRange();
  stops.push(() => stop());
}

/** Minutes (left axis) and cost in the range's main currency (right axis) per UTC day. */
function usageChart(container) {
  let plot = null;
  const resize = new ResizeObserver(() => plot && plot.setSize({ width: container.clientWidth, height: 280 }));
  resize.observe(container);
  return {
    draw(range, rows) {
      const currency = mainCurrency(rows);
      const digits = fractionDigits(currency);
      const days = [];
      for (let t = Date.parse(`${range.from}T00:00:00Z`); t <= Date.parse(`${range.to}T00:00:00Z`); t += 86400000) days.push(t);
      const minutes = new Map(days.map((t) => [t, 0]));
      const cost = new Map(days.map((t) => [t, 0]));
      for (const row of rows) {
        const t = Date.parse(`${row.period}T00:00:00Z`);
        minutes.set(t, (minutes.get(t) || 0) + Number(row.minutes));
        if (row.cost?.currency === currency) cost.set(t, (cost.get(t) || 0) + Number(row.cost.amountMinor) / 10 ** digits);
      }
      const data = [days.map((t) => t / 1000), days.map((t) => minutes.get(t)), days.map((t) => cost.get(t))];
      if (plot && plot.series[2].label === `Cost (${currency})`) return plot.setData(data);
      if (plot) plot.destroy();
      plot = new window.uPlot(
        {
          width: container.clientWidth || 600,
          height: 280,
          scales: { x: { time: true }, minutes: { auto: true }, cost: { auto: true } },
          series: [
            { value: (u, v) => (v == null ? "–" : new Date(v * 1000).toISOString().slice(0, 10)) },
            { label: "Minutes", scale: "minutes", stroke: "#2563eb", fill: "rgba(37, 99, 235, 0.12)", width: 2 },
            { label: `Cost (${currency})`, scale: "cost", stroke: "#d97706", width: 2, value: (u, v) => (v == null ? "–" : v.toFixed(digits)) },
          ],
          axes: [{}, { scale: "minutes", label: "minutes" }, { scale: "cost", side: 1, label: currency, grid: { show: false } }],
        },
        data,
        container,
      );
    },
    destroy() {
      resize.disconnect();
      if (plot) plot.destroy();
      plot = null;
    },
  };
}

function mainCurrency(rows) {
  const totals = {};
  for (const row of rows) if (row.cost) totals[row.cost.currency] = (totals[row.cost.currency] || 0) + Number(row.cost.amountMinor);
  return Object.entries(totals).sort((a, b) => b[1] - a[1])[0]?.[0] || "USD";
}

function fractionDigits(currency) {
  try {
    return new Intl.NumberFormat("en", { style: "currency", currency }).resolvedOptions().maximumFractionDigits;
  } catch {
    return 2;
  }
}

function money({ amountMinor, currency }) {
  const digits = fractionDigits(currency);
  const amount = Number(amountMinor) / 10 ** digits;
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency }).format(amount);
  } catch {
    return `${amount.toFixed(digits)} ${currency}`;
  }
}

// ---- operators ----------------------------------------------------------------------------

function adminView(token) {
  const projections = {
    projectionStatus: { name: true, version: true, position: true, head: true, lagEvents: true, lagSeconds: true, deadLetters: true },
  };
  // The log and replays are not pushed: they are asked again when the projections move (at
  // most once a second), which is when they change.
  let lastAsked = 0;
  let pending = null;
  const refreshLog = () => {
    const wait = Math.max(0, lastAsked + 1000 - Date.now());
    if (pending) return;
    pending = setTimeout(() => {
      pending = null;
      lastAsked = Date.now();
      const tree = {
        log: { head: true, partitions: { name: true, from: true, to: true } },
        replays: { projection: true, version: true, state: true, position: true, targetPosition: true, startedAt: true },
      };
      queryTree(token, tree).then(({ data }) => renderLog(data || {}), failed);
    }, wait);
  };
  stops.push(() => clearTimeout(pending));
  stops.push(
    watch(token, projections, {}, "", ({ projectionStatus }) => {
      renderProjections(projectionStatus);
      refreshLog();
    }),
  );
  refreshLog();

  let stopFleet = () => {};
  $("#user-lookup").onsubmit = (event) => {
    event.preventDefault();
    stopFleet();
    stopFleet = fleet($("#user-fleet"), token, $("#lookup-user").value.trim());
  };
  stops.push(() => {
    stopFleet();
    $("#user-fleet").replaceChildren();
  });
}

function renderProjections(list) {
  const rows = (list || []).map((p) => {
    const row = cells([
      p.name,
      show(p.version),
      show(p.position),
      show(p.head),
      show(p.lagEvents),
      show(p.lagSeconds, (s) => Number(s).toFixed(1)),
      show(p.deadLetters),
    ]);
    row.dataset.projection = p.name;
    row.cells[4].className = "lag-events";
    row.cells[5].className = "lag-seconds";
    row.cells[6].className = "dead-letters";
    if (Number(p.deadLetters) > 0) row.classList.add("warn");
    return row;
  });
  $("#projections tbody").replaceChildren(...rows);
}

function renderLog({ log, replays }) {
  $("#log-head").textContent = log === undefined ? "n/a" : show(log?.head);
  const partitions = log?.partitions;
  $("#partitions tbody").replaceChildren(
    ...(partitions === undefined ? [cells(["n/a", "", ""])] : partitions.map((p) => cells([show(p.name), show(p.from), show(p.to)]))),
  );
  $("#replays tbody").replaceChildren(
    ...(replays === undefined
      ? [cells(["n/a", "", "", "", "", ""])]
      : replays.length === 0
        ? [cells(["none", "", "", "", "", ""])]
        : replays.map((r) =>
            cells([show(r.projection), show(r.version), show(r.state), show(r.position), show(r.targetPosition), show(r.startedAt, (t) => new Date(t).toLocaleString())]),
          )),
  );
}

// ---- small helpers ------------------------------------------------------------------------

function element(tag, text) {
  const node = window.document.createElement(tag);
  node.textContent = text;
  return node;
}

function cells(values) {
  const row = window.document.createElement("tr");
  for (const value of values) row.append(element("td", String(value)));
  return row;
}

function day(date) {
  return date.toISOString().slice(0, 10);
}

// ---- start --------------------------------------------------------------------------------

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("#token-input").value.trim(), $("#remember").checked);
  $("#token-input").value = "";
});
$("#sign-out").addEventListener("click", () => signOut());
offerDevTokens();
const token = storedToken();
const claims = token && claimsOf(token);
if (claims && (!claims.exp || claims.exp * 1000 > Date.now())) {
  start(token, claims);
} else {
  signOut();
}
