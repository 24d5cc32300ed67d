//! Running CMD while something is held: in a process group of its own, with the holding in its
//! environment; signals to `etcd-coord` are passed on to it; if the holding is lost, SIGTERM to
//! the group, then SIGKILL after the grace period.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::exit::{self, Failure};
use crate::output::{self, Format};

/// The signals that end `etcd-coord` (or, while CMD runs, are passed on to it): SIGINT,
/// SIGTERM, SIGHUP. Installed before anything is acquired, so that an interrupted wait still
/// cleans up (its key is deleted, the lease revoked).
pub struct Signals {
    streams: Vec<(i32, tokio::signal::unix::Signal)>,
}

impl Signals {
    pub fn install() -> Result<Signals, Failure> {
        let mut streams = Vec::new();
        for (number, kind) in [
            (Signal::SIGINT, SignalKind::interrupt()),
            (Signal::SIGTERM, SignalKind::terminate()),
            (Signal::SIGHUP, SignalKind::hangup()),
        ] {
            let stream = signal(kind)
                .map_err(|e| Failure::Internal(format!("cannot handle {number}: {e}")))?;
            streams.push((number as i32, stream));
        }
        Ok(Signals { streams })
    }

    /// The next signal's number.
    pub async fn recv(&mut self) -> i32 {
        let waits = self.streams.iter_mut().map(|(number, stream)| {
            let number = *number;
            Box::pin(async move {
                stream.recv().await;
                number
            })
        });
        futures::future::select_all(waits).await.0
    }
}

/// What is held while CMD runs.
pub struct Holding {
    pub key: String,
    pub fencing_token: i64,
    pub lease_id: i64,
    /// Completes, with the reason, when the holding is lost.
    pub lost: Pin<Box<dyn Future<Output = etcd_coord::Error> + Send>>,
    /// Extra environment for CMD (etcdctl's own names, for `lock`).
    pub env: Vec<(&'static str, String)>,
}

/// Runs `cmd` while `held` holds, and returns its exit code; without `cmd`, prints what is held
/// and holds until a signal (exit 0). Lost first: CMD is terminated and this is `Lost`.
pub async fn while_held(
    held: Holding,
    cmd: &[String],
    kill_after: Duration,
    signals: &mut Signals,
    format: Format,
) -> Result<i32, Failure> {
    let Holding {
        key,
        fencing_token,
        lease_id,
        mut lost,
        env,
    } = held;
    let Some((program, args)) = cmd.split_first() else {
        output::acquired(format, &key, fencing_token, lease_id);
        return tokio::select! {
            _ = signals.recv() => Ok(0),
            error = &mut lost => Err(Failure::Lost(format!("{key}: lost: {error}"))),
        };
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("ETCD_COORD_KEY", &key)
        .env("ETCD_COORD_FENCING_TOKEN", fencing_token.to_string())
        .env("ETCD_COORD_LEASE", output::lease_hex(lease_id))
        .envs(env)
        .process_group(0)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Failure::NotFound(format!("{program}: {e}")),
            _ => Failure::CannotRun(format!("{program}: {e}")),
        })?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|e| Failure::Internal(format!("waiting for {program}: {e}")))?;
                return Ok(exit::of_status(status));
            }
            number = signals.recv() => {
                if let (Some(group), Ok(signal)) = (group, Signal::try_from(number)) {
                    let _ = killpg(group, signal);
                }
            }
            error = &mut lost => {
                eprintln!("etcd-coord: {key}: lost ({error}); sending SIGTERM to {program}");
                terminate(&mut child, group, kill_after).await;
                return Err(Failure::Lost(format!("{key}: lost while {program} ran: {error}")));
            }
        }
    }
}

/// SIGTERM to the group, and SIGKILL if the child has not exited within `grace`.
async fn terminate(child: &mut tokio::process::Child, group: Option<Pid>, grace: Duration) {
    let Some(group) = group else { return };
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        eprintln!("etcd-coord: still running after {grace:?}; sending SIGKILL");
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}
