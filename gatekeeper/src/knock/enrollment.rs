//! Enrollment by request and approval, as one line each way: the device
//! prints a [`Request`] (its public key, never its secret), the operator
//! approves it on the gateway, and the device installs the credential
//! that comes back, which holds no secret either. Both read the same
//! short fingerprint of the device's key aloud to know the request was
//! not swapped on the way.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use thiserror::Error;
use x25519_dalek::PublicKey;

use super::{credential::Credential, keys};

const REQUEST_PREFIX: &str = "gk-request-1:";
const CREDENTIAL_PREFIX: &str = "gk-credential-1:";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnrollmentError {
    #[error("this is not {what} (it should start with {prefix}): copy the whole line")]
    Prefix { what: &'static str, prefix: &'static str },
    #[error("{what} is damaged ({reason}): copy the whole line again")]
    Damaged { what: &'static str, reason: String },
    #[error("the credential carries a secret key, which an approved request never does")]
    CarriesSecret,
}

/// What a device asks to be enrolled with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub name: String,
    pub public_key: String,
    /// How the device names the gateway: an address or a DNS name.
    pub gateway: String,
    pub hostname: String,
    pub platform: String,
}

impl Request {
    pub fn to_line(&self) -> String {
        encode(REQUEST_PREFIX, self)
    }

    pub fn from_line(line: &str) -> Result<Request, EnrollmentError> {
        let req: Request = decode(line, REQUEST_PREFIX, "a request from `gatekeeper client request`")?;
        keys::decode_public(&req.public_key).map_err(|e| EnrollmentError::Damaged {
            what: "the request",
            reason: e.to_string(),
        })?;
        Ok(req)
    }

    /// The fingerprint of the requesting key, to compare aloud.
    pub fn fingerprint(&self) -> String {
        keys::decode_public(&self.public_key)
            .map(|k| fingerprint(&k))
            .unwrap_or_default()
    }
}

/// An approved request's credential as one line.
pub fn credential_line(cred: &Credential) -> String {
    encode(CREDENTIAL_PREFIX, cred)
}

/// The credential in a line from `client approve`; never one with a secret.
pub fn credential_from_line(line: &str) -> Result<Credential, EnrollmentError> {
    let cred: Credential = decode(line, CREDENTIAL_PREFIX, "a credential from `gatekeeper client approve`")?;
    if cred.secret_key.is_some() {
        return Err(EnrollmentError::CarriesSecret);
    }
    Ok(cred)
}

/// Ten bytes of SHA-256 over the public key, in five groups: short enough
/// to read over the phone, long enough that no one makes a key to match.
pub fn fingerprint(public: &PublicKey) -> String {
    Sha256::digest(public.as_bytes())[..10]
        .chunks(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect::<Vec<_>>()
        .join("-")
}

fn encode<T: Serialize>(prefix: &str, value: &T) -> String {
    // Strings, numbers and lists: always serializable.
    let json = serde_json::to_vec(value).expect("serializes to JSON");
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(json))
}

fn decode<T: DeserializeOwned>(line: &str, prefix: &'static str, what: &'static str) -> Result<T, EnrollmentError> {
    let body = line
        .trim()
        .strip_prefix(prefix)
        .ok_or(EnrollmentError::Prefix { what, prefix })?;
    let damaged = |reason: String| EnrollmentError::Damaged { what, reason };
    let json = URL_SAFE_NO_PAD.decode(body).map_err(|e| damaged(e.to_string()))?;
    serde_json::from_slice(&json).map_err(|e| damaged(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            name: "laptop".into(),
            public_key: keys::encode(PublicKey::from(&keys::generate()).as_bytes()),
            gateway: "gw.example.net".into(),
            hostname: "laptop".into(),
            platform: "linux".into(),
        }
    }

    #[test]
    fn a_request_survives_its_line_and_a_damaged_one_is_named() {
        let req = request();
        let line = req.to_line();
        assert_eq!(Request::from_line(&format!("  {line}\n")).unwrap(), req);
        assert_eq!(req.fingerprint().len(), 24);
        assert!(matches!(
            Request::from_line(&line[..line.len() - 5]),
            Err(EnrollmentError::Damaged { .. })
        ));
        assert!(matches!(
            Request::from_line("laptop please"),
            Err(EnrollmentError::Prefix { .. })
        ));
        assert!(matches!(
            credential_from_line(&line),
            Err(EnrollmentError::Prefix { .. })
        ));
    }

    #[test]
    fn an_approved_credential_never_carries_a_secret() {
        let mut cred = Credential {
            name: "laptop".into(),
            secret_key: None,
            key_file: None,
            server_public_key: keys::encode(PublicKey::from(&keys::generate()).as_bytes()),
            servers: vec!["gw.example.net".into()],
            knock_port: 62201,
            tunnel_port: Some(7443),
            tls_fingerprint: None,
            knock_version: Some(2),
        };
        assert_eq!(credential_from_line(&credential_line(&cred)).unwrap(), cred);
        cred.secret_key = Some(keys::encode(&[1; 32]));
        assert_eq!(
            credential_from_line(&credential_line(&cred)),
            Err(EnrollmentError::CarriesSecret)
        );
    }
}
