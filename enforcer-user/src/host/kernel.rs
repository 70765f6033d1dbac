//! The running kernel: its release, its version, and how many CPUs it may
//! bring online (per-CPU maps hold a value for each).

/// This kernel's release string (`uname -r`); empty if it cannot be read.
pub fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The (major, minor) of a kernel release string such as `6.18.44-fc-v669`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The CPUs the kernel may bring online (1 if that cannot be read).
pub fn possible_cpus() -> u64 {
    aya::util::nr_cpus().map_or(1, |n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(version("5.15.0"), Some((5, 15)));
        assert_eq!(version("garbage"), None);
    }
}
