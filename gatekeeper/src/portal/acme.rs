//! The portal's certificate from an ACME CA (RFC 8555), validated by
//! TLS-ALPN-01 (RFC 8737) on the portal's own port, so nothing else needs
//! to be reachable.
//!
//! A task obtains the certificate when there is none for the configured
//! domains, and renews it when due: a third of its lifetime ahead, or
//! `renew_before`. The key is made once and kept across renewals, so a
//! client's pin of it holds. What the CA issues is written to the state
//! directory (0600) and served from the daemon's next look at it; until
//! the first one arrives the portal serves a self-signed certificate for
//! the domains. A failed attempt leaves the old certificate served: it is
//! audited and tried again after a minute, then 5, then 30, then hourly.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use serde_json::json;
use thiserror::Error;
use tracing::{info, warn};
use tunnel::tls::{Identity, LiveCertificate, Summary, TlsError, acme};

use crate::{audit::Audit, clock::unix_now, error_chain, private_file, store::config::AcmeSettings};

/// The CA's answers are awaited this long at each step.
const POLL: RetryPolicy = RetryPolicy::new().timeout(Duration::from_secs(90));
/// Waits after a failed attempt, then hourly.
const RETRIES: [u64; 3] = [60, 300, 1800];
const HOURLY: u64 = 3600;

#[derive(Debug, Error)]
pub enum AcmeError {
    #[error("ACME: {stage}")]
    Protocol {
        stage: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    #[error("ACME: the CA offers no tls-alpn-01 challenge for {0} (the portal answers no other)")]
    NoChallenge(String),
    #[error("ACME: the CA refused the order ({0:?}); its authorizations say why")]
    Refused(OrderStatus),
    #[error(
        "ACME: the CA could not validate {domain}: {detail} (does {domain} resolve to this portal, and is its port reachable?)"
    )]
    Validation { domain: String, detail: String },
    #[error("ACME: {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ACME: {what}")]
    Tls {
        what: &'static str,
        #[source]
        source: TlsError,
    },
    #[error("ACME: the account file {path} cannot be read ({reason}); remove it to have a new account made")]
    Account { path: PathBuf, reason: String },
}

/// Why the last attempt failed, and when the next one is (unix seconds):
/// what `gatekeeper status` shows.
pub type Failure = Arc<Mutex<Option<(String, u64)>>>;

/// When an ACME certificate is due for renewal (unix seconds): `before`
/// its expiry, or a third of its lifetime ahead. A `before` as long as the
/// lifetime would renew every certificate as it arrives, and soon meet the
/// CA's rate limits, so it then counts as unset.
pub fn renew_at(s: &Summary, before: Option<Duration>) -> u64 {
    match before {
        Some(before) if before.as_secs() < s.not_after.saturating_sub(s.not_before) => s.not_after - before.as_secs(),
        _ => s.renew_at(),
    }
}

/// An ACME account and the certificate it keeps for the portal.
pub struct Acme {
    settings: AcmeSettings,
    /// `STATE_DIR/acme`.
    dir: PathBuf,
}

