//! Device files (credentials, key files) encrypted at rest with a
//! passphrase, for devices a person unlocks; unattended devices keep them
//! plain (0600). The key is Argon2id over the passphrase and a random
//! salt; the text is sealed with XChaCha20-Poly1305, the parameters bound
//! as associated data. The file stays TOML, so it says what it is:
//!
//! ```text
//! [encrypted]
//! kdf = "argon2id"   m_kib, t, p: its cost
//! salt, nonce, ciphertext (base64)
//! ```
//!
//! The passphrase comes from `GATEKEEPER_PASSPHRASE` (for scripts and
//! services), else from the OS keyring, else from a prompt on the
//! terminal. The keyring is the Linux kernel's user keyring
//! ([`crate::platform::keyring`]; other systems keep nothing): a passphrase
//! typed at the prompt is kept there for [`KEPT_FOR`], so the commands that
//! follow do not ask again (`gatekeeper forget FILE` drops it sooner); one
//! found there that no longer opens the file is passed over.

use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use base64::{Engine, engine::general_purpose::STANDARD};
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where scripts and services put the passphrase.
pub const PASSPHRASE_ENV: &str = "GATEKEEPER_PASSPHRASE";

/// How long a typed passphrase stays in the keyring.
pub const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// Argon2id's cost: 64 MiB, three passes (about a tenth of a second).
const M_KIB: u32 = 64 * 1024;
const T: u32 = 3;
const P: u32 = 1;
/// The most memory a file may ask the KDF for, so a planted file cannot
/// exhaust the device.
const MAX_M_KIB: u32 = 1024 * 1024;

#[derive(Debug, Error)]
pub enum EncryptedError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is encrypted: set {PASSPHRASE_ENV} or run on a terminal to be asked for its passphrase")]
    NoPassphrase(PathBuf),
    #[error("reading the passphrase from the terminal")]
    Prompt(#[source] std::io::Error),
    #[error("the two passphrases differ")]
    Mismatch,
    #[error("an empty passphrase protects nothing")]
    Empty,
    #[error("{0}: wrong passphrase, or the file was altered")]
    Wrong(PathBuf),
    #[error("{path} is not a file gatekeeper encrypted: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    encrypted: Sealed,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed {
    kdf: String,
    m_kib: u32,
    t: u32,
    p: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

impl Sealed {
    /// What the ciphertext is bound to besides the key.
    fn aad(&self) -> String {
        format!(
            "gatekeeper encrypted file v1 {} {} {} {}",
            self.kdf, self.m_kib, self.t, self.p
        )
    }
}

/// Whether `text` is an encrypted file.
pub fn is_encrypted(text: &str) -> bool {
    toml::from_str::<File>(text).is_ok()
}

fn key(passphrase: &str, salt: &[u8], m_kib: u32, t: u32, p: u32) -> Option<[u8; 32]> {
    let params = Params::new(m_kib, t, p, Some(32)).ok()?;
    let mut key = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, &mut key)
        .ok()?;
    Some(key)
}

/// `text` encrypted under `passphrase`, as a file's text.
pub fn encrypt(text: &str, passphrase: &str) -> String {
    let (mut salt, mut nonce) = ([0u8; 16], [0u8; 24]);
    OsRng.fill_bytes(&mut salt);
    OsRng.fill_bytes(&mut nonce);
    let mut sealed = Sealed {
        kdf: "argon2id".into(),
        m_kib: M_KIB,
        t: T,
        p: P,
        salt: STANDARD.encode(salt),
        nonce: STANDARD.encode(nonce),
        ciphertext: String::new(),
    };
    // Constant, valid parameters: the derivation cannot fail.
    let key = key(passphrase, &salt, M_KIB, T, P).expect("valid Argon2 parameters");
    let aad = sealed.aad();
    let ciphertext = XChaCha20Poly1305::new(&key.into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: text.as_bytes(),
                aad: aad.as_bytes(),
            },
        )
        .expect("a small file fits one AEAD message");
    sealed.ciphertext = STANDARD.encode(ciphertext);
    format!(
        "# Gatekeeper file encrypted with a passphrase (`gatekeeper decrypt FILE` makes it plain again).\n{}",
        toml::to_string(&File { encrypted: sealed }).expect("strings and numbers serialize")
    )
}

