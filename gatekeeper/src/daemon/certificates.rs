//! The certificates the daemon serves, over time.
//!
//! The gateway's own certificate (the tunnel listener's, and the portal's
//! unless it has its own files) lives in the state. The daemon renews it
//! two thirds into its validity, with the same key, so the key pins that
//! tokens and credentials carry hold; and it serves whatever the state
//! holds from its next look, so a renewal by another cluster node or by
//! `gatekeeper cert renew` takes effect too. The portal's own files are
//! re-read when they change (a CA's renewal put there), and a self-signed
//! pair there is renewed in place the same way.
//!
//! The portal's ACME certificate is obtained and renewed by its own task
//! (`portal::acme`), which writes it to the state directory; the daemon
//! serves it from there like an operator's files.
//!
//! A renewal that fails leaves the old certificate served: it is audited,
//! shown in `gatekeeper status`, and tried again later. Sessions already
//! up keep the certificate they started with.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_json::json;
use thiserror::Error;
use tracing::{info, warn};
use tunnel::tls::{Fingerprint, Identity, LiveCertificate, Summary, TlsError};

use crate::{
    audit::Audit,
    control::CertificateStatus,
    error_chain,
    portal::acme::{self, Acme, Failure},
    private_file,
    store::{Store, StoreError, config::AcmeSettings},
};

/// How long after a failed renewal the next try waits.
const RETRY_SECS: u64 = 3600;

#[derive(Debug, Error)]
pub enum CertificateError {
    #[error("certificate {cert} / key {key}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error("certificate {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("certificate: {present} exists but {absent} does not; give both files, or neither to have them generated")]
    HalfPair { present: PathBuf, absent: PathBuf },
    #[error("serving the certificate (is the key the certificate's?)")]
    Serve(#[source] TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the portal's ACME task renews this certificate, from the CA")]
    RenewedByAcme,
    #[error(transparent)]
    Acme(#[from] acme::AcmeError),
}

/// Where a served certificate comes from, and goes back to when renewed.
enum Source {
    /// The gateway's identity in the state (directory or cluster).
    State(Arc<dyn Store>),
    Files(Files),
    /// What the ACME task keeps in the state directory; it renews them.
    Acme {
        files: Files,
        renew_before: Option<std::time::Duration>,
    },
}

/// An operator's certificate and key files, and the names a self-signed
/// pair made there carries.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    names: Vec<String>,
}

/// One certificate a listener serves.
pub struct Served {
    /// Which listeners serve it, for status: "tunnel", "portal".
    serves: Vec<&'static str>,
    source: Source,
    live: Arc<LiveCertificate>,
    /// The whole-certificate hash of what is served, to notice a change.
    serving: Fingerprint,
    pin: Fingerprint,
    summary: Option<Summary>,
    /// Why the last renewal failed, and when to try again (unix seconds);
    /// shared with the ACME task, which renews its certificate itself.
    failed: Failure,
}

impl Served {
    /// The gateway's own certificate, from the state (made there if absent).
    pub fn gateway(store: Arc<dyn Store>) -> Result<Served, CertificateError> {
        let identity = store.identity()?;
        Served::new(Source::State(store), &identity)
    }

    /// An operator's certificate and key; both are made (self-signed for
    /// `names`, as the gateway's own) when neither file exists yet.
    pub fn files(cert: &Path, key: &Path, names: Vec<String>) -> Result<Served, CertificateError> {
        let files = Files {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            names,
        };
        let identity = match files.read()? {
            Some(identity) => identity,
            None => {
                let made = Identity::generate(&files.names).map_err(|e| files.tls_error(e))?;
                files.write(&made)?;
                info!(cert = %cert.display(), key = %key.display(), "generated the portal certificate");
                made
            }
        };
        Served::new(Source::Files(files), &identity)
    }

