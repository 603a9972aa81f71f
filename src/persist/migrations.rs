//! Versioned schema migrations, one list for both backends.
//!
//! Each migration is one SQL script written in the subset SQLite and PostgreSQL share; the only
//! dialect difference, the binary column type, is the `{blob}` placeholder (`BLOB` in SQLite,
//! `BYTEA` in PostgreSQL). Routing and binding keys are binary too: the protocol puts no limit
//! on their characters, and PostgreSQL `TEXT` cannot hold a NUL. The `schema_version` table records every applied version. A database
//! whose highest version is newer than [`SCHEMA_VERSION`] is refused with
//! [`PersistError::SchemaVersion`]: an old binary must not write into a schema it does not know.
//! The schema itself is documented in `docs/persistence.md`.

use super::error::PersistError;

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i64 = 1;

/// Creates the version table; run before reading the version, idempotent.
pub const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (\
     version BIGINT PRIMARY KEY, \
     applied_at_ms BIGINT NOT NULL)";

/// Reads the highest applied version (NULL on a fresh database).
pub const SELECT_VERSION: &str = "SELECT MAX(version) FROM schema_version";

/// One step of the schema's history.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version; versions are 1, 2, 3, ... in order.
    pub version: i64,
    /// What it does, for the log.
    pub description: &'static str,
    /// The script, with `{blob}` for the binary column type.
    pub sql: &'static str,
}

/// Every migration, oldest first. Never edit a released one: add a new version.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "exchanges, queues, bindings, messages",
    sql: "
CREATE TABLE exchanges (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL
);
CREATE TABLE queues (
    name TEXT PRIMARY KEY,
    max_length BIGINT,
    message_ttl_ms BIGINT,
    overflow TEXT,
    dead_letter_exchange TEXT
);
CREATE TABLE bindings (
    exchange TEXT NOT NULL,
    queue TEXT NOT NULL,
    key {blob} NOT NULL,
    PRIMARY KEY (exchange, queue, key)
);
CREATE INDEX bindings_by_queue ON bindings (queue);
CREATE TABLE messages (
    queue TEXT NOT NULL,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key {blob} NOT NULL,
    body {blob} NOT NULL,
    headers {blob},
    published_at BIGINT NOT NULL,
    expires_at BIGINT,
    delivered BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (queue, seq)
);
",
}];

/// The SQL dialect a script is rendered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3 (bundled by rusqlite).
    Sqlite,
    /// PostgreSQL 12 or newer.
    Postgres,
}

impl Migration {
    /// The script for one backend.
    pub fn render(&self, dialect: Dialect) -> String {
        let blob = match dialect {
            Dialect::Sqlite => "BLOB",
            Dialect::Postgres => "BYTEA",
        };
        self.sql.replace("{blob}", blob)
    }
}

/// Checks the version found in the database and returns the migrations still to apply.
pub fn plan(found: Option<i64>) -> Result<impl Iterator<Item = &'static Migration>, PersistError> {
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(PersistError::SchemaVersion {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(MIGRATIONS.iter().filter(move |m| m.version > found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_and_end_at_schema_version() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(SCHEMA_VERSION));
    }

    #[test]
    fn plan_refuses_newer_and_skips_applied() {
        assert!(matches!(
            plan(Some(SCHEMA_VERSION + 1)),
            Err(PersistError::SchemaVersion { found, supported })
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION
        ));
        assert_eq!(plan(None).map(|p| p.count()).ok(), Some(MIGRATIONS.len()));
        assert_eq!(plan(Some(SCHEMA_VERSION)).map(|p| p.count()).ok(), Some(0));
    }

    #[test]
    fn render_substitutes_blob_type() {
        let m = MIGRATIONS[0];
        assert!(m.render(Dialect::Sqlite).contains("body BLOB NOT NULL"));
        assert!(m.render(Dialect::Postgres).contains("body BYTEA NOT NULL"));
        assert!(!m.render(Dialect::Postgres).contains("{blob}"));
    }
}
