// Hides every table/view in the exposed schema except the three read-model
// tables that the query benchmark targets (devices, device_stats, daily_usage).
// The real database also has user_events, projection_checkpoints, streams, ...
// which would otherwise show up in the GraphQL schema (harmless, but they make
// introspection/startup slower and are not part of the comparison).
//
// Override the list with PGL_EXPOSED_TABLES=a,b,c; set it to "*" to expose all.
"use strict";
const { makePgSmartTagsPlugin } = require("graphile-utils");

const raw = process.env.PGL_EXPOSED_TABLES || "devices,device_stats,daily_usage";
const exposeAll = raw.trim() === "*";
const exposed = new Set(raw.split(",").map((s) => s.trim()).filter(Boolean));

module.exports = makePgSmartTagsPlugin({
  kind: "class",
  match: (pgClass) => !exposeAll && !exposed.has(pgClass.name),
  tags: { omit: true },
});
