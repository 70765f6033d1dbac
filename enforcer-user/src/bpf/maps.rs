//! Typed access to the maps, whether just loaded or opened from their pins.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
        RingBuf, lpm_trie::Key,
    },
};
use enforcer_common::{
    ACCESS_ALLOW, ACCESS_AUDIT, AddrBytes, AllowEntry, BUCKET_WORDS, BlockCounters, BlockEvent,
    DestRule, names,
};

use super::BpfError;
use crate::config::rules::RuleSet;

fn take_map<M: TryFrom<Map>>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, BpfError> {
    let missing = || BpfError::Missing { kind: "map", name };
    ebpf.take_map(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|_| missing())
}

/// Opens the map pinned at `path`, which must be of the type of `name`.
fn open_pinned<M: TryFrom<Map>>(path: &Path, name: &'static str) -> Result<M, BpfError> {
    let data = MapData::from_pin(path).map_err(map_err(name))?;
    Map::from_map_data(data)
        .map_err(map_err(name))?
        .try_into()
        .map_err(|_| BpfError::Missing { kind: "map", name })
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> BpfError {
    move |source| BpfError::Map { name, source }
}

/// The destination rules: the trie, and the pre-filter of buckets that
/// lets ordinary destinations skip it.
pub struct DestRulesMap {
    trie: LpmTrie<MapData, AddrBytes, DestRule>,
    buckets: Array<MapData, u64>,
    /// Just created and not written yet: the trie is empty and every
    /// bucket clear, so the first sync reads neither back (2,048 bucket
    /// reads and a walk of the trie a start).
    fresh: bool,
}

impl DestRulesMap {
    /// The maps of an object just loaded (a new generation's pins are
    /// new: its name is unique), so empty.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        Ok(DestRulesMap {
            trie: take_map(ebpf, names::DEST_RULES)?,
            buckets: take_map(ebpf, names::DEST_BUCKETS)?,
            fresh: true,
        })
    }

    /// Opens the pinned maps; `pin` gives each map's pin path.
    pub fn from_pins(pin: &dyn Fn(&str) -> PathBuf) -> Result<Self, BpfError> {
        Ok(DestRulesMap {
            trie: open_pinned(&pin(names::DEST_RULES), names::DEST_RULES)?,
            buckets: open_pinned(&pin(names::DEST_BUCKETS), names::DEST_BUCKETS)?,
            fresh: false,
        })
    }

    /// Every entry: (prefix length, address, rule value).
    pub fn entries(&self) -> Result<Vec<(u32, AddrBytes, DestRule)>, BpfError> {
        self.trie
            .iter()
            .map(|entry| entry.map(|(key, value)| (key.prefix_len(), key.data(), value)))
            .collect::<Result<_, _>>()
            .map_err(map_err(names::DEST_RULES))
    }

    fn write_buckets(&mut self, words: &[u64], present: &[u64]) -> Result<(), BpfError> {
        let err = map_err(names::DEST_BUCKETS);
        for (index, (&word, &now)) in (0..BUCKET_WORDS).zip(words.iter().zip(present)) {
            if word != now {
                self.buckets.set(index, word, 0).map_err(&err)?;
            }
        }
        Ok(())
    }

    /// Makes the maps hold exactly `rules`. Buckets are opened before the
    /// rules that need them go in, and closed after the rules that needed
    /// them are gone; new and changed trie entries are written before stale
    /// ones go. No moment has fewer rules in force than either set.
    pub fn sync(&mut self, rules: &RuleSet) -> Result<(), BpfError> {
        let err = map_err(names::DEST_RULES);
        let fresh = std::mem::replace(&mut self.fresh, false);
        let present_words: Vec<u64> = if fresh {
            vec![0; BUCKET_WORDS as usize]
        } else {
            (0..BUCKET_WORDS)
                .map(|i| self.buckets.get(&i, 0))
                .collect::<Result<_, _>>()
                .map_err(map_err(names::DEST_BUCKETS))?
        };
        let words = rules.bucket_words();
        let union: Vec<u64> = words
            .iter()
            .zip(&present_words)
            .map(|(a, b)| a | b)
            .collect();
        self.write_buckets(&union, &present_words)?;
        let wanted: BTreeMap<(u32, AddrBytes), DestRule> = rules
            .rules()
            .iter()
            .map(|r| (r.kernel_key(), r.kernel_value()))
            .collect();
        for (&(len, addr), value) in &wanted {
            self.trie
                .insert(&Key::new(len, addr), value, 0)
                .map_err(&err)?;
        }
        if !fresh {
            let present: Vec<Key<AddrBytes>> =
                self.trie.keys().collect::<Result<_, _>>().map_err(&err)?;
            for key in present {
                if !wanted.contains_key(&(key.prefix_len(), key.data())) {
                    self.trie.remove(&key).map_err(&err)?;
                }
            }
        }
        self.write_buckets(&words, &union)
    }
}

