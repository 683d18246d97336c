//! Bearer tokens: who is calling, and what they may touch.
//!
//! Tokens are JWTs. HS256 with a shared secret serves local use and `cloudphone token`;
//! production verifies RS256 or ES256 with a configured public key (PEM) or a JWKS file, whose
//! key is picked by the token's `kid`. Roles: `user` acts only on its own user id and devices;
//! `admin` acts on everything; `service` is a machine scoped by the `scope` claim.

use std::fmt;
use std::path::Path;

use chrono::{DateTime, Utc};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The development secret used when none is configured. Start-up warns loudly about it.
pub const DEVELOPMENT_SECRET: &str = "cloudphone-development-secret-change-me";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Admin,
    Service,
    /// Reads and exports the event history (`GET /v1/audit/events`); runs no command.
    Auditor,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::User => "user",
            Role::Admin => "admin",
            Role::Service => "service",
            Role::Auditor => "auditor",
        })
    }
}

/// Scopes a `service` token can hold.
pub mod scope {
    /// Register users and change their tier (a signup or billing backend).
    pub const USERS_WRITE: &str = "users:write";
    /// Run every device command for any user (an automation backend).
    pub const DEVICES_WRITE: &str = "devices:write";
    /// Report device failures (a provider's webhook).
    pub const DEVICES_REPORT: &str = "devices:report";
    /// Read every user's dashboards through the query API (a BI tool, a reporting job).
    pub const DASHBOARDS_READ: &str = "dashboards:read";
}

/// The claims of a Cloudphone token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// A user id for `user` and `admin`; the service's name for `service`.
    pub sub: String,
    pub role: Role,
    /// Space-separated scopes (services only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    pub exp: i64,
    /// Issued at: never in the future (beyond the leeway), and at most the configured lifetime
    /// before `exp`.
    pub iat: i64,
    /// Not before: the token is refused until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    pub subject: String,
    /// The subject as a user id, for `user` and `admin` tokens.
    pub user_id: Option<Uuid>,
    pub scopes: Vec<String>,
    /// The token's `exp` (Unix seconds): what a long-lived connection authenticated with it
    /// may not outlast (by more than [`LEEWAY_SECONDS`]).
    pub expires_at: i64,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// May read the whole event history (admins and auditors).
    pub fn may_audit(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Auditor)
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.role == Role::Service && self.scopes.iter().any(|s| s == scope)
    }

    /// True when the caller is the user `user_id` themselves.
    pub fn is_user(&self, user_id: Uuid) -> bool {
        self.role == Role::User && self.user_id == Some(user_id)
    }

    /// Key for per-client limits.
    pub fn rate_key(&self) -> String {
        format!("{}:{}", self.role, self.subject)
    }
}

/// Why a token was refused. The detail goes to logs; clients only learn "invalid token".
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("malformed Authorization header")]
    Malformed,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token subject `{0}` is not a user id")]
    BadSubject(String),
    #[error("no key for key id {0:?}")]
    UnknownKey(Option<String>),
    #[error("token issued in the future (iat {iat}, now {now})")]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("token lives {lifetime} s, longer than the {limit} s allowed")]
    LivesTooLong { lifetime: i64, limit: i64 },
}

/// Where verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// HS256 shared secret.
    Secret(String),
    /// An RS256 or ES256 public key in PEM.
    PublicKeyPem { algorithm: Algorithm, pem: Vec<u8> },
    /// A JWKS document; the token's `kid` selects the key.
    Jwks(JwkSet),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid key: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("invalid JWKS document: {0}")]
    Jwks(#[from] serde_json::Error),
    #[error("algorithm must be RS256 or ES256 for a public key, got {0}")]
    Algorithm(String),
}

impl KeySource {
    pub fn public_key_file(path: &Path, algorithm: &str) -> Result<Self, KeyError> {
        let algorithm = match algorithm {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => return Err(KeyError::Algorithm(other.to_owned())),
        };
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        // Fail at start-up, not at the first request.
        match algorithm {
            Algorithm::ES256 => DecodingKey::from_ec_pem(&pem)?,
            _ => DecodingKey::from_rsa_pem(&pem)?,
        };
        Ok(KeySource::PublicKeyPem { algorithm, pem })
    }

    pub fn jwks_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(KeySource::Jwks(serde_json::from_str(&text)?))
    }
}

/// Clock skew tolerated between the token issuer and us, for `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 30;

