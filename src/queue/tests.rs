//! Unit tests of `queue`.

use std::collections::HashSet;

use super::*;

fn c(i: usize) -> Candidate {
    Candidate {
        key: format!("k{i}"),
        id: format!("{i}"),
        rank: u8::from(i >= 6),
        mod_revision: i as i64,
    }
}

#[test]
fn chains_deal_the_candidates_out_in_claim_order() {
    let all: Vec<Candidate> = (0..10).map(c).collect();
    let ids = |chains: Vec<Vec<Candidate>>| -> Vec<Vec<i64>> {
        chains
            .iter()
            .map(|ch| ch.iter().map(|x| x.mod_revision).collect())
            .collect()
    };
    assert_eq!(ids(chains(all.clone(), 1, 3)), vec![vec![0, 1, 2]]);
    assert_eq!(ids(chains(all.clone(), 2, 2)), vec![vec![0, 2], vec![1, 3]]);
    assert_eq!(
        ids(chains(all[..3].to_vec(), 5, 4)),
        vec![vec![0], vec![1], vec![2]]
    );
    assert!(chains(Vec::<Candidate>::new(), 1, 4).is_empty());
}

#[test]
fn every_claim_fits_in_etcds_operations_for_a_txn() {
    for n in 1..=MAX_BATCH {
        let used = n + chain_len(n) * OPS_PER_CANDIDATE;
        assert!(used <= TXN_OPS, "{n} chains of {}: {used}", chain_len(n));
    }
    assert_eq!(chain_len(1), CHAIN);
}

#[test]
fn a_rotation_keeps_the_first_candidates_first_stays_within_the_highest_priority_and_keeps_every_candidate(
) {
    let all: Vec<Candidate> = (0..10).map(c).collect();
    let order = |v: Vec<Candidate>| -> Vec<i64> { v.iter().map(|x| x.mod_revision).collect() };
    assert_eq!(
        order(rotate(all.clone(), 1, 0)),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(
        order(rotate(all.clone(), 1, 2)),
        vec![0, 3, 4, 5, 1, 2, 6, 7, 8, 9]
    );
    assert_eq!(
        order(rotate(all.clone(), 1, 7)),
        vec![0, 3, 4, 5, 1, 2, 6, 7, 8, 9]
    );
    // A claim of two jobs keeps the first two (each chain's first candidate).
    assert_eq!(
        order(rotate(all.clone(), 2, 1)),
        vec![0, 1, 3, 4, 5, 2, 6, 7, 8, 9]
    );
    // Nothing after the kept ones within the priority: nothing moves.
    assert_eq!(
        order(rotate(all[..7].to_vec(), 6, 3)),
        (0..7).collect::<Vec<_>>()
    );
    assert!(rotate(Vec::<Candidate>::new(), 1, 3).is_empty());
}

#[test]
fn the_spread_starts_wide_follows_the_writes_between_read_and_claim_and_narrows_by_halves() {
    // A new handle cannot know it is alone.
    assert_eq!(MAX_SPREAD, 128);
    // Contended: twice the writes that landed between read and claim, within 2 and the most.
    assert_eq!(next_spread(1, true, 0), 2);
    assert_eq!(next_spread(1, true, 10), 20);
    assert_eq!(next_spread(4, true, 1_000), MAX_SPREAD);
    // Not contended: halved, never below 1 (a chain then goes on at the first job's neighbour).
    assert_eq!(next_spread(MAX_SPREAD, false, 50), 64);
    assert_eq!(next_spread(1, false, 0), 1);
}

/// A burst of 100 claimers on new handles, played through the chains the claims build: each
/// takes the first candidate of its chain still free when its claim applies (in any order:
/// the offsets are independent of it). All but about five in a hundred find one in their
/// first round trip — what [`MAX_SPREAD`] is sized for; chains that all went on at the first
/// job's neighbours would serve [`CHAIN`] of them.
#[test]
fn a_burst_of_100_new_claimers_mostly_claims_in_one_round() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    let want = chain_len(1) + MAX_SPREAD - 1;
    let all: Vec<Candidate> = (0..want).map(|i| Candidate { rank: 0, ..c(i) }).collect();
    let (bursts, claimers) = (200, 100);
    let mut missed = |spread: usize| {
        let mut missed = 0;
        for _ in 0..bursts {
            let mut taken = HashSet::new();
            for _ in 0..claimers {
                let offset = rng.random_range(0..spread);
                let chain = chains(rotate(all.clone(), 1, offset), 1, chain_len(1)).remove(0);
                match chain.iter().find(|x| !taken.contains(&x.mod_revision)) {
                    Some(x) => drop(taken.insert(x.mod_revision)),
                    None => missed += 1,
                }
            }
        }
        missed as f64 / bursts as f64
    };
    let wide = missed(MAX_SPREAD);
    assert!(wide < 6.0, "{wide} of 100 read again");
    let narrow = missed(1);
    assert_eq!(
        narrow,
        (claimers - CHAIN) as f64,
        "a narrow start serves {CHAIN}"
    );
}
