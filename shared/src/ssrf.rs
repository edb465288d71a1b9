//! The SSRF guard for webhook targets: a webhook must not become a way to reach the
//! platform's own network. Checked when a subscription or job names a URL, and again at
//! delivery time against the addresses the host resolves to then (DNS can change).
//!
//! Refused: private, loopback, link-local (cloud metadata lives there), CGNAT,
//! multicast, broadcast, unspecified and reserved addresses, IPv4 and IPv6, including
//! IPv4-mapped and NAT64 forms (6to4, Teredo and local-use NAT64 are refused whole).
//! Hosts in the configured allowlist skip the address check (local development and
//! tests) and may use plain `http`; everything else needs `https`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

/// Longest webhook URL accepted.
pub const MAX_URL_LENGTH: usize = 2048;
/// How long a webhook host's name may take to resolve when a URL is checked.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TargetError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is not an allowed webhook target (private, loopback, link-local or reserved address)")]
    Forbidden(String),
    #[error("cannot resolve {0}")]
    Unresolvable(String),
}

/// Which hosts may skip the address check.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    allowed_hosts: Vec<String>,
}

impl TargetPolicy {
    pub fn new(allowed_hosts: &[String]) -> Self {
        Self { allowed_hosts: allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect() }
    }

    pub fn allows_host(&self, host: &str) -> bool {
        self.allowed_hosts.iter().any(|h| h == &host.to_ascii_lowercase())
    }

    /// The URL's shape: http(s), a host, no credentials, not too long; an IP literal is
    /// checked here, a host name only once resolved.
    pub fn parse(&self, url: &str) -> Result<Url, TargetError> {
        if url.len() > MAX_URL_LENGTH {
            return Err(TargetError::Invalid(format!("longer than {MAX_URL_LENGTH} characters")));
        }
        let parsed = Url::parse(url).map_err(|e| TargetError::Invalid(format!("not a URL: {e}")))?;
        let host = parsed.host_str().ok_or_else(|| TargetError::Invalid("no host".into()))?.to_owned();
        let allowed = self.allows_host(&host);
        match parsed.scheme() {
            "https" => {}
            "http" if allowed => {}
            "http" => return Err(TargetError::Invalid("webhooks need https".into())),
            other => return Err(TargetError::Invalid(format!("unsupported scheme {other}"))),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(TargetError::Invalid("credentials in the URL are not accepted".into()));
        }
        if !allowed
            && let Some(ip) = literal_ip(&parsed)
            && is_forbidden(ip)
        {
            return Err(TargetError::Forbidden(host));
        }
        Ok(parsed)
    }

    /// [`parse`](Self::parse), then resolves a host name and refuses it when any of its
    /// addresses is forbidden.
    pub async fn check(&self, url: &str) -> Result<Url, TargetError> {
        let parsed = self.parse(url)?;
        let host = parsed.host_str().unwrap_or_default().to_owned();
        if self.allows_host(&host) || literal_ip(&parsed).is_some() {
            return Ok(parsed);
        }
        let port = parsed.port_or_known_default().unwrap_or(443);
        // The resolver runs on the blocking pool; a name server that never answers must
        // not hold a thread (and the request) for the resolver's own timeouts.
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host.as_str(), port)));
        let addresses: Vec<IpAddr> = lookup
            .await
            .map_err(|_| TargetError::Unresolvable(host.clone()))?
            .map_err(|_| TargetError::Unresolvable(host.clone()))?
            .map(|a| a.ip())
            .collect();
        if addresses.is_empty() {
            return Err(TargetError::Unresolvable(host));
        }
        if addresses.into_iter().any(is_forbidden) {
            return Err(TargetError::Forbidden(host));
        }
        Ok(parsed)
    }
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    }
}

/// Whether an address is off limits for webhooks.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => forbidden_v4(ip),
        IpAddr::V6(ip) => forbidden_v6(ip),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let segments = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the IPv4 address in its low bits.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = segments[6].to_be_bytes();
        let [c, d] = segments[7].to_be_bytes();
        return forbidden_v4(Ipv4Addr::new(a, b, c, d));
    }
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local fc00::/7 (AWS metadata fd00:ec2::254 too)
        || (segments[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated) fec0::/10
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        || segments[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated)
        // Forms that also carry an IPv4 address, refused whole: a local-use NAT64 prefix
        // reaches the local network; 6to4 and Teredo are deprecated; so is IPv4-translated.
        || segments[..3] == [0x64, 0xff9b, 1] // local-use NAT64 64:ff9b:1::/48
        || segments[0] == 0x2002 // 6to4 2002::/16
        || segments[..2] == [0x2001, 0] // Teredo 2001::/32
        || segments[..6] == [0, 0, 0, 0, 0xffff, 0] // IPv4-translated ::ffff:0:0:0/96
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(ip: &str) -> bool {
        is_forbidden(ip.parse().unwrap())
    }

    #[test]
    fn private_and_special_addresses_are_forbidden() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::127.0.0.1",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::ffff:0:a9fe:a9fe",
        ] {
            assert!(forbidden(ip), "{ip} must be forbidden");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(!forbidden(ip), "{ip} must be allowed");
        }
    }

    #[test]
    fn urls_need_https_a_public_host_and_no_credentials() {
        let policy = TargetPolicy::new(&["127.0.0.1".into()]);
        assert!(policy.parse("https://example.com/hook").is_ok());
        assert!(matches!(policy.parse("http://example.com/hook"), Err(TargetError::Invalid(_))));
        assert!(matches!(policy.parse("ftp://example.com/"), Err(TargetError::Invalid(_))));
        assert!(matches!(policy.parse("https://u:p@example.com/"), Err(TargetError::Invalid(_))));
        assert!(matches!(policy.parse("not a url"), Err(TargetError::Invalid(_))));
        assert!(matches!(policy.parse("https://10.0.0.1/"), Err(TargetError::Forbidden(_))));
        assert!(matches!(policy.parse("https://[::1]/"), Err(TargetError::Forbidden(_))));
        assert!(matches!(policy.parse("https://169.254.169.254/latest"), Err(TargetError::Forbidden(_))));
        let strict = TargetPolicy::default();
        assert!(matches!(strict.parse("https://2130706433/"), Err(TargetError::Forbidden(_))), "decimal 127.0.0.1");
        // The allowlist admits a local receiver, over plain http too.
        assert!(policy.parse("http://127.0.0.1:9000/hook").is_ok());
        assert!(matches!(TargetPolicy::default().parse("http://127.0.0.1:9000/"), Err(TargetError::Invalid(_))));
        assert!(matches!(TargetPolicy::default().parse("https://127.0.0.1:9000/"), Err(TargetError::Forbidden(_))));
    }

    #[tokio::test]
    async fn host_names_are_checked_once_resolved() {
        let policy = TargetPolicy::default();
        assert_eq!(policy.check("https://localhost/hook").await, Err(TargetError::Forbidden("localhost".into())));
        assert!(matches!(policy.check("https://does-not-exist.invalid/").await, Err(TargetError::Unresolvable(_))));
    }
}
