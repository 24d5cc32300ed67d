//! Unit tests of `keys`.

use super::*;
use proptest::prelude::*;

fn shared(name: &str) -> Result<Queue, Error> {
    Queue::new(name, Layout::Shared)
}

#[test]
fn prefix_ends_follow_etcds_convention() {
    assert_eq!(prefix_end(b"svc/"), b"svc0".to_vec());
    assert_eq!(prefix_end(b"a\x7f"), b"a\x80".to_vec());
    assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
}

#[test]
fn pointers_go_beside_the_queue_and_only_behind_our_exclusive_members() {
    let lease = 0x1234_i64;
    let shared = shared("jobs/a").unwrap();
    let mutex = shared.member_key("", lease, 1);
    let pointer = successor_pointer(mutex.as_bytes(), 57).unwrap();
    assert_eq!(
        String::from_utf8(pointer.clone()).unwrap(),
        "jobs/a/#next/0000000000001234-1/57"
    );
    assert!(is_pointer(&pointer));
    assert_eq!(pointer_parts(&pointer), Some((mutex.clone(), 57)));
    assert!(!shared.is_member(&pointer), "a pointer is not a member");
    assert!(
        !pointer.starts_with(format!("{mutex}/").as_bytes()),
        "not under the member"
    );
    assert!(!is_pointer(mutex.as_bytes()));
    assert!(announces_release(mutex.as_bytes()));
    // A queue of our own: `N/#<kind>/<lease>-<n>`.
    let own = Queue::new("jobs/a", Layout::Own("sem")).unwrap();
    let permit = own.member_key("", lease, 2);
    let pointer = successor_pointer(permit.as_bytes(), 9).unwrap();
    assert!(is_pointer(&pointer));
    assert_eq!(pointer_parts(&pointer), Some((permit.clone(), 9)));
    assert!(!own.is_member(&pointer));
    // Readers do not announce (others may hold on); writers do.
    assert!(!announces_release(
        shared.member_key("r", lease, 3).as_bytes()
    ));
    assert!(announces_release(
        shared.member_key("w", lease, 3).as_bytes()
    ));
    // Go's and etcdctl's keys are not ours: no pointer.
    assert_eq!(successor_pointer(b"jobs/a/694d7c6d2a1e3b04", 9), None);
    assert!(!is_pointer(b"jobs/a/#next/nothex/9"));
}

#[test]
fn empty_name_is_invalid() {
    assert!(matches!(shared(""), Err(Error::InvalidArgument(_))));
}

