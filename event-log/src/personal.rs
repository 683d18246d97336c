//! Personal data at rest: per-user data keys wrapped by a master key, and the field
//! encryption the log stores, so that a user can be forgotten (crypto-shredding) although
//! events are immutable.
//!
//! - A payload field an event type lists in `PERSONAL_FIELDS` is stored as the string
//!   `enc:v1:<base64url(nonce || ciphertext || tag)>`: AES-256-GCM under the user's data key,
//!   over the field's JSON text, with associated data binding it to the user and the field
//!   name (a token copied into another user's event or another field does not decrypt).
//! - A data key is 32 random bytes, stored in `personal_data_keys` wrapped (AES-256-GCM) by
//!   the active master key, with the user id as associated data. Master keys come from
//!   configuration only; `cloudphone keys rotate` rewraps data keys under a new one while
//!   every role keeps running (they unwrap with the old or the new key).
//! - Erasure replaces the wrapped key by a tombstone. The log, its replicas, Kafka and every
//!   export keep the ciphertext, which nobody can read any more; the hash chain covers the
//!   ciphertext and still verifies.
//!
//! Nonces are random (96 bits): a data key encrypts a handful of fields per user, far from
//! the 2^32 messages where random nonces would need care.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgPool;
use uuid::Uuid;

pub use crate::export::Personal;

/// Prefix of an encrypted field's stored value.
pub const TOKEN_PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 12;
const FIELD_AAD_TAG: &[u8] = b"cloudphone.personal.v1\0";
const WRAP_AAD_TAG: &[u8] = b"cloudphone.data-key.v1\0";

/// The master key every role uses when none is configured. Anyone with this source code can
/// read data encrypted under it: it is for local use only, and the roles warn loudly.
pub const DEVELOPMENT_MASTER_KEY: &str = "dev:Y2xvdWRwaG9uZS1kZXZlbG9wbWVudC1tYXN0ZXItayE=";

/// Why personal data could not be encrypted, decrypted, or its key managed.
#[derive(Debug, thiserror::Error)]
pub enum PersonalDataError {
    #[error("invalid master key: {0} (expected <id>:<base64 of 32 bytes>)")]
    InvalidMasterKey(String),
    #[error("the personal data of user {0} has been erased")]
    Erased(Uuid),
    #[error("the data key of user {user_id} is wrapped by master key {key_id:?}, which is not configured")]
    UnknownMasterKey { user_id: Uuid, key_id: String },
    #[error("the data key of user {0} does not unwrap (wrong master key material, or a tampered row)")]
    Unwrap(Uuid),
    #[error("personal field {field:?} of user {user_id} does not decrypt")]
    Decrypt { user_id: Uuid, field: String },
    #[error("personal data keys: {0}")]
    Database(#[from] sqlx::Error),
}

/// A master key: wraps and unwraps data keys. `Debug` shows the id only.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    cipher: Aes256Gcm,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// Parses `<id>:<base64 of 32 bytes>` (the form `cloudphone keys generate` prints).
    pub fn parse(spec: &str) -> Result<Self, PersonalDataError> {
        let invalid = |why: &str| PersonalDataError::InvalidMasterKey(why.to_owned());
        let (id, material) = spec.trim().split_once(':').ok_or_else(|| invalid("no ':'"))?;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(invalid("the id must be 1 to 64 characters of [A-Za-z0-9._-]"));
        }
        let bytes = STANDARD
            .decode(material)
            .map_err(|_| invalid("the key is not base64"))?;
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| invalid("the key is not 32 bytes"))?;
        Ok(MasterKey {
            id: id.to_owned(),
            cipher,
        })
    }

    /// A new random master key and its configuration form.
    pub fn generate(id: &str) -> Result<(Self, String), PersonalDataError> {
        let key = Key::<Aes256Gcm>::generate();
        let spec = format!("{id}:{}", STANDARD.encode(key.as_slice()));
        Ok((Self::parse(&spec)?, spec))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, user_id: Uuid, data_key: &Key<Aes256Gcm>) -> Vec<u8> {
        seal(&self.cipher, &wrap_aad(user_id), data_key.as_slice())
    }

    fn unwrap_key(&self, user_id: Uuid, wrapped: &[u8]) -> Result<DataKey, PersonalDataError> {
        let bytes = open(&self.cipher, &wrap_aad(user_id), wrapped).ok_or(PersonalDataError::Unwrap(user_id))?;
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| PersonalDataError::Unwrap(user_id))?;
        Ok(DataKey { cipher })
    }
}

