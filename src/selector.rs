//! [`LeaderSelector`]: keeps a worker campaigning and runs leader-scoped work, for worker
//! pools where "every worker campaigns; the leader runs the leader's job".

use std::future::Future;
use std::time::Duration;

use etcd_client::Client;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::{
    Election, Error, Fence, LeaderEvent, LeaderInfo, LeasedSession, SessionOptions, SessionState,
};

/// Keeps one worker campaigning in an election and runs the caller's leader work while it
/// leads — the loop every worker pool needs around [`Election::campaign`].
///
/// What [`run`](Self::run) does, over and over until shut down:
/// 1. obtains a session (a new one after each loss, with jittered backoff) and campaigns;
/// 2. when elected, calls the leader function with a [`LeaderTerm`] and runs the future it
///    returns (like client-go's `OnStartedLeading(ctx)` or Curator's `takeLeadership`);
/// 3. fires the term's cancellation the moment leadership may be lost — the session is Lost
///    (which it declares a safety margin *before* the server can expire the lease), the leader
///    key is deleted, the selector is shut down, or (with
///    [`with_cancel_on_suspend`](Self::with_cancel_on_suspend)) the session is Suspended;
/// 4. **waits for the leader future to finish** and only then resigns (fenced), so the next
///    leader is not elected while this one's work still runs (client-go learned this the hard
///    way: kubernetes#139991);
/// 5. re-campaigns (like Curator's auto-requeue). A leader future that returns by itself ends
///    the term the same way, and the next campaign waits for the retry backoff (growing while
///    terms keep ending at once), so a leader function that returns immediately never turns
///    into a busy campaign/resign loop.
///
/// Followers (and the leader) see who leads through [`leaders()`](Self::leaders); if observing
/// fails (etcd refuses the watch, say), it starts over after the retry backoff, so the view
/// recovers once etcd serves it again.
///
/// # What it guarantees, and what it cannot
/// Within the process: the leader future is cancelled before the server can let another
/// candidate lead, and a new term starts only after the previous future finished. It cannot
/// stop a future that ignores its cancellation, nor a process that is paused (GC, SIGSTOP)
/// past the safety margin: across processes, **fencing tokens are the real protection**. Make
/// every write the leader does conditional on the term's [`Fence::owner_compares`] (or use
/// [`Fence::txn_if_owner`]), or pass [`Fence::fencing_token`] to resources that reject stale
/// tokens. See `docs/safety.md`.
///
/// # Example
/// ```no_run
/// # async fn demo() -> Result<(), etcd_coord::Error> {
/// use etcd_coord::LeaderSelector;
///
/// let client = etcd_client::Client::connect(["127.0.0.1:2379"], None).await?;
/// let selector = LeaderSelector::new(client, "pools/reports", "worker-1");
/// let mut leaders = selector.leaders();
/// tokio::spawn(async move {
///     while leaders.changed().await.is_ok() {
///         println!("leader now: {:?}", leaders.borrow().as_ref().map(|l| l.key().to_owned()));
///     }
/// });
/// selector
///     .run(tokio::signal::ctrl_c(), |term| async move {
///         // Leader's job: runs until the term is cancelled.
///         term.cancelled().await;
///     })
///     .await
/// # }
/// ```
pub struct LeaderSelector {
    client: Client,
    name: String,
    value: Vec<u8>,
    session_options: SessionOptions,
    cancel_on_suspend: bool,
    retry_min: Duration,
    retry_max: Duration,
    leaders: watch::Sender<Option<LeaderInfo>>,
}

impl std::fmt::Debug for LeaderSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderSelector")
            .field("name", &self.name)
            .field("session_options", &self.session_options)
            .field("cancel_on_suspend", &self.cancel_on_suspend)
            .finish()
    }
}

/// One term of leadership, handed to the leader function of [`LeaderSelector::run`]. It
/// dereferences to the term's [`Fence`] (fencing token, fenced Txns); cloning it hands both
/// the fence and the cancellation to other tasks.
#[derive(Debug, Clone)]
pub struct LeaderTerm {
    fence: Fence,
    cancel: CancellationToken,
}

