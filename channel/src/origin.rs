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
    /// like Phoenix's `check_origin: true`).
    #[default]
    SameHost,
    /// Allow these origins: full origins (`https://app.example.com`), hosts (`app.example.com`, any
    /// scheme and port), or `*.example.com` for any subdomain.
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
            OriginCheck::Allow(list) => list.iter().any(|allowed| {
                if allowed.contains("://") {
                    allowed.trim_end_matches('/').eq_ignore_ascii_case(origin.trim_end_matches('/'))
                } else if let Some(suffix) = allowed.strip_prefix("*.") {
                    host.len() > suffix.len()
                        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                        && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
                } else {
                    host.eq_ignore_ascii_case(allowed)
                }
            }),
        }
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
}