/// What a listed cgroup's subtree may do with a denied destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Reaches it, unreported.
    Allow,
    /// Reaches it, reported as audited (a namespace in audit mode).
    Audit,
}

impl Access {
    /// As `explain` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Access::Allow => "allow",
            Access::Audit => "audit",
        }
    }

    fn code(self) -> u32 {
        match self {
            Access::Allow => ACCESS_ALLOW,
            Access::Audit => ACCESS_AUDIT,
        }
    }

    /// `None` for a code no build writes; the kernel enforces on it.
    fn from_code(code: u32) -> Option<Access> {
        match code {
            ACCESS_ALLOW => Some(Access::Allow),
            ACCESS_AUDIT => Some(Access::Audit),
            _ => None,
        }
    }
}

/// The listed cgroups, by id.
pub type CgroupAccess = BTreeMap<u64, Access>;
/// The allowed pods' interfaces, by index (the node edge guard).
pub type InterfaceAccess = BTreeMap<u32, Access>;

/// What a listed key (a cgroup id, an interface index) may do: allowed, or
/// audited. `K` is the map's key type.
pub struct AllowMap<K: aya::Pod + Ord> {
    map: HashMap<MapData, K, AllowEntry>,
    name: &'static str,
}

/// The listed cgroups.
pub type CgroupAllowMap = AllowMap<u64>;
/// The allowed pods' interfaces.
pub type InterfaceAllowMap = AllowMap<u32>;

impl CgroupAllowMap {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        AllowMap::take_named(ebpf, names::ALLOWED_CGROUPS)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        AllowMap::open_named(path, names::ALLOWED_CGROUPS)
    }
}

impl InterfaceAllowMap {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        AllowMap::take_named(ebpf, names::ALLOWED_INTERFACES)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        AllowMap::open_named(path, names::ALLOWED_INTERFACES)
    }
}

impl<K: aya::Pod + Ord> AllowMap<K> {
    fn take_named(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, BpfError> {
        Ok(AllowMap {
            map: take_map(ebpf, name)?,
            name,
        })
    }

    fn open_named(path: &Path, name: &'static str) -> Result<Self, BpfError> {
        Ok(AllowMap {
            map: open_pinned(path, name)?,
            name,
        })
    }

    /// The entries the map holds; one with a code no build writes is left
    /// out, so [`AllowMap::sync`] rewrites it.
    pub fn entries(&self) -> Result<BTreeMap<K, Access>, BpfError> {
        let mut entries = BTreeMap::new();
        for item in &self.map {
            let (key, entry) = item.map_err(map_err(self.name))?;
            if let Some(access) = Access::from_code(entry.access) {
                entries.insert(key, access);
            }
        }
        Ok(entries)
    }

    /// Makes the map hold exactly `wanted`, by difference: entries that stay
    /// are never removed, not even for an instant, and a changed one is
    /// overwritten in place.
    pub fn sync(&mut self, wanted: &BTreeMap<K, Access>) -> Result<(), BpfError> {
        let err = map_err(self.name);
        let present = self.entries()?;
        for (key, &access) in wanted {
            if present.get(key) != Some(&access) {
                let entry = AllowEntry {
                    access: access.code(),
                    ..AllowEntry::default()
                };
                self.map.insert(key, entry, 0).map_err(&err)?;
            }
        }
        for key in present.keys().filter(|key| !wanted.contains_key(key)) {
            self.map.remove(key).map_err(&err)?;
        }
        Ok(())
    }
}

/// Per-cgroup counts of refused (or audited) attempts.
pub struct CountersMap(PerCpuHashMap<MapData, u64, BlockCounters>);

impl CountersMap {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        take_map(ebpf, names::BLOCK_COUNTERS).map(Self)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        open_pinned(path, names::BLOCK_COUNTERS).map(Self)
    }

