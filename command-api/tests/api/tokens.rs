//! Production key setups: RS256 and ES256 public keys, and a JWKS file selected by `kid`.

use std::path::PathBuf;

use chrono::Utc;
use http_edge::auth::{Claims, KeySource, Role, TokenVerifier};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use uuid::Uuid;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn sign(algorithm: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    let claims = Claims {
        sub: Uuid::now_v7().to_string(),
        role: Role::User,
        scope: String::new(),
        iat: Utc::now().timestamp(),
        exp: Utc::now().timestamp() + 600,
        nbf: None,
    };
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn es256_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(fixture("es256-private.pk8.pem")).unwrap()).unwrap()
}

fn rs256_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256-private.pem")).unwrap()).unwrap()
}

#[test]
fn a_public_key_verifies_its_own_tokens_only() {
    let es = TokenVerifier::new(&KeySource::public_key_file(&fixture("es256-public.pem"), "ES256").unwrap()).unwrap();
    assert!(es.verify(&sign(Algorithm::ES256, None, &es256_key())).is_ok());
    assert!(es.verify(&sign(Algorithm::RS256, None, &rs256_key())).is_err());
    // An HS256 token "signed" with the public key's bytes (the classic confusion attack).
    let public_pem = std::fs::read(fixture("es256-public.pem")).unwrap();
    assert!(
        es.verify(&sign(Algorithm::HS256, None, &EncodingKey::from_secret(&public_pem)))
            .is_err()
    );

    let rs = TokenVerifier::new(&KeySource::public_key_file(&fixture("rs256-public.pem"), "RS256").unwrap()).unwrap();
    assert!(rs.verify(&sign(Algorithm::RS256, None, &rs256_key())).is_ok());
    assert!(rs.verify(&sign(Algorithm::ES256, None, &es256_key())).is_err());
    assert!(KeySource::public_key_file(&fixture("rs256-public.pem"), "HS256").is_err());
}

#[test]
fn a_jwks_file_picks_the_key_by_kid() {
    let verifier = TokenVerifier::new(&KeySource::jwks_file(&fixture("jwks.json")).unwrap()).unwrap();
    assert!(
        verifier
            .verify(&sign(Algorithm::ES256, Some("ec-1"), &es256_key()))
            .is_ok()
    );
    assert!(
        verifier
            .verify(&sign(Algorithm::RS256, Some("rsa-1"), &rs256_key()))
            .is_ok()
    );
    // The right key under the wrong kid, an unknown kid, no kid.
    assert!(
        verifier
            .verify(&sign(Algorithm::RS256, Some("ec-1"), &rs256_key()))
            .is_err()
    );
    assert!(
        verifier
            .verify(&sign(Algorithm::ES256, Some("gone"), &es256_key()))
            .is_err()
    );
    assert!(verifier.verify(&sign(Algorithm::ES256, None, &es256_key())).is_err());
}

/// Tokens that are not yet valid, claim to be issued in the future, or live longer than the
/// configured limit are refused 401 like forged ones; a token within every bound works.
#[sqlx::test(migrations = false)]
async fn not_yet_valid_future_and_long_lived_tokens_are_refused(pool: sqlx::PgPool) {
    use crate::support::{SECRET, TestApp};
    let app = TestApp::spawn_with(pool, |config| {
        config.max_token_lifetime = Some(std::time::Duration::from_secs(3600));
    })
    .await;
    let now = Utc::now().timestamp();
    let user = Uuid::now_v7();
    let sign = |iat: i64, exp: i64, nbf: Option<i64>| {
        let claims = Claims {
            sub: user.to_string(),
            role: Role::User,
            scope: String::new(),
            iat,
            exp,
            nbf,
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let body = serde_json::json!({"tier": "pro", "email": "a@example.com", "phone": "+4915112345678"});
    for (name, token) in [
        ("nbf in 10 minutes", sign(now, now + 1800, Some(now + 600))),
        ("iat in 10 minutes", sign(now + 600, now + 1800, None)),
        ("lives 2 hours", sign(now, now + 7200, None)),
        ("lives forever", sign(now, i64::MAX / 2, None)),
    ] {
        let answer = app.post("/v1/users", &token, body.clone()).await;
        assert_eq!(
            (answer.status.as_u16(), answer.code()),
            (401, "unauthorized"),
            "{name}: {answer:?}"
        );
    }
    let good = sign(now - 5, now + 1800, Some(now - 5));
    let answer = app.post("/v1/users", &good, body).await;
    assert_eq!(answer.status.as_u16(), 201, "{answer:?}");
}
