//! The [`Store`] trait, the choice of [`Backend`], and [`open`].
//!
//! A store is owned by the persistence thread alone: it is `Send`, not shared. [`open`] connects
//! (or opens the SQLite file), applies the migrations and returns a boxed store; the thread then
//! calls [`Store::load`] once at start and [`Store::commit`] once per checkpoint.

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::PersistError;
use super::record::{CommitStats, Record, Recovered};

/// File name of the SQLite database inside the data directory.
pub const SQLITE_FILE_NAME: &str = "pubsub.db";

/// Longest PostgreSQL identifier (NAMEDATALEN - 1).
pub const MAX_PG_IDENTIFIER: usize = 63;

/// Durable storage: one connection, driven by one thread.
pub trait Store: Send {
    /// Reads back every durable exchange, queue, binding and message.
    fn load(&mut self) -> Result<Recovered, PersistError>;
    /// Writes the batch in one transaction, in order; nothing of it is visible on error.
    fn commit(&mut self, batch: &[Record]) -> Result<CommitStats, PersistError>;
    /// Checks the connection, reconnecting if it was lost. After an error for which
    /// [`PersistError::is_connection_lost`] holds, call this until it succeeds, then retry.
    fn ping(&mut self) -> Result<(), PersistError>;
    /// Which backend this is, for logs ("sqlite /var/lib/pubsub/pubsub.db").
    fn describe(&self) -> String;
}

/// Where durable state lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file (the embedded default).
    Sqlite {
        /// Path of the database file.
        path: PathBuf,
    },
    /// A PostgreSQL database.
    Postgres {
        /// Connection URL as the `postgres` crate takes it, without our `schema` parameter.
        url: String,
        /// The schema to create (if missing) and use as `search_path`; `None` uses the
        /// server's default (normally `public`).
        schema: Option<String>,
    },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

/// Shows the backend without any password.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Sqlite { path } => write!(f, "sqlite {}", path.display()),
            Backend::Postgres { url, schema } => {
                write!(f, "postgres {}", redact_url(url))?;
                if let Some(s) = schema {
                    write!(f, " (schema {s})")?;
                }
                Ok(())
            }
        }
    }
}

impl Backend {
    /// Picks the backend from `--data-dir` and `--database`.
    ///
    /// * `database` starting with `postgres://` or `postgresql://`: PostgreSQL. An optional
    ///   `schema=NAME` query parameter (ours, removed before the URL reaches the driver) selects
    ///   a schema that is created if missing and used as `search_path`.
    /// * `None` or empty: SQLite file `<data_dir>/pubsub.db`; the directory is created and
    ///   checked for writability here, so a bad `--data-dir` fails at start with
    ///   [`PersistError::Unwritable`].
    /// * anything else: [`PersistError::Config`].
    pub fn from_config(data_dir: &Path, database: Option<&str>) -> Result<Backend, PersistError> {
        match database.map(str::trim).filter(|s| !s.is_empty()) {
            None => {
                ensure_writable_dir(data_dir)?;
                Ok(Backend::Sqlite {
                    path: data_dir.join(SQLITE_FILE_NAME),
                })
            }
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let (url, schema) = split_schema_param(url)?;
                Ok(Backend::Postgres { url, schema })
            }
            Some(other) => Err(PersistError::Config(format!(
                "--database must be a postgres:// or postgresql:// URL, got {:?}",
                redact_url(other)
            ))),
        }
    }
}

/// Opens the store: creates or connects, applies migrations, refuses a newer schema.
pub fn open(backend: &Backend) -> Result<Box<dyn Store>, PersistError> {
    match backend {
        Backend::Sqlite { path } => Ok(Box::new(super::sqlite::SqliteStore::open(path)?)),
        Backend::Postgres { url, schema } => Ok(Box::new(super::postgres::PgStore::open(
            url,
            schema.as_deref(),
        )?)),
    }
}

