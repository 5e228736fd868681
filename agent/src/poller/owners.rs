//! Who owns a socket, and so its label: the kernel's owner record, a final record, a
//! socket found at start, or the listener of a server-side socket awaiting accept().
use super::*;
use crate::flows::OwnerView;

/// One shared copy of an owner (every socket of a process points to it).
fn intern_owner(owners: &mut HashMap<OwnerView, Arc<OwnerView>>, o: OwnerView) -> Arc<OwnerView> {
    if let Some(a) = owners.get(&o) {
        return a.clone();
    }
    let a = Arc::new(o.clone());
    owners.insert(o, a.clone());
    a
}

/// One shared copy of a name (process, cgroup path).
fn intern(names: &mut HashMap<String, Arc<str>>, s: &str) -> Arc<str> {
    if let Some(a) = names.get(s) {
        return a.clone();
    }
    let a: Arc<str> = s.into();
    names.insert(s.to_owned(), a.clone());
    a
}

impl Poller {
    pub(super) fn label_id(&mut self, label: String) -> u32 {
        self.labels.id(&label)
    }

    pub(super) fn facts_from_owner(&mut self, o: &Owner) -> OwnerFacts {
        let exe = if self.labeler.needs_exe() && o.tgid != 0 {
            std::fs::read_link(format!("/proc/{}/exe", o.tgid))
                .ok()
                .map(|p| p.display().to_string())
        } else {
            None
        };
        let cgroup = if self.labeler.needs_cgroup() {
            self.cgroups
                .as_mut()
                .and_then(|c| c.get(o.cgroup_id).map(str::to_owned))
        } else {
            None
        };
        OwnerFacts {
            process: comm_str(&o.comm),
            exe,
            cgroup,
            uid: o.uid,
            protocol: o.protocol as u8,
            local_port: o.local_port as u16,
            remote_port: o.remote_port as u16,
            remote: owner_remote(o),
            netns: o.netns_cookie,
        }
    }

    pub(super) fn label_facts(&mut self, f: &OwnerFacts) -> u32 {
        let user = if self.labeler.needs_user() {
            self.users.get(f.uid).map(str::to_owned)
        } else {
            None
        };
        let label = self.labeler.label(&SocketFacts {
            process: &f.process,
            exe: f.exe.as_deref(),
            cgroup: f.cgroup.as_deref(),
            uid: f.uid,
            user: user.as_deref(),
            protocol: f.protocol,
            local_port: f.local_port,
            remote_port: f.remote_port,
            remote_addr: f.remote,
            netns_cookie: f.netns,
        });
        self.label_id(label)
    }

    pub(super) fn note_listener(&mut self, o: &Owner) {
        if o.origin != 0 && o.protocol == 6 && o.remote_port == 0 && o.local_port != 0 {
            self.listeners.insert(o.local_port as u16, *o);
        }
    }

    pub(super) fn owner_flow_facts(
        &mut self,
        o: &Owner,
        source: OwnerSource,
        process: String,
    ) -> Option<Box<FlowFacts>> {
        use crate::flows::Direction;
        use std::net::SocketAddr;
        if !self.flow_views_on || o.addr_family == 0 {
            return None;
        }
        let local_ip = wire_ip(o.addr_family, &o.local_ip)?;
        let remote = owner_remote(o)
            .filter(|_| o.remote_port != 0)
            .map(|ip| SocketAddr::new(ip, o.remote_port as u16));
        let direction = match (source, o.origin) {
            (OwnerSource::Listener, _) | (_, ORIGIN_ACCEPT) | (_, ORIGIN_FIRST_IO) => {
                Direction::Inbound
            }
            (_, ORIGIN_SOCK_CREATE) if remote.is_some() => Direction::Outbound,
            _ if self.listeners.contains_key(&(o.local_port as u16))
                && o.protocol == 6
                && remote.is_some() =>
            {
                Direction::Inbound
            }
            _ if remote.is_some() => Direction::Outbound,
            _ => Direction::Unknown,
        };
        Some(Box::new(FlowFacts {
            proto: o.protocol as u8,
            local: SocketAddr::new(local_ip, o.local_port as u16),
            remote,
            direction,
            owner: intern_owner(
                &mut self.owners,
                OwnerView {
                    pid: o.tgid,
                    process: intern(&mut self.names, &process),
                    uid: o.uid,
                    cgroup: None,
                    netns: o.netns_cookie,
                },
            ),
            first_seen_ms: unix_ms(),
        }))
    }

    pub(super) fn resolve(
        &mut self,
        cookie: u64,
        rec: Option<&Owner>,
    ) -> Option<(u32, OwnerSource)> {
        let r = self.resolve_inner(cookie, rec);
        if r.is_none() {
            self.resolved_flow = None;
        }
        r
    }

