//! Encryption of tokens at rest: AES-256-GCM with keys from the environment. Each ciphertext
//! names the key that sealed it (`v1:<key id>:<base64 nonce‖ciphertext>`), so a new key can be
//! added in front of the old ones and tokens re-sealed at leisure (`audience-producer connection
//! rotate-keys`). The workspace and the token's kind are the associated data: a ciphertext
//! copied onto another workspace, or from the user slot to the system-user slot, does not open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

const VERSION: &str = "v1";

/// Why a token could not be sealed or opened. None of them is retryable: a key is missing or
/// wrong, or the stored value was tampered with.
#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error("no encryption key is configured: set AE_CONNECTIONS__ENCRYPTION_KEYS to `<key id>:<base64 of 32 random bytes>` (openssl rand -base64 32)")]
    NoKey,
    #[error("encryption key `{0}` is malformed: expected `<key id>:<base64 of 32 bytes>`, ids without `:` or `,`")]
    BadKey(String),
    #[error("the token was sealed with key `{0}`, which is not configured any more")]
    UnknownKey(String),
    #[error("a stored token is not a ciphertext this fleet wrote")]
    Malformed,
    #[error(
        "a stored token does not open with its key: tampered with, or moved between workspaces"
    )]
    Tampered,
}

/// The configured keys; the first seals, every one opens.
#[derive(Clone)]
pub struct TokenCipher {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("TokenCipher")
            .field("key_ids", &ids)
            .finish()
    }
}

impl TokenCipher {
    /// Parses `id:base64,id:base64,...` (the first is the active key).
    pub fn from_config(keys: Option<&SecretString>) -> Result<TokenCipher, CipherError> {
        let Some(keys) = keys else {
            return Err(CipherError::NoKey);
        };
        let mut parsed = Vec::new();
        for entry in keys.expose_secret().split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            // Without a `:` the entry may be bare key material: never echo it.
            let (id, material) = entry
                .split_once(':')
                .ok_or_else(|| CipherError::BadKey("(no id)".to_owned()))?;
            let bytes = B64
                .decode(material)
                .map_err(|_| CipherError::BadKey(id.to_owned()))?;
            if id.is_empty() || bytes.len() != 32 {
                return Err(CipherError::BadKey(id.to_owned()));
            }
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| CipherError::BadKey(id.to_owned()))?;
            parsed.push((id.to_owned(), cipher));
        }
        if parsed.is_empty() {
            return Err(CipherError::NoKey);
        }
        Ok(TokenCipher { keys: parsed })
    }

    /// A cipher with one fresh random key, for tests and the demo.
    pub fn generate_config(id: &str) -> SecretString {
        let key: [u8; 32] = rand::random();
        SecretString::from(format!("{id}:{}", B64.encode(key)))
    }

    pub fn active_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `token` for `context` (the workspace and slot it belongs to).
    pub fn seal(&self, token: &SecretString, context: &str) -> String {
        let (id, cipher) = &self.keys[0];
        let nonce: [u8; 12] = rand::random();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: token.expose_secret().as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("AES-GCM encrypts any message shorter than 64 GiB");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        format!("{VERSION}:{id}:{}", B64.encode(blob))
    }

    /// Opens what `seal` wrote for the same `context`.
    pub fn open(&self, stored: &str, context: &str) -> Result<SecretString, CipherError> {
        let mut parts = stored.splitn(3, ':');
        let (Some(VERSION), Some(id), Some(blob)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(CipherError::Malformed);
        };
        let cipher = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, c)| c)
            .ok_or_else(|| CipherError::UnknownKey(id.to_owned()))?;
        let blob = B64.decode(blob).map_err(|_| CipherError::Malformed)?;
        if blob.len() < 12 + 16 {
            return Err(CipherError::Malformed);
        }
        let (nonce, sealed) = blob.split_at(12);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CipherError::Tampered)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CipherError::Tampered)
    }

    /// The key id a stored ciphertext names, if it is one of ours.
    pub fn key_id_of(stored: &str) -> Option<&str> {
        let mut parts = stored.splitn(3, ':');
        (parts.next() == Some(VERSION))
            .then(|| parts.next())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SecretString {
        SecretString::from("EAAsecret-token-value")
    }

    #[test]
    fn seals_and_opens_without_the_token_in_the_ciphertext() {
        let cipher = TokenCipher::from_config(Some(&TokenCipher::generate_config("k1"))).unwrap();
        let stored = cipher.seal(&token(), "ws-1/user");
        assert!(stored.starts_with("v1:k1:"), "{stored}");
        assert!(!stored.contains("EAAsecret"));
        assert_ne!(stored, cipher.seal(&token(), "ws-1/user"), "fresh nonce");
        let opened = cipher.open(&stored, "ws-1/user").unwrap();
        assert_eq!(opened.expose_secret(), "EAAsecret-token-value");
    }

    #[test]
    fn a_ciphertext_does_not_open_for_another_workspace_or_slot() {
        let cipher = TokenCipher::from_config(Some(&TokenCipher::generate_config("k1"))).unwrap();
        let stored = cipher.seal(&token(), "ws-1/user");
        assert!(matches!(
            cipher.open(&stored, "ws-2/user"),
            Err(CipherError::Tampered)
        ));
        assert!(matches!(
            cipher.open(&stored, "ws-1/system_user"),
            Err(CipherError::Tampered)
        ));
        let mut flipped = stored.clone().into_bytes();
        let last = flipped.len() - 3;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert!(cipher
            .open(std::str::from_utf8(&flipped).unwrap(), "ws-1/user")
            .is_err());
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let old = TokenCipher::generate_config("old");
        let new = TokenCipher::generate_config("new");
        let before = TokenCipher::from_config(Some(&old)).unwrap();
        let stored = before.seal(&token(), "ws-1/user");
        let both = SecretString::from(format!("{},{}", new.expose_secret(), old.expose_secret()));
        let after = TokenCipher::from_config(Some(&both)).unwrap();
        assert_eq!(after.active_key_id(), "new");
        assert_eq!(TokenCipher::key_id_of(&stored), Some("old"));
        assert!(after.open(&stored, "ws-1/user").is_ok());
        let resealed = after.seal(&token(), "ws-1/user");
        assert_eq!(TokenCipher::key_id_of(&resealed), Some("new"));
        let only_new = TokenCipher::from_config(Some(&new)).unwrap();
        assert!(matches!(
            only_new.open(&stored, "ws-1/user"),
            Err(CipherError::UnknownKey(id)) if id == "old"
        ));
    }

    #[test]
    fn missing_or_malformed_keys_are_refused_with_the_fix() {
        assert!(matches!(
            TokenCipher::from_config(None),
            Err(CipherError::NoKey)
        ));
        assert!(CipherError::NoKey
            .to_string()
            .contains("openssl rand -base64 32"));
        let short = SecretString::from("k1:c2hvcnQ=");
        assert!(matches!(
            TokenCipher::from_config(Some(&short)),
            Err(CipherError::BadKey(id)) if id == "k1"
        ));
        let no_id = SecretString::from("justbase64");
        assert!(TokenCipher::from_config(Some(&no_id)).is_err());
    }
}
