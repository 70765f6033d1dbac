//! What the node edge guard asks the kernel's routing netlink: this
//! namespace's links and routes, and the addresses inside the namespaces
//! its veths lead to (`IFA_TARGET_NETNSID`, which needs only CAP_NET_ADMIN,
//! not entering the namespace). Messages are `netlink-packet-route`'s.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    tc::{TcHandle, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("routing netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("routing netlink {what}: {source}")]
    Request {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("routing netlink {what}: unreadable answer: {reason}")]
    Decode { what: &'static str, reason: String },
}

/// A link of the node's namespace, as far as the plan needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    pub bridge: bool,
    /// The bridge (or other controller) it is a port of.
    pub master: Option<u32>,
    /// The namespace its peer is in (veths), as this namespace numbers it.
    pub peer_netnsid: Option<i32>,
}

/// A unicast route: its destination and the interfaces it leaves by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: IpNet,
    pub interfaces: Vec<u32>,
}

/// Multicast groups whose messages mean the plan may have changed.
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// A socket for requests, answered one dump at a time.
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
}

impl RouteSocket {
    pub fn open() -> Result<RouteSocket, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        // The kernel reads a dump request's attributes (the target
        // namespace of an address dump) only under strict checking.
        socket
            .set_netlink_get_strict_chk(true)
            .map_err(NetlinkError::Socket)?;
        Ok(RouteSocket {
            socket,
            sequence: 0,
        })
    }

    /// A socket that receives link and route changes; readable when any
    /// arrived (non-blocking, for the task's event loop).
    pub fn changes() -> Result<Socket, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        for group in [RTNLGRP_LINK, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE] {
            socket.add_membership(group).map_err(NetlinkError::Socket)?;
        }
        socket
            .set_non_blocking(true)
            .map_err(NetlinkError::Socket)?;
        Ok(socket)
    }

    /// Sends a dump request and collects every answer until the end.
    fn dump(
        &mut self,
        what: &'static str,
        request: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let request_err = |source| NetlinkError::Request { what, source };
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.sequence;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0).map_err(request_err)?;
        let mut answers = Vec::new();
        loop {
            let (bytes, _) = self.socket.recv_from_full().map_err(request_err)?;
            let mut offset = 0;
            while offset < bytes.len() {
                let decode_err = |reason: String| NetlinkError::Decode { what, reason };
                let length = NetlinkBuffer::new_checked(&bytes[offset..])
                    .map_err(|e| decode_err(e.to_string()))?
                    .length() as usize;
                if length == 0 {
                    return Err(decode_err("an empty message".to_owned()));
                }
                let end = (offset + length).min(bytes.len());
                let message =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..end])
                        .map_err(|e| decode_err(e.to_string()))?;
                offset += length;
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) => {
                        return Err(request_err(error.to_io()));
                    }
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// This namespace's links.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let answers = self.dump(
            "link dump",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(&link)),
                _ => None,
            })
            .collect())
    }

    /// Every table's unicast routes, both families.
    pub fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            let answers = self.dump("route dump", RouteNetlinkMessage::GetRoute(request))?;
            routes.extend(answers.into_iter().filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(route) => route_of(&route),
                _ => None,
            }));
        }
        Ok(routes)
    }

    /// The addresses of the namespace this namespace knows as `netnsid`.
    pub fn addresses_in(&mut self, netnsid: i32) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut request = AddressMessage::default();
        request
            .attributes
            .push(AddressAttribute::TargetNetNsId(netnsid));
        let answers = self.dump("address dump", RouteNetlinkMessage::GetAddress(request))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewAddress(address) => {
                    address.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Whether `ifindex` has a clsact filter with this handle and
    /// preference, on egress (`egress`) or ingress.
    pub fn has_filter(
        &mut self,
        ifindex: u32,
        egress: bool,
        handle: u32,
        priority: u16,
    ) -> Result<bool, NetlinkError> {
        let mut request = TcMessage::default();
        request.header.index = i32::try_from(ifindex).unwrap_or(i32::MAX);
        request.header.parent = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: if egress {
                TcHandle::MIN_EGRESS
            } else {
                TcHandle::MIN_INGRESS
            },
        };
        let answers = self.dump(
            "filter dump",
            RouteNetlinkMessage::GetTrafficFilter(request),
        )?;
        Ok(answers.iter().any(|answer| match answer {
            RouteNetlinkMessage::NewTrafficFilter(filter) => {
                let found = filter.header.handle;
                (u32::from(found.major) << 16 | u32::from(found.minor)) == handle
                    && (filter.header.info >> 16) as u16 == priority
            }
            _ => false,
        }))
    }

    /// The addresses of every namespace in `netnsids`.
    pub fn addresses_by_netns(
        &mut self,
        netnsids: impl IntoIterator<Item = i32>,
    ) -> Result<BTreeMap<i32, Vec<IpAddr>>, NetlinkError> {
        netnsids
            .into_iter()
            .map(|id| Ok((id, self.addresses_in(id)?)))
            .collect()
    }
}

fn link_of(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        loopback: message.header.link_layer_type == LinkLayerType::Loopback,
        ..Link::default()
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Controller(master) => link.master = Some(*master),
            LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                link.bridge = infos
                    .iter()
                    .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Bridge)));
            }
            _ => {}
        }
    }
    link
}

fn address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// A unicast route's destination and the interfaces it leaves by; `None`
/// for every other kind (local, broadcast, blackhole...): nothing leaves.
fn route_of(message: &RouteMessage) -> Option<Route> {
    if message.header.kind != RouteType::Unicast {
        return None;
    }
    let v4 = message.header.address_family == AddressFamily::Inet;
    let mut destination = if v4 {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    };
    let mut interfaces = Vec::new();
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(dest) => destination = address(dest)?,
            RouteAttribute::Oif(index) => interfaces.push(*index),
            RouteAttribute::MultiPath(hops) => {
                interfaces.extend(hops.iter().map(|hop| hop.interface_index));
            }
            _ => {}
        }
    }
    let prefix = IpNet::new(destination, message.header.destination_prefix_length).ok()?;
    Some(Route { prefix, interfaces })
}