fn wrap_aad(user_id: Uuid) -> Vec<u8> {
    [WRAP_AAD_TAG, user_id.as_bytes()].concat()
}

fn field_aad(user_id: Uuid, field: &str) -> Vec<u8> {
    [FIELD_AAD_TAG, user_id.as_bytes(), field.as_bytes()].concat()
}

/// `nonce || ciphertext || tag`.
fn seal(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce = Nonce::generate();
    let mut out = nonce.to_vec();
    // Encryption into a Vec cannot fail for inputs this small (the limit is 64 GiB).
    if let Ok(sealed) = cipher.encrypt(&nonce, Payload { msg: plaintext, aad }) {
        out.extend_from_slice(&sealed);
    }
    out
}

fn open(cipher: &Aes256Gcm, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + 16 {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_from(nonce).ok()?;
    cipher.decrypt(&nonce, Payload { msg: body, aad }).ok()
}

/// The active master key (wraps new and rotated data keys) and the previous ones (still
/// unwrap keys not yet rotated).
#[derive(Debug, Clone)]
pub struct MasterKeyring {
    active: MasterKey,
    previous: Vec<MasterKey>,
    development: bool,
}

impl MasterKeyring {
    pub fn new(active: MasterKey, previous: Vec<MasterKey>) -> Result<Self, PersonalDataError> {
        let mut ids: Vec<&str> = previous.iter().map(MasterKey::id).chain([active.id()]).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(PersonalDataError::InvalidMasterKey(
                "two master keys share an id".into(),
            ));
        }
        Ok(MasterKeyring {
            active,
            previous,
            development: false,
        })
    }

    /// From configuration: the active key's spec (the development key when absent) and the
    /// specs of previous keys.
    pub fn from_config(active: Option<&str>, previous: &[String]) -> Result<Self, PersonalDataError> {
        let active_spec = active.unwrap_or(DEVELOPMENT_MASTER_KEY).trim();
        let previous = previous
            .iter()
            .filter(|spec| !spec.trim().is_empty())
            .map(|spec| MasterKey::parse(spec))
            .collect::<Result<_, _>>()?;
        let mut keyring = Self::new(MasterKey::parse(active_spec)?, previous)?;
        keyring.development = active_spec == DEVELOPMENT_MASTER_KEY;
        Ok(keyring)
    }

    pub fn development() -> Self {
        // The constant is valid by construction; a unit test keeps it so.
        Self::from_config(None, &[]).unwrap_or_else(|_| unreachable!("the development master key parses"))
    }

    /// True when the active key is the development key from the source code.
    pub fn is_development(&self) -> bool {
        self.development
    }

    pub fn active(&self) -> &MasterKey {
        &self.active
    }

    fn by_id(&self, id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.active)
            .chain(&self.previous)
            .find(|key| key.id == id)
    }
}

/// A user's data key. `Debug` never shows it.
#[derive(Clone)]
pub struct DataKey {
    cipher: Aes256Gcm,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<secret>)")
    }
}

impl DataKey {
    fn generate() -> (Self, Key<Aes256Gcm>) {
        let key = Key::<Aes256Gcm>::generate();
        (
            DataKey {
                cipher: Aes256Gcm::new(&key),
            },
            key,
        )
    }

    /// The stored token for one personal field's value.
    pub fn encrypt_field(&self, user_id: Uuid, field: &str, value: &Value) -> String {
        let plaintext = value.to_string();
        let sealed = seal(&self.cipher, &field_aad(user_id, field), plaintext.as_bytes());
        let mut token = String::with_capacity(TOKEN_PREFIX.len() + sealed.len() * 4 / 3 + 4);
        token.push_str(TOKEN_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&sealed, &mut token);
        token
    }

    pub fn decrypt_field(&self, user_id: Uuid, field: &str, token: &str) -> Result<Value, PersonalDataError> {
        let failed = || PersonalDataError::Decrypt {
            user_id,
            field: field.to_owned(),
        };
        let encoded = token.strip_prefix(TOKEN_PREFIX).ok_or_else(failed)?;
        let sealed = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| failed())?;
        let plaintext = open(&self.cipher, &field_aad(user_id, field), &sealed).ok_or_else(failed)?;
        serde_json::from_slice(&plaintext).map_err(|_| failed())
    }
}

/// True when a stored value is an encrypted field.
pub fn is_token(value: &Value) -> bool {
    value.as_str().is_some_and(|s| s.starts_with(TOKEN_PREFIX))
}

