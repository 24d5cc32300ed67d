//! Unit tests of `queue`.

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
    assert!(chains(Vec::new(), 1, 4).is_empty());
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
fn a_rotation_stays_within_the_highest_priority_and_keeps_every_candidate() {
    let all: Vec<Candidate> = (0..10).map(c).collect();
    let order = |v: Vec<Candidate>| -> Vec<i64> { v.iter().map(|x| x.mod_revision).collect() };
    assert_eq!(order(rotate(all.clone(), 0)), (0..10).collect::<Vec<_>>());
    assert_eq!(
        order(rotate(all.clone(), 2)),
        vec![2, 3, 4, 5, 0, 1, 6, 7, 8, 9]
    );
    assert_eq!(
        order(rotate(all.clone(), 8)),
        vec![2, 3, 4, 5, 0, 1, 6, 7, 8, 9]
    );
    assert!(rotate(Vec::new(), 3).is_empty());
}
