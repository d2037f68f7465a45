//! fwknopd's `access.conf`, read for `gatekeeper import fwknop`: each
//! stanza (from one `SOURCE` line to the next) becomes a client with the
//! same keys and ports, or is refused with the reason; what a stanza says
//! that Gatekeeper does another way is reported with it.
//!
//! A stanza is imported only if nothing it restricts would be loosened:
//! a `SOURCE` other than `ANY` (Gatekeeper's clients knock from anywhere)
//! needs `--any-source`, GPG and non-HMAC stanzas have no keys we can use,
//! and a stanza without `OPEN_PORTS` (fwknopd opens whatever is asked)
//! has no policy to give.

use base64::{Engine, engine::general_purpose::STANDARD};
use thiserror::Error;

use super::FwknopKeys;
use crate::spec::PortSet;

/// The file could not be read as access.conf at all.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AccessConfError {
    #[error("line {line}: `{key}` comes before the first SOURCE line, which starts each stanza")]
    BeforeSource { line: usize, key: String },
    #[error("no stanza: access.conf stanzas start with a `SOURCE` line")]
    Empty,
}

/// One stanza as written: its first line's number and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stanza {
    pub line: usize,
    pub settings: Vec<Setting>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub line: usize,
    pub key: String,
    pub value: String,
}

/// What a stanza maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub allow: PortSet,
    pub keys: FwknopKeys,
    /// Unix seconds after which its knocks are refused.
    pub expires: Option<u64>,
    /// Seconds its knocks open the gate for (`FW_ACCESS_TIMEOUT`).
    pub open_for: Option<u64>,
    /// Settings Gatekeeper does another way, each with how.
    pub notes: Vec<String>,
}

/// Splits access.conf text into stanzas. `%include` lines are kept as
/// settings, to be reported: their files are not read.
pub fn parse(text: &str) -> Result<Vec<Stanza>, AccessConfError> {
    let mut stanzas: Vec<Stanza> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // As fwknopd reads it: the name, then the rest of the line up to
        // any `;`.
        let (key, value) = match trimmed.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.split(';').next().unwrap_or_default().trim()),
            None => (trimmed, ""),
        };
        let setting = Setting {
            line,
            key: key.to_ascii_uppercase(),
            value: value.to_string(),
        };
        if setting.key == "SOURCE" {
            stanzas.push(Stanza {
                line,
                settings: vec![setting],
            });
            continue;
        }
        match stanzas.last_mut() {
            Some(stanza) => stanza.settings.push(setting),
            None => {
                return Err(AccessConfError::BeforeSource { line, key: setting.key });
            }
        }
    }
    if stanzas.is_empty() {
        return Err(AccessConfError::Empty);
    }
    Ok(stanzas)
}

impl Stanza {
    fn get(&self, key: &str) -> Option<&Setting> {
        self.settings.iter().rev().find(|s| s.key == key)
    }

