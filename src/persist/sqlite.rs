//! The embedded backend: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! `synchronous=FULL` makes every commit fsync the write-ahead log, so a committed checkpoint
//! survives power loss: that is what lets the persistence thread answer confirms after
//! [`Store::commit`]. Statements go through rusqlite's prepared-statement cache; each commit is
//! one `BEGIN IMMEDIATE` transaction. An exclusive `flock` on `pubsub.lock` next to the file
//! keeps a second server off the same data directory (the kernel drops it when the process
//! dies, even by `kill -9`).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::error::{chain, PersistError};
use super::migrations::{self, Dialect};
use super::record::{CommitStats, QueueArgs, Record, Recovered, RecoveredMessage, StoredMessage};
use super::store::{assemble, ensure_writable_dir, sql, to_i64, to_u64, utf8, Store};

/// How long a statement waits for a lock held by another connection (a second process on
/// the same file) before failing with `SQLITE_BUSY`.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection.
pub const SQLITE_STATEMENT_CACHE: usize = 32;

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
    /// Holds the exclusive lock for as long as the store lives.
    _lock: File,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, sets WAL and `synchronous=FULL`, and
    /// applies the migrations.
    pub fn open(path: &Path) -> Result<SqliteStore, PersistError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_writable_dir(dir)?;
        }
        // SQLite silently opens a read-only file read-only; fail early and clearly instead.
        if path.exists() {
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|source| PersistError::Unwritable {
                    path: path.to_path_buf(),
                    source,
                })?;
        }
        let lock = lock_exclusive(path)?;
        let conn = Connection::open(path).map_err(|e| PersistError::Unwritable {
            path: path.to_path_buf(),
            source: std::io::Error::other(chain(&e)),
        })?;
        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
            _lock: lock,
        };
        store.configure()?;
        store.migrate()?;
        Ok(store)
    }

    fn configure(&mut self) -> Result<(), PersistError> {
        self.conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(PersistError::Config(format!(
                "SQLite refused WAL mode for {} (journal_mode is {mode})",
                self.path.display()
            )));
        }
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn
            .set_prepared_statement_cache_capacity(SQLITE_STATEMENT_CACHE);
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), PersistError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(migrations::CREATE_VERSION_TABLE, [])?;
        let found: Option<i64> = tx
            .query_row(migrations::SELECT_VERSION, [], |r| r.get(0))
            .optional()?
            .flatten();
        for m in migrations::plan(found)? {
            tx.execute_batch(&m.render(Dialect::Sqlite))?;
            tx.execute(
                "INSERT INTO schema_version (version, applied_at_ms) VALUES ($1, $2)",
                params![m.version, now_ms()],
            )?;
            tracing::info!(
                version = m.version,
                "applied SQLite migration: {}",
                m.description
            );
        }
        tx.commit()?;
        Ok(())
    }
}

/// Takes the exclusive lock `<db file stem>.lock` next to the database, writing our pid
/// into it for whoever finds it.
fn lock_exclusive(db_path: &Path) -> Result<File, PersistError> {
    let lock_path = db_path.with_extension("lock");
    let unwritable = |source| PersistError::Unwritable {
        path: lock_path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(unwritable)?;
    // SAFETY: `file` owns an open descriptor for the whole call; flock takes no pointers.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(PersistError::Locked { path: lock_path });
        }
        return Err(PersistError::Io(err));
    }
    file.set_len(0).map_err(unwritable)?;
    writeln!(file, "{}", std::process::id()).map_err(unwritable)?;
    Ok(file)
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn opt_i64(v: Option<u64>, what: &str) -> Result<Option<i64>, PersistError> {
    v.map(|v| to_i64(v, what)).transpose()
}

fn opt_u64(v: Option<i64>, what: &str) -> Result<Option<u64>, PersistError> {
    v.map(|v| to_u64(v, what)).transpose()
}

