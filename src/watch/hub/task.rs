//! The task that reads a session's one watch stream and dispatches its events.

use super::*;

/// The task that reads one stream.
pub(super) struct Task {
    pub(super) shared: Arc<Mutex<State>>,
    pub(super) rpc: Rpc,
    pub(super) quiet: Duration,
    pub(super) linger: Duration,
    pub(super) generation: u64,
}

impl Task {
    pub(super) async fn run(
        self,
        stream: WatchStream,
        mut commands: mpsc::UnboundedReceiver<Command>,
        stop: CancellationToken,
        mut creating: VecDeque<Vec<u8>>,
        unsent: Vec<Vec<u8>>,
    ) {
        let (mut sender, mut responses) = stream.split();
        let mut ok = true;
        for scope in unsent {
            Stats::add(&self.rpc.stats().watches, 1);
            ok &= sender.watch(scope, Some(scope_options())).await.is_ok();
        }
        let mut last = Instant::now();
        let mut probe: Option<Instant> = None;
        let mut tick = tokio::time::interval(self.quiet.min(self.linger).min(STALE) / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while ok {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                msg = responses.message() => {
                    last = Instant::now();
                    probe = None;
                    match msg {
                        Ok(Some(resp)) => ok = self.dispatch(&resp, &mut creating),
                        Ok(None) | Err(_) => {
                            tracing::debug!("the shared watch stream ended; its waits re-read");
                            ok = false;
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Create(scope)) => {
                        Stats::add(&self.rpc.stats().watches, 1);
                        ok = sender.watch(scope.clone(), Some(scope_options())).await.is_ok();
                        creating.push_back(scope);
                    }
                    Some(Command::Probe) => {
                        if probe.is_none() && last.elapsed() > STALE {
                            Stats::add(&self.rpc.stats().watch_probes, 1);
                            probe = Some(Instant::now());
                            ok = sender.request_progress().await.is_ok();
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if let Some(sent) = probe {
                        if sent.elapsed() > self.rpc.timeout() {
                            tracing::debug!("the shared watch stream did not answer a progress request; its waits re-read");
                            break;
                        }
                    } else if last.elapsed() > self.quiet {
                        Stats::add(&self.rpc.stats().watch_probes, 1);
                        probe = Some(Instant::now());
                        ok = sender.request_progress().await.is_ok();
                    }
                    match self.expire() {
                        None => break,
                        Some(ids) => {
                            for id in ids {
                                ok &= sender.cancel(id).await.is_ok();
                            }
                        }
                    }
                }
            }
        }
        fail_all(&self.shared, self.generation, None);
    }

    /// Forgets the scopes idle for longer than the linger and returns their watch ids to
    /// cancel; `None` once no scope is left (the stream ends).
    fn expire(&self) -> Option<Vec<i64>> {
        let mut state = lock(&self.shared);
        if state.generation != self.generation {
            return None;
        }
        let linger = self.linger;
        let gone: Vec<Vec<u8>> = state
            .scopes
            .iter()
            .filter(|(_, s)| s.subs == 0 && s.created.is_some() && s.idle_since.elapsed() > linger)
            .map(|(k, _)| k.clone())
            .collect();
        for scope in &gone {
            state.scopes.remove(scope);
        }
        let ids: Vec<i64> = state
            .ids
            .iter()
            .filter(|(_, s)| gone.contains(s))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            state.ids.remove(id);
        }
        if state.scopes.is_empty() {
            return None;
        }
        Some(ids)
    }

    /// Hands `resp` to the subscribers it concerns. `false`: the stream is no use any more.
    fn dispatch(&self, resp: &WatchResponse, creating: &mut VecDeque<Vec<u8>>) -> bool {
        let mut state = lock(&self.shared);
        let state = &mut *state;
        if state.generation != self.generation {
            return false;
        }
        if resp.created() {
            let Some(scope) = creating.pop_front() else {
                return false;
            };
            let revision = resp.header().map_or(0, |h| h.revision());
            if resp.canceled() {
                // Refused (permissions, a stale token): its subscribers decide what to do.
                let reason = resp.cancel_reason().to_owned();
                state.scopes.remove(&scope);
                let refused: Vec<u64> = state
                    .subs
                    .iter()
                    .filter(|(_, s)| s.scope == scope)
                    .map(|(id, _)| *id)
                    .collect();
                for id in refused {
                    if let Some(sub) = state.subs.remove(&id) {
                        let _ = sub.tx.send(Note::Refused(reason.clone()));
                    }
                }
                return true;
            }
            state.ids.insert(resp.watch_id(), scope.clone());
            if let Some(entry) = state.scopes.get_mut(&scope) {
                entry.created = Some(revision);
                entry.kept_from = revision;
            }
            for sub in state.subs.values().filter(|s| s.scope == scope) {
                let _ = sub.tx.send(Note::Ready(revision));
            }
            return true;
        }
        let Some(scope) = state.ids.get(&resp.watch_id()).cloned() else {
            return true; // a progress notification, or a watch being cancelled
        };
        if resp.canceled() {
            tracing::debug!(
                reason = resp.cancel_reason(),
                "a shared watch was cancelled"
            );
            return false;
        }
        let Some(entry) = state.scopes.get_mut(&scope) else {
            return true;
        };
        // One group per revision (a response may carry several; a revision is never split).
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
        for group in groups {
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
                let Some(note) = state.subs.get(&id).and_then(|s| s.outcome(&group)) else {
                    continue;
                };
                if let Some(sub) = state.subs.remove(&id) {
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
        true
    }
}
