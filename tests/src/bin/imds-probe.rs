//! `imds-probe`: the sandbox's clients and its fake servers.
//!
//! Client actions make one attempt and print one line,
//! `outcome=<reached|refused|timeout|error> [errno=E] elapsed_us=N [more]`.
//! They refuse to run in the host's network namespace: their targets are
//! metadata addresses, which must never be reached on the real network.
//!
//! `packet-raw` and `packet-dgram` send a UDP datagram built by hand
//! through an `AF_PACKET` socket (with and without the Ethernet header) on
//! `--dev` to `--gateway-mac` (`--qdisc-bypass`: skipping the qdisc); `vxlan` sends it, wrapped in a VXLAN header
//! and an inner Ethernet frame, as a plain UDP datagram to a VTEP
//! (`--vtep`), optionally with a spoofed inner source. All three wait for
//! the echo on an ordinary UDP socket bound to the source they wrote.
//!
//! `serve --port P... --udp-addr A...` echoes TCP lines on every address of
//! its namespace and UDP datagrams on the given ones, and prints `ready`
//! once bound.
//!
//! `mkdir [--mounts-under PREFIX] [DIR...]` tries to make a directory in
//! each DIR and in every mount point below PREFIX (it runs inside
//! containers, to see what they may write), removes what it made, and
//! prints `dir=D outcome=<written|refused> [errno=E]` for each.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

use imds_guard_tests::{
    frames::{self, Fragment},
    hostns::in_host_netns,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const PAYLOAD: &[u8] = b"ping\n";

/// The result of one attempt.
enum Outcome {
    Reached,
    Refused(std::io::Error),
    Timeout,
    Error(String),
}

impl Outcome {
    fn from_io(err: std::io::Error) -> Outcome {
        match err.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::Timeout,
            _ if err.raw_os_error().is_some() => Outcome::Refused(err),
            _ => Outcome::Error(err.to_string()),
        }
    }

    fn render(&self) -> String {
        match self {
            Outcome::Reached => "outcome=reached".to_owned(),
            Outcome::Timeout => "outcome=timeout".to_owned(),
            Outcome::Refused(err) => format!("outcome=refused errno={}", errno_name(err)),
            Outcome::Error(msg) => format!("outcome=error message={}", msg.replace(' ', "_")),
        }
    }
}

fn errno_name(err: &std::io::Error) -> String {
    err.raw_os_error().map_or_else(
        || "none".to_owned(),
        |code| format!("{:?}", nix::errno::Errno::from_raw(code)),
    )
}

struct Target {
    addr: SocketAddr,
    timeout: Duration,
    source: Option<IpAddr>,
    /// `AF_PACKET` sends: the interface, the next hop's and our own MAC.
    dev: Option<String>,
    gateway_mac: Option<[u8; 6]>,
    source_mac: Option<[u8; 6]>,
    /// `--qdisc-bypass`: `PACKET_QDISC_BYPASS`, which skips the device's
    /// qdisc and so tc egress.
    qdisc_bypass: bool,
    /// `vxlan`: the VTEP's UDP address, the inner frame's destination MAC
    /// (the VTEP device's) and the inner source (default: `--source`).
    vtep: Option<SocketAddr>,
    inner_mac: Option<[u8; 6]>,
    inner_source: Option<IpAddr>,
    /// `stream`: exchanges to make.
    count: u32,
    /// `loop`: pause between attempts, and how long to go on.
    interval: Duration,
    duration: Duration,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("mkdir") => make_dirs(&args[1..]),
        Some(action) => match parse_target(&args[1..]) {
            Ok(target) => client(action, &target),
            Err(msg) => usage(&msg),
        },
        None => usage("no action"),
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "imds-probe: {msg}\nusage: imds-probe serve --port P... --udp-addr A...\n       imds-probe \
         mkdir [--mounts-under PREFIX] [DIR...]\n       imds-probe \
         <tcp|udp|udp-connected|ping|raw-udp|fragments|packet-raw|packet-dgram|vxlan|stream|loop> \
         ADDR PORT [--timeout-ms N] [--source IP] [--count N] [--interval-ms N] [--duration-ms N] \
         [--dev DEV] [--gateway-mac MAC] [--source-mac MAC] [--qdisc-bypass] [--vtep IP:PORT] [--inner-mac MAC] \
         [--inner-source IP]"
    );
    ExitCode::from(2)
}

