// Hides every table/view in the exposed schema except the three read-model
// tables that the query benchmark targets (devices, device_stats, daily_usage).
// v5 counterpart of ../postgraphile/bench-tables-plugin.js: v4's `@omit` smart
// tag becomes the v5 behavior `-*` (no fields, no types, no mutations).
//
// Override the list with PGL_EXPOSED_TABLES=a,b,c; set it to "*" to expose all.
import { makePgSmartTagsPlugin } from "postgraphile/utils";

const raw = process.env.PGL_EXPOSED_TABLES || "devices,device_stats,daily_usage";
const exposeAll = raw.trim() === "*";
const exposed = new Set(raw.split(",").map((s) => s.trim()).filter(Boolean));

export const BenchTablesPlugin = makePgSmartTagsPlugin({
  kind: "class",
  match: (pgClass) => !exposeAll && !exposed.has(pgClass.relname),
  tags: { behavior: "-*" },
});
