//! Network namespaces: a client side with no route out, and a server side
//! that owns the metadata addresses, joined by one veth pair.

use std::{fs::File, net::IpAddr, path::PathBuf};

use crate::{Result, SandboxError, run, unique_name};

/// Addresses inside the sandbox. The ordinary ones come from the
/// benchmarking range (198.18.0.0/15) and a private IPv6 prefix, so nothing
/// here can collide with a real network.
pub mod addrs {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 1);
    pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd99, 1, 0, 0, 0, 0, 0, 2);
    /// The instance metadata address, served by our own fake server.
    pub const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    /// AWS's IPv6 metadata endpoint.
    pub const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    /// EKS Pod Identity: a metadata-range address that must stay reachable.
    pub const POD_IDENTITY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);

    /// The server side's host addresses (the client routes each over the veth).
    pub const SERVER_HOSTS: [IpAddr; 3] = [
        IpAddr::V4(METADATA_V4),
        IpAddr::V4(POD_IDENTITY_V4),
        IpAddr::V6(METADATA_V6),
    ];

    /// Every address the server side owns.
    pub fn server_addrs() -> Vec<IpAddr> {
        let mut all = vec![IpAddr::V4(SERVER_V4), IpAddr::V6(SERVER_V6)];
        all.extend(SERVER_HOSTS);
        all
    }

    /// `::ffff:169.254.169.254`, for IPv4-mapped IPv6 sockets.
    pub fn metadata_v4_mapped() -> IpAddr {
        IpAddr::V6(METADATA_V4.to_ipv6_mapped())
    }
}

/// One named network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Result<Netns> {
        let name = unique_name(tag);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Opens the namespace, for `setns`.
    pub fn open(&self) -> Result<File> {
        let path = self.path();
        File::open(&path).map_err(|source| SandboxError::Io {
            what: "opening network namespace",
            path,
            source,
        })
    }

    /// Runs `ip -n <ns> ARGS`.
    /// Runs `work` on a thread inside this namespace: sockets it makes
    /// (a listener, a client) belong to the namespace.
    pub fn run_inside<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.open()?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: moves only this short-lived thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(SandboxError::Process(format!(
                            "setns into {}: {}",
                            self.name,
                            std::io::Error::last_os_error()
                        )));
                    }
                    Ok(work())
                })
                .join()
                .map_err(|_| SandboxError::Process(format!("a thread in {} panicked", self.name)))?
        })
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace (`ip netns exec`, which also
    /// remounts /sys: fine for tools like `sysctl` and `nft`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<String> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth end inside it.
        if let Err(err) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {err}");
        }
    }
}

/// A client namespace and a server namespace joined by a veth pair.
pub struct Sandbox {
    pub client: Netns,
    pub server: Netns,
}

const CLIENT_IF: &str = "ig-c";
const SERVER_IF: &str = "ig-s";

impl Sandbox {
    pub fn new() -> Result<Sandbox> {
        let client = Netns::create("c")?;
        let server = Netns::create("s")?;
        // Created inside the client namespace, so no name is ever taken in
        // the host's namespace.
        client.ip(&[
            "link",
            "add",
            CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            SERVER_IF,
            "netns",
            server.name(),
        ])?;
        let client_v4 = format!("{}/24", addrs::CLIENT_V4);
        let client_v6 = format!("{}/64", addrs::CLIENT_V6);
        client.ip(&["addr", "add", &client_v4, "dev", CLIENT_IF])?;
        client.ip(&["addr", "add", &client_v6, "dev", CLIENT_IF, "nodad"])?;
        client.ip(&["link", "set", CLIENT_IF, "up"])?;

        let server_v4 = format!("{}/24", addrs::SERVER_V4);
        let server_v6 = format!("{}/64", addrs::SERVER_V6);
        server.ip(&["addr", "add", &server_v4, "dev", SERVER_IF])?;
        server.ip(&["addr", "add", &server_v6, "dev", SERVER_IF, "nodad"])?;
        for host in addrs::SERVER_HOSTS {
            let (family, prefix) = match host {
                IpAddr::V4(a) => ("-4", format!("{a}/32")),
                IpAddr::V6(a) => ("-6", format!("{a}/128")),
            };
            let mut add = vec![family, "addr", "add", &prefix, "dev", SERVER_IF];
            if host.is_ipv6() {
                add.push("nodad");
            }
            server.ip(&add)?;
            // The client reaches these over the veth only; it has no default route.
            client.ip(&[family, "route", "add", &prefix, "dev", CLIENT_IF])?;
        }
        server.ip(&["link", "set", SERVER_IF, "up"])?;
        // Let any group use unprivileged ICMP echo sockets, as in containers.
        client.sysctl("net.ipv4.ping_group_range", "0 2147483647")?;
        Ok(Sandbox { client, server })
    }
}
