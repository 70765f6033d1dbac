//! `imds-bench-traffic`: the benchmark's traffic, between the sandbox's
//! namespaces.
//!
//! Client subcommands run for a bounded time (`--seconds`, fractions
//! allowed, 1 by default) and, where they count attempts, a bounded number
//! of them (`--count`), then print one line of `key=value` fields. Like
//! `imds-probe`, they refuse to run in the host's network namespace: some of
//! them target metadata addresses, which must never be reached on the real
//! network.
//!
//! ```text
//! bulk ADDR PORT --seconds S             TCP stream, bytes=N per_s=N
//! connect-rate ADDR PORT --seconds S     connect and close, connects=N failed=N per_s=N
//! udp-rate ADDR PORT --seconds S         unconnected sendto, sent=N failed=N per_s=N
//! ping-rate ADDR --seconds S             ICMP echo requests, sent=N failed=N per_s=N
//! blocked-connect ADDR PORT --count N [--timeout-ms T] --seconds S
//!                                        one connect after another, outcome counts
//!                                        (refused: EPERM; reset: ECONNREFUSED, as a
//!                                        firewall's TCP reset answers) and p50_ns, p99_ns, max_ns of the connect call
//! until-refused ADDR PORT [--timeout-ms T] [--pause-us P] --seconds S
//!                                        connects until one succeeds (prints `open`),
//!                                        then until one fails with EPERM: refused_ns
//!                                        (CLOCK_MONOTONIC) and both waits' attempts
//! until-reached ADDR PORT [--timeout-ms T] [--pause-us P] --seconds S
//!                                        after a line on stdin, connects until one
//!                                        succeeds: reached_ns (CLOCK_MONOTONIC), attempts
//! sink --port P --accept-port Q --seconds S
//!                                        on [::] (IPv4 too): TCP P and UDP P read and
//!                                        discard, TCP Q accepts and closes; prints
//!                                        `ready` once bound, exits after S seconds
//! ```

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::{Duration, Instant},
};

use imds_guard_tests::{hostns::in_host_netns, monotonic_ns};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Every run ends by itself: no subcommand may ask for more than this.
const MAX_SECONDS: u32 = 3600;
const MAX_COUNT: u32 = 1_000_000;
/// Bulk writes, and the sink's reads, go in chunks of this size.
const CHUNK: usize = 128 * 1024;
/// Small datagrams: the cost per packet, not per byte, is what we measure.
const DATAGRAM: &[u8] = b"imds-bench-16by\n";

const USAGE: &str = "usage: imds-bench-traffic bulk|connect-rate|udp-rate ADDR PORT --seconds S\n       \
     imds-bench-traffic ping-rate ADDR --seconds S\n       \
     imds-bench-traffic blocked-connect ADDR PORT --count N [--timeout-ms T] --seconds S\n       \
     imds-bench-traffic until-refused|until-reached ADDR PORT [--timeout-ms T] [--pause-us P] --seconds S\n       \
     imds-bench-traffic sink --port P --accept-port Q --seconds S";

#[derive(Debug)]
struct Options {
    seconds: Duration,
    count: u32,
    timeout: Duration,
    port: Option<u16>,
    accept_port: Option<u16>,
    /// `until-refused` and `until-reached`: the pause between attempts.
    pause: Duration,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            seconds: Duration::from_secs(1),
            count: 1000,
            timeout: Duration::from_secs(1),
            port: None,
            accept_port: None,
            pause: Duration::from_micros(200),
        };
        for pair in args.chunks(2) {
            let [flag, value] = pair else {
                return Err(format!("{} needs a value", pair[0]));
            };
            match flag.as_str() {
                "--seconds" => options.seconds = seconds(value)?,
                "--count" => options.count = number(flag, value, MAX_COUNT)?,
                "--timeout-ms" => {
                    let most = u64::from(MAX_SECONDS) * 1000;
                    options.timeout = Duration::from_millis(number(flag, value, most)?);
                }
                "--port" => options.port = Some(number(flag, value, u16::MAX)?),
                "--accept-port" => options.accept_port = Some(number(flag, value, u16::MAX)?),
                "--pause-us" => {
                    options.pause = Duration::from_micros(number(flag, value, 1_000_000)?);
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(options)
    }
}

/// The value of `flag`, a number up to `max`.
fn number<T>(flag: &str, value: &str, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match value.parse::<T>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!("{flag} takes a number up to {max}, not {value}")),
    }
}

