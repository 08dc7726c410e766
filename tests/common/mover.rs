//! A mover: a thread that keeps asking pgferry to transfer sessions, as an
//! operator moving everything all the time would.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::admin_json;

/// Outcomes of the transfers the mover asked for.
#[derive(Debug, Default, Clone)]
pub struct MoverStats {
    /// 200 answers: sessions moved.
    pub ok: usize,
    /// 409 answers: refused or no safe point before the deadline; the
    /// session was left where it was.
    pub refused: usize,
    /// 500 answers: the session was lost.
    pub fatal: usize,
    /// Successful moves per application_name.
    pub ok_by_app: BTreeMap<String, usize>,
    /// Fatal outcomes per application_name.
    pub fatal_by_app: BTreeMap<String, usize>,
}

impl MoverStats {
    pub fn moves_of(&self, app: &str) -> usize {
        self.ok_by_app.get(app).copied().unwrap_or(0)
    }
}

pub struct Mover {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
    stats: Arc<Mutex<MoverStats>>,
}

impl Mover {
    /// Every `period`, asks for a transfer of every session whose
    /// application_name satisfies `select` (each request waiting up to
    /// `timeout_ms` for a safe point), until [`Mover::stop`]. A session whose
    /// previous request is still waiting is skipped in that round, so one
    /// session inside a long transaction does not hold up the others.
    pub fn start(
        admin: SocketAddr,
        select: impl Fn(&str) -> bool + Send + 'static,
        period: Duration,
        timeout_ms: u64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(MoverStats::default()));
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let handle = std::thread::spawn(move || {
            let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
            let mut requests = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                let round = Instant::now();
                let (_, list) = admin_json(admin, "GET", "/v1/connections", "");
                for c in list.as_array().into_iter().flatten() {
                    let (Some(id), Some(app)) = (c["id"].as_str(), c["application_name"].as_str())
                    else {
                        continue;
                    };
                    if !select(app) || !lock(&in_flight).insert(id.to_owned()) {
                        continue;
                    }
                    let (id, app) = (id.to_owned(), app.to_owned());
                    let (in_flight, stats) = (in_flight.clone(), stats2.clone());
                    requests.push(std::thread::spawn(move || {
                        let body = format!("{{\"timeout_ms\": {timeout_ms}}}");
                        let (status, _) = admin_json(
                            admin,
                            "POST",
                            &format!("/v1/connections/{id}/transfer"),
                            &body,
                        );
                        let mut s = lock(&stats);
                        match status {
                            200 => {
                                s.ok += 1;
                                *s.ok_by_app.entry(app).or_default() += 1;
                            }
                            409 => s.refused += 1,
                            500 => {
                                s.fatal += 1;
                                *s.fatal_by_app.entry(app).or_default() += 1;
                            }
                            _ => {}
                        }
                        drop(s);
                        lock(&in_flight).remove(&id);
                    }));
                }
                requests.retain(|h| !h.is_finished());
                // Pacing between rounds, not synchronization.
                if let Some(rest) = period.checked_sub(round.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            for h in requests {
                let _ = h.join();
            }
        });
        Mover {
            stop,
            handle,
            stats,
        }
    }

    /// The outcomes so far.
    pub fn stats(&self) -> MoverStats {
        lock(&self.stats).clone()
    }

    /// Stops asking, waits for the requests still pending, returns the
    /// outcomes.
    pub fn stop(self) -> MoverStats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("mover thread");
        let s = lock(&self.stats).clone();
        s
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
