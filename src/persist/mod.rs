//! The persistence core: durable exchanges, queues, bindings and messages checkpointed to SQLite or PostgreSQL.