fn parse_target(args: &[String]) -> Result<Target, String> {
    let [addr, port, rest @ ..] = args else {
        return Err("expected ADDR PORT".to_owned());
    };
    let ip: IpAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port}"))?;
    let mut target = Target {
        addr: SocketAddr::new(ip, port),
        timeout: Duration::from_millis(1500),
        source: None,
        dev: None,
        gateway_mac: None,
        source_mac: None,
        qdisc_bypass: false,
        vtep: None,
        inner_mac: None,
        inner_source: None,
        count: 100,
        interval: Duration::from_millis(5),
        duration: Duration::from_secs(1),
    };
    let millis = |v: &str, flag: &str| {
        v.parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("bad {flag}"))
    };
    let mac = |v: &str, flag: &str| frames::parse_mac(v).ok_or(format!("bad {flag}"));
    let mut i = 0;
    while i < rest.len() {
        // The one option without a value.
        if rest[i] == "--qdisc-bypass" {
            target.qdisc_bypass = true;
            i += 1;
            continue;
        }
        let value = rest
            .get(i + 1)
            .ok_or(format!("{} needs a value", rest[i]))?;
        match rest[i].as_str() {
            "--timeout-ms" => target.timeout = millis(value, "--timeout-ms")?,
            "--interval-ms" => target.interval = millis(value, "--interval-ms")?,
            "--duration-ms" => target.duration = millis(value, "--duration-ms")?,
            "--source" => target.source = Some(value.parse().map_err(|_| "bad --source")?),
            "--count" => target.count = value.parse().map_err(|_| "bad --count")?,
            "--dev" => target.dev = Some(value.clone()),
            "--gateway-mac" => target.gateway_mac = Some(mac(value, "--gateway-mac")?),
            "--source-mac" => target.source_mac = Some(mac(value, "--source-mac")?),
            "--vtep" => target.vtep = Some(value.parse().map_err(|_| "bad --vtep")?),
            "--inner-mac" => target.inner_mac = Some(mac(value, "--inner-mac")?),
            "--inner-source" => {
                target.inner_source = Some(value.parse().map_err(|_| "bad --inner-source")?);
            }
            other => return Err(format!("unknown option {other}")),
        }
        i += 2;
    }
    Ok(target)
}

fn client(action: &str, target: &Target) -> ExitCode {
    if in_host_netns() {
        eprintln!("imds-probe: refusing to send from the host network namespace");
        return ExitCode::from(3);
    }
    match action {
        "stream" => return stream(target),
        "loop" => return attempt_loop(target, std::env::args().any(|a| a == "--count")),
        _ => {}
    }
    let started = Instant::now();
    let (outcome, extra) = match action {
        "tcp" => (tcp(target), String::new()),
        "udp" => (udp(target, false), String::new()),
        "udp-connected" => (udp(target, true), String::new()),
        "ping" => (ping(target), String::new()),
        "raw-udp" => raw_udp(target, false),
        "fragments" => raw_udp(target, true),
        "packet-raw" => (packet_send(target, libc::SOCK_RAW), String::new()),
        "packet-dgram" => (packet_send(target, libc::SOCK_DGRAM), String::new()),
        "vxlan" => (vxlan(target), String::new()),
        "packet-socket" => (open_socket(libc::AF_PACKET, libc::SOCK_RAW), String::new()),
        "xdp-socket" => (open_socket(libc::AF_XDP, libc::SOCK_RAW), String::new()),
        other => return usage(&format!("unknown action {other}")),
    };
    println!(
        "{} elapsed_us={}{extra}",
        outcome.render(),
        started.elapsed().as_micros()
    );
    ExitCode::SUCCESS
}

