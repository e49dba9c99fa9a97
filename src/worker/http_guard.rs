//! The SSRF guard of `http` steps: by default a step may not reach loopback,
//! link-local, private or unspecified addresses. It is judged on the address
//! actually connected to: names are resolved by the guard itself (the HTTP
//! client's resolver), which hands the client only the addresses it may
//! connect to, so a name cannot resolve to one address when checked and to
//! another when connected (no DNS-rebinding gap); an address written in the
//! URL is checked before the request, and every redirect is checked the same
//! way. `--http-allow` (host names and CIDRs) opens what an operator wants.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Why an address is closed by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    Loopback,
    LinkLocal,
    Private,
    Unspecified,
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Closed::Loopback => "a loopback address",
            Closed::LinkLocal => "a link-local address",
            Closed::Private => "a private address",
            Closed::Unspecified => "an unspecified address",
        })
    }
}

/// Why `addr` is closed by default, or `None` for a public address. An
/// IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`) is judged as IPv4.
pub(crate) fn closed(addr: IpAddr) -> Option<Closed> {
    match addr {
        IpAddr::V4(v4) => closed_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => closed_v4(v4),
            None => closed_v6(v6),
        },
    }
}

fn closed_v4(a: Ipv4Addr) -> Option<Closed> {
    let o = a.octets();
    if a.is_loopback() {
        Some(Closed::Loopback)
    } else if a.is_link_local() {
        Some(Closed::LinkLocal)
    } else if a.is_private() {
        Some(Closed::Private)
    } else if o[0] == 0 {
        // 0.0.0.0/8, "this network": connecting to it reaches this host.
        Some(Closed::Unspecified)
    } else {
        None
    }
}

fn closed_v6(a: Ipv6Addr) -> Option<Closed> {
    let first = a.segments()[0];
    if a.is_loopback() {
        Some(Closed::Loopback)
    } else if a.is_unspecified() {
        Some(Closed::Unspecified)
    } else if first & 0xffc0 == 0xfe80 {
        Some(Closed::LinkLocal)
    } else if first & 0xfe00 == 0xfc00 {
        Some(Closed::Private)
    } else {
        None
    }
}

/// A network in CIDR notation (a bare address is the one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { network, prefix })
    }

    fn contains(&self, addr: IpAddr) -> bool {
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let ((net, net_len), (ip, ip_len)) = (bits(self.network), bits(addr));
        if net_len != ip_len {
            return false;
        }
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        net & mask == ip & mask
    }
}

/// What `--http-allow` opens: host names (as written in URLs, any case) and
/// networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HttpAllow {
    hosts: Vec<String>,
    networks: Vec<Cidr>,
}

impl HttpAllow {
    /// Parses `--http-allow` entries: each a CIDR (`10.0.0.0/8`), an
    /// address (`169.254.169.254`, `[::1]`) or a host name (`localhost`).
    pub(crate) fn parse(entries: &[String]) -> Result<HttpAllow, String> {
        let mut allow = HttpAllow::default();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Some(cidr) = Cidr::parse(entry) {
                allow.networks.push(cidr);
            } else if entry.contains('/') || !is_host_name(entry) {
                return Err(format!(
                    "--http-allow: {entry:?} is neither a CIDR (10.0.0.0/8), an address nor a host name"
                ));
            } else {
                allow.hosts.push(entry.to_ascii_lowercase());
            }
        }
        Ok(allow)
    }

    fn allows_host(&self, host: &str) -> bool {
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    fn allows_addr(&self, addr: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(addr))
    }

    /// Whether a request to `host` (as in the URL) at `addr` may go ahead,
    /// or why not.
    pub(crate) fn check(&self, host: &str, addr: IpAddr) -> Result<(), Refused> {
        match closed(addr) {
            Some(why) if !self.allows_host(host) && !self.allows_addr(addr) => Err(Refused {
                host: host.to_string(),
                addr,
                why,
            }),
            _ => Ok(()),
        }
    }
}

fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A request the guard refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    host: String,
    addr: IpAddr,
    why: Closed,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = self.addr.to_string();
        let at = if self.host == addr || self.host == format!("[{addr}]") {
            addr
        } else {
            format!("{} (at {addr})", self.host)
        };
        write!(
            f,
            "refused by the SSRF guard: {at} is {}; an operator can open it with --http-allow",
            self.why
        )
    }
}

impl std::error::Error for Refused {}

/// The HTTP client's resolver: resolves with the system's resolver, then
/// gives the client only the addresses the guard lets it connect to.
pub(crate) struct GuardedResolver {
    pub allow: Arc<HttpAllow>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut first_refusal = None;
            let open: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match allow.check(&host, a.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        first_refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            match (open.is_empty(), first_refusal) {
                (true, Some(refused)) => {
                    Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>)
                }
                _ => Ok(Box::new(open.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The guard's refusal somewhere in an error's sources, if that is what
/// made the request fail.
pub(crate) fn refusal_in<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e Refused> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_link_local_private_and_unspecified_addresses_are_closed() {
        for (addr, why) in [
            ("127.0.0.1", Closed::Loopback),
            ("127.9.9.9", Closed::Loopback),
            ("::1", Closed::Loopback),
            ("::ffff:127.0.0.1", Closed::Loopback),
            ("169.254.169.254", Closed::LinkLocal),
            ("fe80::1", Closed::LinkLocal),
            ("10.0.0.1", Closed::Private),
            ("172.16.5.4", Closed::Private),
            ("172.31.255.255", Closed::Private),
            ("192.168.1.1", Closed::Private),
            ("fc00::1", Closed::Private),
            ("fd12:3456::1", Closed::Private),
            ("::ffff:10.1.2.3", Closed::Private),
            ("0.0.0.0", Closed::Unspecified),
            ("::", Closed::Unspecified),
        ] {
            assert_eq!(closed(ip(addr)), Some(why), "{addr}");
        }
        for open in [
            "93.184.216.34",
            "172.32.0.1",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert_eq!(closed(ip(open)), None, "{open}");
        }
    }

    #[test]
    fn http_allow_opens_the_networks_and_hosts_it_names() {
        let allow = HttpAllow::parse(&[
            "10.0.0.0/8".into(),
            "169.254.169.254".into(),
            "[::1]".into(),
            "Internal.Example".into(),
        ])
        .unwrap();
        assert_eq!(allow.check("x", ip("10.200.1.1")), Ok(()));
        assert_eq!(allow.check("x", ip("::ffff:10.0.0.1")), Ok(()), "mapped");
        assert_eq!(allow.check("x", ip("169.254.169.254")), Ok(()));
        assert!(
            allow.check("x", ip("169.254.169.253")).is_err(),
            "one address only"
        );
        assert_eq!(allow.check("x", ip("::1")), Ok(()));
        assert!(allow.check("x", ip("127.0.0.1")).is_err());
        assert_eq!(
            allow.check("internal.example", ip("192.168.0.9")),
            Ok(()),
            "by name"
        );
        assert_eq!(
            allow.check("x", ip("8.8.8.8")),
            Ok(()),
            "public is open anyway"
        );
        let refused = HttpAllow::default()
            .check("localhost", ip("127.0.0.1"))
            .unwrap_err();
        assert!(refused
            .to_string()
            .contains("localhost (at 127.0.0.1) is a loopback address"));
        for bad in ["10.0.0.0/33", "not a host", "a/b", "::1/129"] {
            assert!(HttpAllow::parse(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(HttpAllow::parse(&["0.0.0.0/0".into()])
            .unwrap()
            .check("x", ip("10.0.0.1"))
            .is_ok());
    }
}