/// The degraded path after [`Store::commit`] failed with an error that is *not*
/// [`PersistError::is_connection_lost`]: some record of the batch can never be written (a value
/// out of range, a bug). Writes the batch in order, bisecting failing halves into smaller
/// transactions until the refused records stand alone, and skips those. Returns the indices
/// (into `batch`) of the skipped records with their errors, in order.
///
/// A connection-lost error stops it with `Err`; whatever it committed before stays committed,
/// and replaying the whole batch later is harmless (inserts of existing messages are skipped,
/// everything else is idempotent). A batch of `n` records with `k` bad ones costs about
/// `2 k log2 n` transactions.
pub fn commit_isolating(
    store: &mut dyn Store,
    batch: &[Record],
) -> Result<Vec<(usize, PersistError)>, PersistError> {
    let mut skipped = Vec::new();
    bisect(store, batch, 0, &mut skipped)?;
    Ok(skipped)
}

fn bisect(
    store: &mut dyn Store,
    batch: &[Record],
    base: usize,
    skipped: &mut Vec<(usize, PersistError)>,
) -> Result<(), PersistError> {
    if batch.is_empty() {
        return Ok(());
    }
    match store.commit(batch) {
        Ok(_) => Ok(()),
        Err(e) if e.is_connection_lost() => Err(e),
        Err(e) if batch.len() == 1 => {
            skipped.push((base, e));
            Ok(())
        }
        Err(_) => {
            let mid = batch.len() / 2;
            let (left, right) = batch.split_at(mid);
            bisect(store, left, base, skipped)?;
            bisect(store, right, base + mid, skipped)
        }
    }
}

/// Name of the probe file written to check a data directory.
const WRITE_PROBE: &str = ".pubsub-write-probe";

/// Creates `dir` (and parents) and proves we can create a file in it.
pub(crate) fn ensure_writable_dir(dir: &Path) -> Result<(), PersistError> {
    let unwritable = |source| PersistError::Unwritable {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(unwritable)?;
    let probe = dir.join(WRITE_PROBE);
    std::fs::write(&probe, b"ok").map_err(unwritable)?;
    std::fs::remove_file(&probe).map_err(unwritable)?;
    Ok(())
}

/// Removes our `schema=NAME` parameter from a PostgreSQL URL.
fn split_schema_param(url: &str) -> Result<(String, Option<String>), PersistError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut schema = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("schema", value)) => {
                validate_identifier(value)?;
                schema = Some(value.to_owned());
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, schema))
}

/// A schema name we can splice into SQL: `[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes.
pub(crate) fn validate_identifier(name: &str) -> Result<(), PersistError> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok_first && ok_rest && name.len() <= MAX_PG_IDENTIFIER {
        Ok(())
    } else {
        Err(PersistError::Config(format!(
            "schema name {name:?} must match [A-Za-z_][A-Za-z0-9_]* and be at most \
             {MAX_PG_IDENTIFIER} bytes"
        )))
    }
}

/// The URL with any password replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// A binary key column back to a `String`.
pub(crate) fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, PersistError> {
    String::from_utf8(bytes)
        .map_err(|e| PersistError::OutOfRange(format!("{what} is not UTF-8: {e}")))
}

/// `u64` to a BIGINT column.
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64, PersistError> {
    i64::try_from(value).map_err(|_| PersistError::OutOfRange(format!("{what} {value} > i64::MAX")))
}

/// A BIGINT column back to `u64`.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, PersistError> {
    u64::try_from(value).map_err(|_| PersistError::OutOfRange(format!("{what} {value} < 0")))
}

/// Statements both backends run as they are. Placeholders are `$1`, `$2`, ... in increasing
/// order of first use: PostgreSQL's syntax, which SQLite reads as parameters bound by position.
pub(crate) mod sql {
    pub const UPSERT_EXCHANGE: &str = "INSERT INTO exchanges (name, kind) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET kind = excluded.kind";
    pub const DELETE_EXCHANGE_BINDINGS: &str = "DELETE FROM bindings WHERE exchange = $1";
    pub const DELETE_EXCHANGE: &str = "DELETE FROM exchanges WHERE name = $1";
    pub const UPSERT_QUEUE: &str = "INSERT INTO queues \
         (name, max_length, message_ttl_ms, overflow, dead_letter_exchange) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET \
         max_length = excluded.max_length, message_ttl_ms = excluded.message_ttl_ms, \
         overflow = excluded.overflow, dead_letter_exchange = excluded.dead_letter_exchange";
    pub const DELETE_QUEUE_MESSAGES: &str = "DELETE FROM messages WHERE queue = $1";
    pub const DELETE_QUEUE_BINDINGS: &str = "DELETE FROM bindings WHERE queue = $1";
    pub const DELETE_QUEUE: &str = "DELETE FROM queues WHERE name = $1";
    pub const INSERT_BINDING: &str = "INSERT INTO bindings (exchange, queue, key) \
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
    pub const DELETE_BINDING: &str =
        "DELETE FROM bindings WHERE exchange = $1 AND queue = $2 AND key = $3";
    /// One message; a replayed (queue, seq) is ignored, so retrying a batch whose commit
    /// acknowledgement was lost is harmless.
    pub const INSERT_MESSAGE: &str = "INSERT INTO messages \
         (queue, seq, id, exchange, routing_key, body, headers, published_at, expires_at, \
         delivered) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (queue, seq) DO NOTHING";
    pub const MARK_DELIVERED: &str =
        "UPDATE messages SET delivered = TRUE WHERE queue = $1 AND seq = $2";
    pub const DELETE_MESSAGE: &str = "DELETE FROM messages WHERE queue = $1 AND seq = $2";

