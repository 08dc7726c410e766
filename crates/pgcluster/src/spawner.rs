//! Forks every postmaster from one dedicated, never-exiting thread.
//!
//! The postmaster gets `PR_SET_PDEATHSIG = SIGQUIT` (immediate shutdown) so it
//! dies with the process that started it, even when that process is SIGKILLed
//! or keeps its clusters in statics whose destructors never run. Linux delivers
//! the parent-death signal when the *thread* that forked the child exits, not
//! the process; forking from whichever caller thread happens to start a cluster
//! (e.g. a test thread, which exits when its test ends) would kill the server
//! early. So all forks happen on the spawner thread, which lives as long as the
//! process: its request channel's sender sits in a static and is never dropped.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{mpsc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::signal::Signal;

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);

fn spawner() -> io::Result<mpsc::Sender<SpawnRequest>> {
    let mut guard = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tx) = guard.as_ref() {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("pgcluster-spawner".to_owned())
        .spawn(move || {
            // Ends only if every sender is dropped, which never happens: one
            // lives in the static for the life of the process.
            for mut req in rx {
                let result = req.cmd.spawn();
                let _ = req.reply.send(result);
            }
        })?;
    *guard = Some(tx.clone());
    Ok(tx)
}

/// Spawns `cmd` on the spawner thread with `PR_SET_PDEATHSIG = SIGQUIT`.
///
/// Credential order: std's Unix `Command` child does `setgroups`/`setgid`/
/// `setuid` (from `CommandExt::{gid,uid}`), then `chdir`, `setpgid` and the
/// signal-mask reset, and only then runs the `pre_exec` closures (see
/// `do_exec` in library/std/src/sys/process/unix/unix.rs). The kernel clears
/// the parent-death signal on credential changes, so it must be set after
/// them — i.e. in `pre_exec`, which is where it is. `execve` of a non-setuid
/// binary keeps it.
pub(crate) fn spawn_with_pdeathsig(mut cmd: Command) -> io::Result<Child> {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure only makes two async-signal-safe syscalls (prctl,
    // getppid) and builds io::Errors from raw errnos, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGQUIT).map_err(io::Error::from)?;
            // If the parent died between fork and prctl we were already
            // reparented and the signal will never come: do not start.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from(Errno::ESRCH));
            }
            Ok(())
        });
    }
    let tx = spawner()?;
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    tx.send(SpawnRequest {
        cmd,
        reply: reply_tx,
    })
    .map_err(|_| io::Error::other("the pgcluster spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the pgcluster spawner thread dropped the request"))?
}
