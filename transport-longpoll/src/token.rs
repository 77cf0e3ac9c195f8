//! Session tokens: a random session id, signed with HMAC-SHA256 so it cannot be guessed or altered.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A session's id: 128 random bits, never reused, so an old token can never name a newer session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId(pub(crate) [u8; 16]);

impl SessionId {
    pub(crate) fn random() -> SessionId {
        let mut id = [0u8; 16];
        // Failing to read the OS's randomness leaves no safe way to make tokens.
        getrandom::fill(&mut id).expect("the operating system's random number generator is unavailable");
        SessionId(id)
    }
}

pub(crate) struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub(crate) fn new(secret: Option<&[u8]>) -> Signer {
        let key = match secret {
            Some(secret) => secret.to_vec(),
            None => SessionId::random().0.iter().chain(SessionId::random().0.iter()).copied().collect(),
        };
        Signer { key }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC accepts any key length")
    }

    /// `base64url(id) "." base64url(hmac(id))`
    pub(crate) fn sign(&self, id: SessionId) -> String {
        let mut mac = self.mac();
        mac.update(&id.0);
        let tag = mac.finalize().into_bytes();
        format!("{}.{}", URL_SAFE_NO_PAD.encode(id.0), URL_SAFE_NO_PAD.encode(tag))
    }

    /// The session id of a token this server signed; `None` for anything else. The tag is
    /// compared in constant time.
    pub(crate) fn verify(&self, token: &str) -> Option<SessionId> {
        let (id, tag) = token.split_once('.')?;
        if id.len() > 32 || tag.len() > 64 {
            return None;
        }
        let id: [u8; 16] = URL_SAFE_NO_PAD.decode(id).ok()?.try_into().ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = self.mac();
        mac.update(&id);
        mac.verify_slice(&tag).ok()?;
        Some(SessionId(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_when_untouched_and_signed_by_the_same_secret() {
        let signer = Signer::new(Some(b"secret"));
        let id = SessionId::random();
        let token = signer.sign(id);
        assert_eq!(signer.verify(&token), Some(id));

        let other = Signer::new(Some(b"another secret"));
        assert_eq!(other.verify(&token), None);

        let mut altered = token.clone().into_bytes();
        altered[3] = if altered[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(signer.verify(std::str::from_utf8(&altered).expect("ascii")), None);

        for garbage in ["", ".", "abc", "a.b", &"x".repeat(10_000), "🙂.🙂"] {
            assert_eq!(signer.verify(garbage), None, "{garbage:?}");
        }
    }
}
