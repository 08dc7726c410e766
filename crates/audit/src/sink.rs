//! Writing to the audit database.
//!
//! Owns the one connection to it (made and remade on demand), the DDL, and
//! every statement pgferry runs there: batches (one statement per table
//! per batch, rows passed as arrays and expanded with `unnest`, so 1,000
//! rows cost one round trip, not 1,000), closing the rows an earlier run
//! left open, and the retention pass. Every round trip is bounded by
//! `write_timeout`: a database that accepts connections but never answers
//! (frozen, partitioned) must come back as an error, not as a hang.

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

use crate::batch::Batch;

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("audit database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("audit database did not answer within {0:?} (write_timeout)")]
    Timeout(Duration),
    #[error("audit schema name {0:?} is not a plain identifier")]
    BadSchema(String),
}

/// The `disconnect_reason` of rows closed because the process that wrote
/// them is gone.
pub const PROXY_RESTARTED: &str = "proxy_restarted";

/// The audit database connection (made and remade on demand).
pub struct PgSink {
    url: String,
    schema: String,
    proxy_id: String,
    write_timeout: Duration,
    client: Option<Client>,
    /// The task driving `client`'s socket. Aborted when the client is
    /// given up: after a timeout it would otherwise wait for the answer
    /// to the abandoned statement for as long as the server stays frozen.
    connection: Option<JoinHandle<()>>,
}

/// A task aborted when this is dropped, unless `keep` took it out.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    fn keep(mut self) -> Option<JoinHandle<()>> {
        self.0.take()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// `fut`, or `SinkError::Timeout` once `limit` has passed.
async fn bounded<T, E>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, SinkError>
where
    SinkError: From<E>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(SinkError::from),
        Err(_) => Err(SinkError::Timeout(limit)),
    }
}

impl PgSink {
    pub fn new(
        url: &str,
        schema: Option<&str>,
        proxy_id: &str,
        write_timeout: Duration,
    ) -> Result<Self, SinkError> {
        let schema = schema.unwrap_or("public").to_owned();
        let plain = !schema.is_empty()
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !plain {
            return Err(SinkError::BadSchema(schema));
        }
        Ok(Self {
            url: url.to_owned(),
            schema,
            proxy_id: proxy_id.to_owned(),
            write_timeout,
            client: None,
            connection: None,
        })
    }