/// Only makes a socket (the target is not used): `reached` when the kernel
/// gave one.
fn open_socket(family: i32, kind: i32) -> Outcome {
    // SAFETY: a plain socket(2) call; the descriptor is closed at once.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Outcome::from_io(std::io::Error::last_os_error());
    }
    // SAFETY: ours, just made.
    unsafe { libc::close(fd) };
    Outcome::Reached
}

fn tcp(target: &Target) -> Outcome {
    match TcpStream::connect_timeout(&target.addr, target.timeout) {
        Ok(stream) => exchange(&stream, target.timeout),
        Err(err) => Outcome::from_io(err),
    }
}

/// Sends the payload on a connected stream and waits for its echo.
fn exchange(mut stream: &TcpStream, timeout: Duration) -> Outcome {
    if let Err(err) = stream.set_read_timeout(Some(timeout)) {
        return Outcome::Error(err.to_string());
    }
    if let Err(err) = stream.write_all(PAYLOAD) {
        return Outcome::from_io(err);
    }
    let mut echo = [0u8; PAYLOAD.len()];
    match stream.read_exact(&mut echo) {
        Ok(()) if echo == PAYLOAD => Outcome::Reached,
        Ok(()) => Outcome::Error("wrong echo".to_owned()),
        Err(err) => Outcome::from_io(err),
    }
}

fn unspecified_for(addr: &SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse(),
        SocketAddr::V6(_) => "[::]:0".parse(),
    }
    .unwrap_or_else(|_| unreachable!("literal addresses parse"))
}

fn udp(target: &Target, connected: bool) -> Outcome {
    let socket = match UdpSocket::bind(unspecified_for(&target.addr)) {
        Ok(s) => s,
        Err(err) => return Outcome::Error(err.to_string()),
    };
    let sent = if connected {
        socket
            .connect(target.addr)
            .and_then(|()| socket.send(PAYLOAD))
    } else {
        socket.send_to(PAYLOAD, target.addr)
    };
    if let Err(err) = sent {
        return Outcome::from_io(err);
    }
    await_datagram_echo(&socket, target.timeout)
}

fn await_datagram_echo(socket: &UdpSocket, timeout: Duration) -> Outcome {
    if let Err(err) = socket.set_read_timeout(Some(timeout)) {
        return Outcome::Error(err.to_string());
    }
    let mut buf = [0u8; 64];
    match socket.recv(&mut buf) {
        Ok(n) if buf[..n] == *PAYLOAD => Outcome::Reached,
        Ok(_) => Outcome::Error("wrong echo".to_owned()),
        Err(err) => Outcome::from_io(err),
    }
}

/// ICMP echo through an unprivileged ping socket.
fn ping(target: &Target) -> Outcome {
    let (domain, protocol, echo_request) = match target.addr {
        SocketAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8),
        SocketAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8),
    };
    let socket = match Socket::new(domain, Type::DGRAM, Some(protocol)) {
        Ok(s) => s,
        Err(err) => return Outcome::Error(err.to_string()),
    };
    // Type, code, checksum (the kernel fills it and the id), sequence 1, payload.
    let mut request = vec![echo_request, 0, 0, 0, 0, 0, 0, 1];
    request.extend_from_slice(PAYLOAD);
    if let Err(err) = socket.send_to(&request, &SockAddr::from(target.addr)) {
        return Outcome::from_io(err);
    }
    if let Err(err) = socket.set_read_timeout(Some(target.timeout)) {
        return Outcome::Error(err.to_string());
    }
    let mut reply = [MaybeUninit::<u8>::uninit(); 128];
    match socket.recv(&mut reply) {
        Ok(_) => Outcome::Reached,
        Err(err) => Outcome::from_io(err),
    }
}

/// The IPv4 id of our hand-built packets: never 0 (the kernel would pick
/// its own id for each fragment), and distinct for consecutive processes: a
/// fragment left queued by the previous probe must not merge with ours
/// (pids run in sequence in a VM).
fn own_ip_id() -> u16 {
    u16::try_from(std::process::id() % 0xffff).unwrap_or(0) + 1
}

