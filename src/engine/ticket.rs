//! A member key that has (or may have) been created, until it is held; and the conditional
//! put that creates one.

use std::sync::Arc;

use etcd_client::{GetResponse, Txn, TxnOpResponse, TxnResponse};

use crate::backoff::Backoff;
use crate::keys::{self};
use crate::rpc::batch::{Batcher, Conditional, How, Slice};
use crate::rpc::{Answered, Stop, Unanswered};
use crate::session::Session;
use crate::Error;

use super::cleanup::{Afterwards, Cleanup};
use super::lines::{Lines, Member};
use super::{until_answered, SessionKeys};

/// A member key that has been (or may have been) created: cleaned up by the session's task if
/// dropped before it is turned into an [`Acquired`] (and then a guard).
pub(crate) struct Ticket {
    session: Arc<Session>,
    pub(super) key: String,
    pub(super) create_revision: i64,
    /// What follows the key's deletion: a sweep of late copies if the put was sent more than
    /// once, else the key's number goes back to the session's pool.
    after: Afterwards,
    /// Our pointer to the key just ahead (see `keys::successor_pointer`), the one its
    /// holder's release deletes.
    pub(super) pointer: Option<Vec<u8>>,
    /// Every pointer of ours that may exist (the current one and any earlier one whose delete
    /// has not been answered yet): deleted with the key if the ticket is dropped.
    pub(super) pointers: Vec<Vec<u8>>,
    /// Through means the oldest member of its queue (one permit over the whole queue): the
    /// release announces it to the successor (`keys::release_announcing`).
    pub(super) announces: bool,
    /// The holders ahead announce their releases: waiting behind one, put a pointer to it.
    pub(super) expects_announcements: bool,
    /// Counts the key in its queue's members of the session's family ([`Lines`]).
    member: Option<Member>,
    armed: bool,
}

impl Ticket {
    /// A ticket for `key`, created at `create_revision`, armed.
    pub(super) fn new(
        session: &Arc<Session>,
        key: String,
        create_revision: i64,
        after: Afterwards,
    ) -> Ticket {
        Ticket {
            session: Arc::clone(session),
            create_revision,
            after,
            pointer: None,
            pointers: Vec::new(),
            announces: false,
            expects_announcements: false,
            member: Some(Lines::enter(session, &key)),
            key,
            armed: true,
        }
    }

    /// The acquisition is through, confirmed at `revision`: hands it out, unless the session
    /// is Lost by now (decided on the clock) — then the still-armed ticket cleans the key up
    /// as it is dropped.
    pub(super) fn into_acquired(mut self, revision: i64) -> Result<Acquired, Error> {
        self.session.check()?;
        self.armed = false;
        self.pointer = None;
        for pointer in std::mem::take(&mut self.pointers) {
            // Through without our predecessor's release deleting it (a holder that does not
            // announce, or a read that came first), or an earlier one: ours to delete.
            self.session.clean_up(Cleanup::DeleteOnLease(pointer));
        }
        Ok(Acquired {
            key: std::mem::take(&mut self.key),
            create_revision: self.create_revision,
            revision,
            after: std::mem::replace(&mut self.after, Afterwards::Nothing),
            announces: self.announces,
            member: self.member.take(),
        })
    }

    /// Deletes the key now (fenced), e.g. a try-acquire that found itself blocked. If that
    /// fails, the ticket stays armed and its drop hands the release to the session's task.
    pub(super) async fn release_now(mut self) {
        let txn = self.release_txn();
        if self.session.rpc.txn(txn).await.is_ok() {
            self.armed = false;
            std::mem::replace(&mut self.after, Afterwards::Nothing).key_deleted(&self.session);
        }
    }
}

