//! The one owner of "the API server is reachable", for readiness: a watch
//! whose last request failed makes it false; an event of that watch, or
//! (for a failure to reach the API server at all) a probe that gets an
//! answer, makes it true again. Quiet watches say nothing when they come
//! back (kube keeps bookmarks to itself), hence the probe; it runs only
//! while a watch is failing, at most every [`PROBE_INTERVAL`].

use std::{collections::BTreeMap, time::Duration};

use tokio::time::Instant;

use crate::k8s::watch::{Failure, WatchName};

/// Pause between probes while the API server is unreachable.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Reachability {
    failing: BTreeMap<WatchName, Failure>,
    probe_at: Option<Instant>,
}

impl Reachability {
    pub fn reachable(&self) -> bool {
        self.failing.is_empty()
    }

    pub fn working(&mut self, watch: WatchName) {
        self.failing.remove(&watch);
        self.schedule();
    }

    pub fn failed(&mut self, watch: WatchName, failure: Failure) {
        self.failing.insert(watch, failure);
        self.schedule();
    }

    /// When to probe; `None` while no watch fails to reach the API server.
    pub fn probe_at(&self) -> Option<Instant> {
        self.probe_at
    }

    /// A probe answered (or not). An answer clears only failures to reach
    /// the API server: a refused watch (403, ...) stays until it works.
    pub fn probed(&mut self, answered: bool) {
        if answered {
            self.failing.retain(|_, f| *f == Failure::Refused);
        }
        self.probe_at = None;
        self.schedule();
    }

    fn schedule(&mut self) {
        let unreachable = self.failing.values().any(|f| *f == Failure::Unreachable);
        self.probe_at = match (unreachable, self.probe_at) {
            (false, _) => None,
            (true, Some(at)) => Some(at),
            (true, None) => Some(Instant::now() + PROBE_INTERVAL),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_for_every_watch() {
        let mut state = Reachability::default();
        assert!(state.reachable());
        assert_eq!(state.probe_at(), None);
        // A 403 on the pod watch is not hidden by a working namespace watch.
        state.failed(WatchName::Pods, Failure::Refused);
        state.working(WatchName::Namespaces);
        assert!(!state.reachable());
        assert_eq!(state.probe_at(), None, "a refusal is not probed for");
        state.probed(true);
        assert!(!state.reachable());
        state.working(WatchName::Pods);
        assert!(state.reachable());
        // An unreachable API server is probed for, every interval at most.
        state.failed(WatchName::Namespaces, Failure::Unreachable);
        let first = state.probe_at().expect("probe scheduled");
        assert!(first >= Instant::now() + PROBE_INTERVAL - Duration::from_secs(1));
        state.failed(WatchName::Pods, Failure::Unreachable);
        assert_eq!(state.probe_at(), Some(first), "one schedule for both");
        state.probed(false);
        assert!(!state.reachable());
        assert!(state.probe_at().is_some());
        state.failed(WatchName::Pods, Failure::Refused);
        state.probed(true);
        assert!(!state.reachable(), "the refused pod watch stays failing");
        assert_eq!(state.probe_at(), None);
        state.working(WatchName::Pods);
        assert!(state.reachable());
    }
}