    /// Connects (if needed) and makes sure the tables exist, within
    /// `write_timeout`.
    pub async fn ensure_ready(&mut self) -> Result<&Client, SinkError> {
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                self.reset();
                let (client, connection) = bounded(self.write_timeout, async {
                    let (mut client, connection) =
                        tokio_postgres::connect(&self.url, NoTls).await?;
                    // Drives the socket while the DDL runs; aborted if the
                    // DDL fails or this future is dropped at the timeout.
                    let task = AbortOnDrop(Some(tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %e, "audit database connection ended");
                        }
                    })));
                    create_schema(&mut client, &self.schema).await?;
                    Ok::<_, SinkError>((client, task))
                })
                .await?;
                let connection = connection.keep();
                self.connection = connection;
                client
            }
        };
        Ok(self.client.insert(client))
    }

    /// Gives up the connection (the next call reconnects): after an error
    /// or a timeout it may be half-dead or still waiting for an answer.
    fn reset(&mut self) {
        self.client = None;
        if let Some(task) = self.connection.take() {
            task.abort();
        }
    }

    pub(crate) async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let result = self.write_inner(batch).await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    async fn write_inner(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let schema = self.schema.clone();
        let proxy_id = self.proxy_id.clone();
        let limit = self.write_timeout;
        let client = self.ensure_ready().await?;
        if !batch.connections.is_empty() {
            let c = &batch.connections;
            let ids: Vec<Uuid> = c.iter().map(|r| r.id).collect();
            let addrs: Vec<Option<IpAddr>> = c.iter().map(|r| r.client_addr).collect();
            let users: Vec<&str> = c.iter().map(|r| r.user.as_str()).collect();
            let dbs: Vec<&str> = c.iter().map(|r| r.database.as_str()).collect();
            let apps: Vec<Option<&str>> = c.iter().map(|r| r.application_name.as_deref()).collect();
            let backends: Vec<Option<&str>> = c.iter().map(|r| r.backend.as_deref()).collect();
            let connects: Vec<SystemTime> = c.iter().map(|r| r.connect_time).collect();
            let disconnects: Vec<Option<SystemTime>> =
                c.iter().map(|r| r.disconnect_time).collect();
            let reasons: Vec<Option<&str>> =
                c.iter().map(|r| r.disconnect_reason.as_deref()).collect();
            let migrations: Vec<i32> = c.iter().map(|r| r.migrations).collect();
            let from_client: Vec<i64> = c.iter().map(|r| r.bytes_from_client).collect();
            let to_client: Vec<i64> = c.iter().map(|r| r.bytes_to_client).collect();
            // The WHERE: a closed row is never reopened by a late write of
            // it still open (after a hand-off, from the old process).
            let sql = format!(
                "INSERT INTO {schema}.pgferry_connection_log AS t \
                 (connection_id, proxy_id, client_addr, user_name, database_name, application_name, \
                  backend, connect_time, disconnect_time, disconnect_reason, migrations, \
                  bytes_from_client, bytes_to_client, updated_at) \
                 SELECT u.id, $2, u.addr, u.usr, u.db, u.app, u.backend, u.ct, u.dt, u.reason, \
                        u.migrations, u.from_client, u.to_client, now() \
                 FROM unnest($1::uuid[], $3::inet[], $4::text[], $5::text[], $6::text[], $7::text[], \
                             $8::timestamptz[], $9::timestamptz[], $10::text[], $11::int4[], \
                             $12::int8[], $13::int8[]) \
                      AS u(id, addr, usr, db, app, backend, ct, dt, reason, migrations, from_client, to_client) \
                 ORDER BY u.id \
                 ON CONFLICT (connection_id) DO UPDATE SET \
                   application_name = EXCLUDED.application_name, backend = EXCLUDED.backend, \
                   disconnect_time = EXCLUDED.disconnect_time, disconnect_reason = EXCLUDED.disconnect_reason, \
                   migrations = EXCLUDED.migrations, bytes_from_client = EXCLUDED.bytes_from_client, \
                   bytes_to_client = EXCLUDED.bytes_to_client, updated_at = EXCLUDED.updated_at \
                 WHERE t.disconnect_time IS NULL OR EXCLUDED.disconnect_time IS NOT NULL"
            );
            bounded(
                limit,
                client.execute(
                    &sql,
                    &[
                        &ids,
                        &proxy_id,
                        &addrs,
                        &users,
                        &dbs,
                        &apps,
                        &backends,
                        &connects,
                        &disconnects,
                        &reasons,
                        &migrations,
                        &from_client,
                        &to_client,
                    ],
                ),
            )
            .await?;
        }
        if !batch.migrations.is_empty() {
            let m = &batch.migrations;
            let ids: Vec<Uuid> = m.iter().map(|r| r.id).collect();
            let conns: Vec<Uuid> = m.iter().map(|r| r.connection_id).collect();
            let froms: Vec<&str> = m.iter().map(|r| r.from_backend.as_str()).collect();
            let tos: Vec<Option<&str>> = m.iter().map(|r| r.to_backend.as_deref()).collect();
            let starts: Vec<SystemTime> = m.iter().map(|r| r.started_at).collect();
            let durations: Vec<f64> = m.iter().map(|r| r.duration_ms).collect();
            let outcomes: Vec<&str> = m.iter().map(|r| r.outcome.as_str()).collect();
            let reasons: Vec<Option<&str>> = m.iter().map(|r| r.reason.as_deref()).collect();
            let sql = format!(
                "INSERT INTO {schema}.pgferry_migration_log \
                 (id, connection_id, proxy_id, from_backend, to_backend, started_at, duration_ms, outcome, reason) \
                 SELECT u.id, u.conn, $3, u.f, u.t, u.s, u.d, u.o, u.r \
                 FROM unnest($1::uuid[], $2::uuid[], $4::text[], $5::text[], $6::timestamptz[], \
                             $7::float8[], $8::text[], $9::text[]) AS u(id, conn, f, t, s, d, o, r) \
                 ORDER BY u.id \
                 ON CONFLICT (id) DO NOTHING"
            );
            bounded(
                limit,
                client.execute(
                    &sql,
                    &[
                        &ids, &conns, &proxy_id, &froms, &tos, &starts, &durations, &outcomes,
                        &reasons,
                    ],
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Closes the rows of this `proxy_id` that are still open in the
    /// database but belong to no connection of this process (`live`): an
    /// earlier run of this proxy died (SIGKILL, crash, power loss) before
    /// writing their disconnect. They get `disconnect_reason =
    /// 'proxy_restarted'` and `disconnect_time = started` (when this run
    /// began, a bound on when the old one was gone), never before their
    /// connect time. Returns the rows closed.
    ///
    /// In a hand-off the new process runs this only once the old one has
    /// flushed or is gone (`Batcher::hold_writes`); adopted sessions are
    /// in its `live`.
    pub async fn close_stale(
        &mut self,
        live: &[Uuid],
        started: SystemTime,
    ) -> Result<u64, SinkError> {
        let schema = self.schema.clone();
        let proxy_id = self.proxy_id.clone();
        let limit = self.write_timeout;
        let result = async {
            let client = self.ensure_ready().await?;
            let sql = format!(
                "UPDATE {schema}.pgferry_connection_log \
                 SET disconnect_time = greatest(connect_time, $2), \
                     disconnect_reason = '{PROXY_RESTARTED}', updated_at = now() \
                 WHERE proxy_id = $1 AND disconnect_time IS NULL \
                   AND connection_id <> ALL($3::uuid[])"
            );
            bounded(limit, client.execute(&sql, &[&proxy_id, &started, &live])).await
        }
        .await;
        if result.is_err() {
            self.reset();
        }
        result
    }
}

/// Rows deleted per statement by the retention pass, so a large backlog
/// never becomes one huge transaction.
pub const RETENTION_CHUNK: i64 = 10_000;

impl PgSink {
    /// Deletes rows older than `keep`, at most `RETENTION_CHUNK` per
    /// statement, if no other pgferry is doing it right now (session
    /// advisory lock). Returns the rows deleted, or `None` when another
    /// replica holds the lock.
    pub async fn expire(&mut self, keep: std::time::Duration) -> Result<Option<u64>, SinkError> {
        let schema = self.schema.clone();
        let limit = self.write_timeout;
        let result = async {
            let client = self.ensure_ready().await?;
            let locked: bool = bounded(
                limit,
                client.query_one(
                    "SELECT pg_try_advisory_lock(hashtext('pgferry_audit_retention'))",
                    &[],
                ),
            )
            .await?
            .get(0);
            if !locked {
                return Ok(None);
            }
            let keep_secs = keep.as_secs_f64();
            let mut deleted = 0u64;
            let statements = [
                format!(
                    "DELETE FROM {schema}.pgferry_connection_log WHERE connection_id IN \
                     (SELECT connection_id FROM {schema}.pgferry_connection_log \
                      WHERE disconnect_time < now() - make_interval(secs => $1) LIMIT $2)"
                ),
                format!(
                    "DELETE FROM {schema}.pgferry_migration_log WHERE id IN \
                     (SELECT id FROM {schema}.pgferry_migration_log \
                      WHERE started_at < now() - make_interval(secs => $1) LIMIT $2)"
                ),
            ];
            let outcome = async {
                for sql in &statements {
                    loop {
                        // Bounded per chunk: a large backlog may take
                        // longer than write_timeout in all.
                        let n =
                            bounded(limit, client.execute(sql, &[&keep_secs, &RETENTION_CHUNK]))
                                .await?;
                        deleted += n;
                        if n < RETENTION_CHUNK as u64 {
                            break;
                        }
                    }
                }
                Ok::<_, SinkError>(())
            }
            .await;
            bounded(
                limit,
                client.execute(
                    "SELECT pg_advisory_unlock(hashtext('pgferry_audit_retention'))",
                    &[],
                ),
            )
            .await?;
            outcome.map(|()| Some(deleted))
        }
        .await;
        if result.is_err() {
            // Also releases the advisory lock if the unlock did not run.
            self.reset();
        }
        result
    }
}

/// Creates the schema and tables if missing. Several pgferry processes may
/// start at once: the DDL runs under a transaction-scoped advisory lock.
async fn create_schema(client: &mut Client, schema: &str) -> Result<(), SinkError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('pgferry_audit_schema'))",
        &[],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.pgferry_connection_log (
            connection_id uuid PRIMARY KEY,
            proxy_id text NOT NULL,
            client_addr inet,
            user_name text NOT NULL,
            database_name text NOT NULL,
            application_name text,
            backend text,
            connect_time timestamptz NOT NULL,
            disconnect_time timestamptz,
            disconnect_reason text,
            migrations integer NOT NULL DEFAULT 0,
            bytes_from_client bigint NOT NULL DEFAULT 0,
            bytes_to_client bigint NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL);
         CREATE INDEX IF NOT EXISTS pgferry_connection_log_connect_time
            ON {schema}.pgferry_connection_log (connect_time);
         CREATE TABLE IF NOT EXISTS {schema}.pgferry_migration_log (
            id uuid PRIMARY KEY,
            connection_id uuid NOT NULL,
            proxy_id text NOT NULL,
            from_backend text NOT NULL,
            to_backend text,
            started_at timestamptz NOT NULL,
            duration_ms double precision NOT NULL,
            outcome text NOT NULL,
            reason text);
         CREATE INDEX IF NOT EXISTS pgferry_migration_log_connection
            ON {schema}.pgferry_migration_log (connection_id);"
    ))
    .await?;
    tx.commit().await?;
    Ok(())
}