impl Ticket {
    /// The fenced delete of a waiter that gives up (never announcing: it was not the oldest),
    /// with every pointer of ours that may exist.
    fn release_txn(&self) -> etcd_client::Txn {
        let lease = self.session.lease_id;
        if self.pointers.is_empty() {
            keys::fenced_delete(&self.key, self.create_revision, lease)
        } else {
            keys::fenced_delete_with_pointers(
                &self.key,
                self.create_revision,
                lease,
                &self.pointers,
            )
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            let txn = self.release_txn();
            self.session.clean_up(Cleanup::Release {
                key: std::mem::take(&mut self.key),
                txn,
                after: std::mem::replace(&mut self.after, Afterwards::Nothing),
            });
        }
    }
}

/// An acquisition that is through: the key, its create revision (the fencing token), the
/// revision at which that was confirmed, and whether its put's late copies must be swept once
/// it ends.
pub(crate) struct Acquired {
    pub(crate) key: String,
    pub(crate) create_revision: i64,
    pub(crate) revision: i64,
    pub(crate) after: Afterwards,
    /// Its release announces it to the successor (it holds as the oldest member of its queue).
    pub(crate) announces: bool,
    /// Counts the key in its queue's members of the session's family ([`Lines`]), if it is a
    /// member of a line.
    pub(crate) member: Option<Member>,
}

/// Sends the conditional Txn `txn` merged flat with what the session's siblings send at that
/// moment (`rpc::batch`), going as `how` says: its answer (either branch), as for `txn` alone.
pub(super) async fn merged(
    session: &Arc<Session>,
    txn: Conditional,
    how: How,
) -> Result<Answered<Slice>, Unanswered> {
    let batcher = session.family_extension(Batcher::default);
    let stop: Arc<dyn Stop> = Arc::clone(session) as Arc<dyn Stop>;
    batcher.conditional(&session.rpc, txn, stop, how).await
}

/// A Txn's answer as a merged part's: whether its compares held, the answers of the branch that
/// ran, and its revision.
pub(super) fn slice(resp: &TxnResponse) -> Result<Slice, Error> {
    Ok(Slice {
        succeeded: resp.succeeded(),
        ops: resp.op_responses(),
        revision: keys::header_revision(resp)?,
    })
}

impl From<Answered<Slice>> for Put {
    fn from(answered: Answered<Slice>) -> Put {
        Put {
            succeeded: answered.resp.succeeded,
            ops: answered.resp.ops,
            revision: answered.resp.revision,
            uncertain: answered.uncertain,
        }
    }
}

/// A conditional put sent until it was answered (with one backoff): whether its compares held,
/// the answers of the branch that ran, its revision, and whether an earlier copy of it may
/// still land.
pub(super) struct Put {
    pub(super) succeeded: bool,
    pub(super) ops: Vec<TxnOpResponse>,
    pub(super) revision: i64,
    pub(super) uncertain: bool,
}

impl Put {
    pub(super) async fn send(
        session: &Arc<Session>,
        txn: impl Fn() -> Txn,
    ) -> Result<Put, Unanswered> {
        let answered = until_answered(session, txn, &mut Backoff::for_requests()).await?;
        let uncertain = answered.uncertain;
        let resp = slice(&answered.resp).map_err(|error| Unanswered { error, uncertain })?;
        Ok(Put::from(Answered { resp, uncertain }))
    }

    /// [`send`](Self::send), merged flat with what the session's siblings send at that moment
    /// (`rpc::batch`, going as `how` says).
    pub(super) async fn send_merged(
        session: &Arc<Session>,
        txn: Conditional,
        how: How,
    ) -> Result<Put, Unanswered> {
        merged(session, txn, how).await.map(Put::from)
    }

    /// The answers of its `Get`s.
    pub(super) fn gets(&self) -> Vec<GetResponse> {
        keys::op_gets(&self.ops)
    }

    /// `error`, for a request that may have landed if this one was sent more than once.
    pub(super) fn fail(&self, error: Error) -> Unanswered {
        Unanswered {
            error,
            uncertain: self.uncertain,
        }
    }
}