/// Sends a UDP datagram by hand through a raw socket with `IP_HDRINCL`, whole
/// or as two fragments, and waits for the echo on an ordinary UDP socket
/// bound to the source port we wrote.
fn raw_udp(target: &Target, fragmented: bool) -> (Outcome, String) {
    let (SocketAddr::V4(dest), Some(IpAddr::V4(source))) = (target.addr, target.source) else {
        return (
            Outcome::Error("raw sends need an IPv4 ADDR and --source".to_owned()),
            String::new(),
        );
    };
    let receiver = match UdpSocket::bind((source, 0)) {
        Ok(s) => s,
        Err(err) => return (Outcome::Error(err.to_string()), String::new()),
    };
    let source_port = match receiver.local_addr() {
        Ok(a) => a.port(),
        Err(err) => return (Outcome::Error(err.to_string()), String::new()),
    };
    // IPPROTO_RAW implies IP_HDRINCL: the header below is what goes out.
    let raw = match Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    ) {
        Ok(s) => s,
        Err(err) => return (Outcome::Error(err.to_string()), String::new()),
    };
    // 16 bytes of payload so the second fragment starts on an 8-byte boundary.
    let payload = b"ping\nping\nping\nX";
    let udp = frames::udp_segment(source_port, dest.port(), payload, None);
    let header = |fragment, len| {
        frames::ipv4_header(
            source,
            *dest.ip(),
            frames::PROTOCOL_UDP,
            len,
            own_ip_id(),
            fragment,
        )
    };
    let packets: Vec<Vec<u8>> = if fragmented {
        // First: UDP header and 8 payload bytes; second: the rest, at offset 16 bytes.
        let (first, second) = udp.split_at(16);
        let more = Fragment {
            offset_units: 0,
            more: true,
        };
        let last = Fragment {
            offset_units: 2,
            more: false,
        };
        vec![
            [&header(more, first.len())[..], first].concat(),
            [&header(last, second.len())[..], second].concat(),
        ]
    } else {
        vec![[&header(Fragment::default(), udp.len())[..], &udp].concat()]
    };
    let to = SockAddr::from(SocketAddr::V4(dest));
    let mut sends = Vec::new();
    for packet in &packets {
        sends.push(match raw.send_to(packet, &to) {
            Ok(_) => "ok".to_owned(),
            Err(err) => errno_name(&err),
        });
    }
    if let Err(err) = receiver.set_read_timeout(Some(target.timeout)) {
        return (Outcome::Error(err.to_string()), String::new());
    }
    let mut buf = [0u8; 64];
    let outcome = match receiver.recv(&mut buf) {
        Ok(n) if buf[..n] == payload[..] => Outcome::Reached,
        Ok(_) => Outcome::Error("wrong echo".to_owned()),
        Err(err) => Outcome::from_io(err),
    };
    (outcome, format!(" sends={}", sends.join(",")))
}

/// A UDP socket bound to `--source` (any port), where the echo of a
/// hand-built datagram arrives, and the datagram itself: from that socket's
/// address (or `inner_source`, with its port) to the target.
fn receiver_and_datagram(
    target: &Target,
    spoofed: Option<IpAddr>,
) -> Result<(UdpSocket, Vec<u8>), Outcome> {
    let source = target
        .source
        .ok_or_else(|| Outcome::Error("this action needs --source".to_owned()))?;
    let receiver = UdpSocket::bind((source, 0)).map_err(|e| Outcome::Error(e.to_string()))?;
    receiver
        .set_read_timeout(Some(target.timeout))
        .map_err(|e| Outcome::Error(e.to_string()))?;
    let port = receiver
        .local_addr()
        .map_err(|e| Outcome::Error(e.to_string()))?
        .port();
    let packet = frames::ip_udp_packet(
        spoofed.unwrap_or(source),
        target.addr.ip(),
        port,
        target.addr.port(),
        PAYLOAD,
        own_ip_id(),
    )
    .ok_or_else(|| Outcome::Error("source and ADDR are of different families".to_owned()))?;
    Ok((receiver, packet))
}

