//! The changes of a [`ServiceView`](super::ServiceView)'s set: [`ViewChange`] and the
//! [`ViewChanges`] stream, from the difference between what a consumer saw and the set now.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use super::endpoint::Endpoint;
use super::view::Published;
#[cfg(doc)]
use super::ServiceView;
use crate::Error;

/// A change of a [`ServiceView`]'s set of endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewChange {
    /// A key now holds an endpoint.
    Added {
        /// The key.
        key: String,
        /// Its endpoint.
        endpoint: Endpoint,
    },
    /// A key's endpoint changed (its address or metadata).
    Updated {
        /// The key.
        key: String,
        /// The endpoint before.
        previous: Endpoint,
        /// The endpoint now.
        endpoint: Endpoint,
    },
    /// A key no longer holds an endpoint (deleted, its lease ended, or overwritten with a value
    /// that is not one).
    Removed {
        /// The key.
        key: String,
        /// The endpoint it held.
        endpoint: Endpoint,
    },
}

impl ViewChange {
    /// The key the change is about.
    pub fn key(&self) -> &str {
        match self {
            ViewChange::Added { key, .. }
            | ViewChange::Updated { key, .. }
            | ViewChange::Removed { key, .. } => key,
        }
    }
}

/// The [`Stream`] of a [`ServiceView`]'s changes, from [`ServiceView::changes`].
pub struct ViewChanges {
    inner: BoxStream<'static, Result<ViewChange, Error>>,
}

impl std::fmt::Debug for ViewChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewChanges").finish_non_exhaustive()
    }
}

struct ChangesState {
    rx: watch::Receiver<Published>,
    seen: Arc<BTreeMap<String, Endpoint>>,
    queue: VecDeque<ViewChange>,
    done: bool,
}

impl ViewChanges {
    pub(super) fn new(
        rx: watch::Receiver<Published>,
        seen: Arc<BTreeMap<String, Endpoint>>,
    ) -> ViewChanges {
        let state = ChangesState {
            rx,
            seen,
            queue: VecDeque::new(),
            done: false,
        };
        let inner = futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(change) = s.queue.pop_front() {
                    return Some((Ok(change), s));
                }
                if s.done {
                    return None;
                }
                let published = s.rx.borrow_and_update().clone();
                if !Arc::ptr_eq(&published.endpoints, &s.seen) {
                    s.queue = diff(&s.seen, &published.endpoints);
                    s.seen = published.endpoints;
                    continue;
                }
                if let Some(e) = published.ended {
                    s.done = true;
                    return Some((Err(Error::ViewEnded(e)), s));
                }
                if s.rx.changed().await.is_err() {
                    return None; // the view was dropped
                }
            }
        });
        ViewChanges {
            inner: inner.boxed(),
        }
    }
}

impl Stream for ViewChanges {
    type Item = Result<ViewChange, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The changes that turn `old` into `new`, in key order.
fn diff(
    old: &BTreeMap<String, Endpoint>,
    new: &BTreeMap<String, Endpoint>,
) -> VecDeque<ViewChange> {
    let mut out = VecDeque::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((k, e)), None) => {
                out.push_back(removed(k, e));
                a.next();
            }
            (None, Some((k, e))) => {
                out.push_back(added(k, e));
                b.next();
            }
            (Some((ka, ea)), Some((kb, eb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push_back(removed(ka, ea));
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push_back(added(kb, eb));
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if ea != eb {
                        out.push_back(ViewChange::Updated {
                            key: (*kb).clone(),
                            previous: (*ea).clone(),
                            endpoint: (*eb).clone(),
                        });
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

fn added(key: &str, endpoint: &Endpoint) -> ViewChange {
    ViewChange::Added {
        key: key.to_owned(),
        endpoint: endpoint.clone(),
    }
}

fn removed(key: &str, endpoint: &Endpoint) -> ViewChange {
    ViewChange::Removed {
        key: key.to_owned(),
        endpoint: endpoint.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map() -> impl Strategy<Value = BTreeMap<String, Endpoint>> {
        prop::collection::btree_map("[a-e]", "[x-z]".prop_map(Endpoint::new), 0..5)
    }

    proptest! {
        #[test]
        fn applying_the_diff_turns_the_old_set_into_the_new(old in map(), new in map()) {
            let mut applied = old.clone();
            let changes = diff(&old, &new);
            let mut keys = Vec::new();
            for change in changes {
                keys.push(change.key().to_owned());
                match change {
                    ViewChange::Added { key, endpoint } => {
                        prop_assert!(applied.insert(key, endpoint).is_none());
                    }
                    ViewChange::Updated { key, previous, endpoint } => {
                        prop_assert_ne!(&previous, &endpoint);
                        prop_assert_eq!(applied.insert(key, endpoint), Some(previous));
                    }
                    ViewChange::Removed { key, endpoint } => {
                        prop_assert_eq!(applied.remove(&key), Some(endpoint));
                    }
                }
            }
            prop_assert_eq!(&applied, &new);
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(keys, sorted, "one change per key, in key order");
        }
    }
}
