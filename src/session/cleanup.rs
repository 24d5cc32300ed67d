//! The session's background work for guards and acquisitions: fenced releases of dropped
//! guards, sweeps of late duplicates, and touches that wake the waiter behind a new holder;
//! and the names this session creates exclusively ([`Names`]), whose sweeps pause while the
//! name is claimed again.
//!
//! Every job retries transient failures with capped, jittered backoff (20 ms doubling to 1 s)
//! for as long as the session lives: a guard dropped during an outage is released once etcd
//! answers again. A failure retrying cannot fix (etcd's auth refusing the delete, say) ends the
//! session ([`LossReason::CleanupFailed`]): its task revokes the lease, so no live lease keeps a
//! key that nobody holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use super::Shared;
use crate::backoff::Backoff;
use crate::engine::request::{send_until_answered, Kind};
use crate::engine::watch::{wait_for_change, Watched};
use crate::{keys, Error, LossReason};

/// A piece of background work the session's task carries out for a guard or an acquisition.
#[derive(Debug)]
pub(crate) enum Cleanup {
    /// Send `txn`, a release fenced on `key`'s create revision and lease (safe to repeat); then
    /// do what `after` says (sweep the late duplicates of a put sent more than once, give the
    /// key's number back, or end the session's claim on the name).
    Release {
        key: String,
        txn: Txn,
        after: Afterwards,
    },
    /// Delete any late duplicate of an acquisition's put, now and whenever one lands, for as
    /// long as the session lives (the outcome of a request that may create the key is unknown).
    Sweep(Sweep),
    /// Bump `key`'s mod revision while it is the incarnation `create_revision` on the
    /// session's lease, so that the waiter watching it re-reads (a semaphore waiter that moved
    /// up behind a new holder).
    Touch { key: String, create_revision: i64 },
    /// Nothing of an acquisition exists (its put did not happen, or may still land only as a
    /// late copy): do what follows a deletion.
    Forget(Afterwards),
}

impl Cleanup {
    /// Delete `key` if it is still ours: the incarnation created at `create_revision`, on
    /// `lease_id`.
    pub(crate) fn release(
        key: String,
        create_revision: i64,
        lease_id: i64,
        after: Afterwards,
    ) -> Cleanup {
        let txn = keys::fenced_delete(&key, create_revision, lease_id);
        Cleanup::Release { key, txn, after }
    }
}

/// What becomes of a member key's name once its deletion was answered.
#[derive(Debug, Clone)]
pub(crate) enum Afterwards {
    /// Its put was sent more than once: late copies are swept for as long as the lease lives,
    /// and its name is never used again.
    Sweep(Sweep),
    /// Its number goes back to the session's pool, for a later key (see `slots`).
    Reuse(u64),
    /// A name this session creates exclusively (see [`Names`]): the session's claim on it
    /// ends; with `value`, a put of that value was sent more than once and its late copies are
    /// swept from now on, whenever the name is not claimed.
    Unclaim { key: String, value: Option<Vec<u8>> },
    /// Nothing: a key this session did not number (a fixed name, or one taken back after a
    /// restart).
    Nothing,
}

impl Afterwards {
    /// `Sweep(sweep)` for a put sent more than once (a copy may still land), else `certain`.
    pub(crate) fn of_put(uncertain: bool, sweep: Sweep, certain: Afterwards) -> Afterwards {
        if uncertain {
            Afterwards::Sweep(sweep)
        } else {
            certain
        }
    }

    /// The key's deletion was answered: hands the sweep to the session's task, or gives the
    /// number back.
    pub(crate) fn key_deleted(self, shared: &Shared) {
        match self {
            Afterwards::Sweep(sweep) => shared.clean_up(Cleanup::Sweep(sweep)),
            Afterwards::Reuse(n) => shared.slots.give_back(n),
            Afterwards::Unclaim { key, value } => {
                if let Some(sweep) = shared.names.unclaim(&key, shared.lease_id, value) {
                    shared.clean_up(Cleanup::Sweep(sweep));
                }
            }
            Afterwards::Nothing => {}
        }
    }
}

/// How to recognise — and delete — a late copy of one acquisition's put.
///
/// A put whose answer was lost is retried, and the acquisition carries on with whichever copy
/// landed first. An earlier copy can still be in flight (held in a network buffer, a proxy, a
/// member's queue) and land after the acquisition was released, re-creating the key under our
/// live lease, where it would block everyone behind it. A sweep deletes such a copy as soon as
/// it lands, for as long as the lease lives (once the lease is gone, a copy cannot land: a put
/// with a dead lease fails), or — for a name this session may claim again ([`Names`]) — until
/// it is asked to stop. Each copy it finds is deleted fenced on that copy's create revision, so
/// a delete of it, however late, can never remove a later key.
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    key: String,
    lease_id: i64,
    /// The values a copy may hold (`None`: any value).
    values: Option<Vec<Vec<u8>>>,
    /// Set to `true` (or dropped) when the sweep must stop (its name is claimed again, or its
    /// claimant left and another sweep takes over): checked between deletes, never during one.
    stop: Option<watch::Receiver<bool>>,
}

