//! The names a session creates exclusively (`create_exclusive`: a registration's key, a
//! barrier), whether one is claimed, and the values of its puts whose late copies may land.

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;

use tokio::sync::watch;

use super::cleanup::Sweep;

/// The names this session creates exclusively (`create_exclusive`: a registration's key, a
/// barrier) rather than by number: whether one is claimed, and the values of its puts that
/// were sent more than once, whose late copies may still land.
///
/// A late copy of an earlier put of a name carries the same key, lease and — for a
/// registration — value as a later, deliberate registration of that name by this session: no
/// compare can tell them apart. So a name's sweep runs only while the name is not claimed:
/// claiming it stops the sweep (after its delete in flight, if any, was answered), and a copy
/// that lands while it is claimed is either found by the claimant's conditional put (a copy
/// holding the claimant's value: the claimant's own, identical key) or blocks that put until
/// the claim ends and the sweep, started again, deletes it.
#[derive(Debug, Default)]
pub(crate) struct Names {
    names: StdMutex<HashMap<String, Name>>,
}

#[derive(Debug, Default)]
struct Name {
    /// A `create_exclusive` of the name is under way, or what it created is held (until its
    /// deletion was answered).
    claimed: bool,
    /// Values of this session's puts of the name that were sent more than once.
    uncertain: Vec<Vec<u8>>,
    /// The running sweep's stop switch, while the name is not claimed.
    sweeping: Option<watch::Sender<bool>>,
}

/// The session's claim on a name, from [`Names::claim`].
pub(crate) struct Claimed {
    /// Values of earlier puts of the name (sent more than once) whose copies may still land.
    pub(crate) uncertain: Vec<Vec<u8>>,
    /// The name's sweep, to stop before anything is put (see [`stop_sweep`]).
    sweeping: Option<watch::Sender<bool>>,
}

impl Claimed {
    /// Asks the name's sweep (if one runs) to stop, and completes once it has: its delete in
    /// flight, if any, was answered.
    pub(crate) async fn stop_sweep(&mut self) {
        if let Some(sweeping) = self.sweeping.take() {
            sweeping.send_replace(true);
            sweeping.closed().await;
        }
    }
}

impl Names {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Name>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key` for a `create_exclusive`: `None` if this session has it claimed already
    /// (another creation under way, or what one created still held).
    pub(crate) fn claim(&self, key: &str) -> Option<Claimed> {
        let mut names = self.lock();
        let name = names.entry(key.to_owned()).or_default();
        if name.claimed {
            return None;
        }
        name.claimed = true;
        Some(Claimed {
            uncertain: name.uncertain.clone(),
            sweeping: name.sweeping.take(),
        })
    }

    /// Ends the claim on `key` (nothing of it exists any more, but copies of its puts sent more
    /// than once — `value`, and earlier ones — may still land). Returns the sweep of those
    /// copies (on `lease_id`) to run until the name is claimed again, if there are any.
    pub(crate) fn unclaim(
        &self,
        key: &str,
        lease_id: i64,
        value: Option<Vec<u8>>,
    ) -> Option<Sweep> {
        let mut names = self.lock();
        let name = names.entry(key.to_owned()).or_default();
        name.claimed = false;
        if let Some(value) = value {
            if !name.uncertain.contains(&value) {
                name.uncertain.push(value);
            }
        }
        if name.uncertain.is_empty() {
            names.remove(key);
            return None;
        }
        let (stop, stopped) = watch::channel(false);
        // A sweep still running (its claimant left before stopping it) is superseded.
        if let Some(old) = name.sweeping.replace(stop) {
            old.send_replace(true);
        }
        Some(Sweep::of_name(
            key,
            lease_id,
            name.uncertain.clone(),
            stopped,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_name_cannot_be_claimed_again_until_it_is_unclaimed() {
        let names = Names::default();
        let first = names.claim("svc/a").expect("free");
        assert!(first.uncertain.is_empty());
        assert!(names.claim("svc/a").is_none(), "claimed twice");
        assert!(names.claim("svc/b").is_some(), "another name is free");
        // Unclaimed with no put in doubt: forgotten, no sweep.
        assert!(names.unclaim("svc/a", 7, None).is_none());
        assert!(names.lock().get("svc/a").is_none());
        assert!(names.claim("svc/a").is_some());
    }

    #[tokio::test]
    async fn a_names_sweep_runs_only_while_it_is_not_claimed_and_remembers_every_value() {
        let names = Names::default();
        names.claim("svc/a").expect("free");
        let sweep = names
            .unclaim("svc/a", 7, Some(b"v1".to_vec()))
            .expect("a put in doubt is swept");
        assert_eq!(sweep.values, Some(vec![b"v1".to_vec()]));
        assert!(!sweep.stopped());
        // Claimed again: the new claimant knows of the copies that may land, and stops the
        // sweep before it puts anything.
        let mut again = names.claim("svc/a").expect("unclaimed");
        assert_eq!(again.uncertain, vec![b"v1".to_vec()]);
        let stopping = tokio::spawn(async move { again.stop_sweep().await });
        tokio::time::timeout(std::time::Duration::from_secs(1), sweep.stop_requested())
            .await
            .expect("the sweep is asked to stop");
        assert!(sweep.stopped());
        drop(sweep); // the sweep ends
        stopping.await.unwrap();
        // Unclaimed again (its own put sent once): the earlier value is still swept.
        let next = names.unclaim("svc/a", 7, None).expect("still in doubt");
        assert_eq!(next.values, Some(vec![b"v1".to_vec()]));
        let left = names.claim("svc/a").expect("unclaimed");
        assert!(!next.stopped());
        drop(left); // a claimant that left without stopping the sweep: it stops all the same
        assert!(next.stopped());
        let last = names
            .unclaim("svc/a", 7, Some(b"v2".to_vec()))
            .expect("in doubt");
        assert_eq!(last.values, Some(vec![b"v1".to_vec(), b"v2".to_vec()]));
        // A sweep still running when the name is unclaimed again is superseded.
        let superseded = names.unclaim("svc/a", 7, None).expect("in doubt");
        assert!(last.stopped() && !superseded.stopped());
    }
}
