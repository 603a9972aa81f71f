//! The PostgreSQL backend, through the synchronous `postgres` crate.
//!
//! The crate runs a small private tokio runtime internally; it lives only on the persistence
//! thread, never on a shard. Message records are written in bulk: each run of enqueues,
//! deliveries and removals between two topology records becomes (at most) three statements
//! whose parameters are arrays, `INSERT ... SELECT * FROM unnest($1::text[], ...)`, prepared
//! once per connection. Topology records are rare and run one statement each. Everything of a
//! batch is one transaction.
//!
//! With a schema (`?schema=NAME` on the URL), the store creates it if missing and sets
//! `search_path` on every (re)connection, so tests and tenants can share one database.

use std::time::{Duration, Instant};

use postgres::types::ToSql;
use postgres::{Client, NoTls, Statement, Transaction};

use super::error::{chain, PersistError};
use super::migrations::{self, Dialect};
use super::record::{CommitStats, QueueArgs, Record, Recovered, RecoveredMessage, StoredMessage};
use super::sqlite::now_ms;
use super::store::{assemble, redact_url, sql, to_i64, to_u64, utf8, Store};

/// Connection timeout used when the URL does not set `connect_timeout`.
pub const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most rows sent in one bulk statement.
pub const PG_MAX_ROWS_PER_STATEMENT: usize = 10_000;

/// Most payload bytes sent in one bulk statement (a bind message is limited to 1 GiB).
pub const PG_MAX_BYTES_PER_STATEMENT: usize = 64 * 1024 * 1024;

/// Key of the advisory lock that serialises migrations between servers sharing a database.
const MIGRATION_LOCK_KEY: i64 = 0x7075_6273_7562; // "pubsub"

const BULK_INSERT: &str = "INSERT INTO messages \
     (queue, seq, id, exchange, routing_key, body, headers, published_at, expires_at, delivered) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::bytea[], \
     $6::bytea[], $7::bytea[], $8::int8[], $9::int8[], $10::bool[]) \
     ON CONFLICT (queue, seq) DO NOTHING";
const BULK_DELIVERED: &str = "UPDATE messages AS m SET delivered = TRUE \
     FROM unnest($1::text[], $2::int8[]) AS d(queue, seq) \
     WHERE m.queue = d.queue AND m.seq = d.seq";
const BULK_REMOVE: &str = "DELETE FROM messages AS m \
     USING unnest($1::text[], $2::int8[]) AS r(queue, seq) \
     WHERE m.queue = r.queue AND m.seq = r.seq";

struct Prepared {
    insert: Statement,
    delivered: Statement,
    remove: Statement,
}

/// A store in a PostgreSQL database (optionally in its own schema).
pub struct PgStore {
    config: postgres::Config,
    target: String,
    schema: Option<String>,
    client: Client,
    prepared: Prepared,
}

impl PgStore {
    /// Connects, selects the schema, applies the migrations and prepares the bulk statements.
    pub fn open(url: &str, schema: Option<&str>) -> Result<PgStore, PersistError> {
        let target = redact_url(url);
        let mut config: postgres::Config = url.parse().map_err(|e: postgres::Error| {
            PersistError::Config(format!("bad PostgreSQL URL {target}: {}", chain(&e)))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(PG_CONNECT_TIMEOUT);
        }
        if let Some(s) = schema {
            super::store::validate_identifier(s)?;
        }
        let schema = schema.map(str::to_owned);
        let (client, prepared) = connect(&config, &target, schema.as_deref())?;
        Ok(PgStore {
            config,
            target,
            schema,
            client,
            prepared,
        })
    }

    fn reconnect(&mut self) -> Result<(), PersistError> {
        let (client, prepared) = connect(&self.config, &self.target, self.schema.as_deref())?;
        self.client = client;
        self.prepared = prepared;
        tracing::info!(target = %self.target, "reconnected to PostgreSQL");
        Ok(())
    }
}

fn connect(
    config: &postgres::Config,
    target: &str,
    schema: Option<&str>,
) -> Result<(Client, Prepared), PersistError> {
    let mut client = config.connect(NoTls).map_err(|e| PersistError::Connect {
        target: target.to_owned(),
        reason: chain(&e),
    })?;
    if let Some(s) = schema {
        // `s` passed validate_identifier: only [A-Za-z0-9_], safe to quote and splice.
        client.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{s}\"; SET search_path TO \"{s}\""
        ))?;
    }
    migrate(&mut client)?;
    let prepared = Prepared {
        insert: client.prepare(BULK_INSERT)?,
        delivered: client.prepare(BULK_DELIVERED)?,
        remove: client.prepare(BULK_REMOVE)?,
    };
    Ok((client, prepared))
}