    /// Adds `totals` to the counters (on CPU 0), for carrying counts over
    /// from a previous generation.
    pub fn add(&mut self, totals: &BTreeMap<u64, BlockCounters>) -> Result<(), BpfError> {
        let err = map_err(names::BLOCK_COUNTERS);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(MapError::IoError(e)))?;
        let present = self.read()?;
        for (id, carried) in totals {
            let mut sum = present.get(id).copied().unwrap_or_default();
            sum.connect += carried.connect;
            sum.sendmsg += carried.sendmsg;
            sum.egress += carried.egress;
            let mut per_cpu = vec![BlockCounters::default(); cpus];
            per_cpu[0] = sum;
            let values = PerCpuValues::try_from(per_cpu).map_err(|e| err(MapError::IoError(e)))?;
            self.0.insert(id, values, 0).map_err(&err)?;
        }
        Ok(())
    }

    /// The counters of every cgroup, summed over CPUs.
    pub fn read(&self) -> Result<BTreeMap<u64, BlockCounters>, BpfError> {
        let mut totals = BTreeMap::new();
        for entry in &self.0 {
            let (id, per_cpu) = entry.map_err(map_err(names::BLOCK_COUNTERS))?;
            let total: &mut BlockCounters = totals.entry(id).or_default();
            for c in per_cpu.iter() {
                total.connect += c.connect;
                total.sendmsg += c.sendmsg;
                total.egress += c.egress;
            }
        }
        Ok(totals)
    }
}

/// The ring buffer the programs send [`BlockEvent`]s through.
pub struct EventRing(RingBuf<MapData>);

impl EventRing {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        take_map(ebpf, names::EVENTS).map(Self)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        open_pinned(path, names::EVENTS).map(Self)
    }

    /// The events waiting in the ring, oldest first (none past `limit`).
    pub fn drain(&mut self, limit: usize) -> Vec<BlockEvent> {
        let mut events = Vec::new();
        while events.len() < limit {
            let Some(item) = self.0.next() else {
                break;
            };
            if item.len() >= std::mem::size_of::<BlockEvent>() {
                // SAFETY: the programs write whole `BlockEvent`s; the read
                // is unaligned-safe.
                events
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<BlockEvent>()) });
            }
        }
        events
    }
}

impl std::os::fd::AsRawFd for EventRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// How many events the programs could not send (rate limit, full ring).
pub struct DroppedEvents(PerCpuArray<MapData, u64>);

impl DroppedEvents {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        take_map(ebpf, names::EVENTS_DROPPED).map(Self)
    }

    pub fn from_pin(path: &Path) -> Result<Self, BpfError> {
        open_pinned(path, names::EVENTS_DROPPED).map(Self)
    }

    pub fn total(&self) -> Result<u64, BpfError> {
        let per_cpu = self.0.get(&0, 0).map_err(map_err(names::EVENTS_DROPPED))?;
        Ok(per_cpu.iter().sum())
    }
}
