//! The one task that owns the loaded programs and writes their maps. Other
//! tasks send it requests through an [`EnforcerHandle`].

use std::collections::{BTreeMap, BTreeSet};

use aya::Ebpf;
use enforcer_common::BlockCounters;
use tokio::sync::{mpsc, oneshot};

use crate::{
    bpf::{self, AllowMap, BpfError, CountersMap, DestRulesMap, Mode},
    cgroup::CgroupDir,
    rules::RuleSet,
};

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("the enforcer task has stopped")]
    Stopped,
}

/// The loaded programs and their maps.
pub struct Enforcer {
    // Owns the program links: dropping it detaches every program.
    _ebpf: Ebpf,
    allowed: AllowMap,
    counters: CountersMap,
}

enum Request {
    SetAllowed {
        ids: BTreeSet<u64>,
        reply: oneshot::Sender<Result<(), BpfError>>,
    },
    Counters {
        reply: oneshot::Sender<Result<BTreeMap<u64, BlockCounters>, BpfError>>,
    },
}

impl Enforcer {
    /// Loads the programs, fills the maps, and only then attaches to
    /// `cgroup`, so allowlisted cgroups are never refused at start.
    pub fn start(
        mode: Mode,
        rules: &RuleSet,
        allowed: &BTreeSet<u64>,
        cgroup: &CgroupDir,
    ) -> Result<Enforcer, BpfError> {
        let mut ebpf = bpf::load(mode)?;
        DestRulesMap::take(&mut ebpf)?.sync(rules)?;
        let mut allow_map = AllowMap::take(&mut ebpf)?;
        let counters = CountersMap::take(&mut ebpf)?;
        allow_map.sync(allowed)?;
        bpf::attach(&mut ebpf, cgroup)?;
        Ok(Enforcer {
            _ebpf: ebpf,
            allowed: allow_map,
            counters,
        })
    }

    /// Starts the owner task; it ends, detaching everything, when every
    /// handle is dropped.
    pub fn spawn(self) -> (EnforcerHandle, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(64);
        let task = tokio::spawn(self.serve(receiver));
        (EnforcerHandle(sender), task)
    }

    async fn serve(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(request) = requests.recv().await {
            // A closed reply channel means the asker gave up; nothing to do.
            match request {
                Request::SetAllowed { ids, reply } => {
                    let _ = reply.send(self.allowed.sync(&ids));
                }
                Request::Counters { reply } => {
                    let _ = reply.send(self.counters.read());
                }
            }
        }
    }
}

/// A cheap, cloneable way to ask the enforcer task for changes.
#[derive(Clone)]
pub struct EnforcerHandle(mpsc::Sender<Request>);

impl EnforcerHandle {
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, BpfError>>) -> Request,
    ) -> Result<T, EnforcerError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(request(reply))
            .await
            .map_err(|_| EnforcerError::Stopped)?;
        Ok(answer.await.map_err(|_| EnforcerError::Stopped)??)
    }

    /// Makes the allow map hold exactly `ids`.
    pub async fn set_allowed(&self, ids: BTreeSet<u64>) -> Result<(), EnforcerError> {
        self.ask(|reply| Request::SetAllowed { ids, reply }).await
    }

    /// Blocked-attempt counters by cgroup id.
    pub async fn counters(&self) -> Result<BTreeMap<u64, BlockCounters>, EnforcerError> {
        self.ask(|reply| Request::Counters { reply }).await
    }
}