/// Encrypts the personal `fields` of a payload in place (fields absent or already encrypted
/// are left as they are).
pub fn seal_fields(key: &DataKey, user_id: Uuid, fields: &[&str], payload: &mut Value) {
    let Some(object) = payload.as_object_mut() else {
        return;
    };
    for field in fields {
        if let Some(value) = object.get_mut(*field)
            && !is_token(value)
        {
            *value = Value::String(key.encrypt_field(user_id, field, value));
        }
    }
}

/// The personal `fields` of a stored payload as a reader sees them: decrypted with the user's
/// key, or erased when the key is gone. `None` for an event without personal fields.
pub fn reveal_fields(key: Option<&DataKey>, user_id: Uuid, fields: &[&str], payload: &Value) -> Option<Personal> {
    if fields.is_empty() {
        return None;
    }
    let object = payload.as_object()?;
    let mut values = Map::new();
    for field in fields {
        let Some(stored) = object.get(*field) else {
            continue;
        };
        let shown = match (stored.as_str(), key) {
            (Some(token), Some(key)) if token.starts_with(TOKEN_PREFIX) => {
                match key.decrypt_field(user_id, field, token) {
                    Ok(value) => value,
                    Err(error) => {
                        tracing::warn!(%user_id, %error, "personal field does not decrypt");
                        Value::Null
                    }
                }
            }
            (Some(token), None) if token.starts_with(TOKEN_PREFIX) => return Some(Personal::Erased),
            // Written before fields were encrypted: stored in clear, shown as stored.
            _ => stored.clone(),
        };
        values.insert((*field).to_owned(), shown);
    }
    Some(Personal::Decrypted(values))
}

/// How many data keys each master key wraps, and how many users are erased.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyInventory {
    pub by_master_key: Vec<(String, i64)>,
    pub erased: i64,
}

/// What a rotation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Data keys rewrapped under the active master key.
    pub rewrapped: u64,
}

/// The `personal_data_keys` table with the configured master keys.
#[derive(Debug, Clone)]
pub struct PersonalDataKeys {
    pool: PgPool,
    keyring: Arc<MasterKeyring>,
}

impl PersonalDataKeys {
    pub fn new(pool: PgPool, keyring: Arc<MasterKeyring>) -> Self {
        PersonalDataKeys { pool, keyring }
    }

    pub fn keyring(&self) -> &MasterKeyring {
        &self.keyring
    }

    /// The user's data key, created on first use. Refused once the user was erased.
    pub async fn key_for_writing(&self, user_id: Uuid, now: DateTime<Utc>) -> Result<DataKey, PersonalDataError> {
        if let Some(key) = self.stored_key(user_id).await? {
            return key.ok_or(PersonalDataError::Erased(user_id));
        }
        let (key, material) = DataKey::generate();
        let master = self.keyring.active();
        let inserted = sqlx::query(
            "INSERT INTO personal_data_keys (user_id, wrapped_key, master_key_id, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(master.wrap(user_id, &material))
        .bind(master.id())
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 1 {
            return Ok(key);
        }
        // Another request created (or erased) it first: use what is stored.
        match self.stored_key(user_id).await? {
            Some(Some(key)) => Ok(key),
            _ => Err(PersonalDataError::Erased(user_id)),
        }
    }

    /// The user's data key for reading: `None` when erased or never created.
    pub async fn key_for_reading(&self, user_id: Uuid) -> Result<Option<DataKey>, PersonalDataError> {
        Ok(self.stored_key(user_id).await?.flatten())
    }

    /// The readable keys of `user_ids` in one query (an export reads a page's worth at a
    /// time); users without a key, or erased, are absent from the map.
    pub async fn keys_for_reading(&self, user_ids: &[Uuid]) -> Result<HashMap<Uuid, DataKey>, PersonalDataError> {
        let rows: Vec<(Uuid, Vec<u8>, String)> = sqlx::query_as(
            "SELECT user_id, wrapped_key, master_key_id FROM personal_data_keys \
             WHERE user_id = ANY($1) AND wrapped_key IS NOT NULL AND master_key_id IS NOT NULL",
        )
        .bind(user_ids)
        .fetch_all(&self.pool)
        .await?;
        let mut keys = HashMap::with_capacity(rows.len());
        for (user_id, wrapped, key_id) in rows {
            let master = self
                .keyring
                .by_id(&key_id)
                .ok_or(PersonalDataError::UnknownMasterKey { user_id, key_id })?;
            keys.insert(user_id, master.unwrap_key(user_id, &wrapped)?);
        }
        Ok(keys)
    }

    /// `None`: no row; `Some(None)`: erased; `Some(Some(key))`: the key.
    async fn stored_key(&self, user_id: Uuid) -> Result<Option<Option<DataKey>>, PersonalDataError> {
        let row: Option<(Option<Vec<u8>>, Option<String>)> =
            sqlx::query_as("SELECT wrapped_key, master_key_id FROM personal_data_keys WHERE user_id = $1")
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            None => Ok(None),
            Some((Some(wrapped), Some(key_id))) => {
                let master = self
                    .keyring
                    .by_id(&key_id)
                    .ok_or(PersonalDataError::UnknownMasterKey { user_id, key_id })?;
                Ok(Some(Some(master.unwrap_key(user_id, &wrapped)?)))
            }
            Some(_) => Ok(Some(None)),
        }
    }

