//! The machine the daemon runs on: its cgroup v2 hierarchy and who runs in
//! it, the checks made before anything is loaded (capabilities, mounts,
//! kernel), and the memlock limit older kernels charge maps to.

pub mod cgroup;
pub mod identity;
pub mod kernel;
pub mod memlock;
pub mod netlink;
pub mod preflight;
pub mod privilege;
