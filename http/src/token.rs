//! Signed session tokens, for transports that keep a session between requests (long-poll, SSE).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Longest payload [`SessionSigner::verify`] accepts, in bytes. Longer tokens are refused before
/// any decoding, so a peer cannot make the server work on a huge token.
pub const MAX_TOKEN_PAYLOAD: usize = 256;

/// Signs and verifies session tokens with HMAC-SHA256, so a peer can neither guess nor alter the
/// session a token names.
///
/// A token is `base64url(payload) "." base64url(hmac(payload))`, safe in a URL query. The payload
/// is whatever the transport uses to find its session, typically [`random_session_id`]: 128
/// random bits, never reused, so a token of an ended session can never name a newer one.
///
/// A token that fails [`verify`](SessionSigner::verify) (forged, altered, garbage, or signed with
/// another secret, e.g. before a restart) is not the client's fault: Phoenix clients expect
/// "session gone" (`410`) for it, never a refusal (`403`).
///
/// ```
/// use fawkes_http::{SessionSigner, random_session_id};
///
/// let signer = SessionSigner::new(Some(b"shared by every node"));
/// let id = random_session_id();
/// let token = signer.sign(&id);
/// assert_eq!(signer.verify(&token).as_deref(), Some(&id[..]));
///
/// assert_eq!(SessionSigner::new(Some(b"another secret")).verify(&token), None);
/// assert_eq!(signer.verify("forged.token"), None);
/// ```
#[derive(Clone)]
pub struct SessionSigner {
    key: Vec<u8>,
}

impl fmt::Debug for SessionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSigner").finish_non_exhaustive()
    }
}

impl SessionSigner {
    /// A signer keyed with `secret`; with `None`, a random key for this process only (tokens then
    /// stop verifying after a restart, and clients start new sessions).
    pub fn new(secret: Option<&[u8]>) -> SessionSigner {
        let key = match secret {
            Some(secret) => secret.to_vec(),
            None => [random_session_id(), random_session_id()].concat(),
        };
        SessionSigner { key }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC accepts any key length")
    }

    /// A token for `payload` (at most [`MAX_TOKEN_PAYLOAD`] bytes, or it will not verify).
    pub fn sign(&self, payload: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(payload);
        let tag = mac.finalize().into_bytes();
        format!("{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(tag))
    }

    /// The payload of a token this signer made; `None` for anything else. The tag is compared in
    /// constant time.
    pub fn verify(&self, token: &str) -> Option<Vec<u8>> {
        let (payload, tag) = token.split_once('.')?;
        if payload.len() > MAX_TOKEN_PAYLOAD.div_ceil(3) * 4 || tag.len() > 44 {
            return None;
        }
        let payload = URL_SAFE_NO_PAD.decode(payload).ok().filter(|p| p.len() <= MAX_TOKEN_PAYLOAD)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&tag).ok()?;
        Some(payload)
    }
}

/// 128 bits from the operating system's random number generator: a session id no one can guess.
///
/// # Panics
/// When the operating system has no randomness to give: there is then no safe way to make tokens.
pub fn random_session_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).expect("the operating system's random number generator is unavailable");
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_when_untouched_and_signed_by_the_same_secret() {
        let signer = SessionSigner::new(Some(b"secret"));
        let id = random_session_id();
        let token = signer.sign(&id);
        assert_eq!(signer.verify(&token), Some(id.to_vec()));
        assert_eq!(SessionSigner::new(Some(b"another secret")).verify(&token), None);
        assert_eq!(SessionSigner::new(None).verify(&token), None, "a random key is not the same secret");

        let mut altered = token.clone().into_bytes();
        altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(signer.verify(std::str::from_utf8(&altered).expect("ascii")), None);

        for garbage in ["", ".", "abc", "a.b", &"x".repeat(10_000), "🙂.🙂"] {
            assert_eq!(signer.verify(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn payloads_up_to_the_cap_verify_and_longer_ones_do_not() {
        let signer = SessionSigner::new(Some(b"secret"));
        let at_cap = vec![7u8; MAX_TOKEN_PAYLOAD];
        assert_eq!(signer.verify(&signer.sign(&at_cap)), Some(at_cap));
        assert_eq!(signer.verify(&signer.sign(&[7u8; MAX_TOKEN_PAYLOAD + 1])), None);
        assert_eq!(signer.verify(&signer.sign(b"")), Some(Vec::new()));
    }
}
