//! Places that local users share (control connections, record-stream subscribers):
//! capped in total and per uid, with a few kept for root, so no other user can lock the
//! administrator out.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Why a place was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every place open to this caller is taken.
    Full { max: usize },
    /// This uid holds its share.
    PerUid { uid: u32, max: usize },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full { max } => write!(f, "all {max} places are taken"),
            Refusal::PerUid { uid, max } => write!(f, "uid {uid} already holds {max} places"),
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

#[derive(Debug)]
pub struct Quota {
    max: usize,
    per_uid: usize,
    root_reserve: usize,
    held: Mutex<Held>,
}

impl Quota {
    /// `max` places for everyone but root, `per_uid` of them per uid; root may also take
    /// `root_reserve` more, so it finds a place when the others are all taken.
    pub fn new(max: usize, per_uid: usize, root_reserve: usize) -> Arc<Quota> {
        Arc::new(Quota {
            max,
            per_uid,
            root_reserve,
            held: Mutex::default(),
        })
    }

    pub fn acquire(self: &Arc<Self>, uid: u32) -> Result<Place, Refusal> {
        let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if uid == 0 {
            if h.total >= self.max + self.root_reserve {
                return Err(Refusal::Full {
                    max: self.max + self.root_reserve,
                });
            }
        } else {
            if h.total >= self.max {
                return Err(Refusal::Full { max: self.max });
            }
            if h.by_uid.get(&uid).copied().unwrap_or(0) >= self.per_uid {
                return Err(Refusal::PerUid {
                    uid,
                    max: self.per_uid,
                });
            }
        }
        h.total += 1;
        *h.by_uid.entry(uid).or_default() += 1;
        Ok(Place {
            quota: self.clone(),
            uid,
        })
    }

    /// Places held now.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// One place; dropping it frees it.
#[derive(Debug)]
pub struct Place {
    quota: Arc<Quota>,
    uid: u32,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut h = self.quota.held.lock().unwrap_or_else(|p| p.into_inner());
        h.total -= 1;
        if let Some(n) = h.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                h.by_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_uid_and_total_caps_with_places_kept_for_root() {
        let q = Quota::new(4, 2, 1);
        let a: Vec<_> = (0..2).map(|_| q.acquire(1000).unwrap()).collect();
        assert_eq!(
            q.acquire(1000).unwrap_err(),
            Refusal::PerUid { uid: 1000, max: 2 }
        );
        let b: Vec<_> = (0..2).map(|_| q.acquire(1001).unwrap()).collect();
        assert_eq!(q.acquire(1002).unwrap_err(), Refusal::Full { max: 4 });
        // Root still gets its reserved place, then no more.
        let r = q.acquire(0).unwrap();
        assert_eq!(q.acquire(0).unwrap_err(), Refusal::Full { max: 5 });
        drop(a);
        assert_eq!(q.held(), 3);
        assert!(q.acquire(1002).is_ok());
        drop((b, r));
    }
}