    /// The client this stanza becomes at `unix_now`, or every reason it
    /// cannot be imported. `any_source`: import a stanza restricted to
    /// some sources as one that may knock from anywhere.
    pub fn map(&self, unix_now: u64, any_source: bool) -> Result<Mapped, Vec<String>> {
        let mut refused = Vec::new();
        let mut notes = Vec::new();
        let source = self.get("SOURCE").map_or("", |s| s.value.as_str());
        if !source.eq_ignore_ascii_case("ANY") {
            if any_source {
                notes.push(format!(
                    "SOURCE {source}: imported with --any-source, so it may knock from anywhere"
                ));
            } else {
                refused.push(format!(
                    "SOURCE {source}: Gatekeeper's clients are not tied to source networks (import it with --any-source to let it knock from anywhere)"
                ));
            }
        }
        let allow = match self.get("OPEN_PORTS") {
            Some(s) => match s.value.parse::<PortSet>() {
                Ok(set) => Some(set),
                Err(e) => {
                    refused.push(format!("line {}: OPEN_PORTS {}: {e}", s.line, s.value));
                    None
                }
            },
            None => {
                refused.push(
                    "no OPEN_PORTS: fwknopd opens whatever a packet asks for; add OPEN_PORTS with the ports this device may open".to_string(),
                );
                None
            }
        };
        let no_key = match self.get("GPG_DECRYPT_ID").or(self.get("GPG_REMOTE_ID")) {
            Some(_) => "GPG keys: only Rijndael (KEY_BASE64) stanzas can be imported",
            None => "no KEY_BASE64 (or KEY)",
        };
        let key = self.secret("KEY_BASE64", "KEY", no_key, &mut refused);
        let hmac_key = self.secret(
            "HMAC_KEY_BASE64",
            "HMAC_KEY",
            "no HMAC_KEY_BASE64: Gatekeeper accepts only authenticated packets; give the device an HMAC key (`fwknop --key-gen`) and `USE_HMAC Y`",
            &mut refused,
        );
        for s in &self.settings {
            match (s.key.as_str(), s.value.to_ascii_uppercase().as_str()) {
                ("ENCRYPTION_MODE", "CBC") | ("HMAC_DIGEST_TYPE", "SHA256") | ("USE_HMAC", "Y") => {}
                (key @ ("ENCRYPTION_MODE" | "HMAC_DIGEST_TYPE" | "USE_HMAC"), _) => {
                    refused.push(format!(
                        "line {}: {key} {}: only CBC with HMAC-SHA256 is accepted",
                        s.line, s.value
                    ));
                }
                ("SOURCE" | "OPEN_PORTS" | "KEY_BASE64" | "KEY" | "HMAC_KEY_BASE64" | "HMAC_KEY", _) => {}
                ("ACCESS_EXPIRE" | "ACCESS_EXPIRE_EPOCH" | "FW_ACCESS_TIMEOUT", _) => {}
                (key, _) => notes.push(format!("line {}: {key} {}: {}", s.line, s.value, unmapped(key))),
            }
        }
        let expires = self.expires(&mut refused);
        let open_for = self.get("FW_ACCESS_TIMEOUT").and_then(|s| {
            let secs = s.value.parse::<u64>().ok().filter(|&n| n > 0);
            if secs.is_none() {
                refused.push(format!(
                    "line {}: FW_ACCESS_TIMEOUT {} is not a number of seconds",
                    s.line, s.value
                ));
            }
            secs
        });
        if expires.is_some_and(|e| e <= unix_now) {
            refused.push("its access has expired (ACCESS_EXPIRE)".to_string());
        }
        match (allow, key, hmac_key) {
            (Some(allow), Some(key), Some(hmac_key)) if refused.is_empty() => Ok(Mapped {
                allow,
                keys: FwknopKeys {
                    key_base64: STANDARD.encode(key),
                    hmac_key_base64: STANDARD.encode(hmac_key),
                },
                expires,
                open_for,
                notes,
            }),
            _ => Err(refused),
        }
    }

    /// A key given as base64 (`b64_key`) or as text (`text_key`); when
    /// there is none, `missing` goes into `refused`.
    fn secret(&self, b64_key: &str, text_key: &str, missing: &str, refused: &mut Vec<String>) -> Option<Vec<u8>> {
        let key = match (self.get(b64_key), self.get(text_key)) {
            (Some(s), _) => STANDARD
                .decode(&s.value)
                .ok()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| format!("line {}: {b64_key} is not base64", s.line)),
            (None, Some(s)) if !s.value.is_empty() => Ok(s.value.as_bytes().to_vec()),
            _ => Err(missing.to_string()),
        };
        key.map_err(|why| refused.push(why)).ok()
    }

    /// `ACCESS_EXPIRE` (MM/DD/YYYY, at 00:00 UTC) or `ACCESS_EXPIRE_EPOCH`.
    fn expires(&self, refused: &mut Vec<String>) -> Option<u64> {
        if let Some(s) = self.get("ACCESS_EXPIRE_EPOCH") {
            let epoch = s.value.parse().ok();
            if epoch.is_none() {
                refused.push(format!(
                    "line {}: ACCESS_EXPIRE_EPOCH {} is not a number",
                    s.line, s.value
                ));
            }
            return epoch;
        }
        let s = self.get("ACCESS_EXPIRE")?;
        let parts: Vec<u32> = s.value.split('/').filter_map(|p| p.trim().parse().ok()).collect();
        match parts[..] {
            [month, day, year] => crate::clock::unix_day(year, month, day),
            _ => None,
        }
        .or_else(|| {
            refused.push(format!("line {}: ACCESS_EXPIRE {} is not MM/DD/YYYY", s.line, s.value));
            None
        })
    }
}