impl Acme {
    pub fn new(settings: AcmeSettings, state_dir: &Path) -> Acme {
        Acme {
            settings,
            dir: state_dir.join("acme"),
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("portal.crt")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("portal.key")
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    pub fn domains(&self) -> &[String] {
        &self.settings.domains
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> AcmeError + '_ {
        move |source| AcmeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The issued certificate and its key, if there is one for the
    /// configured domains.
    pub fn stored(&self) -> Result<Option<Identity>, AcmeError> {
        let (cert, key) = (self.cert_path(), self.key_path());
        if !cert.exists() || !key.exists() {
            return Ok(None);
        }
        let cert_pem = std::fs::read_to_string(&cert).map_err(Self::io(&cert))?;
        let key_pem = std::fs::read_to_string(&key).map_err(Self::io(&key))?;
        let identity = Identity::from_pem(&cert_pem, &key_pem).map_err(|source| AcmeError::Tls {
            what: "the stored certificate",
            source,
        })?;
        Ok(identity.covers(&self.settings.domains).then_some(identity))
    }

    fn renew_at(&self, s: &Summary) -> u64 {
        renew_at(s, self.settings.renew_before)
    }

    /// The account: the stored one, or a new one (terms agreed) written
    /// next to the certificate.
    async fn account(&self) -> Result<Account, AcmeError> {
        let path = self.account_path();
        let protocol = |stage| move |source| AcmeError::Protocol { stage, source };
        let builder = || match &self.settings.trust {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(Self::io(&path))?;
            let credentials: AccountCredentials = serde_json::from_str(&text).map_err(|e| AcmeError::Account {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            return builder()
                .map_err(protocol("setting up HTTPS"))?
                .from_credentials(credentials)
                .await
                .map_err(protocol("reading the account"));
        }
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()
            .map_err(protocol("setting up HTTPS"))?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                None,
            )
            .await
            .map_err(protocol("creating the account"))?;
        let text = serde_json::to_string(&credentials).map_err(|e| AcmeError::Account {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        private_file::write(&path, &text).map_err(Self::io(&path))?;
        info!(directory = %self.settings.directory, "created the ACME account");
        Ok(account)
    }

    /// The portal's key, PEM, made once: every certificate the CA issues
    /// is for it, so a pin of it holds.
    pub fn key(&self) -> Result<String, AcmeError> {
        let path = self.key_path();
        if path.exists() {
            return std::fs::read_to_string(&path).map_err(Self::io(&path));
        }
        let key = acme::new_key().map_err(|source| AcmeError::Tls {
            what: "making the key",
            source,
        })?;
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        private_file::write(&path, &key).map_err(Self::io(&path))?;
        Ok(key)
    }

    /// Orders a certificate for the domains, answers the CA's challenges
    /// on `live`'s listener, and writes what it issues.
    pub async fn obtain(&self, live: &LiveCertificate) -> Result<Identity, AcmeError> {
        let protocol = |stage| move |source| AcmeError::Protocol { stage, source };
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self.settings.domains.iter().cloned().map(Identifier::Dns).collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(protocol("placing the order"))?;
        let mut answered = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(protocol("reading an authorization"))?;
                if authz.status == AuthorizationStatus::Valid {
                    continue;
                }
                let domain = authz.identifier().to_string();
                let mut challenge = authz
                    .challenge(ChallengeType::TlsAlpn01)
                    .ok_or_else(|| AcmeError::NoChallenge(domain.clone()))?;
                let digest = challenge.key_authorization().digest();
                live.answer_challenge(&domain, digest.as_ref())
                    .map_err(|source| AcmeError::Tls {
                        what: "making the challenge certificate",
                        source,
                    })?;
                answered.push(domain);
                challenge.set_ready().await.map_err(protocol("answering a challenge"))?;
            }
            match order
                .poll_ready(&POLL)
                .await
                .map_err(protocol("waiting for validation"))?
            {
                OrderStatus::Ready => Ok(()),
                status => Err(self.why_refused(&mut order, status).await),
            }
        }
        .await;
        for domain in &answered {
            live.end_challenge(domain);
        }
        result?;
        let key = self.key()?;
        let csr = acme::signing_request(&self.settings.domains, &key).map_err(|source| AcmeError::Tls {
            what: "making the signing request",
            source,
        })?;
        order
            .finalize_csr(&csr)
            .await
            .map_err(protocol("finalizing the order"))?;
        let chain = order
            .poll_certificate(&POLL)
            .await
            .map_err(protocol("fetching the certificate"))?;
        let identity = Identity::from_pem(&chain, &key).map_err(|source| AcmeError::Tls {
            what: "the issued certificate",
            source,
        })?;
        let summary = identity.summary().map_err(|source| AcmeError::Tls {
            what: "the issued certificate",
            source,
        })?;
        let path = self.cert_path();
        private_file::write(&path, &chain).map_err(Self::io(&path))?;
        let lifetime = summary.not_after.saturating_sub(summary.not_before);
        if let Some(before) = self.settings.renew_before
            && before.as_secs() >= lifetime
        {
            warn!(
                renew_before_secs = before.as_secs(),
                lifetime_days = lifetime / 86_400,
                "renew_before is not shorter than the CA's certificates last; renewing a third of the lifetime ahead instead"
            );
        }
        Ok(identity)
    }

    /// The CA's reason for an order that did not become ready: the first
    /// failed challenge's problem.
    async fn why_refused(&self, order: &mut instant_acme::Order, status: OrderStatus) -> AcmeError {
        let mut authorizations = order.authorizations();
        while let Some(Ok(authz)) = authorizations.next().await {
            let failed = authz.challenges.iter().find_map(|c| c.error.as_ref());
            if let Some(problem) = failed {
                return AcmeError::Validation {
                    domain: authz.identifier().to_string(),
                    detail: problem.detail.clone().unwrap_or_else(|| format!("{problem:?}")),
                };
            }
        }
        AcmeError::Refused(status)
    }
}

/// Keeps the portal's certificate obtained and renewed until the daemon
/// stops: obtains at once when there is none, then sleeps until the
/// renewal is due (looking again at least hourly).
pub async fn run(acme: Acme, live: Arc<LiveCertificate>, failure: Failure, audit: Audit) {
    let mut failures = 0usize;
    loop {
        let due = match acme.stored() {
            Ok(Some(identity)) => identity.summary().map_or(0, |s| acme.renew_at(&s)),
            Ok(None) => 0,
            Err(e) => {
                warn!(error = %error_chain(&e), "the stored ACME certificate cannot be used; ordering a new one");
                0
            }
        };
        let now = unix_now();
        if due > now {
            tokio::time::sleep(Duration::from_secs((due - now).min(HOURLY))).await;
            continue;
        }
        match acme.obtain(&live).await {
            Ok(identity) => {
                failures = 0;
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
                info!(domains = ?acme.domains(), pin = %identity.pin(), "obtained the portal's certificate");
            }
            Err(e) => {
                let reason = error_chain(&e);
                let wait = RETRIES.get(failures).copied().unwrap_or(HOURLY);
                failures += 1;
                warn!(error = %reason, retry_in_secs = wait, "obtaining the portal's certificate failed; the current one stays served");
                audit.event(
                    "certificate_renewal_failed",
                    json!({"serves": ["portal"], "result": "failed", "reason": reason, "retry_in_secs": wait}),
                );
                *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((reason, unix_now() + wait));
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_a_third_ahead_unless_renew_before_fits_the_lifetime() {
        let ninety_days = Summary {
            subject: "CN=gw.example.org".into(),
            issuer: "CN=CA".into(),
            serial: "01".into(),
            not_before: 1_000_000,
            not_after: 1_000_000 + 90 * 86_400,
        };
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_at(&ninety_days, None), 1_000_000 + 60 * 86_400);
        assert_eq!(renew_at(&ninety_days, Some(day * 10)), 1_000_000 + 80 * 86_400);
        // As long as the lifetime: every certificate would be due on arrival.
        assert_eq!(renew_at(&ninety_days, Some(day * 90)), 1_000_000 + 60 * 86_400);
        assert_eq!(renew_at(&ninety_days, Some(day * 365)), 1_000_000 + 60 * 86_400);
    }
}
