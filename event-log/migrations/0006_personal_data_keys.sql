-- Per-user data keys for the personal data in events (crypto-shredding; see
-- event-log/src/personal.rs). Events store personal fields encrypted with the user's data
-- key; this table stores that key wrapped by a master key from configuration. Erasing a user
-- replaces the wrapped key by NULL, after which no copy of the log (replica, Kafka, export,
-- backup of user_events) can be decrypted again.
CREATE TABLE personal_data_keys (
    user_id       uuid        PRIMARY KEY,
    -- nonce (12 bytes) || AES-256-GCM ciphertext of the 32-byte data key || tag (16 bytes).
    wrapped_key   bytea       CHECK (length(wrapped_key) = 60),
    -- Which configured master key wrapped it; `cloudphone keys rotate` rewraps the others.
    master_key_id text,
    created_at    timestamptz NOT NULL,
    rotated_at    timestamptz,
    -- Set when the key was destroyed. A row that is erased keeps existing as a tombstone, so
    -- no key can be created for the user again.
    erased_at     timestamptz,
    CONSTRAINT personal_data_key_present_or_erased CHECK (
        (wrapped_key IS NOT NULL AND master_key_id IS NOT NULL AND erased_at IS NULL)
        OR (wrapped_key IS NULL AND master_key_id IS NULL AND erased_at IS NOT NULL))
);

-- Rotation finds the keys still wrapped by an old master key.
CREATE INDEX personal_data_keys_master_idx ON personal_data_keys (master_key_id)
    WHERE master_key_id IS NOT NULL;