/// A duration in seconds, fractions allowed, above zero and at most [`MAX_SECONDS`].
fn seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= f64::from(MAX_SECONDS) => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "--seconds takes a number of seconds up to {MAX_SECONDS}, not {text}"
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((command, rest)) if command == "sink" => Options::parse(rest).and_then(|o| sink(&o)),
        Some(_) if in_host_netns() => {
            eprintln!("imds-bench-traffic: refusing to send from the host network namespace");
            return ExitCode::from(3);
        }
        Some((command, rest)) => client(command, rest).map(|fields| println!("{fields}")),
        None => Err("no subcommand".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("imds-bench-traffic: {message}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn client(command: &str, args: &[String]) -> Result<String, String> {
    let (addr, rest) = match (command, args) {
        ("ping-rate", [addr, rest @ ..]) => (SocketAddr::new(parse_ip(addr)?, 0), rest),
        (_, [addr, port, rest @ ..]) => {
            let port = port.parse().map_err(|_| format!("bad port {port}"))?;
            (SocketAddr::new(parse_ip(addr)?, port), rest)
        }
        _ => return Err(format!("{command}: missing the destination")),
    };
    let options = Options::parse(rest)?;
    let io = |err: std::io::Error| format!("{command} {addr}: {err}");
    match command {
        "bulk" => bulk(addr, &options).map_err(io),
        "connect-rate" => Ok(connect_rate(addr, &options)),
        "udp-rate" => udp_rate(addr, &options).map_err(io),
        "ping-rate" => ping_rate(addr, &options).map_err(io),
        "blocked-connect" => blocked_connect(addr, &options).map_err(io),
        "until-refused" => until_refused(addr, &options),
        "until-reached" => until_reached(addr, &options),
        other => Err(format!("unknown subcommand {other}")),
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| format!("bad address {text}"))
}

fn errno_name(err: &std::io::Error) -> String {
    err.raw_os_error().map_or_else(
        || err.kind().to_string().replace(' ', "_"),
        |code| format!("{:?}", nix::errno::Errno::from_raw(code)),
    )
}

#[allow(
    clippy::cast_precision_loss,
    reason = "the counts of one run stay far below 2^52"
)]
fn per_second(count: u64, seconds: f64) -> f64 {
    count as f64 / seconds
}

/// Counts of a rate loop: calls that succeeded, calls that failed, and the
/// first failure's errno.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

impl Tally {
    fn add<T>(&mut self, result: &std::io::Result<T>) {
        match result {
            Ok(_) => self.ok += 1,
            Err(err) => self.fail(err),
        }
    }

    fn fail(&mut self, err: &std::io::Error) {
        self.failed += 1;
        self.first_error.get_or_insert_with(|| errno_name(err));
    }

    /// `<ok_name>=N failed=N [first_error=E] seconds=F per_s=F`, where
    /// `per_s` counts successful calls only.
    fn render(&self, ok_name: &str, elapsed: Duration) -> String {
        let seconds = elapsed.as_secs_f64();
        let first_error = self
            .first_error
            .as_ref()
            .map(|e| format!(" first_error={e}"))
            .unwrap_or_default();
        format!(
            "{ok_name}={} failed={}{first_error} seconds={seconds:.3} per_s={:.1}",
            self.ok,
            self.failed,
            per_second(self.ok, seconds)
        )
    }
}

/// Calls `attempt` until `duration` has passed; returns the tally and the
/// time actually taken.
fn for_duration<T>(
    duration: Duration,
    mut attempt: impl FnMut() -> std::io::Result<T>,
) -> (Tally, Duration) {
    let started = Instant::now();
    let mut tally = Tally::default();
    while started.elapsed() < duration {
        tally.add(&attempt());
    }
    (tally, started.elapsed())
}