/// Sends the datagram through an `AF_PACKET` socket of `kind` (`SOCK_RAW`:
/// we write the Ethernet header; `SOCK_DGRAM`: the kernel does, to the
/// address we give), straight onto `--dev`, past the IP stack's routing
/// and its socket hooks, and waits for the echo.
fn packet_send(target: &Target, kind: libc::c_int) -> Outcome {
    let (Some(dev), Some(gateway)) = (&target.dev, target.gateway_mac) else {
        return Outcome::Error("AF_PACKET sends need --dev and --gateway-mac".to_owned());
    };
    let (receiver, packet) = match receiver_and_datagram(target, None) {
        Ok(pair) => pair,
        Err(outcome) => return outcome,
    };
    let ifindex = match nix::net::if_::if_nametoindex(dev.as_str()) {
        Ok(index) => index,
        Err(err) => return Outcome::Error(format!("{dev}: {err}")),
    };
    let ethertype = frames::ethertype_of(&packet);
    let frame = if kind == libc::SOCK_RAW {
        let Some(own) = target.source_mac else {
            return Outcome::Error("packet-raw needs --source-mac".to_owned());
        };
        frames::ethernet_frame(gateway, own, ethertype, &packet)
    } else {
        packet
    };
    // Protocol 0: this socket only sends, so it needs no receive queue.
    // SAFETY: plain socket creation; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Outcome::from_io(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor no one else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if target.qdisc_bypass {
        let on: libc::c_int = 1;
        // SAFETY: the option value is a valid int of the size given.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                std::ptr::from_ref(&on).cast(),
                u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(0),
            )
        };
        if set != 0 {
            return Outcome::from_io(std::io::Error::last_os_error());
        }
    }
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid start.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::sa_family_t::try_from(libc::AF_PACKET).unwrap_or_default();
    to.sll_protocol = ethertype.to_be();
    to.sll_ifindex = i32::try_from(ifindex).unwrap_or(0);
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&gateway);
    // SAFETY: the buffer and the address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(0),
        )
    };
    if sent < 0 {
        return Outcome::from_io(std::io::Error::last_os_error());
    }
    await_datagram_echo(&receiver, target.timeout)
}

/// The inner frame's source MAC: any unicast, locally administered address
/// other than the VTEP's own (VXLAN drops frames from its own MAC).
const INNER_SOURCE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0e, 0x01];

/// What flannel's VXLAN device is configured with.
const FLANNEL_VNI: u32 = 1;

/// Sends the datagram as the inner packet of a VXLAN datagram, from a plain
/// UDP socket (no capability needed) to the VTEP, and waits for the echo,
/// which the node routes back to the inner source.
fn vxlan(target: &Target) -> Outcome {
    let (Some(vtep), Some(inner_mac)) = (target.vtep, target.inner_mac) else {
        return Outcome::Error("vxlan needs --vtep and --inner-mac".to_owned());
    };
    let (receiver, packet) = match receiver_and_datagram(target, target.inner_source) {
        Ok(pair) => pair,
        Err(outcome) => return outcome,
    };
    // A socket of its own: the VTEP is IPv4 while the inner packet may be
    // IPv6, and the outer source port does not matter.
    let outer = match UdpSocket::bind(unspecified_for(&vtep)) {
        Ok(s) => s,
        Err(err) => return Outcome::Error(err.to_string()),
    };
    let inner = frames::ethernet_frame(
        inner_mac,
        INNER_SOURCE_MAC,
        frames::ethertype_of(&packet),
        &packet,
    );
    if let Err(err) = outer.send_to(&frames::vxlan_payload(FLANNEL_VNI, &inner), vtep) {
        return Outcome::from_io(err);
    }
    await_datagram_echo(&receiver, target.timeout)
}

