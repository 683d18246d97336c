// Queries over HTTP (POST /graphql), and documents built from selection trees so that a field
// the server does not have yet (an older query API) is dropped and shown as "n/a" instead of
// failing the whole panel.

export class RequestError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** POSTs one document; resolves to `{ data, errors }` (GraphQL errors are the caller's). */
export async function post(token, query, variables = {}) {
  const response = await fetch("/graphql", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body: JSON.stringify({ query, variables }),
  });
  let body;
  try {
    body = await response.json();
  } catch {
    throw new RequestError(`the query API answered ${response.status} without JSON`, response.status);
  }
  if (!response.ok && !body.data) {
    const first = (body.errors || [])[0] || {};
    throw new RequestError(first.message || `HTTP ${response.status}`, response.status, first.extensions?.code);
  }
  return body;
}

// Fields the server said it does not know (`Unknown field "x" on type "Y"`): root fields by
// operation (a query field may exist where its subscription does not), others by name alone
// (the trees below never use one name for two different fields).
const missing = new Set();
const missingRoot = { query: new Set(), subscription: new Set() };
const UNKNOWN_FIELD = /Unknown field "(\w+)" on type "(\w+)"/;

/**
 * A selection tree: `{ field: true, "field(args)": { ...subtree } }`. `document("query", tree)`
 * writes it without the fields known to be missing (null when nothing is left).
 */
export function document(operation, tree, variables = "") {
  const text = selection(tree, missingRoot[operation]);
  return text ? `${operation}${variables} ${text}` : null;
}

function selection(tree, skip) {
  const parts = [];
  for (const [key, sub] of Object.entries(tree)) {
    if (skip.has(fieldName(key))) continue;
    if (sub === true) {
      parts.push(key);
    } else {
      const inner = selection(sub, missing);
      if (inner) parts.push(`${key} ${inner}`);
    }
  }
  return parts.length ? `{ ${parts.join(" ")} }` : "";
}

function fieldName(key) {
  return key.split("(")[0].trim();
}

/** Remembers the fields `errors` name as unknown; true when there were new ones (ask again). */
export function learnMissing(errors) {
  let learned = false;
  for (const error of Array.isArray(errors) ? errors : []) {
    const match = UNKNOWN_FIELD.exec(error.message || "");
    if (!match) continue;
    const [, field, type] = match;
    const set = type === "Query" ? missingRoot.query : type === "Subscription" ? missingRoot.subscription : missing;
    if (!set.has(field)) {
      set.add(field);
      learned = true;
    }
  }
  return learned;
}

/** Queries `tree`, dropping fields the server lacks; resolves to `{ data, errors }`. */
export async function queryTree(token, tree, variables = {}, declarations = "") {
  for (let attempt = 0; attempt < 10; attempt++) {
    const text = document("query", tree, declarations);
    if (!text) return { data: {}, errors: [] };
    const answer = await post(token, text, variables);
    if (answer.data || !learnMissing(answer.errors)) return answer;
  }
  throw new RequestError("the schema lacks every field asked for");
}

/** A value for the page: "n/a" when the server lacks the field, "–" when it is null. */
export function show(value, format = (v) => String(v)) {
  if (value === undefined) return "n/a";
  if (value === null) return "–";
  return format(value);
}