    pub const SELECT_EXCHANGES: &str = "SELECT name, kind FROM exchanges";
    pub const SELECT_QUEUES: &str =
        "SELECT name, max_length, message_ttl_ms, overflow, dead_letter_exchange FROM queues";
    pub const SELECT_BINDINGS: &str = "SELECT exchange, queue, key FROM bindings";
    /// Messages of existing queues only, grouped by queue, in seq order within a queue.
    pub const SELECT_MESSAGES: &str = "SELECT queue, seq, id, exchange, routing_key, body, \
         headers, published_at, expires_at, delivered FROM messages \
         WHERE queue IN (SELECT name FROM queues) ORDER BY queue, seq";
}

/// Builds a [`Recovered`] from rows in any order except that messages arrive grouped by queue
/// in seq order; sorts everything else by bytes so both backends return the same thing.
pub(crate) fn assemble(
    mut exchanges: Vec<(String, String)>,
    mut queues: Vec<(String, super::record::QueueArgs)>,
    mut bindings: Vec<(String, String, String)>,
    messages: impl IntoIterator<Item = (String, super::record::RecoveredMessage)>,
) -> Recovered {
    exchanges.sort();
    queues.sort_by(|a, b| a.0.cmp(&b.0));
    bindings.sort();
    let mut grouped: Vec<(String, Vec<super::record::RecoveredMessage>)> = Vec::new();
    for (queue, msg) in messages {
        match grouped.last_mut() {
            Some((q, list)) if *q == queue => list.push(msg),
            _ => grouped.push((queue, vec![msg])),
        }
    }
    grouped.sort_by(|a, b| a.0.cmp(&b.0));
    Recovered {
        exchanges,
        queues,
        bindings,
        messages: grouped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_url_with_schema() {
        let b = Backend::from_config(
            Path::new("/nonexistent"),
            Some("postgres://u:pw@127.0.0.1:5432/test?schema=t_1&sslmode=disable"),
        )
        .unwrap();
        assert_eq!(
            b,
            Backend::Postgres {
                url: "postgres://u:pw@127.0.0.1:5432/test?sslmode=disable".into(),
                schema: Some("t_1".into())
            }
        );
        assert!(!b.to_string().contains("pw"), "{b}");
        let b = Backend::from_config(Path::new("/x"), Some("postgresql://h/db")).unwrap();
        assert_eq!(
            b,
            Backend::Postgres {
                url: "postgresql://h/db".into(),
                schema: None
            }
        );
    }

    #[test]
    fn bad_schema_and_bad_scheme_are_config_errors() {
        for db in [
            "postgres://h/db?schema=a;drop",
            "postgres://h/db?schema=",
            "mysql://h/db",
        ] {
            assert!(
                matches!(
                    Backend::from_config(Path::new("/x"), Some(db)),
                    Err(PersistError::Config(_))
                ),
                "{db}"
            );
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(redact_url("postgres://a:b@h:1/d"), "postgres://a:***@h:1/d");
        assert_eq!(redact_url("postgres://a@h/d"), "postgres://a@h/d");
        assert_eq!(
            redact_url("postgres://h/d?x=a:b@c"),
            "postgres://h/d?x=a:b@c"
        );
    }
}
