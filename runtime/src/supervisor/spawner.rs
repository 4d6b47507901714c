//! Every supervised process is forked by one long-lived thread that marks it (Linux
//! `PR_SET_PDEATHSIG`) to get SIGTERM when the supervising process dies, so that a
//! supervisor killed with SIGKILL (or crashed, or taken by the OOM killer) leaves no
//! orphans serving on: its children drain and exit.
//!
//! Why a thread of its own: the kernel sends the parent-death signal when the *thread*
//! that forked the child exits, not when the process does. Tokio forks from whichever
//! worker or blocking thread runs the task, and blocking threads exit after idling, which
//! would kill healthy children. This thread lives as long as the process, so the signal
//! means what it says.

use std::io;
use std::sync::{mpsc, Mutex, OnceLock};

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The signal a child gets when its supervisor dies: the one a supervisor stops it with.
#[cfg(target_os = "linux")]
const PARENT_DEATH_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGTERM;

struct Job {
    cmd: Command,
    /// The caller's runtime: the child's pipes and exit are watched by its drivers.
    runtime: Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The spawner thread's queue; `None` when the thread could not be started (the
/// children are then forked in place, without the parent-death signal).
static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();

fn spawner() -> Option<&'static Mutex<mpsc::Sender<Job>>> {
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let started = std::thread::Builder::new()
                .name("dynamo-spawner".into())
                .spawn(move || serve(rx));
            match started {
                Ok(_) => Some(Mutex::new(tx)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the spawner thread: children will outlive a killed supervisor");
                    None
                }
            }
        })
        .as_ref()
}

/// The spawner thread: forks each command it is given, for as long as the process runs
/// (the queue's sender is a static, so `recv` never fails).
fn serve(jobs: mpsc::Receiver<Job>) {
    while let Ok(mut job) = jobs.recv() {
        let _runtime = job.runtime.enter();
        let child = job.cmd.spawn();
        // A caller that went away drops the child, and `kill_on_drop` ends it.
        let _ = job.reply.send(child);
    }
}

/// Spawns `cmd` from the spawner thread, set to receive SIGTERM when this process dies.
pub(crate) async fn spawn(mut cmd: Command) -> io::Result<Child> {
    let Some(queue) = spawner() else {
        return cmd.spawn();
    };
    set_parent_death_signal(&mut cmd);
    let (reply, answer) = oneshot::channel();
    let job = Job {
        cmd,
        runtime: Handle::current(),
        reply,
    };
    let sent = match queue.lock() {
        Ok(tx) => tx.send(job),
        Err(poisoned) => poisoned.into_inner().send(job),
    };
    if sent.is_err() {
        return Err(io::Error::other("the spawner thread stopped"));
    }
    answer
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the spawner thread stopped")))
}

#[cfg(target_os = "linux")]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes only two
    // async-signal-safe system calls (prctl, getppid); its errors are built from raw OS
    // codes, without allocating.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(PARENT_DEATH_SIGNAL)?;
            // The supervisor may have died between the fork and the prctl: the child has
            // been re-parented already and no signal will come, so it must not start.
            if nix::unistd::getppid() != parent {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Children forked from threads that exit (as tokio's blocking threads do) must not
    /// receive the parent-death signal: this process is still alive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_outlives_the_thread_that_asked_for_it() {
        let handle = Handle::current();
        let child = std::thread::spawn(move || {
            handle.block_on(async {
                let mut cmd = Command::new("sleep");
                cmd.arg("30").kill_on_drop(true);
                spawn(cmd).await
            })
        })
        .join()
        .expect("the asking thread ends");
        let mut child = child.expect("sleep starts");
        // The asking thread is gone; the child must still run.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "the child died with the thread that asked for it"
        );
        let _ = child.kill().await;
    }
}
