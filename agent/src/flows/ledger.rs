//! The flow ledger: per finished socket, its final counters against the traffic of the
//! flow records it got.
use std::collections::BTreeMap;

use super::state::*;
use super::*;

/// Since start: finished sockets' traffic against their flow records' traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlowLedger {
    /// Finished sockets whose flow records add up exactly to their final counters.
    pub exact_sockets: u64,
    /// Finished sockets whose records do not (see `unrecorded` / `over_recorded`).
    pub inexact_sockets: u64,
    /// Traffic of flows the [flows] filters left out: reported, not lost.
    pub filtered: Traffic,
    /// Traffic of sockets no flow record carries, by reason: `peer_unknown` (an
    /// unconnected socket's bytes not attributed to any peer: the kernel's per-peer map was
    /// full, or a header it could not parse), `orphan_peer` (a peer's counters came for a
    /// socket the table was never given; as seen, per observation), `overflow` (flows not
    /// tracked for lack of room that ended unseen, e.g. an idle peer), `untracked`
    /// (anything else).
    pub unrecorded: BTreeMap<&'static str, Traffic>,
    /// Traffic records carried that the socket did not (a forgotten idle-peer baseline).
    pub over_recorded: Traffic,
    /// Traffic of TCP listening sockets (the handshake packets counted on them): no flow
    /// is theirs; reported, not lost (such sockets count as exact).
    pub listening: Traffic,
}

/// One socket's side of the ledger while it lives (only sockets that had a flow end, or
/// traffic filtered, have one).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SockLedger {
    pub(super) recorded: Traffic,
    pub(super) filtered: Traffic,
}

impl FlowLedger {
    /// A socket finished with `fin` as its final counters; `rest_filtered`: whatever no
    /// record carries was left out by the filters (its current flow did not pass them).
    pub(super) fn settle(
        &mut self,
        mut l: SockLedger,
        fin: Traffic,
        rest_filtered: bool,
        reason: &'static str,
    ) {
        if rest_filtered {
            let mut carried = l.recorded;
            add(&mut carried, l.filtered);
            add(&mut l.filtered, sub(fin, carried));
        }
        add(&mut self.filtered, l.filtered);
        let mut carried = l.recorded;
        add(&mut carried, l.filtered);
        if carried == fin {
            self.exact_sockets += 1;
            return;
        }
        self.inexact_sockets += 1;
        let short = sub(fin, carried);
        if short != Traffic::default() {
            add(self.unrecorded.entry(reason).or_default(), short);
        }
        let over = sub(carried, fin);
        if over != Traffic::default() {
            add(&mut self.over_recorded, over);
        }
    }

    /// A listening socket finished: whatever it counted is handshake traffic.
    pub(super) fn listening(&mut self, l: SockLedger, fin: Traffic) {
        add(&mut self.filtered, l.filtered);
        let mut rest = sub(fin, l.recorded);
        rest = sub(rest, l.filtered);
        add(&mut self.listening, rest);
        self.exact_sockets += 1;
    }

    pub(super) fn orphan(&mut self, t: Traffic) {
        add(self.unrecorded.entry("orphan_peer").or_default(), t);
    }
}