/// The plain text of the encrypted file `text`, read from `path`.
pub fn decrypt(text: &str, passphrase: &str, path: &Path) -> Result<String, EncryptedError> {
    let damaged = |reason: &str| EncryptedError::Damaged {
        path: path.into(),
        reason: reason.into(),
    };
    let sealed = toml::from_str::<File>(text)
        .map_err(|e| damaged(e.message()))?
        .encrypted;
    if sealed.kdf != "argon2id" || sealed.m_kib > MAX_M_KIB {
        return Err(damaged("unknown or too costly key derivation"));
    }
    let decode = |s: &str| STANDARD.decode(s).map_err(|_| damaged("bad base64"));
    let (salt, nonce, ciphertext) = (
        decode(&sealed.salt)?,
        decode(&sealed.nonce)?,
        decode(&sealed.ciphertext)?,
    );
    if nonce.len() != 24 {
        return Err(damaged("the nonce is not 24 bytes"));
    }
    let key =
        key(passphrase, &salt, sealed.m_kib, sealed.t, sealed.p).ok_or_else(|| damaged("bad Argon2 parameters"))?;
    let aad = sealed.aad();
    let plain = XChaCha20Poly1305::new(&key.into())
        .decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &ciphertext,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| EncryptedError::Wrong(path.into()))?;
    String::from_utf8(plain).map_err(|_| damaged("the plain text is not UTF-8"))
}

/// The passphrase for `path`: from the environment, else asked for.
fn passphrase(path: &Path) -> Result<String, EncryptedError> {
    if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        return Ok(p);
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(EncryptedError::NoPassphrase(path.into()));
    }
    rpassword::prompt_password(format!("passphrase for {}: ", path.display())).map_err(EncryptedError::Prompt)
}

/// A new passphrase for `path`: from the environment, else asked for twice.
pub fn new_passphrase(path: &Path) -> Result<String, EncryptedError> {
    let first = passphrase(path)?;
    if std::env::var(PASSPHRASE_ENV).is_err() {
        let again = rpassword::prompt_password("again: ").map_err(EncryptedError::Prompt)?;
        if again != first {
            return Err(EncryptedError::Mismatch);
        }
    }
    if first.is_empty() {
        return Err(EncryptedError::Empty);
    }
    Ok(first)
}

/// A file's text, decrypted when it is encrypted; and the passphrase
/// then used, to encrypt it again when it is rewritten.
pub fn read(path: &Path) -> Result<(String, Option<String>), EncryptedError> {
    let text = std::fs::read_to_string(path).map_err(|source| EncryptedError::Read {
        path: path.into(),
        source,
    })?;
    if !is_encrypted(&text) {
        return Ok((text, None));
    }
    let kept = std::env::var(PASSPHRASE_ENV)
        .is_err()
        .then(|| crate::platform::keyring::find(&crate::platform::keyring::name(path)))
        .flatten();
    if let Some(p) = kept
        && let Ok(plain) = decrypt(&text, &p, path)
    {
        return Ok((plain, Some(p)));
    }
    let typed = std::env::var(PASSPHRASE_ENV).is_err();
    let passphrase = passphrase(path)?;
    let plain = decrypt(&text, &passphrase, path)?;
    if typed {
        crate::platform::keyring::keep(&crate::platform::keyring::name(path), &passphrase, KEPT_FOR);
    }
    Ok((plain, Some(passphrase)))
}

/// Drops the passphrase of `path` from the keyring; whether one was there.
pub fn forget(path: &Path) -> bool {
    crate::platform::keyring::forget(&crate::platform::keyring::name(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_encrypted_reads_back_only_with_its_passphrase() {
        let path = Path::new("laptop.key");
        let text = "secret_key = \"c2VjcmV0\"\n";
        let sealed = encrypt(text, "correct horse");
        assert!(is_encrypted(&sealed) && !is_encrypted(text));
        assert!(!sealed.contains("c2VjcmV0"));
        assert_eq!(decrypt(&sealed, "correct horse", path).unwrap(), text);
        assert!(matches!(
            decrypt(&sealed, "wrong horse", path),
            Err(EncryptedError::Wrong(_))
        ));
        let cheaper = sealed.replace("t = 3", "t = 1");
        assert!(
            matches!(decrypt(&cheaper, "correct horse", path), Err(EncryptedError::Wrong(_))),
            "the parameters are bound to the ciphertext"
        );
        let costly = sealed.replace("m_kib = 65536", "m_kib = 4194304");
        assert!(matches!(
            decrypt(&costly, "correct horse", path),
            Err(EncryptedError::Damaged { .. })
        ));
    }
}
