//! `pgferry ctl top` in a real terminal: tmux runs it in a detached
//! session (120x40) against a real pgferry in front of two real PostgreSQL
//! clusters, and the test reads the screen with `capture-pane`. The view
//! shows the backends with their session counts, a migration (totals,
//! rate, pause quantiles), a drain while it runs and after; `q` ends it
//! with status 0 and the terminal as it was (main screen, cursor shown,
//! cooked mode). Against an admin API that is down it shows the error,
//! keeps trying, and Ctrl-C ends it the same way (SIGTERM too, with 143).
//! Without a terminal it prints one plain frame.
//!
//! Needs tmux (`.ci/run` installs it): without it the tests fail, saying
//! how to install it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{ProxyOptions, ProxyProcess};

/// How long the view may take to show something (it polls every second).
const SHOW: Duration = Duration::from_secs(30);

/// A tmux server of this test's own (`-L`), killed when dropped, with one
/// session running `pgferry ctl top` through a wrapper that records how it
/// exited and the terminal's modes after it, then waits to be killed.
struct Tmux {
    socket: String,
    dir: tempfile::TempDir,
}

impl Tmux {
    /// Starts `pgferry ctl --admin <admin> top <args>` in a 120x40 pane.
    fn start(admin: &str, args: &[&str]) -> Self {
        Self::start_with(admin, args, false)
    }

    /// The same, top run as a background job of the wrapper, which writes
    /// its pid to the file [`Tmux::pid`] reads (to signal it).
    fn start_in_background(admin: &str, args: &[&str]) -> Self {
        Self::start_with(admin, args, true)
    }