/// How Gatekeeper handles what an imported stanza's `key` set.
fn unmapped(key: &str) -> &'static str {
    match key {
        "MAX_FW_TIMEOUT" => {
            "not needed: a packet's client timeout (`fwknop -f`) may shorten what FW_ACCESS_TIMEOUT (else `[knock] open_for`) opens, never lengthen it"
        }
        "REQUIRE_SOURCE_ADDRESS" => {
            "not mapped: a packet naming 0.0.0.0 (`-s`) opens for the address it came from; one naming another address is refused unless the client may be behind NAT"
        }
        "REQUIRE_USERNAME" => "not mapped: the client is found by its HMAC key, whatever user the packet names",
        "ENABLE_CMD_EXEC" | "CMD_EXEC_USER" | "CMD_EXEC_GROUP" | "CMD_CYCLE_OPEN" | "CMD_CYCLE_CLOSE"
        | "CMD_CYCLE_TIMER" => "not mapped: Gatekeeper never runs commands from packets",
        "FORCE_NAT" | "FORCE_SNAT" | "FORCE_MASQUERADE" | "DISABLE_DNAT" | "ENABLE_NAT_DNS" => {
            "not mapped: Gatekeeper opens ports on the gateway itself and forwards nothing"
        }
        "RESTRICT_PORTS" => "not mapped: the client may open OPEN_PORTS and nothing else",
        "DESTINATION" => "not mapped: every address of the gateway is the destination",
        "%INCLUDE" | "%INCLUDE_FOLDER" => "not followed: import each included file by itself",
        "KEY_LEN" | "HMAC_KEY_LEN" => "not needed: the keys are given",
        _ => "not known to the importer: left out",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_795_000_000;

    #[test]
    fn stanzas_map_with_their_keys_ports_and_expiry() {
        let text = "# comment\nSOURCE ANY\nOPEN_PORTS tcp/22, udp/53\nKEY_BASE64 a2V5\nHMAC_KEY_BASE64 aG1hYw==\nFW_ACCESS_TIMEOUT 60\nACCESS_EXPIRE 01/31/2030\n\nSOURCE 192.0.2.0/24\nOPEN_PORTS tcp/22\nKEY plain\nHMAC_KEY plainhmac\n";
        let stanzas = parse(text).unwrap();
        assert_eq!(stanzas.len(), 2);
        assert_eq!(stanzas[1].line, 9);
        let first = stanzas[0].map(NOW, false).unwrap();
        assert_eq!(first.allow.to_string(), "tcp/22,udp/53");
        assert_eq!(first.keys.key_base64, "a2V5");
        assert_eq!(first.expires, Some(1_896_048_000));
        assert_eq!(first.open_for, Some(60));
        assert!(first.notes.is_empty(), "{:?}", first.notes);
        let refused = stanzas[1].map(NOW, false).unwrap_err();
        assert!(refused[0].contains("--any-source"), "{refused:?}");
        let second = stanzas[1].map(NOW, true).unwrap();
        assert_eq!(second.keys.key_base64, STANDARD.encode("plain"));
    }

    #[test]
    fn what_cannot_be_imported_is_refused_with_each_reason() {
        let text = "SOURCE ANY\nGPG_DECRYPT_ID ABCD\nENCRYPTION_MODE legacy\nACCESS_EXPIRE 01/01/2020\nFW_ACCESS_TIMEOUT soon\n";
        let refused = parse(text).unwrap()[0].map(NOW, false).unwrap_err();
        let all = refused.join("\n");
        for needle in [
            "OPEN_PORTS",
            "GPG",
            "HMAC_KEY_BASE64",
            "ENCRYPTION_MODE legacy",
            "expired",
            "line 5: FW_ACCESS_TIMEOUT soon is not a number of seconds",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
        assert_eq!(
            parse("OPEN_PORTS tcp/22\n"),
            Err(AccessConfError::BeforeSource {
                line: 1,
                key: "OPEN_PORTS".into()
            })
        );
        assert_eq!(parse("# nothing\n"), Err(AccessConfError::Empty));
    }
}
