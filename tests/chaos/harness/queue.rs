//! Work queues under the faults: every client both produces — a job every 40–80 ms (a failed
//! enqueue is sent again with the same idempotency key) — and works: claims a job, works on it
//! briefly (or, as a long hold, until its `lost()` fires and then the harness lets it go) and
//! acknowledges it; and what etcd holds at the end, drained for the checker.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, GetOptions, Txn, TxnOp};
use etcd_coord::{Claimed, EnqueueOptions, Error, LeasedSession, QueueOptions, WorkQueue};
use etcd_coord_testkit::checker::QueueEnd;

use super::client::{session_options, why, Control, RAW_TIMEOUT};
use super::report::{Report, Sink};
use super::{Broken, TTL};

/// The run's queue options: deliveries enough that no fault schedule dead-letters a job, and
/// markers kept longer than any run, so that a retried enqueue never adds a second job.
pub fn options() -> QueueOptions {
    QueueOptions::new()
        .with_max_attempts(20)
        .with_dedup_window(Duration::from_secs(60))
}

/// A producer's jobs: names unique to this process (`<client>-<tag>-<n>`), and the one whose
/// enqueue failed, to be enqueued again with the same idempotency key.
pub struct Producer {
    tag: u32,
    n: u64,
    pending: Option<String>,
}

impl Producer {
    pub fn new() -> Producer {
        Producer {
            tag: rand::random(),
            n: 0,
            pending: None,
        }
    }

    fn next(&mut self, client: usize) -> String {
        self.n += 1;
        format!("job-{client}-{:08x}-{}", self.tag, self.n)
    }
}

/// Produces and works on `session`'s queue until the run stops or the session fails (a lost
/// claim too ends the session's rounds: the client starts over): a producer enqueues a job
/// every 40–80 ms — the four producers about 65 a second, a third of what the workers take on
/// 2 busy cores, so that a backlog clears soon after the heal and workers also wait in the
/// idle line — while the worker claims, works and acknowledges.
pub async fn rounds(ctl: &Control, session: &LeasedSession, sink: &Sink, producer: &mut Producer) {
    let queue = WorkQueue::new(session, ctl.name.as_str()).with_options(options());
    // The worker ends the session's rounds (also once the run stops: not while it
    // acknowledges); the producer stops producing when the run stops, and then waits.
    // (On the heap: a debug build's poll frames of both would overflow a thread's stack.)
    let producing = Box::pin(async {
        produce(ctl, &queue, sink, producer).await;
        std::future::pending::<()>().await;
    });
    let working = Box::pin(work(ctl, session, &queue, sink));
    tokio::select! {
        _ = producing => {}
        _ = working => {}
    }
}

/// Enqueues a job every 40–80 ms (the one whose enqueue failed first, again) until the run
/// stops.
async fn produce(ctl: &Control, queue: &WorkQueue, sink: &Sink, producer: &mut Producer) {
    let (id, stopped) = (ctl.id, &ctl.stopped);
    while !stopped.is_cancelled() {
        let job = match producer.pending.take() {
            Some(job) => job,
            None => producer.next(id),
        };
        producer.pending = Some(job.clone());
        sink.report(id, Report::Enqueuing { job: job.clone() });
        let options = EnqueueOptions::new().with_idempotency_key(job.clone());
        if ctl.is(Broken::ForgetsIdempotency) {
            // Deliberately broken: the same job once more, without its idempotency key.
            let _ = queue.enqueue(job.clone()).await;
        }
        let enqueued = tokio::select! {
            r = queue.enqueue_with(job.clone(), options) => r,
            _ = stopped.cancelled() => return,
        };
        match enqueued {
            Ok(job_id) => {
                producer.pending = None;
                let id_text = job_id.to_string();
                sink.report(id, Report::Enqueued { job, id: id_text });
            }
            // Again, with the same idempotency key (the worker ends the session if it is
            // lost).
            Err(e) => {
                sink.report(id, Report::GaveUp(format!("enqueue-{}", why(&e))));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(40..80))).await;
    }
}

