//! Asking one session to move, and waiting for its answer.

use std::time::Duration;

use thiserror::Error;
use tokio::sync::oneshot;

use crate::forwarder::{ControlCommand, ControlSender, TransferOutcome};

/// Beyond its own deadline, a session needs at most a dial, a login and a
/// replay to answer; past this margin something is wrong with it.
const ANSWER_MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MoveError {
    /// The session ended before it could be asked.
    #[error("session ended")]
    SessionGone,
    #[error("session did not answer")]
    NoAnswer,
}

/// Asks the session to move to `to` (or the least-loaded other backend)
/// at its next safe point within `timeout`, and waits for the outcome.
pub async fn request_transfer(
    control: &ControlSender,
    to: Option<String>,
    timeout: Duration,
) -> Result<TransferOutcome, MoveError> {
    let (reply, answer) = oneshot::channel();
    let cmd = ControlCommand::Transfer {
        to,
        timeout,
        reply,
        hold: None,
    };
    control
        .send(cmd)
        .await
        .map_err(|_| MoveError::SessionGone)?;
    match tokio::time::timeout(timeout + ANSWER_MARGIN, answer).await {
        Ok(Ok(outcome)) => Ok(outcome),
        // It took the request, then ended (the client left, say).
        Ok(Err(_)) => Ok(TransferOutcome::RecoverableError("session ended".into())),
        Err(_) => Err(MoveError::NoAnswer),
    }
}
