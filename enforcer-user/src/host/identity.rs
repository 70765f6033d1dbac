//! Who runs in a cgroup, as far as its path tells: the pod UID and
//! container ID that the kubelet and container runtimes write into cgroup
//! names. Reports and `imds-guard status` name workloads with it in every
//! mode, so it belongs to the host, not to Kubernetes mode.

use std::path::Path;

/// What a cgroup path says about who runs in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The pod UID, in the API's spelling (with dashes).
    pub pod_uid: String,
    /// The container ID, when the path reaches a container's cgroup.
    pub container_id: Option<String>,
}

/// Reads the pod UID and container ID out of a cgroup path, for any driver
/// and runtime (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `docker-<id>.scope`, or a bare ID under cgroupfs).
pub fn identify(path: &Path) -> Option<CgroupIdentity> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let (index, uid) = parts.iter().enumerate().rev().find_map(|(i, part)| {
        let name = part.trim_end_matches(".slice");
        let at = name.rfind("pod")?;
        let candidate = &name[at + 3..];
        // A UID is 36 characters of hex digits and separators.
        let looks_like_uid = candidate.len() == 36
            && candidate
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
        looks_like_uid.then(|| (i, candidate.replace('_', "-")))
    })?;
    let container_id = parts.get(index + 1).map(|leaf| {
        let leaf = leaf.trim_end_matches(".scope");
        ["cri-containerd-", "crio-", "docker-", "cri-o-"]
            .iter()
            .find_map(|prefix| leaf.strip_prefix(prefix))
            .unwrap_or(leaf)
            .to_owned()
    });
    Some(CgroupIdentity {
        pod_uid: uid,
        container_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2a8e-3b7d-4e2f-9a1b-0c4d5e6f7a8b";
    const UID_: &str = "6f1c2a8e_3b7d_4e2f_9a1b_0c4d5e6f7a8b";

    #[test]
    fn identifies_pods_and_containers_from_paths() {
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-4a5b6c.scope"
                ),
                Some("4a5b6c"),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-7d8e9f.scope"),
                Some("7d8e9f"),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-0a1b2c.scope"
                ),
                Some("0a1b2c"),
            ),
            (
                format!("/kubepods/burstable/pod{UID}/0a1b2c3d"),
                Some("0a1b2c3d"),
            ),
            (
                format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"),
                None,
            ),
        ];
        for (path, container) in cases {
            assert_eq!(
                identify(Path::new(&path)),
                Some(CgroupIdentity {
                    pod_uid: UID.to_owned(),
                    container_id: container.map(str::to_owned),
                }),
                "{path}"
            );
        }
        assert_eq!(identify(Path::new("/system.slice/kubelet.service")), None);
        assert_eq!(
            identify(Path::new("/kubepods.slice/kubepods-burstable.slice")),
            None
        );
    }
}