impl LeaderTerm {
    /// Completes when the term ends: leadership may be lost, or the selector shuts down. The
    /// leader future should stop promptly once it completes.
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + '_ {
        self.cancel.cancelled()
    }

    /// True once the term is cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

impl std::ops::Deref for LeaderTerm {
    type Target = Fence;

    /// The term's [`Fence`]: `fencing_token()` (pass it with every write to a resource that
    /// can reject stale tokens), `key()`, `owner_compares()`, `txn_if_owner(ops)`, `lost()`.
    fn deref(&self) -> &Fence {
        &self.fence
    }
}

impl LeaderSelector {
    /// A selector for election `name`, campaigning with `value` through `client`.
    pub fn new(client: Client, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        LeaderSelector {
            client,
            name: name.into(),
            value: value.into(),
            session_options: SessionOptions::new(),
            cancel_on_suspend: false,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            leaders: watch::channel(None).0,
        }
    }

    /// Options for each session it creates (TTL, safety margin, …).
    pub fn with_session_options(mut self, options: SessionOptions) -> Self {
        self.session_options = options;
        self
    }

    /// Also cancel the term as soon as the session is Suspended (refreshes failing), not only
    /// when it is Lost. The term then ends even if the session recovers; the worker resigns and
    /// campaigns again. Default: off.
    pub fn with_cancel_on_suspend(mut self, enabled: bool) -> Self {
        self.cancel_on_suspend = enabled;
        self
    }

