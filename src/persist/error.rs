//! The one error type of the persistence layer.
//!
//! Every fallible call in [`crate::persist`] returns [`PersistError`]. The persistence thread
//! uses [`PersistError::is_connection_lost`] to decide between "reconnect and retry the batch"
//! (the database went away, the disk is full, the file cannot be opened) and "this batch is
//! wrong" (a bug or a corrupt database). Messages never contain a database password.

use std::fmt;
use std::path::PathBuf;

/// What can go wrong while opening, writing or reading the durable store.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The data directory (or the SQLite file in it) cannot be created or written.
    #[error("data directory {} is not writable: {source}", .path.display())]
    Unwritable {
        /// The directory or file that could not be created or written.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another store in this one) holds the SQLite database.
    #[error(
        "{} is locked: another pubsub is using this data directory",
        .path.display()
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The database server could not be reached or refused the connection.
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        /// Where we tried to connect, password removed.
        target: String,
        /// Why it failed, with the driver's whole cause chain.
        reason: String,
    },
    /// The database was written by a newer pubsub whose schema we do not know.
    #[error(
        "database schema version {found} is newer than this pubsub supports ({supported}); \
         upgrade pubsub or point it at another database"
    )]
    SchemaVersion {
        /// The highest migration recorded in `schema_version`.
        found: i64,
        /// The highest migration this build knows.
        supported: i64,
    },
    /// The configuration (database URL, schema name) is not usable.
    #[error("invalid persistence configuration: {0}")]
    Config(String),
    /// A stored value does not fit the type we read it into (negative sequence number, ...),
    /// or a value we were asked to write does not fit a database column.
    #[error("stored data out of range: {0}")]
    OutOfRange(String),
    /// An error from SQLite.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// An error from PostgreSQL.
    #[error("PostgreSQL: {}", PgDisplay(.0))]
    Postgres(#[from] postgres::Error),
    /// An I/O error outside the database drivers.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl PersistError {
    /// True when the failure is about the connection or the medium rather than the batch: the
    /// server went away, the socket broke, the disk is full or the file vanished. The caller
    /// keeps the batch, answers its confirms with an error, and retries after
    /// [`super::Store::ping`] succeeds.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            PersistError::Connect { .. }
            | PersistError::Io(_)
            | PersistError::Unwritable { .. } => true,
            PersistError::Postgres(e) => pg_connection_lost(e),
            PersistError::Sqlite(e) => sqlite_connection_lost(e),
            PersistError::SchemaVersion { .. }
            | PersistError::Locked { .. }
            | PersistError::Config(_)
            | PersistError::OutOfRange(_) => false,
        }
    }
}

fn pg_connection_lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let code = code.code();
        // Class 08: connection exception; 57P01..57P03: admin shutdown, crash shutdown,
        // cannot connect now; 53: insufficient resources (disk full, out of memory).
        return code.starts_with("08") || code.starts_with("57P") || code.starts_with("53");
    }
    // No SQLSTATE: the driver failed below the protocol (socket I/O, unexpected EOF).
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn sqlite_connection_lost(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::ReadOnly
                | ErrorCode::OutOfMemory
        )
    )
}

/// Displays a `postgres::Error` with its cause chain (the driver's own `Display` only says
/// "db error").
struct PgDisplay<'a>(&'a postgres::Error);

impl fmt::Display for PgDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// The cause chain of any error as one line, for [`PersistError::Connect`].
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