    /// The portal's certificate from ACME: what the task last obtained, or,
    /// until there is one, a self-signed certificate for the domains with
    /// the key the CA will certify (kept in memory only), so the pin is the
    /// same before and after. `failed` is the task's record of its last
    /// failure.
    pub fn acme(acme: &Acme, settings: &AcmeSettings, failed: Failure) -> Result<Served, CertificateError> {
        let identity = match acme.stored() {
            Ok(Some(identity)) => identity,
            stored => {
                if let Err(e) = stored {
                    warn!(error = %error_chain(&e), "the stored ACME certificate cannot be used; ordering a new one");
                }
                Identity::with_key(&settings.domains, &acme.key()?).map_err(CertificateError::Serve)?
            }
        };
        let files = Files {
            cert: acme.cert_path(),
            key: acme.key_path(),
            names: settings.domains.clone(),
        };
        let mut served = Served::new(
            Source::Acme {
                files,
                renew_before: settings.renew_before,
            },
            &identity,
        )?;
        served.failed = failed;
        Ok(served)
    }

    fn new(source: Source, identity: &Identity) -> Result<Served, CertificateError> {
        Ok(Served {
            serves: Vec::new(),
            source,
            live: LiveCertificate::new(identity).map_err(CertificateError::Serve)?,
            serving: identity.fingerprint(),
            pin: identity.pin(),
            summary: identity.summary().ok(),
            failed: Failure::default(),
        })
    }

    /// The certificate, for a task that changes it without serving it.
    pub fn live(&self) -> Arc<LiveCertificate> {
        self.live.clone()
    }

    /// The certificate to build listeners' configs on, noting who serves it.
    pub fn serve(&mut self, listener: &'static str) -> Arc<LiveCertificate> {
        self.serves.push(listener);
        self.live.clone()
    }

    pub fn pin(&self) -> Fingerprint {
        self.pin
    }

    /// Serves what the source holds now, if it changed, and renews it if a
    /// self-signed certificate is due.
    pub fn look(&mut self, audit: &Audit, now: u64) {
        let stored = match self.source.read() {
            Ok(Some(identity)) => identity,
            // The files went missing or cannot be read: keep serving.
            Ok(None) => return,
            Err(e) => {
                warn!(error = %error_chain(&e), "reading the served certificate failed; the old one stays served");
                return;
            }
        };
        if stored.fingerprint() != self.serving {
            let event = match self.source {
                Source::Acme { .. } => "certificate_obtained",
                _ => "certificate_replaced",
            };
            self.take(&stored, audit, event);
        }
        if let Some(at) = self.renews_at()
            && now >= at
            && !matches!(self.source, Source::Acme { .. })
        {
            let waiting = self.failure().is_some_and(|(_, retry)| now < retry);
            if !waiting {
                self.renew(audit, now);
            }
        }
    }

    /// Renews now: the same key, valid for a year from now.
    fn renew(&mut self, audit: &Audit, now: u64) {
        match self.source.renew() {
            Ok(renewed) => {
                self.set_failure(None);
                self.take(&renewed, audit, "certificate_renewed");
            }
            Err(e) => {
                let reason = error_chain(&e);
                warn!(serves = ?self.serves, error = %reason, "renewing the certificate failed; the old one stays served, retrying in an hour");
                audit.event(
                    "certificate_renewal_failed",
                    json!({"serves": self.serves, "result": "failed", "reason": reason}),
                );
                self.set_failure(Some((reason, now + RETRY_SECS)));
            }
        }
    }

    fn take(&mut self, identity: &Identity, audit: &Audit, event: &str) {
        if let Err(e) = self.live.replace(identity) {
            warn!(error = %error_chain(&e), "the new certificate cannot be served; the old one stays served");
            return;
        }
        self.serving = identity.fingerprint();
        self.pin = identity.pin();
        self.summary = identity.summary().ok();
        let s = self.summary.as_ref();
        info!(event, serves = ?self.serves, subject = s.map(|s| s.subject.as_str()), "serving a new certificate");
        audit.event(
            event,
            json!({
                "serves": self.serves,
                "subject": s.map(|s| &s.subject),
                "serial": s.map(|s| &s.serial),
                "not_after": s.map(|s| crate::clock::rfc3339(s.not_after)),
                "pin": self.pin.to_string(),
            }),
        );
    }

    fn failure(&self) -> Option<(String, u64)> {
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_failure(&self, failure: Option<(String, u64)>) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }

