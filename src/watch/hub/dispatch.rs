//! What the stream's responses mean: scopes put in place from their twins' creations, and each
//! revision's events handed, once and in order, to the subscribers they concern.

use super::*;

/// A watch response, as the hub reads it: one group per revision (a response may carry
/// several; a revision is never split).
pub(super) struct Incoming {
    pub(super) watch_id: i64,
    pub(super) created: bool,
    pub(super) canceled: bool,
    pub(super) reason: String,
    /// The header's revision (of a creation: every event after it is delivered).
    pub(super) revision: i64,
    pub(super) groups: Vec<Group>,
}

impl From<&WatchResponse> for Incoming {
    fn from(resp: &WatchResponse) -> Incoming {
        let mut groups: Vec<Group> = Vec::new();
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let ev = Ev {
                kind: event.event_type(),
                key: kv.key().to_vec(),
                lease: kv.lease(),
                create_revision: kv.create_revision(),
            };
            match groups.last_mut() {
                Some(g) if g.revision == kv.mod_revision() => g.events.push(ev),
                _ => groups.push(Group {
                    revision: kv.mod_revision(),
                    events: vec![ev],
                }),
            }
        }
        Incoming {
            watch_id: resp.watch_id(),
            created: resp.created(),
            canceled: resp.canceled(),
            reason: resp.cancel_reason().to_owned(),
            revision: resp.header().map_or(0, |h| h.revision()),
            groups,
        }
    }
}

/// Hands `incoming` to the subscribers it concerns. Returns the watches to cancel (twins no
/// longer needed), or `None` if the stream is no use any more. `creating`: the creations sent
/// and not answered yet, in the order sent (etcd answers them in that order).
pub(super) fn deliver(
    state: &mut State,
    incoming: Incoming,
    creating: &mut VecDeque<Creation>,
) -> Option<Vec<i64>> {
    let mut cancels = Vec::new();
    if incoming.created {
        created(state, incoming, creating.pop_front()?, &mut cancels);
        return Some(cancels);
    }
    let Some(scope) = state.ids.get(&incoming.watch_id).cloned() else {
        return Some(cancels); // a progress notification, or a watch being cancelled
    };
    if incoming.canceled {
        tracing::debug!(reason = incoming.reason, "a shared watch was cancelled");
        return None;
    }
    let Some(entry) = state.scopes.get_mut(&scope) else {
        return Some(cancels);
    };
    if entry.created.is_none() {
        entry.early.push((incoming.watch_id, incoming.groups));
    } else {
        apply(
            state,
            &scope,
            incoming.watch_id,
            incoming.groups,
            &mut cancels,
        );
    }
    Some(cancels)
}

/// A twin's creation answered: once every twin of the scope is, the scope is in place from the
/// highest revision they reported, and what arrived meanwhile is dispatched.
fn created(state: &mut State, incoming: Incoming, creation: Creation, cancels: &mut Vec<i64>) {
    let scope = creation.scope;
    let Some(entry) = state
        .scopes
        .get_mut(&scope)
        .filter(|e| e.serial == creation.serial && e.created.is_none())
    else {
        // A twin of a scope forgotten meanwhile (refused, or given up), or one more answer
        // than the scope has twins (never expected): nobody listens to it.
        if !incoming.canceled {
            cancels.push(incoming.watch_id);
        }
        return;
    };
    if incoming.canceled {
        // Refused (permissions, a stale token): its subscribers decide what to do.
        for id in entry.watches.drain(..) {
            state.ids.remove(&id);
            cancels.push(id);
        }
        state.scopes.remove(&scope);
        let refused: Vec<u64> = state
            .subs
            .iter()
            .filter(|(_, s)| s.scope == scope)
            .map(|(id, _)| *id)
            .collect();
        for id in refused {
            if let Some(sub) = state.subs.remove(&id) {
                let _ = sub.tx.send(Note::Refused(incoming.reason.clone()));
            }
        }
        return;
    }
    entry.awaiting = entry.awaiting.saturating_sub(1);
    entry.reported = entry.reported.max(incoming.revision);
    // (No twin has spoken yet: what arrives before every twin is created waits in `early`.)
    entry.watches.push(incoming.watch_id);
    state.ids.insert(incoming.watch_id, scope.clone());
    if entry.awaiting > 0 {
        return;
    }
    let revision = entry.reported;
    entry.created = Some(revision);
    entry.kept_from = revision;
    tracing::trace!(
        target: "etcd_coord::handoff",
        key = %String::from_utf8_lossy(&scope),
        waiter = %revision,
        "scope created"
    );
    for sub in state.subs.values().filter(|s| s.scope == scope) {
        let _ = sub.tx.send(Note::Ready(revision));
    }
    for (id, groups) in std::mem::take(&mut entry.early) {
        apply(state, &scope, id, groups, cancels);
    }
}

/// Dispatches the revisions of `groups` (from watch `id` of `scope`) newer than the last
/// dispatched; the first twin to deliver events is kept, the others are cancelled.
fn apply(state: &mut State, scope: &[u8], id: i64, groups: Vec<Group>, cancels: &mut Vec<i64>) {
    let State {
        scopes, ids, subs, ..
    } = state;
    let Some(entry) = scopes.get_mut(scope) else {
        return;
    };
    if groups.is_empty() {
        return;
    }
    if entry.watches.len() > 1 {
        // The first twin to speak is kept.
        for twin in entry.watches.iter().filter(|&&w| w != id) {
            ids.remove(twin);
            cancels.push(*twin);
        }
        entry.watches.retain(|&w| w == id);
    }
    if groups.len() > 1 {
        tracing::trace!(
            target: "etcd_coord::handoff",
            key = %String::from_utf8_lossy(scope),
            waiter = %format!("{} revisions, {}..={}", groups.len(), groups[0].revision, groups[groups.len() - 1].revision),
            "several revisions in one response"
        );
    }
    for group in groups {
        if group.revision <= entry.last() {
            continue; // a twin's copy, or from before the scope was in place
        }
        // The mirror first: a wait woken by this revision finds it applied.
        if let Some(Mirror {
            members: Some(members),
            seen,
        }) = &mut entry.mirror
        {
            members.apply(&group);
            seen.send_replace(members.at());
        }
        let mut concerned: Vec<u64> = entry.scan.clone();
        for event in &group.events {
            for key in lookups(&event.key) {
                if let Some(ids) = entry.index.get(key) {
                    concerned.extend_from_slice(ids);
                }
            }
        }
        concerned.sort_unstable();
        concerned.dedup();
        for id in concerned {
            let Some(note) = subs.get(&id).and_then(|s| s.outcome(&group)) else {
                continue;
            };
            if let Some(sub) = subs.remove(&id) {
                unindex(entry, id, &sub.keys);
                let _ = sub.tx.send(note);
            }
        }
        entry.kept.push_back(group);
        if entry.kept.len() > KEPT {
            if let Some(old) = entry.kept.pop_front() {
                entry.kept_from = old.revision;
            }
        }
    }
}
