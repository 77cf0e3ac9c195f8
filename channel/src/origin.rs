//! Which `Origin`s may open a socket.

use http::HeaderMap;
use http::header::{HOST, ORIGIN};

/// The origin check applied to every connect that carries an `Origin` header (browsers always
/// send one; other clients usually do not, and are not checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OriginCheck {
    /// Allow any origin.
    Any,
    /// Allow only an origin whose host and port equal the request's `Host` header (the default,
    /// like Phoenix's `check_origin: true`). The `Host` header is the client's to choose: a
    /// DNS-rebinding page on `http://evil.example` that resolves to a server bound to localhost
    /// sends `Host: evil.example` and passes. Servers that know their own origins list them in
    /// [`OriginCheck::Allow`] instead (`fawkes serve` does, without `allowed_origins`).
    #[default]
    SameHost,
    /// Allow these origins, as Phoenix's `check_origin` list does: full origins
    /// (`https://app.example.com`, `http://localhost:3000`), hosts (`app.example.com`, any scheme
    /// and port), and `*` wildcards for subdomains or ports (`https://*.example.com`,
    /// `*.example.com`, `http://localhost:*`). [`OriginCheck::allow_list`] checks the patterns.
    Allow(Vec<String>),
}

impl OriginCheck {
    /// True when a request with these headers passes the check.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(ORIGIN).and_then(|o| o.to_str().ok()) else {
            return true;
        };
        let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest).trim_end_matches('/');
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority });
        match self {
            OriginCheck::Any => true,
            OriginCheck::SameHost => {
                headers.get(HOST).and_then(|h| h.to_str().ok()).is_some_and(|h| h.eq_ignore_ascii_case(authority))
            }
            OriginCheck::Allow(list) => list.iter().any(|allowed| match allowed.split_once("://") {
                Some((scheme, rest)) => {
                    let Some((origin_scheme, origin_rest)) = origin.split_once("://") else { return false };
                    let origin_rest = origin_rest.trim_end_matches('/');
                    let rest = rest.trim_end_matches('/');
                    if !scheme.eq_ignore_ascii_case(origin_scheme) {
                        return false;
                    }
                    let (origin_host, origin_port) = split_port(origin_rest);
                    let (allowed_host, allowed_port) = split_port(rest);
                    let port_ok = match allowed_port {
                        Some("*") => true,
                        other => other == origin_port,
                    };
                    port_ok && host_matches(allowed_host, origin_host)
                }
                None => host_matches(allowed, host),
            }),
        }
    }

    /// An [`OriginCheck::Allow`] list, each pattern checked first; `["*"]` is [`OriginCheck::Any`].
    ///
    /// ```
    /// use fawkes_channel::OriginCheck;
    ///
    /// let check = OriginCheck::allow_list(["http://localhost:*", "https://*.example.com"]).unwrap();
    /// assert!(matches!(check, OriginCheck::Allow(_)));
    /// assert!(OriginCheck::allow_list(["https://*"]).is_err());
    /// ```
    pub fn allow_list<I, S>(patterns: I) -> Result<OriginCheck, OriginPatternError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let patterns: Vec<String> = patterns.into_iter().map(Into::into).collect();
        if patterns.len() == 1 && patterns[0] == "*" {
            return Ok(OriginCheck::Any);
        }
        for pattern in &patterns {
            check_pattern(pattern).map_err(|reason| OriginPatternError { pattern: pattern.clone(), reason })?;
        }
        Ok(OriginCheck::Allow(patterns))
    }
}

