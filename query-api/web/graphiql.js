// GraphiQL for the query API, loaded from this server's own files (no CDN), sending the token
// the console signed in with (sessionStorage, or localStorage when remembered) as the
// Authorization header of every query, and as the connection parameter of subscriptions.
(function () {
  "use strict";
  var TOKEN_KEY = "cloudphone.token";
  var token = sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY);
  var socket = (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + "/graphql";
  var headers = token ? { Authorization: "Bearer " + token } : {};
  var fetcher = GraphiQL.createFetcher({
    url: "/graphql",
    headers: headers,
    subscriptionUrl: socket,
    wsConnectionParams: token ? { authorization: "Bearer " + token } : {},
  });
  var h = React.createElement;
  var console = h("a", { href: "/", className: "graphiql-console-link" }, token ? "Cloudphone console" : "Sign in on the console first");
  ReactDOM.createRoot(document.getElementById("graphiql")).render(
    h(
      GraphiQL,
      {
        fetcher: fetcher,
        defaultEditorToolsVisibility: true,
        defaultQuery: "{\n  projectionStatus {\n    name\n    position\n    head\n    lagEvents\n  }\n}\n",
      },
      h(GraphiQL.Logo, null, console),
    ),
  );
})();