/// The longest a token may live (`exp - iat`) unless configured otherwise: a day, what
/// `cloudphone token` mints by default.
pub const DEFAULT_MAX_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Verifies bearer tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: VerifierKeys,
    /// Longest `exp - iat` accepted; `None` accepts any lifetime.
    max_lifetime: Option<i64>,
}

#[derive(Clone)]
enum VerifierKeys {
    Single {
        key: DecodingKey,
        validation: Box<Validation>,
    },
    Jwks(JwkSet),
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = match self.keys {
            VerifierKeys::Single { .. } => "single key",
            VerifierKeys::Jwks(_) => "JWKS",
        };
        write!(f, "TokenVerifier({keys}, max lifetime {:?} s)", self.max_lifetime)
    }
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    // `iat` is required too: [`Claims`] has no default for it.
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECONDS;
    validation
}

impl TokenVerifier {
    pub fn new(source: &KeySource) -> Result<Self, KeyError> {
        let keys = match source {
            KeySource::Secret(secret) => VerifierKeys::Single {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: Box::new(validation(Algorithm::HS256)),
            },
            KeySource::PublicKeyPem { algorithm, pem } => VerifierKeys::Single {
                key: match algorithm {
                    Algorithm::ES256 => DecodingKey::from_ec_pem(pem)?,
                    _ => DecodingKey::from_rsa_pem(pem)?,
                },
                validation: Box::new(validation(*algorithm)),
            },
            KeySource::Jwks(set) => VerifierKeys::Jwks(set.clone()),
        };
        Ok(TokenVerifier {
            keys,
            max_lifetime: Some(DEFAULT_MAX_TOKEN_LIFETIME.as_secs() as i64),
        })
    }

    /// Refuses tokens whose `exp - iat` is longer than `limit` (`None`: any lifetime).
    pub fn with_max_lifetime(mut self, limit: Option<std::time::Duration>) -> Self {
        self.max_lifetime = limit.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self
    }

    /// Verifies an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(AuthError::Malformed)?;
        self.verify(token.trim())
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = match &self.keys {
            VerifierKeys::Single { key, validation } => jsonwebtoken::decode::<Claims>(token, key, validation)?.claims,
            VerifierKeys::Jwks(set) => {
                let header = jsonwebtoken::decode_header(token)?;
                let jwk = header
                    .kid
                    .as_deref()
                    .and_then(|kid| set.find(kid))
                    .ok_or_else(|| AuthError::UnknownKey(header.kid.clone()))?;
                let key = DecodingKey::from_jwk(jwk)?;
                // The algorithm comes from our key set, never from the token alone.
                let algorithm = match jwk.common.key_algorithm.map(|a| a.to_string()).as_deref() {
                    Some("ES256") => Algorithm::ES256,
                    _ => Algorithm::RS256,
                };
                jsonwebtoken::decode::<Claims>(token, &key, &validation(algorithm))?.claims
            }
        };
        // jsonwebtoken checks `exp` and `nbf`; `iat` and the lifetime are ours.
        let now = Utc::now().timestamp();
        if claims.iat > now.saturating_add(LEEWAY_SECONDS as i64) {
            return Err(AuthError::IssuedInFuture { iat: claims.iat, now });
        }
        if let Some(limit) = self.max_lifetime {
            let lifetime = claims.exp.saturating_sub(claims.iat);
            if lifetime > limit {
                return Err(AuthError::LivesTooLong { lifetime, limit });
            }
        }
        let user_id = match claims.role {
            Role::User | Role::Admin => {
                Some(Uuid::parse_str(&claims.sub).map_err(|_| AuthError::BadSubject(claims.sub.clone()))?)
            }
            Role::Service | Role::Auditor => None,
        };
        Ok(Principal {
            role: claims.role,
            user_id,
            scopes: claims.scope.split_whitespace().map(str::to_owned).collect(),
            subject: claims.sub,
            expires_at: claims.exp,
        })
    }
}

