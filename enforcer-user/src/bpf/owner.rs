//! The one task that owns the loaded programs and writes their maps. Other
//! tasks send it requests through an [`EnforcerHandle`].

use std::collections::BTreeMap;

use enforcer_common::{BlockCounters, names};
use tokio::sync::{mpsc, oneshot};

use super::{
    BpfError,
    edge::{self, EdgeAttached, EdgePrograms, EdgeTargets},
    loader::{self, LoaderAhead},
    maps::{
        CgroupAccess, CgroupAllowMap, CountersMap, DestRulesMap, DroppedEvents, EventRing,
        InterfaceAllowMap,
    },
    pins::{self, GenerationKey, PinError, PinRoot, StartPlan},
};
use crate::{
    config::{Mode, rules::RuleSet},
    host::{cgroup::CgroupDir, memlock},
};

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("the enforcer task has stopped")]
    Stopped,
}

/// The pinned maps of the generation in force.
pub struct Enforcer {
    rules: DestRulesMap,
    allowed: CgroupAllowMap,
    counters: CountersMap,
    dropped: DroppedEvents,
    /// Handed to the event reader by [`Enforcer::take_events`].
    events: Option<EventRing>,
    interfaces: InterfaceAllowMap,
    /// The node edge guard's programs; `None` when it is off.
    edge: Option<EdgePrograms>,
}

/// The enforcer's state, for metrics, health and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub allowed: CgroupAccess,
    pub counters: BTreeMap<u64, BlockCounters>,
    pub events_dropped: u64,
}

enum Request {
    SetAllowed {
        entries: CgroupAccess,
        reply: oneshot::Sender<Result<(), BpfError>>,
    },
    SetRules {
        rules: RuleSet,
        reply: oneshot::Sender<Result<(), BpfError>>,
    },
    Snapshot {
        reply: oneshot::Sender<Result<Snapshot, BpfError>>,
    },
    SetEdge {
        plan: EdgeTargets,
        reply: oneshot::Sender<Result<EdgeAttached, BpfError>>,
    },
    /// Ends the task, whatever other handles still exist.
    Shutdown,
}

/// How a start went, for the log.
#[derive(Debug)]
pub enum Started {
    /// The pinned generation of this build was adopted: nothing was detached.
    Adopted { generation: String },
    /// A new generation was attached, then the old ones removed.
    Installed {
        generation: String,
        carried_from: Option<String>,
        removed: Vec<String>,
    },
}

impl Started {
    /// The generation in force.
    pub fn generation(&self) -> &str {
        match self {
            Started::Adopted { generation } | Started::Installed { generation, .. } => generation,
        }
    }
}

/// What the enforcer starts with.
pub struct StartSettings<'a> {
    pub pins: &'a PinRoot,
    pub mode: Mode,
    pub rules: &'a RuleSet,
    pub cgroup: &'a CgroupDir,
    /// The cgroups to allow, when known at start; `None` keeps what the
    /// pinned state had (Kubernetes mode, before the first list).
    pub allowed: Option<&'a CgroupAccess>,
    /// Whether the node edge guard runs.
    pub node_guard: bool,
    /// Whether the BPF LSM program refuses packet sockets.
    pub refuse_packet_sockets: bool,
}