    /// Destroys the user's data key (or records a tombstone when there is none yet, so none
    /// can be created later). Returns true when a key was destroyed by this call.
    pub async fn erase(&self, user_id: Uuid, now: DateTime<Utc>) -> Result<bool, PersonalDataError> {
        let destroy = || {
            sqlx::query(
                "UPDATE personal_data_keys SET wrapped_key = NULL, master_key_id = NULL, erased_at = $2 \
                 WHERE user_id = $1 AND erased_at IS NULL",
            )
            .bind(user_id)
            .bind(now)
            .execute(&self.pool)
        };
        if destroy().await?.rows_affected() == 1 {
            return Ok(true);
        }
        let tombstone = sqlx::query(
            "INSERT INTO personal_data_keys (user_id, created_at, erased_at) VALUES ($1, $2, $2) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        // A key created between the two statements (a registration racing the erasure) is
        // destroyed now.
        Ok(tombstone.rows_affected() == 0 && destroy().await?.rows_affected() == 1)
    }

    /// Rewraps every data key not wrapped by the active master key, `batch` keys per
    /// transaction; `on_progress` sees the running total. Rows are locked one batch at a
    /// time (SKIP LOCKED), so writers and readers of other keys never wait, and a rotation
    /// that stops can simply be run again.
    pub async fn rotate(
        &self,
        batch: i64,
        now: DateTime<Utc>,
        mut on_progress: impl FnMut(u64),
    ) -> Result<RotationReport, PersonalDataError> {
        let active = self.keyring.active();
        let mut report = RotationReport::default();
        loop {
            let mut tx = self.pool.begin().await?;
            let rows: Vec<(Uuid, Vec<u8>, String)> = sqlx::query_as(
                "SELECT user_id, wrapped_key, master_key_id FROM personal_data_keys \
                 WHERE master_key_id IS NOT NULL AND master_key_id <> $1 \
                 ORDER BY user_id LIMIT $2 FOR UPDATE SKIP LOCKED",
            )
            .bind(active.id())
            .bind(batch.max(1))
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                tx.commit().await?;
                return Ok(report);
            }
            let mut user_ids = Vec::with_capacity(rows.len());
            let mut wrapped = Vec::with_capacity(rows.len());
            for (user_id, old_wrapped, key_id) in rows {
                let old = self
                    .keyring
                    .by_id(&key_id)
                    .ok_or(PersonalDataError::UnknownMasterKey { user_id, key_id })?;
                let data_key = old.unwrap_material(user_id, &old_wrapped)?;
                user_ids.push(user_id);
                wrapped.push(active.wrap(user_id, &data_key));
            }
            sqlx::query(
                "UPDATE personal_data_keys AS k SET wrapped_key = r.wrapped_key, master_key_id = $3, rotated_at = $4 \
                 FROM unnest($1::uuid[], $2::bytea[]) AS r(user_id, wrapped_key) WHERE k.user_id = r.user_id",
            )
            .bind(&user_ids)
            .bind(&wrapped)
            .bind(active.id())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            report.rewrapped += user_ids.len() as u64;
            on_progress(report.rewrapped);
        }
    }

    /// Data keys per master key, and erased users.
    pub async fn inventory(&self) -> Result<KeyInventory, PersonalDataError> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT master_key_id, count(*) FROM personal_data_keys GROUP BY master_key_id ORDER BY master_key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut inventory = KeyInventory::default();
        for (key_id, count) in rows {
            match key_id {
                Some(id) => inventory.by_master_key.push((id, count)),
                None => inventory.erased = count,
            }
        }
        Ok(inventory)
    }
}

