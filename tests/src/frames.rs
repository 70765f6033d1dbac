//! Packets laid out by hand, for the sandbox's clients that bypass the
//! kernel's own IP stack: raw and `AF_PACKET` senders, and inner packets of
//! an overlay (VXLAN) datagram.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const PROTOCOL_UDP: u8 = 17;
const UDP_HEADER_LEN: usize = 8;
const IPV4_HEADER_LEN: usize = 20;

/// A MAC address written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The Internet checksum (RFC 1071) over the concatenation of `chunks`;
/// every chunk but the last must have an even length.
pub fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        let mut words = chunk.chunks_exact(2);
        for word in &mut words {
            sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
        }
        if let [last] = words.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The fold above leaves at most 16 bits.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Where an IPv4 packet sits in its datagram: the fragment offset in
/// 8-byte units and whether more fragments follow.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fragment {
    pub offset_units: u16,
    pub more: bool,
}

/// An IPv4 header (no options) with its checksum, for `payload_len` bytes
/// after it.
pub fn ipv4_header(
    source: Ipv4Addr,
    dest: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    id: u16,
    fragment: Fragment,
) -> [u8; IPV4_HEADER_LEN] {
    let total = u16::try_from(IPV4_HEADER_LEN + payload_len).unwrap_or(u16::MAX);
    let flags_offset = (u16::from(fragment.more) << 13) | fragment.offset_units;
    let mut h = [0u8; IPV4_HEADER_LEN];
    h[0] = 0x45; // version 4, 5 words
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&flags_offset.to_be_bytes());
    h[8] = 64; // TTL
    h[9] = protocol;
    h[12..16].copy_from_slice(&source.octets());
    h[16..20].copy_from_slice(&dest.octets());
    let checksum = internet_checksum(&[&h]);
    h[10..12].copy_from_slice(&checksum.to_be_bytes());
    h
}

/// A UDP header and payload. The checksum is left 0 ("none", allowed over
/// IPv4) unless `pseudo_header` is given (IPv6 requires one).
pub fn udp_segment(
    source_port: u16,
    dest_port: u16,
    payload: &[u8],
    pseudo_header: Option<&[u8]>,
) -> Vec<u8> {
    let length = u16::try_from(UDP_HEADER_LEN + payload.len()).unwrap_or(u16::MAX);
    let mut udp = Vec::with_capacity(UDP_HEADER_LEN + payload.len());
    udp.extend_from_slice(&source_port.to_be_bytes());
    udp.extend_from_slice(&dest_port.to_be_bytes());
    udp.extend_from_slice(&length.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    if let Some(pseudo) = pseudo_header {
        // 0 means "no checksum"; a computed 0 is sent as all ones.
        let sum = match internet_checksum(&[pseudo, &udp]) {
            0 => 0xffff,
            sum => sum,
        };
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
    }
    udp
}

/// A whole IPv4 or IPv6 packet carrying one UDP datagram, checksums filled,
/// as a wire or an `AF_PACKET` socket sends it.
pub fn ip_udp_packet(
    source: IpAddr,
    dest: IpAddr,
    source_port: u16,
    dest_port: u16,
    payload: &[u8],
    id: u16,
) -> Option<Vec<u8>> {
    match (source, dest) {
        (IpAddr::V4(source), IpAddr::V4(dest)) => {
            let udp = udp_segment(source_port, dest_port, payload, None);
            let header = ipv4_header(
                source,
                dest,
                PROTOCOL_UDP,
                udp.len(),
                id,
                Fragment::default(),
            );
            Some([&header[..], &udp].concat())
        }
        (IpAddr::V6(source), IpAddr::V6(dest)) => {
            let udp_len = UDP_HEADER_LEN + payload.len();
            let pseudo = ipv6_pseudo_header(source, dest, PROTOCOL_UDP, udp_len);
            let udp = udp_segment(source_port, dest_port, payload, Some(&pseudo));
            Some(
                [
                    &ipv6_header(source, dest, PROTOCOL_UDP, udp.len())[..],
                    &udp,
                ]
                .concat(),
            )
        }
        _ => None,
    }
}

fn ipv6_header(source: Ipv6Addr, dest: Ipv6Addr, next_header: u8, payload_len: usize) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60; // version 6, no traffic class or flow label
    let length = u16::try_from(payload_len).unwrap_or(u16::MAX);
    h[4..6].copy_from_slice(&length.to_be_bytes());
    h[6] = next_header;
    h[7] = 64; // hop limit
    h[8..24].copy_from_slice(&source.octets());
    h[24..40].copy_from_slice(&dest.octets());
    h
}

/// RFC 8200 8.1: what the upper-layer checksum covers besides the segment.
fn ipv6_pseudo_header(source: Ipv6Addr, dest: Ipv6Addr, next_header: u8, len: usize) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&source.octets());
    pseudo.extend_from_slice(&dest.octets());
    pseudo.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next_header]);
    pseudo
}

/// The Ethernet type of an IP packet, from its version nibble.
pub fn ethertype_of(packet: &[u8]) -> u16 {
    match packet.first().map(|b| b >> 4) {
        Some(6) => ETHERTYPE_IPV6,
        _ => ETHERTYPE_IPV4,
    }
}

/// An Ethernet II frame around `payload`.
pub fn ethernet_frame(dest: [u8; 6], source: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dest[..], &source, &ethertype.to_be_bytes(), payload].concat()
}

/// A VXLAN header (RFC 7348: the "VNI present" flag, the 24-bit VNI)
/// followed by the inner Ethernet frame: the payload of the outer UDP
/// datagram sent to the VTEP's port.
pub fn vxlan_payload(vni: u32, inner_frame: &[u8]) -> Vec<u8> {
    let vni = (vni & 0x00ff_ffff) << 8;
    [&[0x08, 0, 0, 0][..], &vni.to_be_bytes(), inner_frame].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_ipv4_header() {
        // The header from RFC 1071's usual worked example (Wikipedia's
        // "IPv4 header checksum"): 45 00 00 73 00 00 40 00 40 11 .. c0 a8 00 01 c0 a8 00 c7.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&[&header]), 0xb861);
    }

    #[test]
    fn built_headers_check_out() {
        let packet = ip_udp_packet(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            1000,
            80,
            b"abc",
            7,
        )
        .unwrap();
        assert_eq!(packet.len(), 20 + 8 + 3);
        // A header with its checksum in place sums to zero.
        assert_eq!(internet_checksum(&[&packet[..20]]), 0);
        let source: Ipv6Addr = "fd00::1".parse().unwrap();
        let dest: Ipv6Addr = "fd00::2".parse().unwrap();
        let packet = ip_udp_packet(source.into(), dest.into(), 1000, 80, b"abc", 0).unwrap();
        let pseudo = ipv6_pseudo_header(source, dest, PROTOCOL_UDP, 11);
        assert_eq!(internet_checksum(&[&pseudo, &packet[40..]]), 0);
        assert_eq!(ethertype_of(&packet), ETHERTYPE_IPV6);
    }

    #[test]
    fn vxlan_header_carries_the_vni() {
        assert_eq!(vxlan_payload(1, b"x"), [8, 0, 0, 0, 0, 0, 1, 0, b'x']);
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00"), None);
    }
}