impl Sweep {
    /// Any incarnation of `key` attached to `lease_id`: for member keys, whose name is retired
    /// once a sweep exists ([`Afterwards::Sweep`] never gives its number back), so once the
    /// acquisition is over any such key is a late copy.
    pub(crate) fn on_lease(key: &str, lease_id: i64) -> Sweep {
        Sweep {
            key: key.to_owned(),
            lease_id,
            values: None,
            stop: None,
        }
    }

    /// `key` on `lease_id` holding one of `values`, until `stop` turns `true`: for a name this
    /// session creates exclusively, while it is not claimed.
    fn of_name(
        key: &str,
        lease_id: i64,
        values: Vec<Vec<u8>>,
        stop: watch::Receiver<bool>,
    ) -> Sweep {
        Sweep {
            key: key.to_owned(),
            lease_id,
            values: Some(values),
            stop: Some(stop),
        }
    }

    /// `If(Lease(key) == ours) Then(Get(key))`: whether a key that may be a copy exists.
    fn find(&self) -> Txn {
        Txn::new()
            .when([Compare::lease(
                self.key.as_str(),
                CompareOp::Equal,
                self.lease_id,
            )])
            .and_then([TxnOp::get(self.key.as_str(), None)])
    }

    /// The create revision of the copy `find` found, if it found one.
    fn copy_in(&self, resp: &etcd_client::TxnResponse) -> Option<i64> {
        if !resp.succeeded() {
            return None;
        }
        let gets = keys::txn_gets(resp);
        let kv = gets.first()?.kvs().first()?;
        let matches = self
            .values
            .as_ref()
            .is_none_or(|values| values.iter().any(|v| v.as_slice() == kv.value()));
        matches.then(|| kv.create_revision())
    }

    /// Deletes the copy created at `create_revision`, if it is still there on our lease.
    fn delete(&self, create_revision: i64) -> Txn {
        Txn::new()
            .when(keys::owner_compares(
                &self.key,
                create_revision,
                self.lease_id,
            ))
            .and_then([TxnOp::delete(self.key.as_str(), None)])
    }

    fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|stop| *stop.borrow() || stop.has_changed().is_err())
    }

    /// Completes once the sweep is asked to stop (never, for a sweep that cannot be).
    async fn stop_requested(&self) {
        match self.stop.clone() {
            // An error: the switch was dropped, which asks for the same.
            Some(mut stop) => drop(stop.wait_for(|s| *s).await),
            None => std::future::pending().await,
        }
    }
}

/// The names this session creates exclusively (`create_exclusive`: a registration's key, a
/// barrier) rather than by number: whether one is claimed, and the values of its puts that
/// were sent more than once, whose late copies may still land.
///
/// A late copy of an earlier put of a name carries the same key, lease and — for a
/// registration — value as a later, deliberate registration of that name by this session: no
/// compare can tell them apart. So a name's sweep runs only while the name is not claimed:
/// claiming it stops the sweep (after its delete in flight, if any, was answered), and a copy
/// that lands while it is claimed is either found by the claimant's conditional put (a copy
/// holding the claimant's value: the claimant's own, identical key) or blocks that put until
/// the claim ends and the sweep, started again, deletes it.
#[derive(Debug, Default)]
pub(crate) struct Names {
    names: StdMutex<HashMap<String, Name>>,
}

#[derive(Debug, Default)]
struct Name {
    /// A `create_exclusive` of the name is under way, or what it created is held (until its
    /// deletion was answered).
    claimed: bool,
    /// Values of this session's puts of the name that were sent more than once.
    uncertain: Vec<Vec<u8>>,
    /// The running sweep's stop switch, while the name is not claimed.
    sweeping: Option<watch::Sender<bool>>,
}

/// The session's claim on a name, from [`Names::claim`].
pub(crate) struct Claimed {
    /// Values of earlier puts of the name (sent more than once) whose copies may still land.
    pub(crate) uncertain: Vec<Vec<u8>>,
    /// The name's sweep, to stop before anything is put (see [`stop_sweep`]).
    sweeping: Option<watch::Sender<bool>>,
}