    /// The backoff between attempts after a failure (new session, campaign, observing), and
    /// before campaigning again after a term whose leader future returned by itself:
    /// jittered, doubling from `min` to `max`. Default 100 ms to 5 s. `min` must be more than
    /// zero ([`run`](Self::run) says so); any larger value is accepted (arithmetic saturates).
    pub fn with_retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.retry_min = min;
        self.retry_max = max;
        self
    }

    /// Who leads, as observed while [`run`](Self::run) runs (`None`: nobody, or not known
    /// yet). Every worker, leader or follower, can watch it.
    pub fn leaders(&self) -> watch::Receiver<Option<LeaderInfo>> {
        self.leaders.subscribe()
    }

    /// Campaigns, leads and re-campaigns until `shutdown` completes; then cancels the current
    /// term, waits for the leader future, resigns, closes the session and returns.
    ///
    /// `lead` is called once per term and its future is awaited in place (it need not be
    /// `'static`); it should return soon after [`LeaderTerm::cancelled`] completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid name, session options or a zero retry
    /// backoff (at once, before anything is sent). Every other failure — permission errors
    /// included, which an operator may fix — is logged and retried with the backoff.
    #[tracing::instrument(name = "etcd_coord.selector.run", skip_all, fields(name = %self.name))]
    pub async fn run<S, L, F>(self, shutdown: S, mut lead: L) -> Result<(), Error>
    where
        S: Future,
        L: FnMut(LeaderTerm) -> F,
        F: Future<Output = ()>,
    {
        crate::keys::validate_name(&self.name)?;
        if self.retry_min.is_zero() {
            return Err(Error::InvalidArgument(
                "the leader selector's retry backoff must be more than zero".into(),
            ));
        }
        let stop = CancellationToken::new();
        let observe = self.observe_leaders(stop.clone());
        let campaign = async {
            let mut backoff = Backoff::new(self.retry_min, self.retry_max);
            let mut requeue = Backoff::new(self.retry_min, self.retry_max);
            loop {
                if stop.is_cancelled() {
                    return Ok(());
                }
                // Boxed: a session's life is a deep future; this keeps `run`'s shallow.
                match Box::pin(self.one_session(&stop, &mut lead, &mut requeue)).await {
                    Ok(()) => backoff.reset(),
                    Err(e @ Error::InvalidArgument(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(election = %self.name, error = %e, "leader selector: retrying");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = stop.cancelled() => {}
                }
            }
        };
        tokio::pin!(shutdown);
        tokio::pin!(campaign);
        tokio::pin!(observe);
        loop {
            tokio::select! {
                result = &mut campaign => return result,
                _ = &mut shutdown, if !stop.is_cancelled() => stop.cancel(),
                _ = &mut observe => {}
            }
        }
    }

    /// One session's life: campaign and lead (possibly several terms) until the session is
    /// Lost or the selector stops.
    async fn one_session<L, F>(
        &self,
        stop: &CancellationToken,
        lead: &mut L,
        requeue: &mut Backoff,
    ) -> Result<(), Error>
    where
        L: FnMut(LeaderTerm) -> F,
        F: Future<Output = ()>,
    {
        let session = tokio::select! {
            s = LeasedSession::new(self.client.clone(), self.session_options.clone()) => s?,
            _ = stop.cancelled() => return Ok(()),
        };
        let election = Election::new(&session, self.name.clone());
        let result = loop {
            let mut leadership = tokio::select! {
                r = election.campaign(self.value.clone()) => match r {
                    Ok(l) => l,
                    Err(e) => break Err(e),
                },
                _ = stop.cancelled() => break Ok(()),
            };
            let cancel = stop.child_token();
            let term = LeaderTerm {
                fence: leadership.fence(),
                cancel: cancel.clone(),
            };
            tracing::info!(election = %self.name, token = term.fencing_token(), "leading");
            let work = lead(term);
            tokio::pin!(work);
            let lost = leadership.lost();
            tokio::pin!(lost);
            let suspended = wait_suspended(&session, self.cancel_on_suspend);
            tokio::pin!(suspended);
            let started = tokio::time::Instant::now();
            let returned_by_itself = tokio::select! {
                _ = &mut work => true,
                _ = &mut lost => { cancel.cancel(); work.await; false }
                _ = &mut suspended => { cancel.cancel(); work.await; false }
                _ = cancel.cancelled() => { work.await; false }
            };
            cancel.cancel();
            tracing::info!(election = %self.name, "leader work finished; resigning");
            if session.state() == SessionState::Lost {
                // Its task already revoked what it could; a resign through a dead connection
                // would only delay the next session.
                drop(leadership);
                break Ok(());
            }
            if let Err(e) = leadership.resign().await {
                tracing::warn!(election = %self.name, error = %e, "resign failed; the session retries it in the background");
            }
            if stop.is_cancelled() {
                break Ok(());
            }
            if returned_by_itself {
                // Terms that end at once slow the next campaigns down; a long one starts over.
                if started.elapsed() >= self.retry_max {
                    requeue.reset();
                }
                tokio::select! {
                    _ = tokio::time::sleep(requeue.next_delay()) => {}
                    _ = stop.cancelled() => break Ok(()),
                }
            }
        };
        let _ = session.close().await;
        result
    }

    /// Publishes every leadership change to [`leaders()`](Self::leaders) until `stop`. If
    /// observing fails, starts over (from a fresh read) after the retry backoff.
    async fn observe_leaders(&self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.retry_min, self.retry_max);
        while !stop.is_cancelled() {
            let mut events = Box::pin(crate::election::observe_with(
                self.client.clone(),
                self.session_options.request_timeout(),
                &self.name,
                0,
            ));
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(event)) => {
                            backoff.reset();
                            self.leaders.send_replace(match event {
                                LeaderEvent::Leader(info) => Some(info),
                                _ => None,
                            });
                        }
                        Some(Err(e)) => {
                            tracing::warn!(election = %self.name, error = %e, "observing leaders failed; starting over");
                            break;
                        }
                        None => break,
                    },
                    _ = stop.cancelled() => break,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.cancelled() => {}
            }
        }
        std::future::pending::<()>().await
    }
}

/// Completes when `session` is Suspended or Lost, if `enabled`; never otherwise.
async fn wait_suspended(session: &LeasedSession, enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    let mut states = session.subscribe();
    let _ = states.wait_for(|s| *s != SessionState::Alive).await;
}