    pub(super) fn resolve_inner(
        &mut self,
        cookie: u64,
        rec: Option<&Owner>,
    ) -> Option<(u32, OwnerSource)> {
        let kernel = match rec {
            Some(o) => Some(*o),
            None => bpfsys::lookup::<u64, Owner>(self.maps.owners.fd().as_fd(), &cookie)
                .ok()
                .flatten(),
        };
        if let Some(o) = kernel.filter(|o| o.origin != 0) {
            self.note_listener(&o);
            let f = self.facts_from_owner(&o);
            self.resolved_flow = self.owner_flow_facts(&o, OwnerSource::Kernel, f.process.clone());
            return Some((self.label_facts(&f), OwnerSource::Kernel));
        }
        if let Some(d) = self.discovered.get(&cookie)
            && let Some(p) = &d.owner
        {
            let f = OwnerFacts {
                process: p.comm.clone(),
                exe: p.exe.clone(),
                cgroup: p.cgroup.clone(),
                uid: p.uid,
                protocol: d.protocol,
                local_port: d.local.port(),
                remote_port: d.remote.port(),
                remote: Some(d.remote.ip()).filter(|ip| !ip.is_unspecified()),
                netns: procfs::netns_cookie_of_self(),
            };
            self.resolved_flow = if self.flow_views_on {
                let inbound = d.protocol == 6 && self.listeners.contains_key(&d.local.port());
                Some(Box::new(FlowFacts {
                    proto: d.protocol,
                    local: d.local,
                    remote: Some(d.remote).filter(|r| r.port() != 0),
                    direction: if inbound {
                        crate::flows::Direction::Inbound
                    } else {
                        crate::flows::Direction::Outbound
                    },
                    owner: intern_owner(
                        &mut self.owners,
                        crate::flows::OwnerView {
                            pid: p.tgid,
                            process: intern(&mut self.names, &p.comm),
                            uid: p.uid,
                            cgroup: p.cgroup.as_deref().map(|c| intern(&mut self.names, c)),
                            netns: f.netns,
                        },
                    ),
                    first_seen_ms: unix_ms(),
                }))
            } else {
                None
            };
            return Some((self.label_facts(&f), OwnerSource::Discovered));
        }
        // Addresses only (the kernel saw packets, no owner yet): a TCP socket on a port
        // we know a listener for is a server-side socket awaiting accept().
        if let Some(o) = kernel.filter(|o| o.addr_family != 0 && o.remote_port != 0)
            && let Some(l) = self.listeners.get(&(o.local_port as u16)).copied()
        {
            let mut merged = l;
            merged.local_port = o.local_port;
            merged.remote_port = o.remote_port;
            merged.remote_ip = o.remote_ip;
            merged.local_ip = o.local_ip;
            merged.addr_family = o.addr_family;
            let f = self.facts_from_owner(&merged);
            self.resolved_flow =
                self.owner_flow_facts(&merged, OwnerSource::Listener, f.process.clone());
            return Some((self.label_facts(&f), OwnerSource::Listener));
        }
        None
    }

    /// Many sockets to label at once (the first tick, a burst of new connections): one
    /// walk of the owner map, in parts, resolving the sockets that need an owner as their
    /// entries come by, instead of a lookup each. Parts, not the whole map in one buffer:
    /// 100k owners read at once (and indexed) were 39 MB of the agent's memory peak.
    pub(super) fn resolve_by_walk(&mut self, record_owner: &IntMap<u64, Owner>) {
        let mut cursor = bpfsys::WalkCursor::default();
        let mut part: Vec<(u64, Owner)> = Vec::with_capacity(OWNER_WALK_PART);
        loop {
            part.clear();
            let done = match bpfsys::walk_step(
                self.maps.owners.fd().as_fd(),
                &mut cursor,
                OWNER_WALK_PART,
                &mut part,
            ) {
                Ok(done) => done,
                Err(e) => {
                    debug!("walking the owner map: {e}");
                    return;
                }
            };
            for (cookie, o) in &part {
                let wanted = !record_owner.contains_key(cookie)
                    && self.table.socks.get(cookie).is_some_and(|st| {
                        matches!(st.owner_source, None | Some(OwnerSource::Listener))
                    });
                if wanted && o.origin != 0 {
                    self.label_of(*cookie, Some(o));
                }
            }
            if done {
                return;
            }
        }
    }

    /// Current label of a socket, resolving (or improving) its owner when needed.
    pub(super) fn label_of(&mut self, cookie: u64, rec: Option<&Owner>) -> Option<u32> {
        let st = self.table.socks.get(&cookie)?;
        let retry = match st.owner_source {
            None => st.owner_attempts < 100 || rec.is_some(),
            Some(OwnerSource::Listener) => st.owner_attempts < 100 || rec.is_some(),
            _ => false,
        };
        if retry {
            let found = self.resolve(cookie, rec);
            let st = self.table.socks.get_mut(&cookie)?;
            st.owner_attempts = st.owner_attempts.saturating_add(1);
            if let Some((label, src)) = found {
                st.label = Some(label);
                st.owner_source = Some(src);
                if let Some(mut f) = self.resolved_flow.take() {
                    // Keep when the flow was first seen across owner improvements.
                    if let Some(old) = &st.flow {
                        f.first_seen_ms = old.first_seen_ms;
                    }
                    st.flow = Some(f);
                }
            }
        }
        // A label the owning application asked for (control socket) wins; the owner is
        // still resolved above, for the socket's flow records.
        let named = self
            .overrides
            .lock()
            .ok()
            .and_then(|o| o.get(&cookie).map(|n| n.label.clone()));
        if let Some(label) = named {
            let id = self.label_id(label);
            let st = self.table.socks.get_mut(&cookie)?;
            st.label = Some(id);
            return Some(id);
        }
        self.table.socks.get(&cookie)?.label
    }

    /// The owner in a final record the kernel submitted since this tick drained the ring:
    /// drains it again into `late_finals` (processed next tick) and looks there.
    pub(super) fn late_final_owner(&mut self, cookie: u64) -> Option<Owner> {
        let mut late = std::mem::take(&mut self.late_finals);
        self.read_finals(&mut late);
        self.late_finals = late;
        self.late_finals
            .iter()
            .find(|r| r.cookie == cookie && r.has_owner != 0)
            .map(|r| r.owner)
    }
}
