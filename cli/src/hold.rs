//! What every holding subcommand shares: its flags, the session, a bounded and interruptible
//! acquisition, CMD run while the guard holds, and the release and lease revocation after.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::time::Duration;

use etcd_coord::{Error, Fence, LeasedSession};

use crate::conn::{parse_duration, Connection};
use crate::exit::Failure;
use crate::run::{self, Holding, Signals};

#[derive(Debug, clap::Args)]
pub struct Flags {
    /// The session's lease TTL (seconds, or a duration such as 30s): a crashed etcd-coord's
    /// hold ends this long after its last refresh.
    #[arg(long, default_value = "10", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Give up (exit 124) if not acquired within this; without it, wait as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// When the hold is lost, CMD gets SIGTERM, and SIGKILL this long after.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub kill_after: Duration,
}

/// A guard `etcd-coord` can hold CMD under: it has a [`Fence`], and an end (release, resign,
/// leave).
pub trait Guard: Deref<Target = Fence> + Send + 'static {
    fn end(self) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;
}

macro_rules! released {
    ($($guard:ty),*) => {$(
        impl Guard for $guard {
            fn end(self) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> {
                Box::pin(self.release())
            }
        }
    )*};
}
released!(
    etcd_coord::MutexGuard,
    etcd_coord::SemaphorePermit,
    etcd_coord::RwLockReadGuard,
    etcd_coord::RwLockWriteGuard,
    etcd_coord::Leadership,
    etcd_coord::BarrierHold
);

impl Guard for etcd_coord::DoubleBarrierGuard {
    fn end(self) -> Pin<Box<dyn Future<Output = Result<(), Error>> + Send>> {
        Box::pin(self.leave())
    }
}

/// Acquires `what` with `acquire` (given the session), runs `cmd` while it holds, then ends
/// it and revokes the session's lease. `env` adds to CMD's environment.
pub async fn hold<G, F, Fut>(
    conn: &Connection,
    flags: &Flags,
    what: &str,
    cmd: &[String],
    env: impl FnOnce(&Fence) -> Vec<(&'static str, String)>,
    acquire: F,
) -> Result<i32, Failure>
where
    G: Guard,
    F: FnOnce(LeasedSession) -> Fut,
    Fut: Future<Output = Result<G, Error>>,
{
    let mut signals = Signals::install()?;
    let session = session(conn, flags.ttl, what).await?;
    let acquired = interruptible(&mut signals, async {
        let acquisition = Box::pin(acquire(session.clone()));
        let acquired = match flags.timeout {
            Some(limit) => etcd_coord::timeout(limit, acquisition)
                .await
                .ok_or(Failure::Timeout(limit))?,
            None => acquisition.await,
        };
        acquired.map_err(|e| Failure::of(what, e))
    })
    .await;
    let guard = match acquired {
        Ok(guard) => guard,
        Err(failure) => {
            close(&session).await;
            return Err(failure);
        }
    };
    let held = Holding {
        key: guard.key().to_owned(),
        fencing_token: guard.fencing_token(),
        lease_id: session.lease_id(),
        lost: Box::pin(guard.lost()),
        env: env(&guard),
    };
    let result = run::while_held(held, cmd, flags.kill_after, &mut signals, conn.format).await;
    if result.is_ok() {
        // Ending a double barrier waits for the others: a signal stops that wait.
        match interruptible(&mut signals, async {
            guard.end().await.map_err(|e| Failure::of(what, e))
        })
        .await
        {
            Err(Failure::Signalled(_)) | Ok(()) => {}
            Err(failure) => eprintln!("etcd-coord: {failure}"),
        }
    } else {
        drop(guard);
    }
    close(&session).await;
    result
}

/// A session of `ttl` through `conn`'s client, for `what`.
pub async fn session(
    conn: &Connection,
    ttl: Duration,
    what: &str,
) -> Result<LeasedSession, Failure> {
    let client = conn.client().await?;
    LeasedSession::new(client, conn.session_options(ttl))
        .await
        .map_err(|e| Failure::of(what, e))
}

/// `fut`, unless a signal comes first.
pub async fn interruptible<T>(
    signals: &mut Signals,
    fut: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::select! {
        out = fut => out,
        number = signals.recv() => Err(Failure::Signalled(number)),
    }
}

/// Revokes the session's lease (every key on it goes); a failure is only reported.
async fn close(session: &LeasedSession) {
    if let Err(e) = session.close().await {
        eprintln!(
            "etcd-coord: revoking lease {:x}: {e} (it ends by its TTL)",
            session.lease_id()
        );
    }
}
