// PostGraphile v5 configuration for the read-model query benchmark baseline.
// Loaded by run.sh through the postgraphile CLI (`postgraphile -C graphile.config.mjs`).
//
// Env: DATABASE_URL (required), PORT (required), PGL_MAX_POOL_SIZE (default 10),
// PGL_EXPOSED_TABLES (see bench-tables-plugin.mjs).
import { makePgService } from "postgraphile/adaptors/pg";
import { PostGraphileAmberPreset } from "postgraphile/presets/amber";
import { PostGraphileConnectionFilterPreset } from "postgraphile-plugin-connection-filter";
import { PgAggregatesPreset } from "@graphile/pg-aggregates";
import { BenchTablesPlugin } from "./bench-tables-plugin.mjs";

if (!process.env.DATABASE_URL) throw new Error("DATABASE_URL is not set");
if (!process.env.PORT) throw new Error("PORT is not set");

/** @type {GraphileConfig.Preset} */
const preset = {
  extends: [PostGraphileAmberPreset, PostGraphileConnectionFilterPreset, PgAggregatesPreset],
  plugins: [BenchTablesPlugin],
  pgServices: [
    makePgService({
      connectionString: process.env.DATABASE_URL,
      poolConfig: { max: Number(process.env.PGL_MAX_POOL_SIZE || 10) },
      schemas: ["public"],
      // Read-only, no subscriptions: don't set up a LISTEN/NOTIFY subscriber.
      pubsub: false,
    }),
  ],
  schema: {
    // Read-only schema: no create/update/delete mutations (there is no Mutation type).
    defaultBehavior: "-insert -update -delete",
  },
  grafast: {
    // No `explain` (plan/SQL) in responses, like v4 without --allow-explain.
    explain: false,
  },
  grafserv: {
    host: "127.0.0.1",
    port: Number(process.env.PORT),
    graphqlPath: "/graphql",
    // No Ruru (v5's GraphiQL), no watch mode, no GET queries.
    graphiql: false,
    graphiqlOnGraphQLGET: false,
    graphqlOverGET: false,
    watch: false,
    websockets: false,
  },
};

export default preset;