impl MasterKey {
    fn unwrap_material(&self, user_id: Uuid, wrapped: &[u8]) -> Result<Key<Aes256Gcm>, PersonalDataError> {
        let bytes = open(&self.cipher, &wrap_aad(user_id), wrapped).ok_or(PersonalDataError::Unwrap(user_id))?;
        Key::<Aes256Gcm>::try_from(bytes.as_slice()).map_err(|_| PersonalDataError::Unwrap(user_id))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> DataKey {
        DataKey::generate().0
    }

    #[test]
    fn the_development_master_key_parses() {
        assert!(MasterKey::parse(DEVELOPMENT_MASTER_KEY).is_ok());
        assert!(MasterKeyring::development().is_development());
        let (other, _) = MasterKey::generate("prod-1").unwrap();
        assert!(!MasterKeyring::new(other, vec![]).unwrap().is_development());
    }

    #[test]
    fn bad_master_keys_are_refused_with_a_reason() {
        for bad in ["nocolon", ":AAAA", "id:not base64!", "id:AAAA", "sp ace:ZGV2"] {
            assert!(
                matches!(MasterKey::parse(bad), Err(PersonalDataError::InvalidMasterKey(_))),
                "{bad}"
            );
        }
        let (a, spec) = MasterKey::generate("k1").unwrap();
        let again = MasterKey::parse(&spec).unwrap();
        assert!(MasterKeyring::new(a, vec![again]).is_err(), "duplicate ids");
    }

    #[test]
    fn fields_round_trip_and_hide_the_plaintext() {
        let key = key();
        let user = Uuid::new_v4();
        let mut payload =
            json!({"user_id": user, "email": "ada@example.com", "phone": "+4915112345678", "tier": "pro"});
        seal_fields(&key, user, &["email", "phone"], &mut payload);
        let text = payload.to_string();
        assert!(!text.contains("ada@") && !text.contains("4915112345678"), "{text}");
        assert!(is_token(&payload["email"]) && payload["tier"] == "pro");
        let shown = reveal_fields(Some(&key), user, &["email", "phone"], &payload).unwrap();
        assert_eq!(
            shown,
            Personal::Decrypted(
                json!({"email": "ada@example.com", "phone": "+4915112345678"})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
        assert_eq!(reveal_fields(None, user, &["email"], &payload), Some(Personal::Erased));
        assert_eq!(reveal_fields(Some(&key), user, &[], &payload), None);
    }

    #[test]
    fn the_same_value_encrypts_differently_each_time() {
        let key = key();
        let user = Uuid::new_v4();
        let value = json!("ada@example.com");
        assert_ne!(
            key.encrypt_field(user, "email", &value),
            key.encrypt_field(user, "email", &value)
        );
    }

    #[test]
    fn a_token_does_not_decrypt_for_another_user_field_or_key() {
        let key = key();
        let user = Uuid::new_v4();
        let token = key.encrypt_field(user, "email", &json!("ada@example.com"));
        assert!(key.decrypt_field(user, "email", &token).is_ok());
        assert!(key.decrypt_field(Uuid::new_v4(), "email", &token).is_err());
        assert!(key.decrypt_field(user, "phone", &token).is_err());
        assert!(self::key().decrypt_field(user, "email", &token).is_err());
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(key.decrypt_field(user, "email", &tampered).is_err());
    }

    #[test]
    fn a_wrapped_key_unwraps_only_for_its_user_and_master_key() {
        let (master, _) = MasterKey::generate("m1").unwrap();
        let (other, _) = MasterKey::generate("m2").unwrap();
        let user = Uuid::new_v4();
        let (data, material) = DataKey::generate();
        let wrapped = master.wrap(user, &material);
        assert_eq!(wrapped.len(), 60, "the column's CHECK expects 60 bytes");
        let unwrapped = master.unwrap_key(user, &wrapped).unwrap();
        let token = data.encrypt_field(user, "email", &json!("x@y.z"));
        assert_eq!(unwrapped.decrypt_field(user, "email", &token).unwrap(), json!("x@y.z"));
        assert!(master.unwrap_key(Uuid::new_v4(), &wrapped).is_err());
        assert!(other.unwrap_key(user, &wrapped).is_err());
    }

    #[test]
    fn debug_never_prints_key_material() {
        let (master, spec) = MasterKey::generate("m1").unwrap();
        let material = spec.split_once(':').unwrap().1;
        let shown = format!(
            "{master:?} {:?} {:?}",
            key(),
            MasterKeyring::new(master.clone(), vec![]).unwrap()
        );
        assert!(!shown.contains(material) && shown.contains("m1"), "{shown}");
    }
}