    fn start_with(admin: &str, args: &[&str], background: bool) -> Self {
        require_tmux();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let socket = format!(
            "pgferry-top-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("tmux.conf");
        // The wrapper stays (in `tmux wait-for`, until the server is
        // killed) after top ends, so the pane's last screen and its
        // terminal state can still be read; should it die, the pane stays
        // anyway.
        std::fs::write(&conf, "set -g remain-on-exit on\nset -g status off\n")
            .expect("write tmux.conf");
        let script = dir.path().join("run.sh");
        let d = dir.path().display();
        std::fs::write(
            &script,
            format!(
                "unset PGFERRY_ADMIN_URL PGFERRY_ADMIN_TOKEN\n\
                 {bin} ctl --admin {admin} top {args}{background}\n\
                 code=$?\n\
                 stty -a > {d}/stty 2>&1\n\
                 echo \"top exited $code\"\n\
                 echo \"$code\" > {d}/exit.tmp && mv {d}/exit.tmp {d}/exit\n\
                 exec tmux wait-for never\n",
                bin = shell_quote(env!("CARGO_BIN_EXE_pgferry")),
                admin = shell_quote(admin),
                args = args
                    .iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
                d = shell_quote(&d.to_string()),
                background = if background {
                    format!(" & echo $! > {}/pid; wait $!", shell_quote(&d.to_string()))
                } else {
                    String::new()
                },
            ),
        )
        .expect("write run.sh");
        let tmux = Tmux { socket, dir };
        let out = tmux.run(&[
            "-f",
            &conf.display().to_string(),
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "-s",
            "top",
            &format!("sh {}", shell_quote(&script.display().to_string())),
        ]);
        assert!(out.status.success(), "tmux new-session: {}", text(&out));
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("run tmux")
    }

    /// The pane's visible screen.
    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        assert!(out.status.success(), "capture-pane: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A tmux format about the pane, such as `#{alternate_on}`.
    fn pane(&self, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", "top", format]);
        assert!(out.status.success(), "display-message: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Polls the screen until `cond` holds for it; the screen then.
    fn wait_for(&self, what: &str, mut cond: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + SHOW;
        loop {
            let screen = self.screen();
            if cond(&screen) {
                // Shown with the output of a test that fails later.
                eprintln!("--- the view showed {what}:\n{screen}");
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the view to show {what}; the screen:\n{screen}\n{}",
                self.exit_note()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of a top started by [`Tmux::start_in_background`].
    fn pid(&self) -> i32 {
        let file = self.dir.path().join("pid");
        let deadline = Instant::now() + SHOW;
        loop {
            if let Some(pid) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "no pid in {}", file.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exit_file(&self) -> PathBuf {
        self.dir.path().join("exit")
    }

    fn exit_note(&self) -> String {
        match std::fs::read_to_string(self.exit_file()) {
            Ok(code) => format!("(top has exited with {})", code.trim()),
            Err(_) => "(top is still running)".to_owned(),
        }
    }

    /// Sends keys (tmux names such as `q` or `C-c`).
    fn keys(&self, keys: &str) {
        let out = self.run(&["send-keys", "-t", "top", keys]);
        assert!(out.status.success(), "send-keys: {}", text(&out));
    }

    /// Waits for `pgferry ctl top` to exit; its status.
    fn exit_code(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(code) = std::fs::read_to_string(self.exit_file()) {
                return code
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("exit file {code:?}: {e}"));
            }
            assert!(
                Instant::now() < deadline,
                "pgferry ctl top did not exit; the screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// After top exited: the main screen is back, the cursor is shown, the
    /// terminal is in cooked mode again, and the view is gone from the
    /// screen.
    fn assert_terminal_restored(&self, code: i32) {
        let screen = self.wait_for("the wrapper's last line", |s| {
            s.contains(&format!("top exited {code}"))
        });
        assert!(
            !screen.contains("MIGRATIONS") && !screen.contains("BACKEND"),
            "the view is still on screen (the alternate screen was not left):\n{screen}"
        );
        assert_eq!(
            self.pane("#{alternate_on}"),
            "0",
            "still on the alternate screen"
        );
        assert_eq!(
            self.pane("#{cursor_flag}"),
            "1",
            "the cursor is still hidden"
        );
        let stty = std::fs::read_to_string(self.dir.path().join("stty")).expect("stty -a output");
        let modes: Vec<&str> = stty
            .split(|c: char| c.is_whitespace() || c == ';')
            .collect();
        for mode in ["icanon", "echo", "isig", "opost", "icrnl"] {
            assert!(
                modes.contains(&mode),
                "{mode} is off after top (still raw):\n{stty}"
            );
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// These tests drive `pgferry ctl top` in tmux: installed when missing (as
/// root on Debian), else a panic with the command to run.
fn require_tmux() {
    common::require(&[pgferry_pgcluster::prerequisites::TMUX]);
    match Command::new("tmux").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("tmux -V failed: {}", text(&out)),
        Err(e) => panic!("tmux cannot be run: {e}"),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The words of the screen line that starts with `start`.
fn row<'a>(screen: &'a str, start: &str) -> Option<Vec<&'a str>> {
    screen
        .lines()
        .find(|l| l.starts_with(start))
        .map(|l| l.split_whitespace().collect())
}

/// The view's (per second, total) of a migration outcome.
fn outcome(screen: &str, label: &str) -> Option<(String, String)> {
    let words = row(screen, label)?;
    let n = words.len();
    (n >= 3).then(|| (words[n - 2].to_owned(), words[n - 1].to_owned()))
}

/// Whether the view's backend table shows every backend with the session
/// count the admin API gives now, and `state` for the ones named.
fn backends_match(screen: &str, proxy: &ProxyProcess, states: &[(&str, &str)]) -> bool {
    let api = proxy.backends();
    api.iter().all(|(name, b)| {
        row(screen, &format!("{name} ")).is_some_and(|w| {
            w.len() == 8
                && w[6].parse::<u64>().ok() == b["sessions"].as_u64()
                && b["state"].as_str() == Some(w[2])
                && states.iter().all(|(n, s)| n != name || w[2] == *s)
        })
    })
}

/// A psql session through the proxy, kept open until its stdin closes.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Session {
    fn open(proxy: &ProxyProcess, app: &str) -> Self {
        let url = proxy.url(
            common::USER,
            common::PASSWORD,
            &format!("sslmode=disable&application_name={app}"),
        );
        let mut child = Command::new(common::psql_bin())
            .arg(url)
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .env_remove("PGPASSWORD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        let stdin = child.stdin.take();
        let mut s = Session { child, stdin };
        s.send("select 1;");
        s
    }

    fn send(&mut self, sql: &str) {
        let stdin = self.stdin.as_mut().expect("psql stdin");
        stdin.write_all(sql.as_bytes()).expect("write to psql");
        stdin.write_all(b"\n").expect("write to psql");
        stdin.flush().expect("flush psql");
    }

    /// Runs `sql`, quits, and says whether psql succeeded.
    fn finish(mut self, sql: &str) -> (bool, String) {
        self.send(sql);
        drop(self.stdin.take());
        let out = self.child.wait_with_output().expect("psql");
        (out.status.success(), text(&out))
    }
}

fn transfer(proxy: &ProxyProcess, app: &str) -> String {
    let conn = proxy.connection_by_app(app);
    let id = conn["id"].as_str().expect("id").to_owned();
    let to = if conn["backend"] == "pg1" {
        "pg2"
    } else {
        "pg1"
    };
    let (status, body) = proxy.http(
        "POST",
        &format!("/v1/connections/{id}/transfer"),
        Some(&format!(r#"{{"to":"{to}","timeout_ms":15000}}"#)),
        None,
    );
    assert_eq!(status, 200, "transfer of {app}: {body}");
    assert!(body.contains(r#""outcome":"success""#), "{body}");
    to.to_owned()
}

fn metric(proxy: &ProxyProcess, series: &str) -> String {
    format!("{}", proxy.metric(series) as u64)
}

#[test]
fn top_follows_sessions_migrations_and_a_drain_and_quits_on_q() {
    require_tmux();
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let admin = format!("http://{}", proxy.admin);
    let mut sessions: Vec<Session> = (0..3)
        .map(|i| Session::open(&proxy, &format!("top-{i}")))
        .collect();
    common::wait_until(SHOW, "three sessions", || {
        let (status, body) = proxy.http_get("/v1/connections");
        status == 200 && (0..3).all(|i| body.contains(&format!("\"top-{i}\"")))
    });

    let top = Tmux::start(&admin, &[]);

    // The backends, each with the session count the API gives, and 3 in all.
    let screen = top.wait_for("both backends with their sessions", |s| {
        backends_match(s, &proxy, &[("pg1", "active"), ("pg2", "active")])
            && row(s, "total").as_deref() == Some(&["total", "3"][..])
    });
    assert!(
        screen.starts_with(&format!("pgferry top  {admin}  ")),
        "{screen}"
    );
    assert_eq!(outcome(&screen, "success").map(|o| o.1), Some("0".into()));
    assert!(
        screen.contains("PAUSE  p50 -  p99 -  (no migration yet)"),
        "{screen}"
    );
    assert!(screen.contains("DRAINS IN PROGRESS  none"), "{screen}");
    let header = row(&screen, "MIGRATIONS").expect("migrations header");
    assert_eq!(header[..3], ["MIGRATIONS", "PER", "SECOND"], "{screen}");

    // A migration: the totals, a rate above zero in the interval that had
    // it, pause quantiles, and the sessions where they are now. The rate
    // is on screen for one interval only, from the frame that first has
    // the new total; should the test have looked away that long, another
    // migration gives it a second chance.
    let mut seen_rate = false;
    for attempt in 1..=3 {
        transfer(&proxy, "top-0");
        let want = metric(&proxy, "pgferry_conn_migration_success_total");
        assert_eq!(want, attempt.to_string(), "success counter");
        let screen = top.wait_for("the migration", |s| {
            if let Some((rate, _)) = outcome(s, "success") {
                seen_rate |= rate.parse::<f64>().is_ok_and(|r| r > 0.0);
            }
            outcome(s, "success").is_some_and(|o| o.1 == want)
                && outcome(s, "attempted").is_some_and(|o| o.1 == want)
                && backends_match(s, &proxy, &[])
        });
        assert_eq!(
            outcome(&screen, "fatal error").map(|o| o.1),
            Some("0".into()),
            "{screen}"
        );
        let pause = row(&screen, "PAUSE").expect("pause line");
        assert_eq!(pause[..2], ["PAUSE", "p50"], "{screen}");
        assert!(
            pause[2].parse::<f64>().is_ok_and(|ms| ms > 0.0) && pause[3] == "ms",
            "no p50 in {pause:?}"
        );
        assert!(
            pause[5].parse::<f64>().is_ok_and(|ms| ms > 0.0) && pause[6] == "ms",
            "no p99 in {pause:?}"
        );
        if seen_rate {
            break;
        }
    }
    assert!(seen_rate, "no frame showed a success rate above 0");

    // A drain that cannot finish while a session is in a transaction:
    // shown as running, with the session left; then the transaction ends,
    // the drain finishes and the view says so.
    let stuck = &mut sessions[1];
    stuck.send("begin; select 1;");
    common::wait_until(SHOW, "top-1 in a transaction", || {
        common::has_session_in_state(proxy.admin, "top-1", "in_transaction")
    });
    let from = proxy.connection_by_app("top-1")["backend"]
        .as_str()
        .expect("backend")
        .to_owned();
    let drain = {
        let admin = proxy.admin;
        let from = from.clone();
        std::thread::spawn(move || {
            common::admin_request(
                admin,
                "POST",
                &format!("/v1/backends/{from}/drain"),
                Some(r#"{"timeout_ms":60000}"#),
                None,
            )
        })
    };
    let screen = top.wait_for("the drain running", |s| {
        row(s, &format!("{from} ")).is_some_and(|w| w[2] == "draining" && w[7] == "running")
            && s.lines().any(|l| {
                l.starts_with(&format!("DRAINS IN PROGRESS  {from} ("))
                    && l.ends_with(" left)")
                    && !l.contains("(0 sessions")
            })
    });
    assert!(!drain.is_finished(), "the drain ended early:\n{screen}");
    stuck.send("commit;");
    let (status, body) = drain.join().expect("drain thread");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""remaining":0"#), "{body}");
    top.wait_for("the drain over", |s| {
        s.contains("DRAINS IN PROGRESS  none")
            && row(s, &format!("{from} ")).is_some_and(|w| w[2] == "drained" && w[6] == "0")
            && backends_match(s, &proxy, &[])
    });

    // q: exit 0, the terminal as it was.
    top.keys("q");
    assert_eq!(top.exit_code(), 0);
    top.assert_terminal_restored(0);

    // Without a terminal: one plain frame, no escape sequences.
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["ctl", "--admin", &admin, "top", "--interval", "200ms"])
        .env_remove("PGFERRY_ADMIN_URL")
        .env_remove("PGFERRY_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run pgferry ctl top");
    let frame = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!frame.contains('\u{1b}'), "escape sequences in {frame:?}");
    assert!(frame.contains("PER SECOND (last 0."), "{frame}");
    assert!(
        backends_match(&frame, &proxy, &[(from.as_str(), "drained")]),
        "{frame}"
    );
    assert_eq!(
        outcome(&frame, "success").map(|o| o.1),
        Some(metric(&proxy, "pgferry_conn_migration_success_total"))
    );

    for (i, s) in sessions.into_iter().enumerate() {
        let (ok, out) = s.finish("select 1;");
        assert!(ok, "top-{i}: {out}");
    }
}

#[test]
fn top_shows_an_api_that_is_down_keeps_trying_and_quits_on_ctrl_c() {
    require_tmux();
    let refused = common::RefusedPort::reserve();
    let admin = format!("http://{}", refused.addr);
    let top = Tmux::start(&admin, &["--interval", "200ms"]);
    // Tries again and again, saying why it fails.
    let screen = top.wait_for("the error and retries", |s| {
        row(s, "retrying every 200ms:")
            .and_then(|w| w.get(3)?.parse::<u32>().ok())
            .is_some_and(|n| n >= 3)
    });
    for source in ["ERROR backends: ", "ERROR metrics: "] {
        let line = screen
            .lines()
            .find(|l| l.starts_with(source))
            .unwrap_or_else(|| panic!("no {source:?} line in:\n{screen}"));
        assert!(
            line.contains("cannot reach") && line.contains(&refused.addr.to_string()),
            "{line}"
        );
    }
    assert!(screen.contains("BACKENDS  (no answer yet)"), "{screen}");
    assert!(!Path::new(&top.exit_file()).exists(), "top gave up");

    top.keys("C-c");
    assert_eq!(top.exit_code(), 0);
    top.assert_terminal_restored(0);

    // SIGTERM: the same way out, with 128 + 15.
    let top = Tmux::start_in_background(&admin, &[]);
    top.wait_for("the error", |s| s.contains("ERROR backends: cannot reach"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(top.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM to top");
    assert_eq!(top.exit_code(), 143);
    top.assert_terminal_restored(143);

    // The terminal itself goes away (its tmux server killed: SIGHUP, then
    // a dead tty): top ends too, rather than spinning on the tty (one
    // left behind by an earlier version burned a core for an hour).
    let top = Tmux::start_in_background(&admin, &[]);
    top.wait_for("the error", |s| s.contains("ERROR backends: cannot reach"));
    let pid = nix::unistd::Pid::from_raw(top.pid());
    drop(top);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Signal 0: is it still there (a zombie until its parent, the killed
    // wrapper, is reaped by init, which counts as gone here)?
    while nix::sys::signal::kill(pid, None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|st| !st.contains(") Z "))
            .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "top still runs after its terminal went away"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Without a terminal: the error in the frame, and status 1.
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["ctl", "--admin", &admin, "top", "--once"])
        .env_remove("PGFERRY_ADMIN_URL")
        .env_remove("PGFERRY_ADMIN_TOKEN")
        .output()
        .expect("run pgferry ctl top --once");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let frame = String::from_utf8_lossy(&out.stdout);
    assert!(
        frame.contains("ERROR backends: cannot reach the pgferry admin API"),
        "{frame}"
    );
}