impl Enforcer {
    /// Adopts the pinned generation of this build, or installs a new one
    /// (with the loader made `ahead`) before removing the old, so the
    /// subtree is never unenforced.
    pub fn start(
        settings: &StartSettings<'_>,
        ahead: LoaderAhead,
    ) -> Result<(Enforcer, Started), EnforcerError> {
        let pins = settings.pins;
        let key = GenerationKey {
            object_hash: loader::generation_fingerprint(settings.refuse_packet_sockets),
            mode: settings.mode,
            cgroup_id: settings.cgroup.id(),
        };
        let (mut enforcer, started) = match pins::plan(&key, &pins.generations()?) {
            StartPlan::Adopt { current, stale } => {
                let mut enforcer = Enforcer::open(pins, &current)?;
                // What this start enforces; an installed generation is filled
                // before it is attached.
                enforcer.rules.sync(settings.rules)?;
                if let Some(allowed) = settings.allowed {
                    enforcer.allowed.sync(allowed)?;
                }
                // Ours is attached: the others can go.
                for generation in &stale {
                    pins.remove_generation(generation)?;
                }
                (
                    enforcer,
                    Started::Adopted {
                        generation: current,
                    },
                )
            }
            StartPlan::Install { carry_from, stale } => {
                let generation = pins.new_generation_name(&key);
                let installed =
                    Enforcer::install(settings, ahead, &generation, carry_from.as_deref());
                let enforcer = match installed {
                    Ok(enforcer) => enforcer,
                    Err(err) => {
                        // A refused start leaves nothing behind: a daemon in a
                        // crash loop must not pile up kernel memory. The old
                        // generation, if any, stays attached.
                        if let Err(cleanup) = pins.remove_generation(&generation) {
                            tracing::warn!(%generation, "cannot remove the failed generation: {cleanup}");
                        }
                        // The root too, when nothing else is in it.
                        let _ = std::fs::remove_dir(pins.path());
                        return Err(err);
                    }
                };
                for old in &stale {
                    pins.remove_generation(old)?;
                }
                let started = Started::Installed {
                    generation,
                    carried_from: carry_from,
                    removed: stale,
                };
                (enforcer, started)
            }
        };
        let generation = started.generation();
        if settings.node_guard {
            let prog_pin = |program: &str| pins.program_pin(generation, program);
            enforcer.edge = Some(EdgePrograms::from_pins(&prog_pin, &pins.tc_link_dir())?);
        } else {
            // Turned off: what an earlier run attached goes.
            let tc_links = pins.tc_link_dir();
            edge::detach_all(&tc_links).map_err(|source| PinError::Io {
                action: "removing the node edge guard's links",
                path: tc_links,
                source,
            })?;
        }
        Ok((enforcer, started))
    }

    /// Opens the pinned maps of a complete generation.
    fn open(pins: &PinRoot, generation: &str) -> Result<Enforcer, EnforcerError> {
        let pin = |map: &str| pins.map_pin(generation, map);
        Ok(Enforcer {
            rules: DestRulesMap::from_pins(&pin)?,
            allowed: CgroupAllowMap::from_pin(&pin(names::ALLOWED_CGROUPS))?,
            counters: CountersMap::from_pin(&pin(names::BLOCK_COUNTERS))?,
            dropped: DroppedEvents::from_pin(&pin(names::EVENTS_DROPPED))?,
            events: Some(EventRing::from_pin(&pin(names::EVENTS))?),
            interfaces: InterfaceAllowMap::from_pin(&pin(names::ALLOWED_INTERFACES))?,
            edge: None,
        })
    }

    /// Loads a new generation, fills its maps (from `carry_from`'s where
    /// there is one), and only then attaches it: during an upgrade both
    /// generations are attached for a moment, and their verdicts are AND-ed.
    fn install(
        settings: &StartSettings<'_>,
        ahead: LoaderAhead,
        generation: &str,
        carry_from: Option<&str>,
    ) -> Result<Enforcer, EnforcerError> {
        let pins = settings.pins;
        // Before any map exists, so a refusal creates nothing.
        if let memlock::Memlock::Enough { need, limit } = loader::ensure_memlock()? {
            tracing::info!(
                need = %memlock::human(need),
                limit = %memlock::human(limit),
                "this kernel charges BPF maps to RLIMIT_MEMLOCK; the limit is enough"
            );
        }
        pins.create_generation_dir(generation)?;
        let map_pin = |map: &str| pins.map_pin(generation, map);
        let mut ebpf = loader::create_maps(
            ahead.take(),
            settings.mode,
            settings.cgroup.id(),
            Some(&map_pin),
        )?;
        let mut enforcer = Enforcer {
            rules: DestRulesMap::take(&mut ebpf)?,
            allowed: CgroupAllowMap::take(&mut ebpf)?,
            counters: CountersMap::take(&mut ebpf)?,
            dropped: DroppedEvents::take(&mut ebpf)?,
            events: Some(EventRing::take(&mut ebpf)?),
            interfaces: InterfaceAllowMap::take(&mut ebpf)?,
            edge: None,
        };
        // The maps are filled while the verifier checks the programs:
        // neither needs the other, and nothing is attached before both end.
        std::thread::scope(|scope| {
            let filling = scope.spawn(|| enforcer.fill(settings, carry_from));
            let verified = loader::load_programs(&mut ebpf, settings.refuse_packet_sockets);
            let filled = filling
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            verified.map_err(EnforcerError::from).and(filled)
        })?;
        // Before the links: a generation with all its links is complete.
        let program_pin = |program: &str| pins.program_pin(generation, program);
        loader::pin_node_programs(&mut ebpf, &program_pin)?;
        let link_pin = |program: &str| pins.link_pin(generation, program);
        if settings.refuse_packet_sockets {
            loader::attach_lsm_pinned(&mut ebpf, &link_pin)?;
        }
        loader::attach_pinned(&mut ebpf, settings.cgroup, &link_pin)?;
        Ok(enforcer)
    }

