//! Drain progress: while the drain request waits for its answer, a thread
//! polls the backend list and says on stderr how many sessions are left.
//! stderr only, so `--json` output on stdout stays parseable.

use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::{AdminClient, Method, Request, Wait};
use crate::model::Backend;
use crate::render;

const INTERVAL: Duration = Duration::from_millis(500);
/// Short, so stopping never waits long for a poll in flight.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

pub struct DrainProgress {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl DrainProgress {
    pub fn start(client: AdminClient, name: String) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("drain-progress".into())
            .spawn(move || watch(&client, &name, &stopped))
            // Progress is a nicety: without a thread the drain still runs.
            .ok();
        Self { stop, thread }
    }

    /// Stops polling; returns once the thread has printed its last line, so
    /// no progress line comes after the drain's answer.
    pub fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(client: &AdminClient, name: &str, stopped: &mpsc::Receiver<()>) {
    let request = Request {
        method: Method::Get,
        path: "/v1/backends".into(),
        body: None,
        wait: Wait::Poll(POLL_TIMEOUT),
    };
    let mut last = None;
    // The first poll comes after one interval: a drain that is over by then
    // prints no progress at all.
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
        // A failed poll is skipped: the drain request itself reports a
        // server that went away.
        let Some(left) = sessions_left(client, &request, name) else {
            continue;
        };
        // Only changes: a stuck drain should not scroll the terminal.
        if last != Some(left) {
            last = Some(left);
            let _ = writeln!(std::io::stderr(), "{}", render::drain_progress(name, left));
        }
    }
}

fn sessions_left(client: &AdminClient, request: &Request, name: &str) -> Option<u64> {
    let reply = client.send(request).ok().filter(|r| r.is_success())?;
    let list: Vec<Backend> = serde_json::from_str(&reply.body).ok()?;
    list.into_iter()
        .find(|b| b.name == name)
        .map(|b| b.sessions)
}