/// Makes a TCP attempt (connect, exchange, close) every `--interval-ms` for
/// `--duration-ms` (or until `--count` attempts, when given), and prints the
/// tally: `reached=N refused=N timeout=N error=N`.
fn attempt_loop(target: &Target, count_given: bool) -> ExitCode {
    let deadline = Instant::now() + target.duration;
    let mut tally = [0u32; 4];
    while Instant::now() < deadline && (!count_given || tally.iter().sum::<u32>() < target.count) {
        let slot = match tcp(target) {
            Outcome::Reached => 0,
            Outcome::Refused(_) => 1,
            Outcome::Timeout => 2,
            Outcome::Error(_) => 3,
        };
        tally[slot] += 1;
        if !target.interval.is_zero() {
            std::thread::sleep(target.interval);
        }
    }
    let [reached, refused, timeout, error] = tally;
    println!("reached={reached} refused={refused} timeout={timeout} error={error}");
    ExitCode::SUCCESS
}

/// Opens one TCP connection and exchanges a line every 50 ms, `--count`
/// times, printing `exchange ok` or `exchange <outcome>` for each; the first
/// line is the connect's own outcome.
fn stream(target: &Target) -> ExitCode {
    let stream = match TcpStream::connect_timeout(&target.addr, target.timeout) {
        Ok(s) => s,
        Err(err) => {
            println!("connect {}", Outcome::from_io(err).render());
            return ExitCode::SUCCESS;
        }
    };
    println!("connect outcome=reached");
    let exchange_timeout = Duration::from_millis(300);
    for _ in 0..target.count {
        match exchange(&stream, exchange_timeout) {
            Outcome::Reached => println!("exchange ok"),
            other => {
                // The stream is out of step once an echo is missed.
                println!("exchange {}", other.render());
                return ExitCode::SUCCESS;
            }
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(50));
    }
    ExitCode::SUCCESS
}

fn make_dirs(args: &[String]) -> ExitCode {
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg != "--mounts-under" {
            dirs.push(arg.into());
            continue;
        }
        let Some(prefix) = rest.next() else {
            return usage("--mounts-under needs a value");
        };
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for mount in enforcer_common::mountinfo::parse(&mountinfo) {
            if mount.point.starts_with(prefix)
                && mount.point.is_dir()
                && !dirs.contains(&mount.point)
            {
                dirs.push(mount.point);
            }
        }
    }
    for dir in dirs {
        let probe = dir.join(format!("imds-probe-{}", std::process::id()));
        let outcome = match std::fs::create_dir(&probe) {
            Ok(()) => {
                let _ = std::fs::remove_dir(&probe);
                "outcome=written".to_owned()
            }
            Err(err) => format!("outcome=refused errno={}", errno_name(&err)),
        };
        println!("dir={} {outcome}", dir.display());
    }
    ExitCode::SUCCESS
}

fn serve(args: &[String]) -> ExitCode {
    let mut ports = Vec::new();
    let mut udp_addrs = Vec::new();
    for pair in args.chunks(2) {
        match pair {
            [flag, port] if flag == "--port" => match port.parse::<u16>() {
                Ok(p) => ports.push(p),
                Err(_) => return usage(&format!("bad port {port}")),
            },
            [flag, addr] if flag == "--udp-addr" => match addr.parse::<IpAddr>() {
                Ok(a) => udp_addrs.push(a),
                Err(_) => return usage(&format!("bad address {addr}")),
            },
            _ => return usage("serve takes --port P and --udp-addr A pairs"),
        }
    }
    for port in ports {
        // `[::]` with IPV6_V6ONLY off (Linux's default) serves IPv4 too.
        let any = SocketAddr::new(IpAddr::from([0u16; 8]), port);
        let listener = match TcpListener::bind(any) {
            Ok(l) => l,
            Err(err) => {
                eprintln!("imds-probe serve: tcp port {port}: {err}");
                return ExitCode::FAILURE;
            }
        };
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || echo_lines(conn));
            }
        });
        // One UDP socket per address, so replies come from the address the
        // client sent to (a connected UDP client drops anything else).
        for addr in &udp_addrs {
            let udp = match UdpSocket::bind((*addr, port)) {
                Ok(u) => u,
                Err(err) => {
                    eprintln!("imds-probe serve: udp {addr} port {port}: {err}");
                    return ExitCode::FAILURE;
                }
            };
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            });
        }
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

fn echo_lines(conn: TcpStream) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
        if writer.write_all(&line).is_err() {
            return;
        }
        line.clear();
    }
}
