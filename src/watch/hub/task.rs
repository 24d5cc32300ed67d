//! The task that reads a session's one watch stream and dispatches its events.

use super::dispatch::{deliver, Incoming};
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
        first: Creation,
        unsent: Vec<Creation>,
    ) {
        let (mut sender, mut responses) = stream.split();
        // The first scope's first twin came with the stream; its other twins, and every twin
        // of the scopes subscribed to while it opened, follow. Creations are answered in the
        // order they are sent.
        let mut creating = VecDeque::from([first.clone()]);
        let mut ok = true;
        for _ in 1..TWINS {
            ok &= self.create(&mut sender, &mut creating, first.clone()).await;
        }
        for creation in unsent {
            ok &= self
                .create_twins(&mut sender, &mut creating, creation)
                .await;
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
                        Ok(Some(resp)) => {
                            let incoming = Incoming::from(&resp);
                            let delivered = {
                                let mut state = lock(&self.shared);
                                (state.generation == self.generation)
                                    .then(|| deliver(&mut state, incoming, &mut creating))
                                    .flatten()
                            };
                            match delivered {
                                Some(cancels) => {
                                    for id in cancels {
                                        ok &= sender.cancel(id).await.is_ok();
                                    }
                                }
                                None => ok = false,
                            }
                        }
                        Ok(None) | Err(_) => {
                            tracing::debug!("the shared watch stream ended; its waits re-read");
                            ok = false;
                        }
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Create(creation)) => {
                        ok = self.create_twins(&mut sender, &mut creating, creation).await;
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

    /// Sends the creations of `creation`'s scope's twins (counted as one watch of the
    /// session's); `false` if the stream is broken.
    async fn create_twins(
        &self,
        sender: &mut etcd_client::WatchRequestSender,
        creating: &mut VecDeque<Creation>,
        creation: Creation,
    ) -> bool {
        Stats::add(&self.rpc.stats().watches, 1);
        let mut ok = true;
        for _ in 0..TWINS {
            ok &= self.create(sender, creating, creation.clone()).await;
        }
        ok
    }

    /// Sends one watch creation of `creation`'s scope; `false` if the stream is broken.
    async fn create(
        &self,
        sender: &mut etcd_client::WatchRequestSender,
        creating: &mut VecDeque<Creation>,
        creation: Creation,
    ) -> bool {
        let sent = sender
            .watch(creation.scope.clone(), Some(scope_options()))
            .await
            .is_ok();
        creating.push_back(creation);
        sent
    }
}
