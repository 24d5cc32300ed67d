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
    let client = etcd_client::Client::connect([addr.to_string()], None)
        .await
        .unwrap();
    let rpc = Rpc::new(
        client,
        Duration::from_secs(30),
        tokio_util::task::TaskTracker::new(),
    );
    let hub = Hub::new(rpc, Duration::from_secs(10), Duration::from_secs(10));
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
