//! The web console and GraphiQL as a browser fetches them: every file from this server, with
//! its content type, a strict policy on the pages, compressed when the browser accepts it and
//! revalidated with ETags; development tokens only where the keys are the development secret.
//! (The pages at work in a real browser: cloudphone's `console` tests.)

use http_edge::auth::{DEVELOPMENT_SECRET, KeySource, Role, TokenVerifier};
use query_api::QueryApiConfig;
use reqwest::header;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::*;

/// The local paths a page's `src` and `href` attributes name.
fn linked(page: &str) -> Vec<String> {
    page.split(['"', '\''])
        .filter(|part| part.starts_with("/console/"))
        .map(str::to_owned)
        .collect()
}

async fn get(api: &TestApi, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = api.client.get(format!("http://{}{path}", api.addr));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[sqlx::test(migrations = false)]
async fn the_console_and_graphiql_load_every_file_from_this_server_under_a_strict_policy(pool: PgPool) {
    migrated(&pool).await;
    let api = start(&pool, test_config()).await;

    for (path, title) in [("/", "Cloudphone console"), ("/graphql", "Cloudphone GraphiQL")] {
        let page = get(&api, path, &[]).await;
        assert_eq!(page.status(), 200, "{path}");
        assert_eq!(page.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let policy = page.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert!(policy.contains("script-src 'self';"), "{policy}");
        let sockets = format!("connect-src 'self' ws://{0} wss://{0};", api.addr);
        assert!(policy.contains(&sockets), "{policy}");
        assert_eq!(page.headers()[header::X_FRAME_OPTIONS], "DENY");
        let html = page.text().await.unwrap();
        assert!(html.contains(title), "{path}");
        // No page names another host: no `//` URL, no CDN.
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("src=\"//"),
            "{html}"
        );
        let files = linked(&html);
        assert!(files.len() >= 3, "{path} links {files:?}");
        for file in files {
            let answer = get(&api, &file, &[]).await;
            assert_eq!(answer.status(), 200, "{file}");
            let kind = answer.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
            let expected = if file.ends_with(".css") {
                "text/css"
            } else {
                "text/javascript"
            };
            assert!(kind.starts_with(expected), "{file}: {kind}");
            assert_eq!(answer.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
    }

    // GraphiQL's bundle: 3.5 MB as it is, far less compressed; then a 304 for a browser that has it.
    let path = "/console/vendor/graphiql.min.js";
    let plain = get(&api, path, &[]).await;
    assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
    assert_eq!(plain.headers()[header::CACHE_CONTROL], "no-cache");
    let plain_tag = plain.headers()[header::ETAG].clone();
    assert!(plain.bytes().await.unwrap().len() > 3_000_000);
    let compressed = get(&api, path, &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(compressed.headers()[header::CONTENT_ENCODING], "gzip");
    assert_eq!(compressed.headers()[header::VARY], "accept-encoding");
    let tag = compressed.headers()[header::ETAG].to_str().unwrap().to_owned();
    assert_ne!(tag, plain_tag.to_str().unwrap(), "each encoding has its own ETag");
    assert!(compressed.bytes().await.unwrap().len() < 1_000_000);
    let cached = get(
        &api,
        path,
        &[("accept-encoding", "gzip"), ("if-none-match", tag.as_str())],
    )
    .await;
    assert_eq!(cached.status(), 304);
    assert!(cached.bytes().await.unwrap().is_empty());

    // A Host header that would add directives to the policy is left out of it.
    let odd = get(&api, "/", &[("host", "evil;script-src *")]).await;
    let policy = odd.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        policy.contains("connect-src 'self';") && !policy.contains("evil"),
        "{policy}"
    );
}

#[sqlx::test(migrations = false)]
async fn graphiql_turned_off_is_a_405_and_the_console_stays(pool: PgPool) {
    migrated(&pool).await;
    let api = start(
        &pool,
        QueryApiConfig {
            graphiql: false,
            ..test_config()
        },
    )
    .await;
    let graphiql = get(&api, "/graphql", &[]).await;
    assert_eq!(graphiql.status(), 405);
    let body: Value = graphiql.json().await.unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "METHOD_NOT_ALLOWED");
    assert_eq!(get(&api, "/", &[]).await.status(), 200);
}

#[sqlx::test(migrations = false)]
async fn development_tokens_are_minted_only_where_the_keys_are_the_development_secret(pool: PgPool) {
    migrated(&pool).await;
    // A real secret: the route does not exist.
    let production = start(&pool, test_config()).await;
    let url = format!("http://{}/console/dev-token", production.addr);
    let refused = production
        .client
        .post(&url)
        .json(&json!({"role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    assert_eq!(production.client.get(&url).send().await.unwrap().status(), 404);
    drop(production);

    let development = start(
        &pool,
        QueryApiConfig {
            keys: KeySource::Secret(DEVELOPMENT_SECRET.to_owned()),
            ..test_config()
        },
    )
    .await;
    let url = format!("http://{}/console/dev-token", development.addr);
    assert_eq!(development.client.get(&url).send().await.unwrap().status(), 200);
    let verifier = TokenVerifier::new(&KeySource::Secret(DEVELOPMENT_SECRET.to_owned())).unwrap();

    let user = Uuid::now_v7();
    let minted: Value = development
        .client
        .post(&url)
        .json(&json!({"role": "user", "subject": user}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let principal = verifier.verify(minted["token"].as_str().unwrap()).unwrap();
    assert!(principal.is_user(user));

    // An admin token with a new subject, that the query API itself accepts.
    let minted: Value = development
        .client
        .post(&url)
        .json(&json!({"role": "admin"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = minted["token"].as_str().unwrap();
    assert_eq!(verifier.verify(token).unwrap().role, Role::Admin);
    let answer = development
        .client
        .post(format!("http://{}/graphql", development.addr))
        .bearer_auth(token)
        .json(&json!({"query": "{ projectionStatus { name } }"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // Services, auditors and malformed requests are refused.
    for body in [
        json!({"role": "service"}),
        json!({"role": "auditor"}),
        json!({"role": "user", "subject": "alice"}),
        json!({"role": "user", "extra": 1}),
    ] {
        let answer = development.client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(answer.status(), 400, "{body}");
    }
}
