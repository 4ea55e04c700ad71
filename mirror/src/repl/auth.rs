//! Mutual authentication of the two nodes with their shared secret, before any data flows.
//!
//! Challenge–response with a keyed BLAKE3 MAC: each side sends a fresh random nonce and
//! proves knowledge of the secret by MACing both nonces, both node names, the volume and its
//! own role in the exchange, and the protocol versions offered and chosen (so that nobody in
//! between can make two nodes settle on an older version than both speak). The secret never
//! crosses the wire; a recorded exchange cannot be
//! replayed (the other side's nonce is new each time); a proof from the acceptor cannot be
//! reflected back as the dialer's (the role is in the MAC).
//! The link is authenticated, not encrypted: run replication on a trusted network or a VPN.

/// Domain separation for the key derived from the configured secret.
const KEY_CONTEXT: &str = "nbdmirror 2026-11 replication link authentication v1";

#[derive(Clone)]
pub struct AuthKey([u8; 32]);

impl AuthKey {
    pub fn from_secret(secret: &str) -> AuthKey {
        AuthKey(blake3::derive_key(KEY_CONTEXT, secret.as_bytes()))
    }
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

/// Which side of the handshake computes the proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Dialer,
    Acceptor,
}

/// What both sides MAC.
pub struct Transcript<'a> {
    pub dialer_node: &'a str,
    pub acceptor_node: &'a str,
    pub volume: &'a str,
    pub dialer_nonce: &'a [u8; 32],
    pub acceptor_nonce: &'a [u8; 32],
    /// The dialer's (oldest, newest) protocol versions, as it sent them.
    pub offered_versions: (u16, u16),
    /// The version the acceptor chose.
    pub version: u16,
}

pub fn proof(key: &AuthKey, side: Side, t: &Transcript<'_>) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(match side {
        Side::Dialer => b"dialer\0",
        Side::Acceptor => b"accept\0",
    });
    for part in [t.dialer_node, t.acceptor_node, t.volume] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(t.dialer_nonce);
    h.update(t.acceptor_nonce);
    h.update(&t.offered_versions.0.to_be_bytes());
    h.update(&t.offered_versions.1.to_be_bytes());
    h.update(&t.version.to_be_bytes());
    *h.finalize().as_bytes()
}

/// Constant-time check of a proof received from the other side.
pub fn verify(key: &AuthKey, side: Side, t: &Transcript<'_>, received: &[u8; 32]) -> bool {
    blake3::Hash::from(proof(key, side, t)) == blake3::Hash::from(*received)
}

/// A fresh nonce from the OS's randomness.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    if getrandom(&mut n).is_err() {
        // /dev/urandom is always there on Linux; if it is not, a time- and address-based
        // value still never repeats within a process (the MAC's key is the real secret).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let h = blake3::hash(
            &[
                t.to_le_bytes(),
                (&n as *const _ as usize as u128).to_le_bytes(),
            ]
            .concat(),
        );
        n = *h.as_bytes();
    }
    n
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(a: &'a [u8; 32], b: &'a [u8; 32]) -> Transcript<'a> {
        Transcript {
            dialer_node: "node-a",
            acceptor_node: "node-b",
            volume: "disk0",
            dialer_nonce: a,
            acceptor_nonce: b,
            offered_versions: (1, 2),
            version: 2,
        }
    }

    #[test]
    fn proofs_verify_only_with_the_same_secret_side_and_nonces() {
        let key = AuthKey::from_secret("a shared secret of some length");
        let other = AuthKey::from_secret("another secret of some length");
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        let t = transcript(&a, &b);
        let p = proof(&key, Side::Dialer, &t);
        assert!(verify(&key, Side::Dialer, &t, &p));
        assert!(!verify(&other, Side::Dialer, &t, &p));
        assert!(
            !verify(&key, Side::Acceptor, &t, &p),
            "reflection must fail"
        );
        let fresh = nonce();
        assert!(
            !verify(&key, Side::Dialer, &transcript(&a, &fresh), &p),
            "replay must fail"
        );
        let downgraded = Transcript {
            offered_versions: (1, 1),
            version: 1,
            ..transcript(&a, &b)
        };
        assert!(
            !verify(&key, Side::Dialer, &downgraded, &p),
            "a rewritten version offer must fail"
        );
    }
}