#[test]
fn names_with_hash_or_control_characters_are_invalid() {
    for bad in ["a#b", "#", "a\0b", "line\nbreak", "tab\there", "del\u{7f}"] {
        assert!(
            matches!(shared(bad), Err(Error::InvalidArgument(_))),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn overlong_name_is_invalid_and_the_longest_allowed_is_valid() {
    assert!(shared(&"x".repeat(MAX_NAME_LEN)).is_ok());
    assert!(matches!(
        shared(&"x".repeat(MAX_NAME_LEN + 1)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn a_shared_queue_is_every_key_directly_under_the_name_in_etcds_layout() {
    let q = shared("locks/job").unwrap();
    assert_eq!(q.prefix(), "locks/job/");
    let ours = q.member_key("", 0x694d, 10);
    assert_eq!(ours, "locks/job/#000000000000694d-a");
    assert!(q.is_member(ours.as_bytes()));
    // Go's concurrency.Mutex / etcdctl lock: the lease id in lowercase hex.
    assert!(q.is_member(b"locks/job/694d"));
    // Nested names, ours or Go's, are not members.
    assert!(!q.is_member(b"locks/job/sub/#000000000000694d-a"));
    assert!(!q.is_member(b"locks/job/sub/694d"));
    assert!(!q.is_member(b"locks/job/"));
    assert!(!q.is_member(b"locks/jobs/694d"));
}

#[test]
fn a_queue_of_our_own_sits_under_its_kind_and_outside_the_shared_queue() {
    let q = Queue::new("locks/job", Layout::Own("rwlock")).unwrap();
    assert_eq!(q.prefix(), "locks/job/#rwlock/");
    let writer = q.member_key("w", 0x694d, 10);
    assert_eq!(writer, "locks/job/#rwlock/w000000000000694d-a");
    assert!(writer.starts_with(&q.sub("w")));
    assert!(!q.member_key("r", 1, 1).starts_with(&q.sub("w")));
    assert!(q.is_member(writer.as_bytes()));
    assert!(!shared("locks/job").unwrap().is_member(writer.as_bytes()));
}

fn name() -> impl Strategy<Value = String> {
    // Printable names, with '/' common so nested names are exercised.
    proptest::string::string_regex("[a-z/._ -]{1,12}").unwrap()
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::Shared),
        Just(Layout::Own("semaphore")),
        Just(Layout::Own("rwlock")),
    ]
}

proptest! {
    #[test]
    fn a_valid_name_yields_member_keys_of_its_own_queue(n in name(), l in layout(), lease in any::<i64>(), seq in any::<u64>()) {
        let q = Queue::new(&n, l).unwrap();
        let key = q.member_key("", lease, seq);
        prop_assert!(key.starts_with(q.prefix()));
        prop_assert!(q.is_member(key.as_bytes()));
    }

    #[test]
    fn no_queue_counts_another_queues_keys(a in name(), la in layout(), b in name(), lb in layout(), lease in any::<i64>(), seq in any::<u64>()) {
        prop_assume!((a.as_str(), la) != (b.as_str(), lb));
        let qa = Queue::new(&a, la).unwrap();
        let qb = Queue::new(&b, lb).unwrap();
        let key = qb.member_key("", lease, seq);
        prop_assert!(!qa.is_member(key.as_bytes()), "{key} is a member of {:?}", qa);
    }

    #[test]
    fn etcds_own_keys_are_members_of_the_shared_queue_only(n in name(), lease in any::<u64>()) {
        let go_key = format!("{n}/{lease:x}");
        prop_assert!(shared(&n).unwrap().is_member(go_key.as_bytes()));
        prop_assert!(!Queue::new(&n, Layout::Own("semaphore")).unwrap().is_member(go_key.as_bytes()));
    }

    #[test]
    fn distinct_acquisitions_get_distinct_keys(n in name(), l1 in any::<i64>(), s1 in any::<u64>(), l2 in any::<i64>(), s2 in any::<u64>()) {
        prop_assume!((l1, s1) != (l2, s2));
        let q = shared(&n).unwrap();
        prop_assert_ne!(q.member_key("", l1, s1), q.member_key("", l2, s2));
    }

    #[test]
    fn any_name_with_a_hash_is_rejected(pre in name(), post in name()) {
        let bad = format!("{pre}#{post}");
        prop_assert!(matches!(shared(&bad), Err(Error::InvalidArgument(_))));
    }
}

#[test]
fn a_member_keys_queue_is_its_name_up_to_its_last_slash_one_per_kind() {
    let key = |name: &str, layout: Layout, kind: &str| {
        Queue::new(name, layout).unwrap().member_key(kind, 0xff, 1)
    };
    let mutex = key("locks/a", Layout::Shared, "");
    assert_eq!(queue_of(&mutex), "locks/a/");
    let permit = key("locks/a", Layout::Own("sem"), "");
    assert_eq!(queue_of(&permit), "locks/a/#sem/");
    let (reader, writer) = (
        key("locks/a", Layout::Own("rwlock"), "r"),
        key("locks/a", Layout::Own("rwlock"), "w"),
    );
    assert_eq!(queue_of(&reader), queue_of(&writer));
    assert_ne!(queue_of(&reader), queue_of(&permit));
}
