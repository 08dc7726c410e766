//! The admin API's JSON answers, as far as ctl reads them. Unknown fields
//! are ignored so a newer server still works with an older ctl.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Backend {
    pub name: String,
    pub address: String,
    pub state: String,
    pub healthy: bool,
    pub sessions: u64,
    /// Older servers do not say.
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub cluster: Option<String>,
    /// Older servers do not say.
    #[serde(default)]
    pub dialect: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Connection {
    pub id: String,
    #[serde(default)]
    pub client_addr: String,
    pub user: String,
    pub database: String,
    #[serde(default)]
    pub application_name: Option<String>,
    pub backend: String,
    pub connected_at: String,
    pub migrations: u64,
    pub state: String,
}

/// 200 of a transfer; its 409/500 bodies carry `outcome` and `reason`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Transfer {
    pub outcome: String,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub duration_ms: Option<f64>,
    #[serde(default)]
    pub pause_ms: Option<f64>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Drain {
    pub backend: String,
    pub moved: u64,
    pub failed: u64,
    pub remaining: u64,
    #[serde(default)]
    pub failures: Vec<Failure>,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Failure {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Rebalance {
    pub moves: Vec<Move>,
    pub moved: u64,
    pub failed: u64,
    #[serde(default)]
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Move {
    pub id: String,
    pub from: String,
    pub to: String,
    pub outcome: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Removed {
    pub removed: String,
    pub closed: u64,
}

/// Any error body: `{"error"}`, a transfer's `{"outcome","reason"}`, or a
/// remove refused because of `sessions`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub outcome: Option<String>,
    #[serde(default)]
    pub sessions: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PhaseTime {
    pub phase: String,
    pub ms: f64,
}

/// A switchover's answer (200, and 409 when it aborted).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Switchover {
    pub outcome: String,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub phases: Vec<PhaseTime>,
    pub sessions_held: u64,
    pub sessions_moved: u64,
    pub sessions_failed: u64,
    #[serde(default)]
    pub failures: Vec<Failure>,
    #[serde(default)]
    pub blocked: Vec<String>,
    pub longest_pause_ms: f64,
    pub duration_ms: f64,
}

/// `GET /v1/switchover`, as far as progress lines need it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SwitchoverProgress {
    pub running: bool,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub held: u64,
    #[serde(default)]
    pub sessions: u64,
}

/// `GET /v1/handoff`, and the answers of `POST /v1/handoff` (200, 202, and
/// 409 when it aborted).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Handoff {
    pub phase: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub peer_pid: Option<i64>,
    #[serde(default)]
    pub handed_over: u64,
    #[serde(default)]
    pub kept: u64,
    #[serde(default)]
    pub resumed: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub error: Option<String>,
    pub pid: i64,
}