    /// When the served certificate is renewed (unix seconds); none: not by
    /// the gateway (a CA's, or an old default).
    fn renews_at(&self) -> Option<u64> {
        let s = self.summary.as_ref()?;
        match &self.source {
            // Self-signed: the stand-in until the CA's first certificate.
            Source::Acme { renew_before, .. } => (!s.self_signed()).then(|| acme::renew_at(s, *renew_before)),
            _ => s.self_renewal(),
        }
    }

    pub fn status(&self) -> CertificateStatus {
        let s = self.summary.as_ref();
        let acme = matches!(self.source, Source::Acme { .. });
        let problem = match (self.failure(), s) {
            (Some((reason, _)), _) => Some(format!("the last renewal failed: {reason}")),
            (None, Some(s)) if acme && s.self_signed() => {
                Some("self-signed until the ACME CA issues the first certificate".into())
            }
            (None, Some(s)) if s.old_default() => Some(
                "made by an earlier release: its subject and validity identify the product to scanners; `gatekeeper cert renew` replaces it (key pins hold, whole-certificate pins from old tokens do not)"
                    .into(),
            ),
            (None, None) => Some("the certificate cannot be parsed".into()),
            _ => None,
        };
        CertificateStatus {
            serves: self.serves.iter().map(ToString::to_string).collect(),
            source: match &self.source {
                Source::State(store) => store.location(),
                Source::Files(files) => files.cert.display().to_string(),
                Source::Acme { .. } => "ACME".into(),
            },
            subject: s.map(|s| s.subject.clone()).unwrap_or_default(),
            issuer: s.map(|s| s.issuer.clone()).unwrap_or_default(),
            not_after: s.map_or(0, |s| s.not_after),
            renews_at: self.renews_at(),
            pin: self.pin.to_string(),
            problem,
        }
    }
}

impl Source {
    /// The identity the source holds now; none: the files are absent.
    fn read(&self) -> Result<Option<Identity>, CertificateError> {
        match self {
            Source::State(store) => Ok(Some(store.identity()?)),
            // The ACME task makes the key first and writes the certificate
            // once the CA issues it: until then there is nothing to serve.
            Source::Acme { files, .. } if !files.cert.exists() => Ok(None),
            Source::Files(files) | Source::Acme { files, .. } => files.read(),
        }
    }

    fn renew(&self) -> Result<Identity, CertificateError> {
        match self {
            Source::State(store) => Ok(store.renew_identity()?),
            Source::Files(files) => files.renew(),
            Source::Acme { .. } => Err(CertificateError::RenewedByAcme),
        }
    }
}

impl Files {
    fn read(&self) -> Result<Option<Identity>, CertificateError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CertificateError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let (cert, key) = (&self.cert, &self.key);
        match (cert.exists(), key.exists()) {
            (true, true) => Identity::from_pem(&read(cert)?, &read(key)?)
                .map(Some)
                .map_err(|e| self.tls_error(e)),
            (false, false) => Ok(None),
            (true, false) => Err(CertificateError::HalfPair {
                present: cert.clone(),
                absent: key.clone(),
            }),
            (false, true) => Err(CertificateError::HalfPair {
                present: key.clone(),
                absent: cert.clone(),
            }),
        }
    }

    /// A new certificate for the key in the files, written back.
    fn renew(&self) -> Result<Identity, CertificateError> {
        let current = self.read()?.ok_or_else(|| CertificateError::Io {
            path: self.cert.clone(),
            source: io::ErrorKind::NotFound.into(),
        })?;
        let renewed = current.reissue(&self.names).map_err(|e| self.tls_error(e))?;
        self.write(&renewed)?;
        Ok(renewed)
    }

    /// The key first: a crash between the two leaves the old certificate
    /// with the same key, which still matches it.
    fn write(&self, identity: &Identity) -> Result<(), CertificateError> {
        let (c, k) = identity.to_pem();
        for (path, text) in [(&self.key, k), (&self.cert, c)] {
            private_file::write(path, text).map_err(|source| CertificateError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn tls_error(&self, source: TlsError) -> CertificateError {
        CertificateError::Tls {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }
}
