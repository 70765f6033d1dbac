//! Wakes the reconciler when a directory appears in the pod cgroup subtree
//! (inotify on the base and its QoS-class directories), so an allowed pod
//! whose cgroup comes after its pod event is listed at once rather than at
//! the next poll.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    os::fd::{AsFd as _, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::{Interest, unix::AsyncFd};

use crate::k8s::layout::PodLayout;

#[derive(Debug, thiserror::Error)]
#[error("cannot watch the pod cgroup subtree {path} for new pods: {source}")]
pub struct ArrivalsError {
    path: PathBuf,
    source: std::io::Error,
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Directories created under the pod subtree, as they come.
pub struct CgroupArrivals {
    inotify: AsyncFd<InotifyFd>,
    base: PathBuf,
    watched: BTreeMap<WatchDescriptor, PathBuf>,
}

/// The directories under the base that hold pods rather than being pods:
/// `burstable`, `kubepods-besteffort.slice`, ...
fn holds_pods(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    !(name.starts_with("pod") || name.contains("-pod"))
}

const CREATED: AddWatchFlags = AddWatchFlags::IN_CREATE.union(AddWatchFlags::IN_MOVED_TO);

impl CgroupArrivals {
    pub fn watch(layout: &PodLayout) -> Result<CgroupArrivals, ArrivalsError> {
        let error = |source: std::io::Error| ArrivalsError {
            path: layout.base.clone(),
            source,
        };
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| error(e.into()))?;
        // SAFETY: the Inotify owns its descriptor until the AsyncFd drops it.
        let inotify =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
                .map_err(|e| error(e.into_parts().1))?;
        let mut arrivals = CgroupArrivals {
            inotify,
            base: layout.base.clone(),
            watched: BTreeMap::new(),
        };
        arrivals.add(&layout.base).map_err(error)?;
        arrivals.watch_class_dirs().map_err(error)?;
        Ok(arrivals)
    }

    /// Watches every class directory under the base (again: a watch that
    /// exists is kept).
    fn watch_class_dirs(&mut self) -> std::io::Result<()> {
        for child in std::fs::read_dir(&self.base)?.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) && holds_pods(&child.file_name()) {
                // A class directory that goes away meanwhile has no pods to wait for.
                let _ = self.add(&child.path());
            }
        }
        Ok(())
    }

    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        let flags = CREATED | AddWatchFlags::IN_ONLYDIR;
        let descriptor = self.inotify.get_ref().0.add_watch(dir, flags)?;
        self.watched.insert(descriptor, dir.to_path_buf());
        Ok(())
    }

    /// Waits until at least one directory was created; class directories
    /// created under the base are watched in turn. Cancel-safe.
    pub async fn next(&mut self) -> std::io::Result<()> {
        loop {
            let mut ready = self.inotify.readable().await?;
            let events = match ready.get_inner().0.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => {
                    ready.clear_ready();
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            drop(ready);
            let mut created = false;
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    // Events were lost, a class directory's among them
                    // perhaps: watch them all again, and look again.
                    self.watch_class_dirs()?;
                    created = true;
                    continue;
                }
                if !event.mask.contains(AddWatchFlags::IN_ISDIR) {
                    continue;
                }
                created = true;
                let (Some(parent), Some(name)) = (self.watched.get(&event.wd), event.name) else {
                    continue;
                };
                if *parent == self.base && holds_pods(&name) {
                    let dir = parent.join(&name);
                    // Gone again already: nothing to wait for in it.
                    let _ = self.add(&dir);
                }
            }
            if created {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_directories_are_told_from_pods() {
        for (name, holds) in [
            ("burstable", true),
            ("besteffort", true),
            ("kubepods-burstable.slice", true),
            ("kubelet-kubepods-besteffort.slice", true),
            ("pod1234-abcd", false),
            ("kubepods-pod1234_abcd.slice", false),
            ("kubepods-burstable-pod1234_abcd.slice", false),
        ] {
            assert_eq!(holds_pods(OsStr::new(name)), holds, "{name}");
        }
    }

    async fn wait(arrivals: &mut CgroupArrivals) {
        tokio::time::timeout(std::time::Duration::from_secs(5), arrivals.next())
            .await
            .expect("woken")
            .expect("inotify");
    }

    #[tokio::test]
    async fn a_new_pod_directory_wakes_the_watch() {
        struct Removed(PathBuf);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let base = std::env::temp_dir().join(format!("imds-guard-arrivals-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let _removed = Removed(base.clone());
        std::fs::create_dir_all(base.join("burstable")).expect("mkdir");
        let layout = PodLayout::at(base.clone());
        let mut arrivals = CgroupArrivals::watch(&layout).expect("watch");
        std::fs::create_dir(base.join("burstable/pod-1")).expect("mkdir");
        wait(&mut arrivals).await;
        // A class directory made later is watched too.
        std::fs::create_dir(base.join("besteffort")).expect("mkdir");
        wait(&mut arrivals).await;
        std::fs::create_dir(base.join("besteffort/pod-2")).expect("mkdir");
        wait(&mut arrivals).await;
    }
}
