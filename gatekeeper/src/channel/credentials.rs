//! A device's channel credentials, in one directory:
//!
//! - `sm2.key`, `sm2.crt`: its SM2 identity (the `sm` policy);
//! - `ecdsa.key`, `ecdsa.crt`: its ECDSA P-256 identity (the others);
//! - `public.pem`: both certificates, the file to hand to peers;
//! - `peers/NAME.pem`: a paired peer's `public.pem`, whose certificates
//!   are the ones pinned for it.
//!
//! Keys are written 0600 and never replaced unless asked: a new key
//! unpairs the device from every peer.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use thiserror::Error;
use tunnel::tls::Fingerprint;

use super::policy::{Identity, KeyKind};
use crate::private_file;

/// How long a self-signed channel certificate is valid: peers pin it,
/// so its expiry is only a bound on a stolen key's use.
const LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

const PUBLIC: &str = "public.pem";
const PEERS: &str = "peers";

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already holds credentials: pass --force to replace them (every peer must pair again)", .0.display())]
    Exists(PathBuf),
    #[error("{} holds no certificate: expected the PEM `public.pem` of a peer's `channel init`", .0.display())]
    NoCertificate(PathBuf),
    #[error("bad PEM in {}", .0.display())]
    Pem(PathBuf),
    #[error("peer {name:?} is not paired: run `gatekeeper channel pair --dir {} --name {name} PEER-public.pem`", dir.display())]
    NotPaired { name: String, dir: PathBuf },
    #[error("peer name {0:?}: use letters, digits, '.', '-' and '_' only")]
    Name(String),
    #[error("generating the {0} certificate")]
    Generate(&'static str),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CredentialsError + 'a {
    move |source| CredentialsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), CredentialsError> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    plain
        .then_some(())
        .ok_or_else(|| CredentialsError::Name(name.chars().take(64).collect()))
}

/// What `init` made.
pub struct Created {
    pub public: PathBuf,
    pub sm2: Fingerprint,
    pub ecdsa: Fingerprint,
}

/// Makes both identities of device `name` in `dir`.
pub fn init(dir: &Path, name: &str, force: bool) -> Result<Created, CredentialsError> {
    check_name(name)?;
    if !force && dir.join(key_file(KeyKind::Sm2)).exists() {
        return Err(CredentialsError::Exists(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir.join(PEERS)).map_err(io("creating", dir))?;
    let sm2 = shangmi::Sm2Key::generate();
    let sm2_cert = shangmi::self_signed(&sm2, name, LIFETIME).map_err(|_| CredentialsError::Generate("SM2"))?;
    let sm2_cert_pem = pem("CERTIFICATE", &sm2_cert);
    let ecdsa =
        tunnel::tls::Identity::generate(&[name.to_string()]).map_err(|_| CredentialsError::Generate("ECDSA"))?;
    let (ecdsa_cert_pem, ecdsa_key_pem) = ecdsa.to_pem();
    let writes = [
        (key_file(KeyKind::Sm2), sm2.to_pkcs8_pem()),
        (cert_file(KeyKind::Sm2), sm2_cert_pem.clone()),
        (key_file(KeyKind::Ecdsa), ecdsa_key_pem.to_string()),
        (cert_file(KeyKind::Ecdsa), ecdsa_cert_pem.to_string()),
        (
            PUBLIC.to_string(),
            format!("# channel identity of {name}: give this file to peers\n{sm2_cert_pem}{ecdsa_cert_pem}"),
        ),
    ];
    for (file, text) in writes {
        let path = dir.join(file);
        private_file::write(&path, &text).map_err(io("writing", &path))?;
    }
    Ok(Created {
        public: dir.join(PUBLIC),
        sm2: Fingerprint::of(&sm2_cert),
        ecdsa: ecdsa.fingerprint(),
    })
}

fn key_file(kind: KeyKind) -> String {
    format!("{}.key", kind.label())
}

fn cert_file(kind: KeyKind) -> String {
    format!("{}.crt", kind.label())
}

fn pem(label: &str, der: &[u8]) -> String {
    // Encoding a certificate's bytes as PEM cannot fail.
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// The device's identity of `kind`.
pub fn identity(dir: &Path, kind: KeyKind) -> Result<Identity, CredentialsError> {
    let cert_path = dir.join(cert_file(kind));
    let key_path = dir.join(key_file(kind));
    let cert = certificates(&cert_path)?
        .into_iter()
        .next()
        .ok_or_else(|| CredentialsError::NoCertificate(cert_path.clone()))?;
    let key_pem = std::fs::read(&key_path).map_err(io("reading", &key_path))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CredentialsError::Pem(key_path))?;
    Ok(Identity { cert, key })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let text = std::fs::read(path).map_err(io("reading", path))?;
    CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| CredentialsError::Pem(path.to_path_buf()))
}

/// Pins peer `name`: keeps the certificates of its `public.pem` (read
/// from `file`), and returns their fingerprints.
pub fn pair(dir: &Path, name: &str, file: &Path) -> Result<Vec<Fingerprint>, CredentialsError> {
    check_name(name)?;
    let certs = certificates(file)?;
    if certs.is_empty() {
        return Err(CredentialsError::NoCertificate(file.to_path_buf()));
    }
    let text: String = certs.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let path = dir.join(PEERS).join(format!("{name}.pem"));
    std::fs::create_dir_all(dir.join(PEERS)).map_err(io("creating", dir))?;
    private_file::write(&path, &text).map_err(io("writing", &path))?;
    Ok(certs.iter().map(Fingerprint::of).collect())
}

/// The fingerprints pinned for peer `name`.
pub fn pins(dir: &Path, name: &str) -> Result<Vec<Fingerprint>, CredentialsError> {
    check_name(name)?;
    let path = dir.join(PEERS).join(format!("{name}.pem"));
    if !path.exists() {
        return Err(CredentialsError::NotPaired {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        });
    }
    Ok(certificates(&path)?.iter().map(Fingerprint::of).collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_then_pair_pins_both_certificates_and_keeps_keys_private() {
        let dir = std::env::temp_dir().join(format!("gk-channel-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (alpha, beta) = (dir.join("alpha"), dir.join("beta"));
        let a = init(&alpha, "alpha", false).unwrap();
        init(&beta, "beta", false).unwrap();
        assert!(matches!(init(&alpha, "alpha", false), Err(CredentialsError::Exists(_))));
        let mode = std::fs::metadata(alpha.join("sm2.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        assert!(matches!(pins(&beta, "alpha"), Err(CredentialsError::NotPaired { .. })));
        let pinned = pair(&beta, "alpha", &a.public).unwrap();
        assert_eq!(pinned, vec![a.sm2, a.ecdsa]);
        assert_eq!(pins(&beta, "alpha").unwrap(), pinned);
        assert_eq!(Fingerprint::of(&identity(&alpha, KeyKind::Sm2).unwrap().cert), a.sm2);
        assert!(matches!(pair(&beta, "../x", &a.public), Err(CredentialsError::Name(_))));
        assert!(matches!(
            pair(&beta, "x", &alpha.join("sm2.key")),
            Err(CredentialsError::NoCertificate(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