/// An origin pattern that [`OriginCheck::allow_list`] cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "origin pattern {pattern:?}: {reason} (expected e.g. \"https://app.example.com\", \"http://localhost:*\", \"https://*.example.com\" or \"example.com\")"
)]
pub struct OriginPatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn check_pattern(pattern: &str) -> Result<(), &'static str> {
    let (scheme, rest) = match pattern.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest.trim_end_matches('/')),
        None => (None, pattern),
    };
    if scheme.is_some_and(|s| s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))) {
        return Err("the scheme is not a URL scheme");
    }
    if rest.contains('/') {
        return Err("an origin has no path");
    }
    let (host, port) = if scheme.is_some() { split_port(rest) } else { (rest, None) };
    if port.is_some_and(|port| port != "*" && port.parse::<u16>().is_err()) {
        return Err("the port is neither a number nor *");
    }
    let bare = host.strip_prefix("*.").unwrap_or(host);
    if bare.is_empty() {
        return Err("no host");
    }
    if bare.contains('*') {
        return Err("* may only stand for subdomains (*.example.com) or the port (:*)");
    }
    if bare.contains(':') && !bare.starts_with('[') {
        return Err("a port needs a scheme (http://host:port)");
    }
    Ok(())
}

/// `host:port` into the host and the port, when there is one (IPv6 hosts keep their brackets).
fn split_port(authority: &str) -> (&str, Option<&str>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// `allowed` is a host or `*.suffix` (any subdomain of suffix, not suffix itself).
fn host_matches(allowed: &str, host: &str) -> bool {
    match allowed.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => host.eq_ignore_ascii_case(allowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: &str, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ORIGIN, origin.parse().expect("valid header"));
        h.insert(HOST, host.parse().expect("valid header"));
        h
    }

    #[test]
    fn same_host_compares_host_and_port() {
        assert!(OriginCheck::SameHost.allows(&headers("http://localhost:4000", "localhost:4000")));
        assert!(!OriginCheck::SameHost.allows(&headers("http://localhost:4001", "localhost:4000")));
        assert!(!OriginCheck::SameHost.allows(&headers("https://evil.example", "localhost:4000")));
        assert!(OriginCheck::SameHost.allows(&HeaderMap::new()));
    }

    #[test]
    fn allow_list_takes_origins_hosts_and_wildcards() {
        let check = OriginCheck::Allow(vec!["https://a.example".into(), "b.example".into(), "*.c.example".into()]);
        assert!(check.allows(&headers("https://a.example", "x")));
        assert!(!check.allows(&headers("http://a.example", "x")));
        assert!(check.allows(&headers("http://b.example:8080", "x")));
        assert!(check.allows(&headers("https://app.c.example", "x")));
        assert!(!check.allows(&headers("https://evilc.example", "x")));
        assert!(!check.allows(&headers("https://c.example", "x")));
    }

    #[test]
    fn allow_list_takes_wildcard_subdomains_and_ports_with_a_scheme() {
        let check = OriginCheck::allow_list(["http://localhost:*", "https://*.example.com", "http://127.0.0.1:3000"])
            .expect("valid patterns");
        assert!(check.allows(&headers("http://localhost:3000", "x")));
        assert!(check.allows(&headers("http://localhost", "x")));
        assert!(!check.allows(&headers("https://localhost:3000", "x")));
        assert!(check.allows(&headers("https://app.example.com", "x")));
        assert!(!check.allows(&headers("http://app.example.com", "x")));
        assert!(!check.allows(&headers("https://app.example.com:8443", "x")));
        assert!(!check.allows(&headers("https://example.com", "x")));
        assert!(check.allows(&headers("http://127.0.0.1:3000", "x")));
        assert!(!check.allows(&headers("http://127.0.0.1:3001", "x")));
        assert!(!check.allows(&headers("null", "x")));
    }

    #[test]
    fn allow_list_refuses_patterns_it_cannot_match() {
        for bad in ["https://*", "http://a.*.com", "https://a.example/path", "http://host:port", "", "host:3000"] {
            assert!(OriginCheck::allow_list([bad]).is_err(), "{bad:?} accepted");
        }
        assert_eq!(OriginCheck::allow_list(["*"]), Ok(OriginCheck::Any));
    }
}
