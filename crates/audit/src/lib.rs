//! Connection audit log for pgferry.
//!
//! Owns: audit events, the batcher and the PostgreSQL sink (issue "Connection
//! audit log"). It must never make the connection path wait on the database.
//! Nothing is implemented yet; the proxy runs with auditing off.