/// Claims, works on and acknowledges jobs until the run stops, a claim fails or is lost.
async fn work(ctl: &Control, session: &LeasedSession, queue: &WorkQueue, sink: &Sink) {
    let (id, stopped) = (ctl.id, &ctl.stopped);
    while !stopped.is_cancelled() {
        sink.report(id, Report::Waiting);
        let claimed = tokio::select! {
            r = queue.claim() => r,
            _ = stopped.cancelled() => return,
        };
        let job = match claimed {
            Ok(job) => job,
            Err(e) => {
                sink.report(id, Report::GaveUp(format!("claim-{}", why(&e))));
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        let token = job.fencing_token();
        let name = String::from_utf8_lossy(job.payload()).into_owned();
        sink.report(
            id,
            Report::Claimed {
                job: name.clone(),
                id: job.id().to_string(),
                token,
                lease: session.lease_id(),
                attempt: job.attempt(),
            },
        );
        if ctl.is(Broken::DequeuesByDelete) {
            // Deliberately broken, as etcd's recipe.Queue dequeues: the job is deleted now.
            delete_job(session.client(), ctl.name.as_str(), job.id().as_str()).await;
        }
        let long = ctl.take_long_hold();
        // A long hold knows its job's key, for an acknowledgement past its loss: read before
        // the hold is reported, and so before the harness's fault can stall the read.
        let mut job_key_now = None;
        if long.is_some() {
            let read = job_key(session.client(), ctl.name.as_str(), job.id().as_str());
            job_key_now = tokio::time::timeout(RAW_TIMEOUT, read).await.ok().flatten();
            sink.report(id, Report::LongHold { token });
        }
        let work = async {
            match &long {
                Some(long) => long.cancelled().await,
                None => {
                    let ms = rand::random_range(5..20);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
        };
        let ignores = long.is_some() && ctl.is(Broken::IgnoresLoss);
        let lost_first = tokio::select! {
            _ = work => false,
            _ = job.lost(), if !ignores => true,
        };
        if lost_first {
            sink.report(id, Report::Ended { token });
            // A long hold's work ends when the harness lets it go — after the fault, when the
            // job was claimed again — and then it acknowledges, late: etcd must refuse it.
            if let Some(long) = &long {
                long.cancelled().await;
            }
            late_ack(ctl, session, sink, &job, job_key_now).await;
            drop(job); // its claim is given back in the background, if anything is left
            return;
        }
        sink.releasing(id).await;
        if ctl.is(Broken::Unfenced) {
            // Deliberately broken: acknowledges with plain deletes, not through its claim. etcd
            // answers a plain delete OK whether the job was still there or not: this worker
            // believes its acknowledgement applied, as one without the fence would.
            unfenced_ack(ctl, session, sink, &job).await;
            drop(job);
        } else if ctl.is(Broken::Leaks) {
            // Deliberately broken: the claim is neither acknowledged nor given back.
            std::mem::forget(job);
        } else {
            match job.ack().await {
                Ok(()) => sink.report(
                    id,
                    Report::Acked {
                        token,
                        certain: true,
                    },
                ),
                Err(Error::CommitUncertain(_)) => sink.report(
                    id,
                    Report::Acked {
                        token,
                        certain: false,
                    },
                ),
                Err(e) => sink.report(id, Report::GaveUp(format!("ack-{}", why(&e)))),
            }
        }
        sink.report(id, Report::Ended { token });
    }
}

/// An acknowledgement sent past the claim's loss, as a Txn on the claim's compares — as
/// `Claimed::ack` sends it, but past the library's own refusal of a Lost session — by a long
/// hold that knows its job's key (deliberately broken, [`Broken::Unfenced`]: plain deletes).
async fn late_ack(
    ctl: &Control,
    session: &LeasedSession,
    sink: &Sink,
    job: &Claimed,
    job_key: Option<String>,
) {
    let (id, token) = (ctl.id, job.fencing_token());
    if ctl.is(Broken::Unfenced) {
        return unfenced_ack(ctl, session, sink, job).await;
    }
    let Some(job_key) = job_key else {
        return; // not a long hold: its job's key is not known
    };
    let txn = Txn::new()
        .when(job.owner_compares())
        .and_then([TxnOp::delete(job.key(), None), TxnOp::delete(job_key, None)]);
    let mut client = session.client().clone();
    match tokio::time::timeout(RAW_TIMEOUT, client.txn(txn)).await {
        Ok(Ok(r)) if r.succeeded() => sink.report(
            id,
            Report::Acked {
                token,
                certain: true,
            },
        ),
        Ok(Ok(_)) => sink.report(id, Report::AckRefused { token }),
        _ => {}
    }
}

/// The deliberately broken acknowledgement ([`Broken::Unfenced`]): a plain delete of the job,
/// reported as applied (etcd answers a plain delete OK whether the job was there or not).
async fn unfenced_ack(ctl: &Control, session: &LeasedSession, sink: &Sink, job: &Claimed) {
    delete_job(session.client(), ctl.name.as_str(), job.id().as_str()).await;
    let token = job.fencing_token();
    sink.report(
        ctl.id,
        Report::Acked {
            token,
            certain: true,
        },
    );
}

/// The key of job `id` of queue `name`, if it is queued.
async fn job_key(client: &Client, name: &str, id: &str) -> Option<String> {
    let prefix = format!("{name}/#queue/jobs/");
    let resp = client
        .clone()
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .ok()?;
    let suffix = format!("-{id}");
    resp.kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok())
        .find(|k| k.ends_with(&suffix))
        .map(str::to_owned)
}

/// Deletes job `id`'s key with a plain delete (the deliberately broken workers).
async fn delete_job(client: &Client, name: &str, id: &str) {
    let found = tokio::time::timeout(RAW_TIMEOUT, job_key(client, name, id)).await;
    if let Ok(Some(key)) = found {
        let mut client = client.clone();
        let _ = tokio::time::timeout(RAW_TIMEOUT, client.delete(key, None)).await;
    }
}

/// Whether a key of the run's queue is one no client holds by design: a job, a dead letter,
/// an enqueue's marker (on the dedup lease, which nobody refreshes and which outlives the run).
pub fn unowned_by_design(key: &str) -> bool {
    ["/#queue/jobs/", "/#queue/dead/", "/#queue/ids/"]
        .iter()
        .any(|p| key.contains(p))
}

/// Once the clients stopped: every job still queued or claimed (claimed by a dead process's
/// lease until it expires) is claimed and acknowledged by the harness, the dead letters are
/// read and deleted, and the dedup leases — which hold the enqueues' markers only and, by
/// design, outlive the sessions that granted them (for twice the dedup window, which tells
/// them from the sessions' leases) — are revoked, so that nothing of the run remains. Returns
/// what etcd held for the checker, and how many dedup leases were revoked.
pub async fn drain(admin: &Client, name: &str) -> (QueueEnd, usize) {
    let session = LeasedSession::new(admin.clone(), session_options())
        .await
        .expect("the harness's session");
    let queue = WorkQueue::new(&session, name).with_options(options());
    let mut end = QueueEnd::default();
    let deadline = tokio::time::Instant::now() + TTL + Duration::from_secs(5);
    loop {
        match queue.try_claim().await.expect("the harness claims") {
            Some(job) => {
                let job_name = String::from_utf8_lossy(job.payload()).into_owned();
                eprintln!(
                    "chaos: drained job {} ({job_name}), delivery {}",
                    job.id(),
                    job.attempt()
                );
                end.queued.insert(job.id().to_string(), job_name);
                job.ack().await.expect("the harness acknowledges");
            }
            None => {
                let claimed = queue.claimed().await.expect("the claims can be read");
                if queue.len().await.expect("the queue's length") == 0 && claimed.is_empty() {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "jobs still held {:?} after the clients stopped: {claimed:?}",
                    TTL + Duration::from_secs(5)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for dead in queue.dead_letters().await.expect("the dead letters") {
        let job_name = String::from_utf8_lossy(&dead.payload).into_owned();
        end.dead.insert(dead.id.to_string(), job_name);
    }
    let mut admin = admin.clone();
    let prefix = |what: &str| format!("{name}/#queue/{what}/");
    admin
        .delete(prefix("dead"), Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("the dead letters are deleted");
    let dedup_ttl = 2 * options().dedup_window().as_secs() as i64;
    let mut dedup_leases = 0;
    let leases = super::audit::retried("the leases can be listed", || {
        let mut admin = admin.clone();
        async move { admin.leases().await }
    })
    .await;
    for lease in leases.leases() {
        let id = lease.id();
        let alive = super::audit::retried("a lease can be looked at", || {
            let mut admin = admin.clone();
            async move { admin.lease_time_to_live(id, None).await }
        })
        .await;
        if alive.granted_ttl() == dedup_ttl {
            super::audit::retried("a dedup lease can be revoked", || {
                let mut admin = admin.clone();
                async move {
                    match admin.lease_revoke(id).await {
                        Err(etcd_client::Error::GRpcStatus(s))
                            if s.message().contains("requested lease not found") =>
                        {
                            Ok(())
                        }
                        other => other.map(|_| ()),
                    }
                }
            })
            .await;
            dedup_leases += 1;
        }
    }
    session.close().await.expect("the harness's session closes");
    (end, dedup_leases)
}
