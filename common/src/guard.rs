//! Server-side request forgery defence for fetching: only public addresses are connected to,
//! checked on the addresses a name actually resolves to (so DNS rebinding is refused too) and on
//! every redirect hop, unless an explicit allowlist of hosts or CIDRs opens them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Which destinations may be fetched.
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    /// Networks opened even though they are not public (e.g. `127.0.0.1/32` for a local photo server).
    pub allow_nets: Vec<IpNet>,
    /// Host names whose addresses are all allowed.
    pub allow_hosts: Vec<String>,
}

impl AddressPolicy {
    /// Parses allowlist entries: each a CIDR, an IP address, or a host name.
    pub fn from_allowlist(entries: &[String]) -> Self {
        let mut policy = Self::default();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(net) = entry.parse::<IpNet>() {
                policy.allow_nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy.allow_nets.push(IpNet::from(ip));
            } else {
                policy.allow_hosts.push(entry.to_ascii_lowercase());
            }
        }
        policy
    }

    /// Whether connecting to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allow_nets.iter().any(|net| net.contains(&ip))
    }

    fn permits_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow_hosts.contains(&host)
    }

    /// Checks a URL's host when it is an IP literal (names are checked when they resolve).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme `{}` is not fetched", url.scheme()));
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(_)) => return Ok(()),
            None => return Err("the URL has no host".into()),
        };
        if self.permits(ip) { Ok(()) } else { Err(format!("{ip} is not a public address")) }
    }
}

/// Whether `ip` is a globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation 2001:db8::/32
                || (s[0] == 0x2001 && s[1] == 0) // Teredo 2001::/32
                || s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // discard 100::/64
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254.0.0/16, cloud metadata included
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (b & 0xc0) == 64) // carrier-grade NAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments 192.0.0.0/24
        || (a == 198 && (b & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || a >= 240) // reserved 240.0.0.0/4
}

/// The IPv4 address inside IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible, NAT64 (64:ff9b::/96)
/// and 6to4 (2002::/16) addresses.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..5] == [0; 5] && (s[5] == 0xffff || (s[5] == 0 && !ip.is_loopback() && !ip.is_unspecified())) {
        return Some(tail);
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    None
}

/// A resolver that drops every address the policy refuses, and fails if none is left.
pub struct GuardedResolver {
    pub policy: Arc<AddressPolicy>,
}

/// Why a name was refused; the fetcher turns it into a `blocked_address` result. It names the host
/// the client gave and never the addresses it resolved to: those are the internal network's, and
/// the message reaches the client (results, `source_url` errors, callback attempts).
#[derive(Debug, thiserror::Error)]
#[error("`{host}` resolves only to addresses that are not public and that its allowlist does not open")]
pub struct Blocked {
    pub host: String,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if policy.permits_host(&host) {
                return Ok(Box::new(addrs.into_iter()) as Addrs);
            }
            let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| policy.permits(a.ip())).collect();
            if allowed.is_empty() {
                let addrs = addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
                tracing::debug!(%host, %addrs, "a name resolving only to refused addresses");
                return Err(Box::new(Blocked { host }) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// `url` as it may be logged: scheme, host, port and path, without the user name and password,
/// the query shown as `?…` and the fragment left out (they often hold a token).
pub fn redact(url: &str) -> String {
    let Ok(mut url) = url::Url::parse(url) else {
        return "(a URL that does not parse)".into();
    };
    let had_query = url.query().is_some();
    // Neither fails for a URL with a host; one without (`mailto:`) has no credentials to drop.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    let mut shown = url.to_string();
    if had_query {
        shown.push_str("?…");
    }
    shown
}

/// A failed request's message with its causes, the URL in it shown as [`redact`] shows it: the
/// message is logged and stored, and the caller knows which URL it was.
pub fn error_text(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), &redact(url.as_str()));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_and_special_addresses_are_refused() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(ip(refused)), "{refused} must be refused");
        }
        for allowed in ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip(allowed)), "{allowed} is public");
        }
    }

    #[test]
    fn the_allowlist_opens_networks_and_hosts() {
        let policy =
            AddressPolicy::from_allowlist(&["127.0.0.1/32".into(), "10.0.0.0/8".into(), "Photos.Local".into()]);
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(policy.permits(ip("10.200.0.7")));
        assert!(!policy.permits(ip("127.0.0.2")));
        assert!(!policy.permits(ip("192.168.0.1")));
        assert!(policy.permits_host("photos.local."));
    }

    #[test]
    fn ip_literal_urls_are_checked() {
        let policy = AddressPolicy::default();
        let check = |u: &str| policy.check_url(&reqwest::Url::parse(u).unwrap());
        assert!(check("http://169.254.169.254/latest/meta-data/").unwrap_err().contains("not a public address"));
        assert!(check("http://[::ffff:7f00:1]/").is_err());
        assert!(check("http://0x7f000001/").is_err(), "hex IPv4 is still loopback");
        assert!(check("http://8.8.8.8/x.jpg").is_ok());
        assert!(check("http://example.org/x.jpg").is_ok(), "names are checked when they resolve");
        assert!(check("file:///etc/passwd").is_err());
    }

    #[tokio::test]
    async fn a_refused_name_is_named_and_its_addresses_are_not() {
        let resolver = GuardedResolver { policy: Arc::new(AddressPolicy::default()) };
        let err = resolver.resolve("localhost".parse::<Name>().unwrap()).await.err().expect("refused").to_string();
        assert!(err.starts_with("`localhost` resolves only to"), "{err}");
        // localhost resolves to 127.0.0.1 (and ::1); an internal name's addresses map the intranet.
        assert!(!err.contains("127.0.0.1") && !err.contains("::1"), "{err}");
    }

    #[test]
    fn redaction_keeps_where_a_url_points_and_drops_its_secrets() {
        assert_eq!(
            redact("https://user:s3cret@hooks.example:8443/cb/42?token=s3cret&x=1#s3cret"),
            "https://hooks.example:8443/cb/42?…"
        );
        assert_eq!(redact("http://10.0.0.7/list.csv"), "http://10.0.0.7/list.csv");
        assert_eq!(redact("https://photos.example/a.jpg?"), "https://photos.example/a.jpg?…");
        assert!(!redact("not a URL ?token=s3cret").contains("s3cret"));
    }

    #[tokio::test]
    async fn error_texts_show_the_url_redacted() {
        // A port nothing listens on: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let e = client.get(format!("http://user:s3cret@127.0.0.1:{port}/cb?token=s3cret")).send().await.unwrap_err();
        let text = error_text(&e);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains(&format!("http://127.0.0.1:{port}/cb?…")), "{text}");
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused_unless_allowed() {
        let resolver = GuardedResolver { policy: Arc::new(AddressPolicy::default()) };
        let err = resolver.resolve("localhost".parse::<Name>().unwrap()).await.err().expect("refused");
        assert!(err.to_string().contains("not public"), "{err}");
        let open =
            GuardedResolver { policy: Arc::new(AddressPolicy::from_allowlist(&["127.0.0.0/8".into(), "::1".into()])) };
        assert!(open.resolve("localhost".parse::<Name>().unwrap()).await.is_ok());
    }
}