/// Signs an HS256 token, for `cloudphone token` and tests.
pub fn mint_token(
    secret: &str,
    subject: &str,
    role: Role,
    scopes: &[&str],
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        sub: subject.to_owned(),
        role,
        scope: scopes.join(" "),
        iat: now.timestamp(),
        exp: (now + ttl).timestamp(),
        nbf: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(&KeySource::Secret("s3cret".into())).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_into_its_principal() {
        let user = Uuid::now_v7();
        let token = mint_token(
            "s3cret",
            &user.to_string(),
            Role::User,
            &[],
            Utc::now(),
            chrono::Duration::hours(1),
        )
        .unwrap();
        let principal = verifier().verify_header(Some(&format!("Bearer {token}"))).unwrap();
        assert!(principal.is_user(user));
        assert!(!principal.is_admin());
        assert_eq!(principal.subject, user.to_string());
    }

    #[test]
    fn wrong_secret_expired_or_garbled_tokens_are_refused() {
        let user = Uuid::now_v7().to_string();
        let other = mint_token("other", &user, Role::Admin, &[], Utc::now(), chrono::Duration::hours(1)).unwrap();
        assert!(verifier().verify(&other).is_err());
        let expired = mint_token(
            "s3cret",
            &user,
            Role::User,
            &[],
            Utc::now() - chrono::Duration::hours(2),
            chrono::Duration::hours(1),
        )
        .unwrap();
        assert!(verifier().verify(&expired).is_err());
        assert!(matches!(verifier().verify_header(None), Err(AuthError::Missing)));
        assert!(matches!(
            verifier().verify_header(Some("Basic abc")),
            Err(AuthError::Malformed)
        ));
        assert!(verifier().verify("not.a.token").is_err());
    }

    #[test]
    fn a_user_token_must_name_a_user_id_and_services_carry_scopes() {
        let bad = mint_token(
            "s3cret",
            "alice",
            Role::User,
            &[],
            Utc::now(),
            chrono::Duration::hours(1),
        )
        .unwrap();
        assert!(matches!(verifier().verify(&bad), Err(AuthError::BadSubject(_))));
        let service = mint_token(
            "s3cret",
            "billing",
            Role::Service,
            &[scope::USERS_WRITE],
            Utc::now(),
            chrono::Duration::hours(1),
        )
        .unwrap();
        let principal = verifier().verify(&service).unwrap();
        assert!(principal.has_scope(scope::USERS_WRITE));
        assert!(!principal.has_scope(scope::DEVICES_WRITE));
    }

    #[test]
    fn a_token_signed_with_another_algorithm_is_refused() {
        // alg=none and friends: only HS256 is accepted with a secret.
        let claims = Claims {
            sub: Uuid::now_v7().to_string(),
            role: Role::Admin,
            scope: String::new(),
            iat: Utc::now().timestamp(),
            exp: Utc::now().timestamp() + 3600,
            nbf: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(verifier().verify(&token).is_err());
    }

    fn signed(claims: &Claims) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    }

    fn claims_at(iat: i64, exp: i64, nbf: Option<i64>) -> Claims {
        Claims {
            sub: Uuid::now_v7().to_string(),
            role: Role::User,
            scope: String::new(),
            iat,
            exp,
            nbf,
        }
    }

    #[test]
    fn not_before_issued_at_and_lifetime_are_checked_with_the_leeway() {
        let now = Utc::now().timestamp();
        let leeway = LEEWAY_SECONDS as i64;
        let verifier = verifier();
        // Not yet valid, beyond the leeway; and within it.
        let early = signed(&claims_at(now, now + 600, Some(now + 120)));
        assert!(verifier.verify(&early).is_err(), "a token before its nbf was accepted");
        let almost = signed(&claims_at(now, now + 600, Some(now + leeway / 2)));
        assert!(verifier.verify(&almost).is_ok());
        // Issued in the future.
        let future = signed(&claims_at(now + 120, now + 600, None));
        assert!(matches!(
            verifier.verify(&future),
            Err(AuthError::IssuedInFuture { .. })
        ));
        let skewed = signed(&claims_at(now + leeway / 2, now + 600, None));
        assert!(verifier.verify(&skewed).is_ok());
        // Lives longer than the default day; and forever.
        let long = signed(&claims_at(now, now + 2 * 86_400, None));
        assert!(matches!(verifier.verify(&long), Err(AuthError::LivesTooLong { .. })));
        let forever = signed(&claims_at(now, i64::MAX, None));
        assert!(verifier.verify(&forever).is_err());
        // A configured limit, and none.
        let hour = verifier
            .clone()
            .with_max_lifetime(Some(std::time::Duration::from_secs(3600)));
        let two_hours = signed(&claims_at(now, now + 7200, None));
        assert!(hour.verify(&two_hours).is_err());
        assert!(verifier.clone().with_max_lifetime(None).verify(&long).is_ok());
        // No iat at all.
        let no_iat = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": Uuid::now_v7().to_string(), "role": "user", "exp": now + 600}),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(verifier.verify(&no_iat).is_err());
    }
}