/// Applies one record; returns the rows changed.
fn apply(tx: &rusqlite::Transaction<'_>, rec: &Record) -> Result<usize, PersistError> {
    let n = match rec {
        Record::ExchangeDeclared { name, kind } => tx
            .prepare_cached(sql::UPSERT_EXCHANGE)?
            .execute(params![name, kind])?,
        Record::ExchangeDeleted { name } => {
            tx.prepare_cached(sql::DELETE_EXCHANGE_BINDINGS)?
                .execute(params![name])?
                + tx.prepare_cached(sql::DELETE_EXCHANGE)?
                    .execute(params![name])?
        }
        Record::QueueDeclared { name, args } => {
            tx.prepare_cached(sql::UPSERT_QUEUE)?.execute(params![
                name,
                opt_i64(args.max_length, "max_length")?,
                opt_i64(args.message_ttl_ms, "message_ttl_ms")?,
                args.overflow,
                args.dead_letter_exchange
            ])?
        }
        Record::QueueDeleted { name } => {
            tx.prepare_cached(sql::DELETE_QUEUE_MESSAGES)?
                .execute(params![name])?
                + tx.prepare_cached(sql::DELETE_QUEUE_BINDINGS)?
                    .execute(params![name])?
                + tx.prepare_cached(sql::DELETE_QUEUE)?
                    .execute(params![name])?
        }
        Record::Bound {
            exchange,
            queue,
            key,
        } => tx.prepare_cached(sql::INSERT_BINDING)?.execute(params![
            exchange,
            queue,
            key.as_bytes()
        ])?,
        Record::Unbound {
            exchange,
            queue,
            key,
        } => tx.prepare_cached(sql::DELETE_BINDING)?.execute(params![
            exchange,
            queue,
            key.as_bytes()
        ])?,
        Record::Enqueued {
            queue,
            seq,
            msg,
            delivered,
        } => tx.prepare_cached(sql::INSERT_MESSAGE)?.execute(params![
            &**queue,
            to_i64(*seq, "seq")?,
            msg.id,
            msg.exchange,
            msg.routing_key.as_bytes(),
            &msg.body[..],
            msg.headers.as_deref(),
            to_i64(msg.published_at_ms, "published_at_ms")?,
            opt_i64(msg.expires_at_ms, "expires_at_ms")?,
            delivered
        ])?,
        Record::Delivered { queue, seq } => tx
            .prepare_cached(sql::MARK_DELIVERED)?
            .execute(params![&**queue, to_i64(*seq, "seq")?])?,
        Record::Removed { queue, seq } => tx
            .prepare_cached(sql::DELETE_MESSAGE)?
            .execute(params![&**queue, to_i64(*seq, "seq")?])?,
    };
    Ok(n)
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Recovered, PersistError> {
        let tx = self.conn.transaction()?;
        let exchanges = {
            let mut st = tx.prepare(sql::SELECT_EXCHANGES)?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<Vec<(String, String)>, _>>()?
        };
        let queues = {
            let mut st = tx.prepare(sql::SELECT_QUEUES)?;
            let mut rows = st.query([])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let name: String = r.get(0)?;
                let args = QueueArgs {
                    max_length: opt_u64(r.get(1)?, "max_length")?,
                    message_ttl_ms: opt_u64(r.get(2)?, "message_ttl_ms")?,
                    overflow: r.get(3)?,
                    dead_letter_exchange: r.get(4)?,
                };
                out.push((name, args));
            }
            out
        };
        let bindings = {
            let mut st = tx.prepare(sql::SELECT_BINDINGS)?;
            let mut rows = st.query([])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                out.push((r.get(0)?, r.get(1)?, utf8(r.get(2)?, "binding key")?));
            }
            out
        };
        let messages = {
            let mut st = tx.prepare(sql::SELECT_MESSAGES)?;
            let mut rows = st.query([])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let queue: String = r.get(0)?;
                let body: Vec<u8> = r.get(5)?;
                let headers: Option<Vec<u8>> = r.get(6)?;
                let msg = StoredMessage {
                    id: r.get(2)?,
                    exchange: r.get(3)?,
                    routing_key: utf8(r.get(4)?, "routing key")?,
                    body: body.into(),
                    headers: headers.map(Into::into),
                    published_at_ms: to_u64(r.get(7)?, "published_at")?,
                    expires_at_ms: opt_u64(r.get(8)?, "expires_at")?,
                };
                out.push((
                    queue,
                    RecoveredMessage {
                        seq: to_u64(r.get(1)?, "seq")?,
                        msg,
                        delivered: r.get(9)?,
                    },
                ));
            }
            out
        };
        tx.commit()?;
        Ok(assemble(exchanges, queues, bindings, messages))
    }

    fn commit(&mut self, batch: &[Record]) -> Result<CommitStats, PersistError> {
        let start = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut written = 0;
        for rec in batch {
            written += apply(&tx, rec)?;
        }
        tx.commit()?;
        Ok(CommitStats {
            records: batch.len(),
            written,
            elapsed: start.elapsed(),
        })
    }

    fn ping(&mut self) -> Result<(), PersistError> {
        let one: i64 = self.conn.query_row("SELECT 1", [], |r| r.get(0))?;
        if one == 1 {
            Ok(())
        } else {
            Err(PersistError::OutOfRange(format!("SELECT 1 returned {one}")))
        }
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }
}