/// One TCP stream, written as fast as it goes.
fn bulk(addr: SocketAddr, options: &Options) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, options.timeout)?;
    stream.set_write_timeout(Some(options.timeout))?;
    let chunk = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut bytes: u64 = 0;
    while started.elapsed() < options.seconds {
        bytes += stream.write(&chunk)? as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(format!(
        "bytes={bytes} seconds={seconds:.3} per_s={:.1}",
        per_second(bytes, seconds)
    ))
}

/// One TCP connect, bounded by `timeout` (`SO_SNDTIMEO` bounds a blocking
/// connect; it then fails with EINPROGRESS). The socket closes with a reset
/// (linger 0), so thousands of connects leave no `TIME_WAIT` behind to run
/// out of ports. Returns how the connect call ended and how long it took.
fn connect_once(
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<(std::io::Result<()>, Duration)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_write_timeout(Some(timeout))?;
    socket.set_linger(Some(Duration::ZERO))?;
    let target = SockAddr::from(addr);
    let started = Instant::now();
    let result = socket.connect(&target);
    Ok((result, started.elapsed()))
}

fn connect_rate(addr: SocketAddr, options: &Options) -> String {
    let (tally, elapsed) = for_duration(options.seconds, || {
        connect_once(addr, options.timeout).and_then(|(result, _)| result)
    });
    tally.render("connects", elapsed)
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    let ip = match addr {
        SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Small datagrams through one unconnected socket: every send goes through
/// the sendmsg hook.
fn udp_rate(addr: SocketAddr, options: &Options) -> std::io::Result<String> {
    let socket = UdpSocket::bind(unspecified_for(addr))?;
    let (tally, elapsed) = for_duration(options.seconds, || socket.send_to(DATAGRAM, addr));
    Ok(tally.render("sent", elapsed))
}

/// ICMP echo requests through an unprivileged ping socket, which the
/// packet hook judges.
fn ping_rate(addr: SocketAddr, options: &Options) -> std::io::Result<String> {
    let (domain, protocol, echo_request) = match addr {
        SocketAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8),
        SocketAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8),
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(protocol))?;
    // Type, code, then checksum and id, which the kernel fills.
    let mut request = vec![echo_request, 0, 0, 0, 0, 0, 0, 0];
    request.extend_from_slice(DATAGRAM);
    let target = SockAddr::from(addr);
    let (tally, elapsed) = for_duration(options.seconds, || socket.send_to(&request, &target));
    Ok(tally.render("sent", elapsed))
}

/// The `per_mille`th of sorted samples (nearest rank).
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    let rank = (sorted.len() * per_mille).div_ceil(1000).max(1);
    sorted.get(rank - 1).copied().unwrap_or_default()
}

/// `--count` connects one after the other (or until `--seconds`, if less),
/// timing each connect call.
fn blocked_connect(addr: SocketAddr, options: &Options) -> std::io::Result<String> {
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(options.count as usize);
    let (mut connected, mut refused, mut reset, mut timed_out) = (0u32, 0u32, 0u32, 0u32);
    let mut other = Tally::default();
    while latencies.len() < options.count as usize && started.elapsed() < options.seconds {
        let (result, took) = connect_once(addr, options.timeout)?;
        latencies.push(took);
        match result {
            Ok(()) => connected += 1,
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => refused += 1,
            Err(err) if err.raw_os_error() == Some(libc::ECONNREFUSED) => reset += 1,
            Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => timed_out += 1,
            Err(err) => other.fail(&err),
        }
    }
    latencies.sort_unstable();
    let first_error = other
        .first_error
        .map(|e| format!(" first_error={e}"))
        .unwrap_or_default();
    Ok(format!(
        "attempts={} connected={connected} refused={refused} reset={reset} timeout={timed_out} other={}{first_error} \
         p50_ns={} p99_ns={} max_ns={}",
        latencies.len(),
        other.failed,
        percentile(&latencies, 500).as_nanos(),
        percentile(&latencies, 990).as_nanos(),
        latencies.last().copied().unwrap_or_default().as_nanos(),
    ))
}

