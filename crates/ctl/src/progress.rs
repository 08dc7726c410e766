//! Progress of long commands (drain, switchover, hand-off): while the request waits
//! for its answer, a thread polls the admin API and says on stderr what
//! changed. stderr only, so `--json` output on stdout stays parseable.

use std::io::Write;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::{AdminClient, Method, Request, Wait};
use crate::model::{Backend, Handoff, SwitchoverProgress};
use crate::render;

const INTERVAL: Duration = Duration::from_millis(500);
/// Short, so stopping never waits long for a poll in flight.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Progress {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

/// Turns one poll's answer body into a progress line (`None`: nothing to
/// say, or an answer it cannot read).
type Line = Box<dyn Fn(&str) -> Option<String> + Send>;

impl Progress {
    /// Sessions left on the backend being drained.
    pub fn drain(client: AdminClient, name: String) -> Self {
        Self::start(
            client,
            "/v1/backends",
            Box::new(move |body| {
                let list: Vec<Backend> = serde_json::from_str(body).ok()?;
                let left = list.into_iter().find(|b| b.name == name)?.sessions;
                Some(render::drain_progress(&name, left))
            }),
        )
    }

    /// The running switchover's phase and held sessions.
    pub fn switchover(client: AdminClient) -> Self {
        Self::start(
            client,
            "/v1/switchover",
            Box::new(|body| {
                let p: SwitchoverProgress = serde_json::from_str(body).ok()?;
                p.running.then(|| render::switchover_progress(&p))
            }),
        )
    }

    /// The running hand-off, as whichever process answers sees it: the
    /// old one until the new one accepts, then (new connections) the new
    /// one. Each line names the pid that answered.
    pub fn handoff(client: AdminClient) -> Self {
        Self::start(
            client,
            "/v1/handoff",
            Box::new(|body| {
                let h: Handoff = serde_json::from_str(body).ok()?;
                matches!(
                    h.phase.as_str(),
                    "starting" | "handing_over" | "taking_over"
                )
                .then(|| render::handoff(&h))
            }),
        )
    }

    fn start(client: AdminClient, path: &'static str, line: Line) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || watch(&client, path, &line, &stopped))
            // Progress is a nicety: without a thread the command still runs.
            .ok();
        Self { stop, thread }
    }

    /// Stops polling; returns once the thread has printed its last line, so
    /// no progress line comes after the command's answer.
    pub fn stop(mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(client: &AdminClient, path: &str, line: &Line, stopped: &mpsc::Receiver<()>) {
    let request = Request {
        method: Method::Get,
        path: path.into(),
        body: None,
        wait: Wait::Poll(POLL_TIMEOUT),
    };
    let mut last = None;
    // The first poll comes after one interval: a command that is over by
    // then prints no progress at all.
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
        // A failed poll is skipped: the request itself reports a server
        // that went away.
        let Some(reply) = client.send(&request).ok().filter(|r| r.is_success()) else {
            continue;
        };
        let Some(text) = line(&reply.body) else {
            continue;
        };
        // Only changes: a stuck command should not scroll the terminal.
        if last.as_ref() != Some(&text) {
            let _ = writeln!(std::io::stderr(), "{text}");
            last = Some(text);
        }
    }
}
