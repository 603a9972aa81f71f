//! The persistence core: durable exchanges, queues, bindings and messages checkpointed to
//! SQLite or PostgreSQL.
//!
//! This module is synchronous and I/O-only: no glommio, no networking of our own. The broker
//! runs it on a dedicated persistence thread:
//!
//! 1. [`Backend::from_config`] picks SQLite (`<data-dir>/pubsub.db`) or PostgreSQL
//!    (`--database postgres://...`), [`open`] connects and migrates, [`Store::load`] returns
//!    the [`Recovered`] state once at start.
//! 2. Shards send [`Record`]s (with an optional [`Ticket`] for a pending confirm); the thread
//!    [`Checkpointer::push`]es them, and every checkpoint interval it calls
//!    [`Checkpointer::take_batch`], [`Store::commit`]s the coalesced records in one
//!    transaction and answers the batch's tickets.
//! 3. On a commit error it answers those tickets with an error. If
//!    [`PersistError::is_connection_lost`], it gives the records back with
//!    [`Checkpointer::restore`] and retries after [`Store::ping`] succeeds; otherwise some
//!    record can never be written and [`commit_isolating`] writes all the others.
//!
//! `docs/persistence.md` has the schema, the design and the failure behaviour.

mod checkpoint;
pub mod core;
mod error;
mod migrations;
mod postgres;
mod record;
mod sqlite;
mod store;

pub use checkpoint::{Batch, Checkpointer, Pending, Ticket, MAX_PENDING_BYTES};
pub use error::PersistError;
pub use migrations::{Migration, MIGRATIONS, SCHEMA_VERSION};
pub use postgres::PgStore;
pub use record::{CommitStats, QueueArgs, Record, Recovered, RecoveredMessage, StoredMessage};
pub use sqlite::SqliteStore;
pub use store::{commit_isolating, open, Backend, Store, SQLITE_FILE_NAME};