impl Claimed {
    /// Asks the name's sweep (if one runs) to stop, and completes once it has: its delete in
    /// flight, if any, was answered.
    pub(crate) async fn stop_sweep(&mut self) {
        if let Some(sweeping) = self.sweeping.take() {
            sweeping.send_replace(true);
            sweeping.closed().await;
        }
    }
}

impl Names {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Name>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key` for a `create_exclusive`: `None` if this session has it claimed already
    /// (another creation under way, or what one created still held).
    pub(crate) fn claim(&self, key: &str) -> Option<Claimed> {
        let mut names = self.lock();
        let name = names.entry(key.to_owned()).or_default();
        if name.claimed {
            return None;
        }
        name.claimed = true;
        Some(Claimed {
            uncertain: name.uncertain.clone(),
            sweeping: name.sweeping.take(),
        })
    }

    /// Ends the claim on `key` (nothing of it exists any more, but copies of its puts sent more
    /// than once — `value`, and earlier ones — may still land). Returns the sweep of those
    /// copies (on `lease_id`) to run until the name is claimed again, if there are any.
    pub(crate) fn unclaim(
        &self,
        key: &str,
        lease_id: i64,
        value: Option<Vec<u8>>,
    ) -> Option<Sweep> {
        let mut names = self.lock();
        let name = names.entry(key.to_owned()).or_default();
        name.claimed = false;
        if let Some(value) = value {
            if !name.uncertain.contains(&value) {
                name.uncertain.push(value);
            }
        }
        if name.uncertain.is_empty() {
            names.remove(key);
            return None;
        }
        let (stop, stopped) = watch::channel(false);
        // A sweep still running (its claimant left before stopping it) is superseded.
        if let Some(old) = name.sweeping.replace(stop) {
            old.send_replace(true);
        }
        Some(Sweep::of_name(
            key,
            lease_id,
            name.uncertain.clone(),
            stopped,
        ))
    }
}

/// Counts one piece of background work (a queued clean-up, a detached request) while it lives.
pub(crate) struct PendingWork(Arc<watch::Sender<usize>>);

impl PendingWork {
    pub(super) fn new(counter: &Arc<watch::Sender<usize>>) -> PendingWork {
        counter.send_modify(|n| *n += 1);
        PendingWork(Arc::clone(counter))
    }
}

impl Drop for PendingWork {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A clean-up in the queue, counted (for `settled()`) until its first pass is done.
pub(super) struct Job {
    pub(super) cleanup: Cleanup,
    pub(super) pending: Option<PendingWork>,
}

/// Runs the clean-ups handed to the session, concurrently. Returns only if one fails in a way
/// retrying cannot fix: the session must then end.
pub(super) async fn run_cleanups(
    shared: &Arc<Shared>,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
) -> LossReason {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => running.push(run_job(shared, job)),
                // The sender lives in `shared`: cannot happen, but never spin.
                None => std::future::pending::<()>().await,
            },
            Some(outcome) = running.next(), if !running.is_empty() => {
                match outcome {
                    Ok(()) | Err(Error::SessionLost(_) | Error::SessionClosed) => {}
                    Err(e) => {
                        tracing::error!(lease = shared.lease_id, error = %e, "a background release failed permanently; ending the session");
                        return LossReason::CleanupFailed;
                    }
                }
            }
        }
    }
}

/// Carries out one job until it is done, the session is Lost, or it fails permanently.
async fn run_job(shared: &Arc<Shared>, mut job: Job) -> Result<(), Error> {
    let mut backoff = Backoff::for_requests();
    match job.cleanup {
        Cleanup::Release { key, txn, after } => {
            let resp = send_until_answered(shared, || txn.clone(), Kind::Write, &mut backoff)
                .await?
                .resp;
            tracing::debug!(key, deleted = resp.succeeded(), "background release done");
            match after {
                // In this job, not a new one: it is already running in the session's task.
                Afterwards::Sweep(sweep) => {
                    job.pending = None;
                    run_sweep(shared, &sweep, &mut backoff).await
                }
                // The number is back before `settled()` says this release is done.
                other => {
                    other.key_deleted(shared);
                    job.pending = None;
                    Ok(())
                }
            }
        }
        Cleanup::Sweep(sweep) => {
            if sweep.stopped() {
                return Ok(());
            }
            // Counted until its first delete is answered: after that it only watches.
            let first = delete_copy(shared, &sweep, &mut backoff).await?;
            job.pending = None;
            sweep_after(shared, &sweep, first, &mut backoff).await
        }
        Cleanup::Forget(after) => {
            after.key_deleted(shared);
            Ok(())
        }
        Cleanup::Touch {
            key,
            create_revision,
        } => {
            let touch = keys::touch(&key, create_revision, shared.lease_id);
            send_until_answered(shared, || touch.clone(), Kind::Write, &mut backoff).await?;
            Ok(())
        }
    }
}

/// Deletes a copy of the sweep's key if one exists (fenced on that copy's create revision);
/// returns the revision of the last answer.
async fn delete_copy(
    shared: &Arc<Shared>,
    sweep: &Sweep,
    backoff: &mut Backoff,
) -> Result<i64, Error> {
    let found = send_until_answered(shared, || sweep.find(), Kind::MaybeReadOnly, backoff)
        .await?
        .resp;
    let Some(create_revision) = sweep.copy_in(&found) else {
        return keys::header_revision(&found);
    };
    let resp = send_until_answered(
        shared,
        || sweep.delete(create_revision),
        Kind::Write,
        backoff,
    )
    .await?
    .resp;
    if resp.succeeded() {
        tracing::warn!(
            key = sweep.key,
            "deleted a late copy of an acquisition's put"
        );
    }
    keys::header_revision(&resp)
}

async fn run_sweep(
    shared: &Arc<Shared>,
    sweep: &Sweep,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    if sweep.stopped() {
        return Ok(());
    }
    let first = delete_copy(shared, sweep, backoff).await?;
    sweep_after(shared, sweep, first, backoff).await
}

/// From `revision` on, deletes every copy of the sweep's key as it lands, until the session is
/// Lost (the error ends the sweep), the sweep is asked to stop, or something fails
/// permanently.
async fn sweep_after(
    shared: &Arc<Shared>,
    sweep: &Sweep,
    mut revision: i64,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let puts = [Watched::put(sweep.key.as_str())];
    loop {
        if sweep.stopped() {
            return Ok(());
        }
        let absent = || async {
            let mut backoff = Backoff::for_requests();
            let resp =
                send_until_answered(shared, || sweep.find(), Kind::MaybeReadOnly, &mut backoff)
                    .await?
                    .resp;
            Ok(sweep.copy_in(&resp).is_none())
        };
        tokio::select! {
            woken = wait_for_change(shared, &puts, None, revision, absent, backoff) => {
                woken?;
            }
            () = sweep.stop_requested() => return Ok(()),
        }
        if sweep.stopped() {
            return Ok(());
        }
        revision = delete_copy(shared, sweep, backoff).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_name_cannot_be_claimed_again_until_it_is_unclaimed() {
        let names = Names::default();
        let first = names.claim("svc/a").expect("free");
        assert!(first.uncertain.is_empty());
        assert!(names.claim("svc/a").is_none(), "claimed twice");
        assert!(names.claim("svc/b").is_some(), "another name is free");
        // Unclaimed with no put in doubt: forgotten, no sweep.
        assert!(names.unclaim("svc/a", 7, None).is_none());
        assert!(names.lock().get("svc/a").is_none());
        assert!(names.claim("svc/a").is_some());
    }

    #[tokio::test]
    async fn a_names_sweep_runs_only_while_it_is_not_claimed_and_remembers_every_value() {
        let names = Names::default();
        names.claim("svc/a").expect("free");
        let sweep = names
            .unclaim("svc/a", 7, Some(b"v1".to_vec()))
            .expect("a put in doubt is swept");
        assert_eq!(sweep.values, Some(vec![b"v1".to_vec()]));
        assert!(!sweep.stopped());
        // Claimed again: the new claimant knows of the copies that may land, and stops the
        // sweep before it puts anything.
        let mut again = names.claim("svc/a").expect("unclaimed");
        assert_eq!(again.uncertain, vec![b"v1".to_vec()]);
        let stopping = tokio::spawn(async move { again.stop_sweep().await });
        tokio::time::timeout(std::time::Duration::from_secs(1), sweep.stop_requested())
            .await
            .expect("the sweep is asked to stop");
        assert!(sweep.stopped());
        drop(sweep); // the sweep ends
        stopping.await.unwrap();
        // Unclaimed again (its own put sent once): the earlier value is still swept.
        let next = names.unclaim("svc/a", 7, None).expect("still in doubt");
        assert_eq!(next.values, Some(vec![b"v1".to_vec()]));
        let left = names.claim("svc/a").expect("unclaimed");
        assert!(!next.stopped());
        drop(left); // a claimant that left without stopping the sweep: it stops all the same
        assert!(next.stopped());
        let last = names
            .unclaim("svc/a", 7, Some(b"v2".to_vec()))
            .expect("in doubt");
        assert_eq!(last.values, Some(vec![b"v1".to_vec(), b"v2".to_vec()]));
        // A sweep still running when the name is unclaimed again is superseded.
        let superseded = names.unclaim("svc/a", 7, None).expect("in doubt");
        assert!(last.stopped() && !superseded.stopped());
    }
}
