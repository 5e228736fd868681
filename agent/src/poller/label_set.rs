//! The labels live sockets carry, one shared copy each, bounded.
//!
//! Any local user chooses label text (a process name is a label by default), so the set
//! is capped: names no tracked socket uses any more are released by a sweep over the
//! socket table, and once `max` labels are in use a new name gets the overflow label,
//! which is counted. Overflowed traffic is still a label's traffic, so every event still
//! adds up: sum(labels) + unattributed == total.
use std::{collections::HashMap, sync::Arc};

use serde::Serialize;

/// The label sockets get once the cap is reached.
pub const OVERFLOW_LABEL: &str = "_overflow";

/// Sweeps at most this often while the set is full (in calls to `tick_done`).
const FULL_SWEEP_EVERY: u64 = 10;
/// Below this many names no sweep is worth its walk.
const MIN_SWEEP: usize = 256;
/// Otherwise a sweep every this many ticks (5 s at 100 ms): names a closed socket left
/// behind are released within seconds, so the cap is only reached by names in real use.
const PERIODIC_SWEEP: u64 = 50;

/// Counters for `status` and the metrics.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LabelSetStats {
    /// Distinct labels held now (the overflow label included once used).
    pub labels: usize,
    pub max_labels: usize,
    /// Labels released because no tracked socket used them any more.
    pub released: u64,
    /// Sockets given the overflow label because the cap was reached.
    pub overflowed_sockets: u64,
}

#[derive(Debug)]
pub struct LabelSet {
    /// Id -> name; `None` is a free id.
    names: Vec<Option<Arc<str>>>,
    index: HashMap<Arc<str>, u32>,
    free: Vec<u32>,
    max: usize,
    overflow: Option<u32>,
    /// Names held right after the last sweep: the next one waits until twice as many.
    after_sweep: usize,
    /// `tick_done` calls so far, and the one that last swept while full.
    ticks: u64,
    full_sweep_at: Option<u64>,
    /// The cap was hit since the last sweep: sweep at the next chance.
    want_sweep: bool,
    stats: LabelSetStats,
}

impl LabelSet {
    pub fn new(max: usize) -> LabelSet {
        LabelSet {
            names: vec![],
            index: HashMap::new(),
            free: vec![],
            max: max.max(1),
            overflow: None,
            after_sweep: 0,
            ticks: 0,
            full_sweep_at: None,
            want_sweep: false,
            stats: LabelSetStats {
                max_labels: max.max(1),
                ..Default::default()
            },
        }
    }

    /// The id of `label`, adding it when there is room, else the overflow label's.
    pub fn id(&mut self, label: &str) -> u32 {
        if let Some(&i) = self.index.get(label) {
            return i;
        }
        // The overflow label takes the last place, so it always has one.
        if self.index.len() + 1 >= self.max {
            self.want_sweep = true;
            self.stats.overflowed_sockets += 1;
            return self.overflow_id();
        }
        self.insert(label)
    }

    fn overflow_id(&mut self) -> u32 {
        match self.overflow {
            Some(i) => i,
            None => {
                let i = self.insert(OVERFLOW_LABEL);
                self.overflow = Some(i);
                i
            }
        }
    }

    fn insert(&mut self, label: &str) -> u32 {
        let name: Arc<str> = label.into();
        let i = match self.free.pop() {
            Some(i) => {
                self.names[i as usize] = Some(name.clone());
                i
            }
            None => {
                self.names.push(Some(name.clone()));
                (self.names.len() - 1) as u32
            }
        };
        self.index.insert(name, i);
        self.stats.labels = self.index.len();
        i
    }

    pub fn name(&self, id: u32) -> Option<&Arc<str>> {
        self.names.get(id as usize).and_then(Option::as_ref)
    }

    /// Whether a sweep is due at the end of this tick: the set doubled since the last
    /// one, or it is full (then at most every few ticks, so a host really using `max`
    /// labels does not walk its sockets every tick).
    pub fn sweep_due(&mut self) -> bool {
        self.ticks += 1;
        let n = self.index.len();
        if self.want_sweep {
            let recent = self
                .full_sweep_at
                .is_some_and(|t| self.ticks < t + FULL_SWEEP_EVERY);
            if !recent {
                self.full_sweep_at = Some(self.ticks);
                return true;
            }
        }
        (n >= MIN_SWEEP && n >= 2 * self.after_sweep.max(1))
            || (n > 0 && self.ticks.is_multiple_of(PERIODIC_SWEEP))
    }

    /// Releases every label whose id `in_use` does not name. Ids in use keep their
    /// number, so nothing that holds one needs to change.
    pub fn sweep(&mut self, in_use: impl Iterator<Item = u32>) {
        let mut used = vec![false; self.names.len()];
        for i in in_use {
            if let Some(u) = used.get_mut(i as usize) {
                *u = true;
            }
        }
        for (i, slot) in self.names.iter_mut().enumerate() {
            if !used[i]
                && let Some(name) = slot.take()
            {
                self.index.remove(&name);
                self.free.push(i as u32);
                self.stats.released += 1;
                if self.overflow == Some(i as u32) {
                    self.overflow = None;
                }
            }
        }
        // Trailing free ids are dropped so the vectors can shrink.
        while self.names.last().is_some_and(Option::is_none) {
            self.names.pop();
        }
        let len = self.names.len() as u32;
        self.free.retain(|&i| i < len);
        if self.names.capacity() > 4 * self.names.len().max(64) {
            self.names.shrink_to_fit();
            self.free.shrink_to_fit();
            self.index.shrink_to_fit();
        }
        self.after_sweep = self.index.len();
        self.want_sweep = false;
        self.stats.labels = self.index.len();
    }

    pub fn stats(&self) -> LabelSetStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_id_and_the_cap_overflows() {
        let mut s = LabelSet::new(3);
        let a = s.id("a");
        assert_eq!(s.id("a"), a);
        let b = s.id("b");
        assert_ne!(a, b);
        // The third place is the overflow label's.
        let o = s.id("c");
        assert_eq!(&**s.name(o).unwrap(), OVERFLOW_LABEL);
        assert_eq!(s.id("d"), o);
        let st = s.stats();
        assert_eq!((st.labels, st.overflowed_sockets), (3, 2));
    }

    #[test]
    fn sweep_releases_unused_names_and_keeps_ids_in_use() {
        let mut s = LabelSet::new(4);
        let a = s.id("a");
        let b = s.id("b");
        let _c = s.id("c");
        let d = s.id("d");
        assert_eq!(&**s.name(d).unwrap(), OVERFLOW_LABEL);
        assert!(s.sweep_due(), "full: sweep at once");
        s.sweep([b].into_iter());
        assert_eq!(s.name(b).map(|n| &**n), Some("b"));
        assert!(s.name(a).is_none());
        // Room again: a new name is a label, not the overflow.
        let e = s.id("e");
        assert_eq!(s.name(e).map(|n| &**n), Some("e"));
        let st = s.stats();
        assert_eq!((st.labels, st.released), (2, 3));
    }

    #[test]
    fn many_short_lived_names_stay_bounded() {
        let mut s = LabelSet::new(1000);
        let mut live: Vec<u32> = vec![];
        for n in 0..300_000u32 {
            live.push(s.id(&format!("p{n}")));
            // Each name's socket is gone two ticks later.
            if live.len() > 2 {
                live.remove(0);
            }
            if s.sweep_due() {
                s.sweep(live.iter().copied());
            }
            assert!(s.stats().labels <= 1000);
        }
        assert!(s.names.len() <= 1000, "{}", s.names.len());
        assert_eq!(s.stats().overflowed_sockets, 0);
    }
}
