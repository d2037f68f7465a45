//! What a device keeps to knock: its secret key and how to reach the
//! gateway. The gateway keeps only the public half.
//!
//! Two ways to get there:
//! - the device makes its own key pair (`gatekeeper keygen`, a [`KeyFile`])
//!   and the gateway enrolls the public key (`client add --public-key`, or
//!   `client request` / `client approve`); the credential it gets back
//!   names the key file and holds no secret;
//! - for convenience, `client add` makes the pair on the gateway and the
//!   credential carries the secret, so it must travel privately.
//!
//! Either file may be encrypted at rest with a passphrase
//! ([`crate::encrypted_file`]); both are read through it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use x25519_dalek::{PublicKey, StaticSecret};

use super::keys;
use crate::encrypted_file::{self, EncryptedError};

#[derive(Debug, Error)]
pub enum CredentialError {
    #[error(transparent)]
    Read(#[from] EncryptedError),
    #[error("the credential {path} is not one gatekeeper wrote: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("the key file {path} is not one `gatekeeper keygen` wrote: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error(
        "the credential {0} holds no secret key and names no key_file: install it with `gatekeeper client install CREDENTIAL --key KEYFILE`"
    )]
    NoSecret(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub name: String,
    /// The device's secret key, when the gateway made the pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
    /// Where the device's own key is (`gatekeeper keygen`); relative to
    /// the credential's directory unless absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    pub server_public_key: String,
    /// How to reach the gateway: addresses or DNS names (resolved at each
    /// knock), first one first.
    pub servers: Vec<String>,
    pub knock_port: u16,
    /// The gateway's tunnel listener, where a device learns the gateway's
    /// next knock key (`client refresh`); older credentials: the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel_port: Option<u16>,
    /// The SHA-256 pin of the gateway's TLS public key (the portal presents
    /// it unless the operator configured another certificate). Older
    /// credentials pin the whole certificate; `client refresh` updates them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
    /// The newest knock format the gateway reads: 2 (`docs/knock-v2.md`)
    /// from gateways that announce it; older credentials: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knock_version: Option<u8>,
}

/// A device file's text, decrypted if it is encrypted at rest.
fn read(path: &Path) -> Result<String, CredentialError> {
    Ok(encrypted_file::read(path)?.0)
}

impl Credential {
    /// The credential as its file says, without reading its key file.
    pub fn read(path: &Path) -> Result<Credential, CredentialError> {
        Credential::parse(&read(path)?, path)
    }

    /// `text`, which came from `path` (for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Credential, CredentialError> {
        toml::from_str(text).map_err(|e| CredentialError::Parse {
            path: path.into(),
            reason: e.message().to_string(),
        })
    }

    /// The credential with its secret: inline, or read from its key file.
    pub fn load(path: &Path) -> Result<Credential, CredentialError> {
        Credential::load_text(&read(path)?, path)
    }

    /// [`Credential::load`] of `text`, read from `path` already.
    pub fn load_text(text: &str, path: &Path) -> Result<Credential, CredentialError> {
        let mut cred = Credential::parse(text, path)?;
        if cred.secret_key.is_none() {
            let file = cred
                .key_file
                .as_ref()
                .ok_or_else(|| CredentialError::NoSecret(path.into()))?;
            let file = path.parent().unwrap_or(Path::new("")).join(file);
            cred.secret_key = Some(keys::encode(&read_key_file(&file)?.to_bytes()));
        }
        Ok(cred)
    }

    /// The file a device keeps: a comment saying what it holds, then the fields.
    pub fn to_file_text(&self) -> String {
        let warning = if self.secret_key.is_some() {
            "It holds this device's secret key: keep it private (mode 0600)."
        } else {
            "It holds no secret: the device's key stays in its key file."
        };
        format!(
            "# Gatekeeper credential for {:?}. {warning}\n{}",
            self.name,
            // Strings, numbers and lists of strings: always serializable.
            toml::to_string(self).expect("a credential serializes to TOML")
        )
    }
}

/// A key file: a device's own key pair, made on the device (`gatekeeper
/// keygen`). Only the public half ever leaves it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    secret_key: String,
}

/// The text of a key file for `secret`, with its public key in a comment.
pub fn key_file_text(secret: &StaticSecret) -> String {
    format!(
        "# Gatekeeper device key. Public key: {}\n# The secret below never leaves this device (mode 0600).\n{}",
        keys::encode(PublicKey::from(secret).as_bytes()),
        toml::to_string(&KeyFile {
            secret_key: keys::encode(&secret.to_bytes()),
        })
        .expect("a key file serializes to TOML")
    )
}

/// The secret in the key file at `path`.
pub fn read_key_file(path: &Path) -> Result<StaticSecret, CredentialError> {
    let bad = |reason: String| CredentialError::KeyFile {
        path: path.into(),
        reason,
    };
    let file: KeyFile = toml::from_str(&read(path)?).map_err(|e| bad(e.message().to_string()))?;
    keys::decode_secret(&file.secret_key).map_err(|e| bad(e.to_string()))
}
