//! The "empty hooks" condition: programs that only return, attached where the agent
//! attaches (cgroup_skb ingress and egress on the test cgroup, tc on the interface the
//! agent would count). Their cost is the floor any program at those points pays.
use std::{fs::File, path::PathBuf, process::Command};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType, tc,
    },
    util::KernelVersion,
};
use sockacct_tests::TestCgroup;

/// Built next to the agent's object by `cargo xtask build-ebpf` (agent-ebpf/src/floor.rs).
fn object() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bpf/bpfel-unknown-none/release/sockacct-floor")
}

/// Attached while alive; dropping detaches (aya's links) and removes a clsact qdisc it
/// added.
pub struct Floor {
    _ebpf: Ebpf,
    qdisc_on: Option<String>,
}

/// The ladder's egress programs, each doing a little more of sockacct_egress's work.
pub const LADDER: [&str; 6] = [
    "sockacct_floor_egress",
    "sockacct_ladder1_totals",
    "sockacct_ladder2_cookie",
    "sockacct_ladder3_lookup",
    "sockacct_ladder4_count",
    "sockacct_ladder5_sk_storage",
];

impl Floor {
    /// One egress program of the object alone on the cgroup (a step of the ladder).
    pub fn attach_egress(cg: &TestCgroup, name: &str) -> anyhow::Result<Floor> {
        let obj = object();
        let mut ebpf = Ebpf::load_file(&obj)
            .with_context(|| format!("loading {} (run `cargo xtask build-ebpf`)", obj.display()))?;
        let dir = File::open(&cg.path).with_context(|| format!("opening {}", cg.path.display()))?;
        let p: &mut CgroupSkb = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing"))?
            .try_into()?;
        p.load()?;
        p.attach(&dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)?;
        Ok(Floor {
            _ebpf: ebpf,
            qdisc_on: None,
        })
    }

    pub fn attach(cg: &TestCgroup, iface: Option<&str>) -> anyhow::Result<Floor> {
        let obj = object();
        let mut ebpf = Ebpf::load_file(&obj)
            .with_context(|| format!("loading {} (run `cargo xtask build-ebpf`)", obj.display()))?;
        let dir = File::open(&cg.path).with_context(|| format!("opening {}", cg.path.display()))?;
        for (name, ty) in [
            ("sockacct_floor_ingress", CgroupSkbAttachType::Ingress),
            ("sockacct_floor_egress", CgroupSkbAttachType::Egress),
        ] {
            let p: &mut CgroupSkb = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing"))?
                .try_into()?;
            p.load()?;
            p.attach(&dir, ty, CgroupAttachMode::Single)?;
        }
        let mut qdisc_on = None;
        if let Some(iface) = iface {
            // Before 6.6 (no tcx) tc programs need a clsact qdisc, as for the agent.
            if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0))
                && tc::qdisc_add_clsact(iface).is_ok()
            {
                qdisc_on = Some(iface.to_string());
            }
            for (name, ty) in [
                ("sockacct_floor_tc_ingress", TcAttachType::Ingress),
                ("sockacct_floor_tc_egress", TcAttachType::Egress),
            ] {
                let p: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .with_context(|| format!("{name} missing"))?
                    .try_into()?;
                p.load()?;
                p.attach(iface, ty)?;
            }
        }
        Ok(Floor {
            _ebpf: ebpf,
            qdisc_on,
        })
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Some(iface) = &self.qdisc_on {
            let _ = Command::new("tc")
                .args(["qdisc", "del", "dev", iface, "clsact"])
                .status();
        }
    }
}