/// Connects (one every `--pause-us`) until one ends as `wanted` says,
/// within `--seconds` from `started`; `what` names the wait in the error
/// when none did. Returns when (`CLOCK_MONOTONIC` ns, as that connect
/// returned) and after how many attempts.
fn connect_until(
    addr: SocketAddr,
    options: &Options,
    started: Instant,
    what: &str,
    wanted: impl Fn(&std::io::Result<()>) -> bool,
) -> Result<(u64, u32), String> {
    let io = |err: std::io::Error| format!("{what} {addr}: {err}");
    let mut attempts = 0;
    let mut last = None;
    while started.elapsed() < options.seconds {
        let (result, _) = connect_once(addr, options.timeout).map_err(io)?;
        attempts += 1;
        if wanted(&result) {
            return Ok((monotonic_ns().map_err(io)?, attempts));
        }
        last = Some(result.map_or_else(|err| errno_name(&err), |()| "connected".to_owned()));
        std::thread::sleep(options.pause);
    }
    Err(format!(
        "{what} {addr}: not within {:?} ({attempts} attempts, the last {})",
        options.seconds,
        last.unwrap_or_else(|| "none".to_owned())
    ))
}

/// From a cgroup the daemon is about to refuse: connects until one reaches
/// the server (then prints `open`: nothing enforces yet, and whoever waits
/// for it starts the daemon), then until one is refused with EPERM.
fn until_refused(addr: SocketAddr, options: &Options) -> Result<String, String> {
    let started = Instant::now();
    let (_, open_attempts) = connect_until(addr, options, started, "reaching", Result::is_ok)?;
    println!("open");
    std::io::stdout()
        .flush()
        .map_err(|err| format!("until-refused: {err}"))?;
    let refused =
        |r: &std::io::Result<()>| matches!(r, Err(err) if err.raw_os_error() == Some(libc::EPERM));
    let (refused_ns, refused_attempts) =
        connect_until(addr, options, started, "refused with EPERM", refused)?;
    Ok(format!(
        "refused_ns={refused_ns} open_attempts={open_attempts} refused_attempts={refused_attempts}"
    ))
}

/// Once a line comes on stdin (whoever runs this says when to begin),
/// connects until one reaches the server. Run from an allowlisted cgroup:
/// the programs judge the connecting task's cgroup, and moving a process
/// between cgroups waits for an RCU grace period (milliseconds), so this
/// waits in place.
fn until_reached(addr: SocketAddr, options: &Options) -> Result<String, String> {
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .map_err(|err| format!("until-reached: {err}"))?;
    let (reached_ns, attempts) =
        connect_until(addr, options, Instant::now(), "reaching", Result::is_ok)?;
    Ok(format!("reached_ns={reached_ns} attempts={attempts}"))
}

fn sink(options: &Options) -> Result<(), String> {
    let (Some(port), Some(accept_port)) = (options.port, options.accept_port) else {
        return Err("sink needs --port and --accept-port".to_owned());
    };
    // `[::]` with IPV6_V6ONLY off (Linux's default) takes IPv4 too.
    let any = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let bind_error =
        |what: &'static str, port: u16| move |err| format!("sink: {what} port {port}: {err}");
    let streams = listen(any(port)).map_err(bind_error("tcp", port))?;
    let accepts = listen(any(accept_port)).map_err(bind_error("tcp", accept_port))?;
    let datagrams = UdpSocket::bind(any(port)).map_err(bind_error("udp", port))?;
    std::thread::spawn(move || {
        for stream in streams.incoming().flatten() {
            std::thread::spawn(move || discard_stream(stream));
        }
    });
    // Accepted and dropped at once: connect-rate's clients reset anyway.
    std::thread::spawn(move || accepts.incoming().for_each(drop));
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while datagrams.recv(&mut buf).is_ok() {}
    });
    println!("ready");
    std::io::stdout()
        .flush()
        .map_err(|err| format!("sink: {err}"))?;
    std::thread::sleep(options.seconds);
    Ok(())
}

/// A listener with a long accept queue: connect-rate's client completes
/// handshakes faster than a thread on a busy machine may accept them, and a
/// full queue drops SYNs, which stalls the client for a second.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn discard_stream(mut stream: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}