    /// Fills a new generation's maps: the rules, the allow list and
    /// counters of `carry_from` if any, then the allow list of this start.
    fn fill(
        &mut self,
        settings: &StartSettings<'_>,
        carry_from: Option<&str>,
    ) -> Result<(), EnforcerError> {
        self.rules.sync(settings.rules)?;
        if let Some(old) = carry_from {
            let old = Enforcer::open(settings.pins, old)?;
            self.allowed.sync(&old.allowed.entries()?)?;
            self.counters.add(&old.counters.read()?)?;
        }
        if let Some(allowed) = settings.allowed {
            self.allowed.sync(allowed)?;
        }
        Ok(())
    }

    /// The ring buffer, for the one task that reads events.
    pub fn take_events(&mut self) -> Option<EventRing> {
        self.events.take()
    }

    fn snapshot(&self) -> Result<Snapshot, BpfError> {
        Ok(Snapshot {
            allowed: self.allowed.entries()?,
            counters: self.counters.read()?,
            events_dropped: self.dropped.total()?,
        })
    }

    /// Brings the node edge guard to `plan`: the allowed interfaces first,
    /// so an uplink attached next never refuses an allowed pod.
    fn set_edge(&mut self, plan: &EdgeTargets) -> Result<EdgeAttached, BpfError> {
        let Some(programs) = &mut self.edge else {
            return Ok(EdgeAttached::default());
        };
        if let Some(allowed) = &plan.allowed {
            self.interfaces.sync(allowed)?;
        }
        Ok(programs.apply(plan))
    }

    /// Which tc interface the node edge guard uses, if it runs.
    pub fn edge_hook(&self) -> Option<edge::TcHook> {
        self.edge.as_ref().map(EdgePrograms::hook)
    }

    /// The owner task, to spawn, and the handle to ask it with. The task
    /// ends on [`EnforcerHandle::shutdown`] or when every handle is dropped;
    /// the pinned programs stay attached.
    pub fn into_task(self) -> (EnforcerHandle, impl Future<Output = ()> + Send + 'static) {
        let (sender, receiver) = mpsc::channel(64);
        (EnforcerHandle(sender), self.serve(receiver))
    }

    async fn serve(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(request) = requests.recv().await {
            // A closed reply channel means the asker gave up; nothing to do.
            match request {
                Request::SetAllowed { entries, reply } => {
                    let _ = reply.send(self.allowed.sync(&entries));
                }
                Request::SetRules { rules, reply } => {
                    let _ = reply.send(self.rules.sync(&rules));
                }
                Request::Snapshot { reply } => {
                    let _ = reply.send(self.snapshot());
                }
                Request::SetEdge { plan, reply } => {
                    let _ = reply.send(self.set_edge(&plan));
                }
                Request::Shutdown => return,
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

    /// Makes the allow map hold exactly `entries`.
    pub async fn set_allowed(&self, entries: CgroupAccess) -> Result<(), EnforcerError> {
        self.ask(|reply| Request::SetAllowed { entries, reply })
            .await
    }

    /// Makes the rule trie hold exactly `rules`.
    pub async fn set_rules(&self, rules: RuleSet) -> Result<(), EnforcerError> {
        self.ask(|reply| Request::SetRules { rules, reply }).await
    }

    /// Ends the owner task (the pinned programs stay attached).
    pub async fn shutdown(&self) {
        // A closed channel means the task has ended already.
        let _ = self.0.send(Request::Shutdown).await;
    }

    /// Brings the node edge guard to `plan`; says what is attached.
    pub async fn set_edge(&self, plan: EdgeTargets) -> Result<EdgeAttached, EnforcerError> {
        self.ask(|reply| Request::SetEdge { plan, reply }).await
    }

    /// The allow list, counters and dropped events, as the maps hold them.
    pub async fn snapshot(&self) -> Result<Snapshot, EnforcerError> {
        self.ask(|reply| Request::Snapshot { reply }).await
    }
}
