//! What a device imports to knock: its secret key and how to reach the
//! gateway. `gatekeeper client add` writes it; the gateway keeps only the
//! public half.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("reading the credential {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the credential {path} is not one `gatekeeper client add` wrote: {reason}")]
    Parse { path: PathBuf, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub name: String,
    pub secret_key: String,
    pub server_public_key: String,
    pub servers: Vec<IpAddr>,
    pub knock_port: u16,
    /// SHA-256 of the gateway's TLS certificate, which the portal presents
    /// unless the operator configured another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
}

impl Credential {
    pub fn load(path: &Path) -> Result<Credential, CredentialError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| CredentialError::Parse {
            path: path.into(),
            reason: e.message().to_string(),
        })
    }

    /// The file a device imports: a warning comment, then the fields.
    pub fn to_file_text(&self) -> String {
        format!(
            "# Gatekeeper credential for {:?}. It holds this device's secret key: keep it private (mode 0600).\n{}",
            self.name,
            // Plain strings, numbers and a list of addresses: always serializable.
            toml::to_string(self).expect("a credential serializes to TOML")
        )
    }
}
