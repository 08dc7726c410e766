//! `pgferry ctl top`: a live view of a running pgferry, redrawn every
//! interval until `q`: sessions per backend, migrations per second by
//! outcome, the pause's p50 and p99, drains in progress.
//!
//! A thread polls `GET /v1/backends` and `GET /metrics` once an interval
//! (each request with its own timeout) and hands each round to the main
//! thread, which owns the terminal: raw mode and the alternate screen,
//! restored on every way out (`q`, Ctrl-C, SIGTERM/SIGHUP/SIGINT, an I/O
//! error, a panic). The keyboard never waits for the network. When the
//! admin API cannot be reached the view says why and keeps trying.
//!
//! Without a terminal on stdout, or with `--once`, it prints one frame as
//! plain text (two readings an interval apart, so that the rates mean
//! something) and exits: 0 when both readings were had, 1 otherwise.

mod metrics;
mod view;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, queue, style, terminal};

use crate::client::{AdminClient, ClientError, Method, Request, Wait};
use crate::model::{Backend, ErrorBody};
use view::{Poll, State};

/// How long one request of a poll may take: a stuck server shows up as an
/// error in the view instead of freezing it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the keyboard and the polls are looked at.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub interval: Duration,
    pub once: bool,
}

pub fn run(client: AdminClient, opts: Options) -> ExitCode {
    if opts.once || !std::io::stdout().is_terminal() {
        return once(&client, opts.interval);
    }
    match live(client, opts.interval) {
        Ok(Quit::Key) => ExitCode::SUCCESS,
        Ok(Quit::Signal(sig)) => ExitCode::from(128u8.saturating_add(sig)),
        Err(e) => {
            // The terminal is restored by now.
            eprintln!("pgferry ctl top: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One frame on stdout, plain text.
fn once(client: &AdminClient, interval: Duration) -> ExitCode {
    let mut state = State::new(client.base(), interval);
    let first = poll(client);
    let mut ok = first.ok();
    state.update(first);
    if ok {
        // The second reading is what the rates and the interval's pause
        // quantiles are computed against.
        std::thread::sleep(interval);
        let second = poll(client);
        ok = second.ok();
        state.update(second);
    }
    let mut text = state.lines(Instant::now(), &clock()).join("\n");
    text.push('\n');
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (`| head`) is not worth a panic.
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

enum Quit {
    /// `q`, `Q`, Esc or Ctrl-C.
    Key,
    /// SIGTERM, SIGHUP or SIGINT.
    Signal(u8),
}

fn live(client: AdminClient, interval: Duration) -> std::io::Result<Quit> {
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        let value = usize::try_from(sig).unwrap_or(1);
        signal_hook::flag::register_usize(sig, Arc::clone(&signal), value)?;
    }
    spawn_watchdog(Arc::clone(&signal))?;
    let polls = spawn_poller(client.clone(), interval)?;
    let mut state = State::new(client.base(), interval);
    let mut screen = Screen::enter()?;
    let mut dirty = true;
    loop {
        let sig = signal.load(Ordering::Relaxed);
        if sig != 0 {
            return Ok(Quit::Signal(u8::try_from(sig).unwrap_or(127)));
        }
        loop {
            match polls.try_recv() {
                Ok(p) => {
                    state.update(p);
                    dirty = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(std::io::Error::other("the poller thread ended"))
                }
            }
        }
        if dirty {
            screen.draw(&state.lines(Instant::now(), &clock()))?;
            dirty = false;
        }
        if event::poll(TICK)? {
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
                    KeyCode::Char('q' | 'Q') | KeyCode::Esc => return Ok(Quit::Key),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(Quit::Key)
                    }
                    _ => {}
                },
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
}

/// After a signal, the main loop has this long to see it and leave.
const SIGNAL_GRACE: Duration = Duration::from_secs(2);

/// Ends the process when a signal came and the main loop did not leave in
/// `SIGNAL_GRACE`. That happens when the terminal itself is gone (its
/// tmux or ssh session killed: SIGHUP): crossterm's event poll then spins
/// on the dead tty and never returns, and the handled SIGTERM could no
/// longer stop a process burning a core (one did, for an hour).
fn spawn_watchdog(signal: Arc<AtomicUsize>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("top-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            let sig = signal.load(Ordering::Relaxed);
            if sig != 0 {
                std::thread::sleep(SIGNAL_GRACE);
                // Best effort: the terminal may be gone.
                restore();
                std::process::exit(128 + i32::try_from(sig).unwrap_or(127));
            }
        })?;
    Ok(())
}

/// Polls once an interval, on a thread of its own, until the receiver is
/// gone.
fn spawn_poller(client: AdminClient, interval: Duration) -> std::io::Result<mpsc::Receiver<Poll>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("top-poller".into())
        .spawn(move || loop {
            let started = Instant::now();
            if tx.send(poll(&client)).is_err() {
                return;
            }
            // Pacing, not synchronisation: the next round is due one
            // interval after this one started.
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
        })?;
    Ok(rx)
}

fn poll(client: &AdminClient) -> Poll {
    let backends = get(client, "/v1/backends").and_then(|body| {
        serde_json::from_str::<Vec<Backend>>(&body)
            .map_err(|e| format!("unexpected answer to GET /v1/backends: {e}"))
    });
    let metrics = get(client, "/metrics").map(|body| metrics::parse(&body));
    Poll {
        at: Instant::now(),
        backends,
        metrics,
    }
}

/// The body of a 2xx answer to a GET, or one line saying what went wrong.
fn get(client: &AdminClient, path: &str) -> Result<String, String> {
    let reply = client
        .send(&Request {
            method: Method::Get,
            path: path.into(),
            body: None,
            wait: Wait::Poll(REQUEST_TIMEOUT),
        })
        .map_err(|e: ClientError| e.to_string())?;
    if reply.is_success() {
        return Ok(reply.body);
    }
    let why = serde_json::from_str::<ErrorBody>(&reply.body)
        .ok()
        .and_then(|b| b.error.or(b.reason))
        .unwrap_or_else(|| reply.body.chars().take(200).collect());
    Err(format!("GET {path}: HTTP {}: {}", reply.status, why.trim()))
}

fn clock() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    view::utc_clock(secs)
}

/// The terminal in raw mode on the alternate screen, cursor hidden, until
/// dropped (also while a panic unwinds; a panic hook restores it before
/// the message is printed).
struct Screen {
    out: std::io::Stdout,
}

impl Screen {
    fn enter() -> std::io::Result<Self> {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        terminal::enable_raw_mode()?;
        RAW.store(true, Ordering::SeqCst);
        // From here on Drop restores, whatever fails next.
        let mut screen = Screen {
            out: std::io::stdout(),
        };
        crossterm::execute!(screen.out, terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(screen)
    }

    /// Writes the lines from the top, each cut to the width, and clears
    /// the rest of the screen.
    fn draw(&mut self, lines: &[String]) -> std::io::Result<()> {
        let (width, height) = terminal::size()?;
        // One column spare: a line that fills the last column would leave
        // the cursor waiting to wrap, and the clear after it could eat its
        // last character.
        let width = usize::from(width.saturating_sub(1));
        let shown = lines.len().min(usize::from(height));
        for (row, line) in lines.iter().take(shown).enumerate() {
            let row = u16::try_from(row).unwrap_or(u16::MAX);
            let text: String = line.chars().take(width).collect();
            queue!(
                self.out,
                cursor::MoveTo(0, row),
                style::Print(text),
                terminal::Clear(terminal::ClearType::UntilNewLine)
            )?;
        }
        if shown < usize::from(height) {
            let row = u16::try_from(shown).unwrap_or(u16::MAX);
            queue!(
                self.out,
                cursor::MoveTo(0, row),
                terminal::Clear(terminal::ClearType::FromCursorDown)
            )?;
        }
        self.out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Whether the terminal is ours to restore.
static RAW: AtomicBool = AtomicBool::new(false);

/// Leaves the alternate screen, shows the cursor, ends raw mode; only the
/// first call after [`Screen::enter`] does anything.
fn restore() {
    if !RAW.swap(false, Ordering::SeqCst) {
        return;
    }
    let mut out = std::io::stdout();
    let _ = crossterm::execute!(out, cursor::Show, terminal::LeaveAlternateScreen);
    let _ = terminal::disable_raw_mode();
}