fn migrate(client: &mut Client) -> Result<(), PersistError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])?;
    tx.batch_execute(migrations::CREATE_VERSION_TABLE)?;
    let found: Option<i64> = tx.query_one(migrations::SELECT_VERSION, &[])?.try_get(0)?;
    for m in migrations::plan(found)? {
        tx.batch_execute(&m.render(Dialect::Postgres))?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at_ms) VALUES ($1, $2)",
            &[&m.version, &now_ms()],
        )?;
        tracing::info!(
            version = m.version,
            "applied PostgreSQL migration: {}",
            m.description
        );
    }
    tx.commit()?;
    Ok(())
}

/// Message records waiting to go out as array parameters, borrowed from the batch.
#[derive(Default)]
struct Bulk<'a> {
    queue: Vec<&'a str>,
    seq: Vec<i64>,
    id: Vec<&'a str>,
    exchange: Vec<&'a str>,
    routing_key: Vec<&'a [u8]>,
    body: Vec<&'a [u8]>,
    headers: Vec<Option<&'a [u8]>>,
    published_at: Vec<i64>,
    expires_at: Vec<Option<i64>>,
    delivered: Vec<bool>,
    insert_bytes: usize,
    delivered_queue: Vec<&'a str>,
    delivered_seq: Vec<i64>,
    removed_queue: Vec<&'a str>,
    removed_seq: Vec<i64>,
}

impl<'a> Bulk<'a> {
    fn push_insert(
        &mut self,
        queue: &'a str,
        seq: u64,
        msg: &'a StoredMessage,
        delivered: bool,
    ) -> Result<(), PersistError> {
        self.queue.push(queue);
        self.seq.push(to_i64(seq, "seq")?);
        self.id.push(&msg.id);
        self.exchange.push(&msg.exchange);
        self.routing_key.push(msg.routing_key.as_bytes());
        self.body.push(&msg.body);
        self.headers.push(msg.headers.as_deref());
        self.published_at
            .push(to_i64(msg.published_at_ms, "published_at_ms")?);
        self.expires_at.push(
            msg.expires_at_ms
                .map(|v| to_i64(v, "expires_at_ms"))
                .transpose()?,
        );
        self.delivered.push(delivered);
        self.insert_bytes += msg.approx_bytes();
        Ok(())
    }

    fn is_full(&self) -> bool {
        self.queue.len() >= PG_MAX_ROWS_PER_STATEMENT
            || self.insert_bytes >= PG_MAX_BYTES_PER_STATEMENT
            || self.delivered_queue.len() >= PG_MAX_ROWS_PER_STATEMENT
            || self.removed_queue.len() >= PG_MAX_ROWS_PER_STATEMENT
    }

    /// Sends inserts, then deliveries, then removals. For any one (queue, seq) the shard emits
    /// enqueue before delivery before removal, so this order gives the same result as
    /// applying the records one by one.
    fn flush(&mut self, tx: &mut Transaction<'_>, p: &Prepared) -> Result<usize, PersistError> {
        let mut n = 0;
        if !self.queue.is_empty() {
            let params: [&(dyn ToSql + Sync); 10] = [
                &self.queue,
                &self.seq,
                &self.id,
                &self.exchange,
                &self.routing_key,
                &self.body,
                &self.headers,
                &self.published_at,
                &self.expires_at,
                &self.delivered,
            ];
            n += tx.execute(&p.insert, &params)?;
        }
        if !self.delivered_queue.is_empty() {
            n += tx.execute(&p.delivered, &[&self.delivered_queue, &self.delivered_seq])?;
        }
        if !self.removed_queue.is_empty() {
            n += tx.execute(&p.remove, &[&self.removed_queue, &self.removed_seq])?;
        }
        *self = Bulk::default();
        usize::try_from(n).map_err(|_| PersistError::OutOfRange(format!("{n} rows")))
    }
}

fn opt_i64(v: Option<u64>, what: &str) -> Result<Option<i64>, PersistError> {
    v.map(|v| to_i64(v, what)).transpose()
}

fn opt_u64(v: Option<i64>, what: &str) -> Result<Option<u64>, PersistError> {
    v.map(|v| to_u64(v, what)).transpose()
}

