// One call of each kind through clients generated from the checked-in contracts, so that a
// contract change that breaks callers breaks this file's compilation (tsc --noEmit, run by
// ops/dev/contracts-ts.sh): a command (with its headers), the audit export, a GraphQL query
// and a subscription. Never run; only compiled.

import createClient from "openapi-fetch";
import type { components as CommandComponents, paths as CommandPaths } from "../generated/command-api";
import type { paths as QueryPaths } from "../generated/query-api";
import type {
  DashboardQuery,
  DashboardQueryVariables,
  LiveDeviceStatsSubscription,
  LiveDeviceStatsSubscriptionVariables,
} from "../generated/operations";
import type { DeviceStats } from "../generated/schema";

type Problem = CommandComponents["schemas"]["Problem"];
type Tier = CommandComponents["schemas"]["TierName"];
type StopReason = CommandComponents["schemas"]["StopReasonName"];

function explain(problem: Problem): Error {
  return new Error(`${problem.status} ${problem.code}: ${problem.detail}`);
}

/** Creates a device safely retried under `key`; answers its id, path and log position. */
export async function createDevice(
  baseUrl: string,
  token: string,
  key: string,
): Promise<{ id: string; location: string | null; position: number }> {
  const commands = createClient<CommandPaths>({ baseUrl, headers: { authorization: `Bearer ${token}` } });
  const { data, error, response } = await commands.POST("/v1/devices", {
    params: { header: { "Idempotency-Key": key, traceparent: undefined } },
    body: { provider: "aws", cpu_cores: 4, memory_mb: 8192, android_version: 14, reference: "order-4711/phone-1" },
  });
  if (error) {
    throw explain(error);
  }
  return { id: data.id, location: response.headers.get("Location"), position: data.position };
}

/** Moves a user to another tier and stops a device for maintenance. */
export async function changeTierAndStop(
  baseUrl: string,
  token: string,
  user: string,
  device: string,
): Promise<number> {
  const commands = createClient<CommandPaths>({ baseUrl, headers: { authorization: `Bearer ${token}` } });
  const tier: Tier = "enterprise";
  const changed = await commands.PUT("/v1/users/{id}/tier", { params: { path: { id: user } }, body: { tier } });
  if (changed.error) {
    throw explain(changed.error);
  }
  const reason: StopReason = "maintenance";
  const stopped = await commands.POST("/v1/devices/{id}/stop", { params: { path: { id: device } }, body: { reason } });
  if (stopped.error) {
    throw explain(stopped.error);
  }
  return stopped.data.position;
}

/** A user's history as CSV, read where `position` has been written. */
export async function exportHistory(baseUrl: string, token: string, user: string, position: number): Promise<string> {
  const query = createClient<QueryPaths>({ baseUrl, headers: { authorization: `Bearer ${token}` } });
  const { data, error } = await query.GET("/v1/audit/events", {
    params: {
      query: { userId: user, format: "csv", personal: "omit", eventType: "DeviceCreated" },
      header: { "X-Min-Position": String(position) },
    },
    parseAs: "text",
  });
  if (error) {
    throw explain(error);
  }
  return data;
}

const DASHBOARD = /* GraphQL */ `
  query Dashboard($filter: DeviceFilterInput, $minPosition: BigInt) {
    deviceStats(filter: $filter, minPosition: $minPosition) {
      rows(first: 100) {
        userId
        status
        provider
        deviceCount
      }
      totals {
        deviceCount
        cpuCores
      }
    }
    devices(first: 10) {
      totalCount
      nodes {
        id
        status
        provider
        createdAt
      }
    }
  }
`;

/** The dashboard's numbers: running devices and the total count, typed by the schema. */
export async function dashboard(
  url: string,
  token: string,
  variables: DashboardQueryVariables,
): Promise<{ running: number; total: string }> {
  const response = await fetch(url, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ query: DASHBOARD, variables }),
  });
  const { data } = (await response.json()) as { data: DashboardQuery };
  const running = data.deviceStats.rows.filter((row) => row.status === "RUNNING").length;
  return { running, total: data.devices.totalCount };
}

const LIVE_DEVICE_STATS = /* GraphQL */ `
  subscription LiveDeviceStats($filter: DeviceFilterInput) {
    deviceStats(filter: $filter) {
      totals {
        deviceCount
      }
    }
  }
`;

/** The subscription's message for `graphql-transport-ws`, and how a pushed result is read. */
export function liveDeviceStats(variables: LiveDeviceStatsSubscriptionVariables): {
  subscribe: string;
  read: (payload: { data: LiveDeviceStatsSubscription }) => string;
} {
  return {
    subscribe: JSON.stringify({ id: "1", type: "subscribe", payload: { query: LIVE_DEVICE_STATS, variables } }),
    read: (payload) => {
      const totals: Pick<DeviceStats["totals"], "deviceCount"> = payload.data.deviceStats.totals;
      return totals.deviceCount;
    },
  };
}
