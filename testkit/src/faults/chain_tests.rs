//! Unit tests of a link's chain of toxics.

use super::*;
use crate::faults::stage::*;
use crate::faults::toxic::{Stream, Toxic, ToxicKind};

fn stage(kind: ToxicKind) -> (Chain, Stamp, Toxic) {
    let toxic = Toxic::new("t", Stream::Downstream, kind);
    let stamp = Stamp::fresh();
    let mut chain = Chain::default();
    chain.apply(vec![(toxic.clone(), stamp)], Instant::now());
    (chain, stamp, toxic)
}

fn data(bytes: &[u8]) -> Chunk {
    Chunk::Data {
        at: Instant::now(),
        bytes: bytes.to_vec(),
    }
}

fn drain(chain: &mut Chain) -> Vec<u8> {
    let mut got = Vec::new();
    while chain.has_output() {
        got.extend(chain.pop_output());
    }
    got
}

#[test]
fn a_removed_timeout_closes_the_link_and_what_it_dropped_stays_dropped() {
    let (mut chain, _, _) = stage(ToxicKind::Timeout { timeout: 0 });
    chain.push(data(b"gone"));
    chain.pump(Instant::now());
    assert!(!chain.has_output() && !chain.finished());
    chain.apply(Vec::new(), Instant::now());
    chain.pump(Instant::now());
    assert!(chain.finished() && chain.cut);
}

#[test]
fn a_removed_blackhole_hands_on_what_it_held_in_order() {
    let (mut chain, _, _) = stage(ToxicKind::Blackhole);
    chain.push(data(b"one "));
    chain.push(data(b"two"));
    chain.pump(Instant::now());
    assert!(!chain.has_output());
    chain.apply(Vec::new(), Instant::now());
    chain.pump(Instant::now());
    assert_eq!(drain(&mut chain), b"one two");
    assert!(!chain.finished());
}

#[test]
fn an_update_restarts_the_toxic_and_the_same_values_leave_it_alone() {
    let (mut chain, stamp, toxic) = stage(ToxicKind::Timeout { timeout: 0 });
    let t0 = Instant::now();
    assert_eq!(chain.next_wake(), None);
    let updated = Toxic {
        kind: ToxicKind::Timeout { timeout: 100 },
        ..toxic.clone()
    };
    let later = t0 + millis(50);
    chain.apply(vec![(updated.clone(), stamp.updated())], later);
    assert_eq!(chain.next_wake(), Some(later + millis(100)));
    // Unchanged: no restart.
    chain.apply(vec![(updated, stamp.updated())], later + millis(30));
    assert_eq!(chain.next_wake(), Some(later + millis(100)));
    chain.pump(later + millis(100));
    assert!(chain.finished());
}

#[test]
fn limit_data_counts_across_restarts_but_not_across_a_remove_and_add() {
    let (mut chain, stamp, toxic) = stage(ToxicKind::LimitData { bytes: 10 });
    chain.push(data(b"123456"));
    chain.pump(Instant::now());
    assert_eq!(drain(&mut chain), b"123456");
    chain.apply(vec![(toxic.clone(), stamp.updated())], Instant::now());
    chain.push(data(b"789abc"));
    chain.pump(Instant::now());
    assert_eq!(drain(&mut chain), b"789a");
    assert!(chain.finished());

    let (mut chain, _, toxic) = stage(ToxicKind::LimitData { bytes: 4 });
    chain.push(data(b"12"));
    chain.pump(Instant::now());
    assert_eq!(drain(&mut chain), b"12");
    chain.apply(vec![(toxic, Stamp::fresh())], Instant::now());
    chain.push(data(b"3456"));
    chain.pump(Instant::now());
    assert_eq!(drain(&mut chain), b"3456");
    assert!(chain.finished());
}

#[test]
fn latencies_in_a_chain_add_up() {
    let lag = |name: &str| {
        Toxic::new(
            name,
            Stream::Downstream,
            ToxicKind::Latency {
                latency: 100,
                jitter: 0,
            },
        )
    };
    let mut chain = Chain::default();
    let t0 = Instant::now();
    chain.apply(
        vec![(lag("a"), Stamp::fresh()), (lag("b"), Stamp::fresh())],
        t0,
    );
    chain.push(Chunk::Data {
        at: t0,
        bytes: b"x".to_vec(),
    });
    chain.pump(t0);
    assert_eq!(chain.next_wake(), Some(t0 + millis(100)));
    chain.pump(t0 + millis(100));
    assert!(!chain.has_output());
    assert_eq!(chain.next_wake(), Some(t0 + millis(200)));
    chain.pump(t0 + millis(200));
    assert_eq!(drain(&mut chain), b"x");
}

#[test]
fn slow_close_holds_the_end_and_an_update_starts_its_delay_again() {
    let (mut chain, stamp, toxic) = stage(ToxicKind::SlowClose { delay: 100 });
    let t0 = Instant::now();
    chain.push(data(b"bye"));
    chain.push(Chunk::End);
    chain.pump(t0);
    assert_eq!(drain(&mut chain), b"bye");
    assert!(!chain.finished());
    let t1 = t0 + millis(50);
    let longer = Toxic {
        kind: ToxicKind::SlowClose { delay: 200 },
        ..toxic
    };
    chain.apply(vec![(longer, stamp.updated())], t1);
    chain.pump(t1);
    assert_eq!(chain.next_wake(), Some(t1 + millis(200)));
    chain.pump(t1 + millis(200));
    assert!(chain.finished());
}