/// Applies one topology record; returns the rows changed.
fn apply_topology(tx: &mut Transaction<'_>, rec: &Record) -> Result<u64, PersistError> {
    let n = match rec {
        Record::ExchangeDeclared { name, kind } => {
            tx.execute(sql::UPSERT_EXCHANGE, &[name, kind])?
        }
        Record::ExchangeDeleted { name } => {
            tx.execute(sql::DELETE_EXCHANGE_BINDINGS, &[name])?
                + tx.execute(sql::DELETE_EXCHANGE, &[name])?
        }
        Record::QueueDeclared { name, args } => tx.execute(
            sql::UPSERT_QUEUE,
            &[
                name,
                &opt_i64(args.max_length, "max_length")?,
                &opt_i64(args.message_ttl_ms, "message_ttl_ms")?,
                &args.overflow,
                &args.dead_letter_exchange,
            ],
        )?,
        Record::QueueDeleted { name } => {
            tx.execute(sql::DELETE_QUEUE_MESSAGES, &[name])?
                + tx.execute(sql::DELETE_QUEUE_BINDINGS, &[name])?
                + tx.execute(sql::DELETE_QUEUE, &[name])?
        }
        Record::Bound {
            exchange,
            queue,
            key,
        } => tx.execute(sql::INSERT_BINDING, &[exchange, queue, &key.as_bytes()])?,
        Record::Unbound {
            exchange,
            queue,
            key,
        } => tx.execute(sql::DELETE_BINDING, &[exchange, queue, &key.as_bytes()])?,
        // Message records go through `Bulk`.
        Record::Enqueued { .. } | Record::Delivered { .. } | Record::Removed { .. } => 0,
    };
    Ok(n)
}

impl Store for PgStore {
    fn load(&mut self) -> Result<Recovered, PersistError> {
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let mut exchanges = Vec::new();
        for r in tx.query(sql::SELECT_EXCHANGES, &[])? {
            exchanges.push((r.try_get(0)?, r.try_get(1)?));
        }
        let mut queues = Vec::new();
        for r in tx.query(sql::SELECT_QUEUES, &[])? {
            let name: String = r.try_get(0)?;
            let args = QueueArgs {
                max_length: opt_u64(r.try_get(1)?, "max_length")?,
                message_ttl_ms: opt_u64(r.try_get(2)?, "message_ttl_ms")?,
                overflow: r.try_get(3)?,
                dead_letter_exchange: r.try_get(4)?,
            };
            queues.push((name, args));
        }
        let mut bindings = Vec::new();
        for r in tx.query(sql::SELECT_BINDINGS, &[])? {
            bindings.push((
                r.try_get(0)?,
                r.try_get(1)?,
                utf8(r.try_get(2)?, "binding key")?,
            ));
        }
        let mut messages = Vec::new();
        for r in tx.query(sql::SELECT_MESSAGES, &[])? {
            let queue: String = r.try_get(0)?;
            let body: Vec<u8> = r.try_get(5)?;
            let headers: Option<Vec<u8>> = r.try_get(6)?;
            let msg = StoredMessage {
                id: r.try_get(2)?,
                exchange: r.try_get(3)?,
                routing_key: utf8(r.try_get(4)?, "routing key")?,
                body: body.into(),
                headers: headers.map(Into::into),
                published_at_ms: to_u64(r.try_get(7)?, "published_at")?,
                expires_at_ms: opt_u64(r.try_get(8)?, "expires_at")?,
            };
            messages.push((
                queue,
                RecoveredMessage {
                    seq: to_u64(r.try_get(1)?, "seq")?,
                    msg,
                    delivered: r.try_get(9)?,
                },
            ));
        }
        tx.commit()?;
        Ok(assemble(exchanges, queues, bindings, messages))
    }

    fn commit(&mut self, batch: &[Record]) -> Result<CommitStats, PersistError> {
        let start = Instant::now();
        let prepared = &self.prepared;
        let mut tx = self.client.transaction()?;
        let mut written = 0usize;
        let mut bulk = Bulk::default();
        for rec in batch {
            match rec {
                Record::Enqueued {
                    queue,
                    seq,
                    msg,
                    delivered,
                } => bulk.push_insert(queue, *seq, msg, *delivered)?,
                Record::Delivered { queue, seq } => {
                    bulk.delivered_queue.push(queue);
                    bulk.delivered_seq.push(to_i64(*seq, "seq")?);
                }
                Record::Removed { queue, seq } => {
                    bulk.removed_queue.push(queue);
                    bulk.removed_seq.push(to_i64(*seq, "seq")?);
                }
                topology => {
                    written += bulk.flush(&mut tx, prepared)?;
                    let n = apply_topology(&mut tx, topology)?;
                    written += usize::try_from(n).unwrap_or(usize::MAX);
                }
            }
            if bulk.is_full() {
                written += bulk.flush(&mut tx, prepared)?;
            }
        }
        written += bulk.flush(&mut tx, prepared)?;
        tx.commit()?;
        Ok(CommitStats {
            records: batch.len(),
            written,
            elapsed: start.elapsed(),
        })
    }

    fn ping(&mut self) -> Result<(), PersistError> {
        if !self.client.is_closed() {
            match self.client.simple_query("SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let e = PersistError::from(e);
                    if !e.is_connection_lost() {
                        return Err(e);
                    }
                }
            }
        }
        self.reconnect()
    }

    fn describe(&self) -> String {
        match &self.schema {
            Some(s) => format!("postgres {} (schema {s})", self.target),
            None => format!("postgres {}", self.target),
        }
    }
}
