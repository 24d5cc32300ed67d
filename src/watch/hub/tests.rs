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
