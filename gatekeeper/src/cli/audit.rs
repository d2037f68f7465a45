//! `gatekeeper audit`: search the audit trail, and join a device's knock
//! journal with it.

use std::{io::Write, path::PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use gatekeeper::{
    audit::query::{self, Filter, Merged, Unreadable},
    clock::unix_now,
    store::files::{DEFAULT_STATE_DIR, FileStore},
};
use serde_json::Value;

/// Search the audit trail: the current file and every rotated one, oldest
/// first. Every filter given must match; lines print one per line, or as
/// they are written with --json.
///
/// Examples:
///
///   gatekeeper audit --client laptop --since 1h
///
///   gatekeeper audit --result rejected --reason replay --json | jq .src
///
///   gatekeeper audit merge laptop.knocks.jsonl
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    merge: Option<AuditCommand>,
    /// Lines about this client.
    #[arg(long, value_name = "NAME")]
    client: Option<String>,
    /// accepted, rejected (summary lines of refusals too) or failed; for
    /// tunnel lines: connected, disconnected, stopped...
    #[arg(long, value_name = "RESULT")]
    result: Option<String>,
    /// A refusal reason (docs/audit.md lists them): bad_tag, replay,
    /// not_permitted...
    #[arg(long, value_name = "REASON")]
    reason: Option<String>,
    /// One kind of line: knock, portal, agent_session, client_closed...
    #[arg(long, value_name = "EVENT")]
    event: Option<String>,
    /// Lines from this long ago (30m, 1h, 7d) or since this day or time
    /// (2026-12-02, 2026-12-02T09:30:00Z, UTC).
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// The lines of one knock (its nonce, hex, as the device's journal
    /// records it).
    #[arg(long, value_name = "ID")]
    knock_id: Option<String>,
    /// Print at most N lines (the first N that match).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    #[command(flatten)]
    source: Source,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    Merge(MergeArgs),
}

/// Put what a device sent beside what the gateway decided.
///
/// CLIENT_LOG is the device's knock journal (`knock`, `connect` and
/// `portal` keep it beside the credential as NAME.knocks.jsonl). Each of
/// its knocks is matched with the gateway's lines by knock id. A knock
/// with no gateway line never reached the daemon: lost on the way, or
/// dropped by the gate before it (`gatekeeper stats` counts those by
/// reason: unknown key, replayed, over a rate).
///
/// Example: gatekeeper audit merge laptop.knocks.jsonl --json
#[derive(Args, Debug)]
struct MergeArgs {
    /// The device's knock journal.
    client_log: PathBuf,
    #[command(flatten)]
    source: Source,
}

/// Where the gateway's trail is, and how to print.
#[derive(Args, Debug)]
struct Source {
    /// The audit file to read, with its rotated `.1`, `.2`... [default:
    /// `[audit] path` in the state directory's gatekeeper.toml, else
    /// STATE_DIR/audit.log].
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// One JSON object per line, for scripts.
    #[arg(long)]
    json: bool,
    /// The gateway's state directory (each node of a cluster keeps its own
    /// trail).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

impl Source {
    fn files(&self) -> Result<Vec<PathBuf>> {
        let current = match &self.file {
            Some(f) => f.clone(),
            None => FileStore::new(&self.state_dir).audit_path()?,
        };
        Ok(query::files(&current)?)
    }
}

pub fn audit(args: AuditArgs) -> Result<()> {
    if let Some(AuditCommand::Merge(m)) = args.merge {
        return merge(m);
    }
    let filter = Filter {
        event: args.event,
        client: args.client,
        result: args.result,
        reason: args.reason,
        since: args.since.map(|s| query::since(&s, unix_now())).transpose()?,
        knock_id: args.knock_id.map(|k| k.to_ascii_lowercase()),
    };
    let files = args.source.files()?;
    let mut printed = 0usize;
    let limit = args.limit.unwrap_or(usize::MAX);
    let mut out = std::io::stdout().lock();
    let unreadable = query::scan(&files, &filter, |line| {
        if printed >= limit {
            return false;
        }
        printed += 1;
        let text = if args.source.json {
            line.to_string()
        } else {
            one_line(&line)
        };
        // A reader that went away (`| head`) ends the search quietly.
        writeln!(out, "{text}").is_ok()
    })?;
    warn_unreadable(&unreadable);
    if printed == 0 {
        eprintln!(
            "no line matches (read {})",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn merge(args: MergeArgs) -> Result<()> {
    let (journal, bad_journal) = query::read_journal(&args.client_log)?;
    if journal.is_empty() {
        bail!(
            "{} holds no knocks: it is the journal `gatekeeper knock` keeps beside the credential (NAME.knocks.jsonl)",
            args.client_log.display()
        );
    }
    let files = args.source.files()?;
    let (merged, unreadable) = query::merge(journal, &files)?;
    warn_unreadable(&bad_journal);
    warn_unreadable(&unreadable);
    for m in &merged {
        if args.source.json {
            println!("{}", serde_json::to_string(m)?);
        } else {
            println!("{}", merged_line(m));
        }
    }
    let unanswered = merged.iter().filter(|m| m.gateway.is_empty()).count();
    if unanswered > 0 {
        eprintln!(
            "{unanswered} of {} knocks have no gateway line: they never reached the daemon (lost on the way, or dropped by the gate first: `gatekeeper stats`)",
            merged.len()
        );
    }
    Ok(())
}

fn warn_unreadable(lines: &[Unreadable]) {
    if let Some(first) = lines.first() {
        eprintln!(
            "skipped {} line(s) that are not audit JSON, the first {} line {}",
            lines.len(),
            first.path.display(),
            first.line
        );
    }
}

/// A line for people: time, event, then its fields as `key=value`, the
/// ones worth reading first.
fn one_line(line: &Value) -> String {
    const FIRST: [&str; 6] = ["client", "result", "reason", "src", "carrier", "knock_id"];
    let mut out = format!(
        "{} {:<16}",
        line["time"].as_str().unwrap_or("-"),
        line["event"].as_str().unwrap_or("-")
    );
    let Some(obj) = line.as_object() else {
        return out;
    };
    let rest = obj
        .iter()
        .filter(|(k, _)| !FIRST.contains(&k.as_str()) && !matches!(k.as_str(), "time" | "event"));
    let first = FIRST.iter().filter_map(|k| obj.get_key_value(*k));
    for (k, v) in first.chain(rest) {
        match (k.as_str(), v) {
            (_, Value::Null) => {}
            // The two objects a knock line carries, shortened: --json
            // has them whole.
            ("request", r) => out.push_str(&format!(
                " asked={}/{}-{} from_port={}",
                r["protocol"].as_str().unwrap_or("?"),
                r["start_port"],
                r["end_port"],
                r["local_port"]
            )),
            ("opened", o) => out.push_str(&format!(
                " opened={} for_secs={} src_port={}",
                o["ports"].as_str().unwrap_or("?"),
                o["for_secs"],
                o["src_port"].as_u64().map_or("any".to_string(), |p| p.to_string())
            )),
            (_, Value::String(s)) => out.push_str(&format!(" {k}={s}")),
            (_, other) => out.push_str(&format!(" {k}={other}")),
        }
    }
    out
}

fn merged_line(m: &Merged) -> String {
    let s = &m.sent;
    let gateway = if m.gateway.is_empty() {
        "gateway: no line (never reached the daemon)".to_string()
    } else {
        m.gateway
            .iter()
            .map(|g| {
                let mut said = format!("gateway: {}", g["result"].as_str().unwrap_or("?"));
                if let Some(r) = g["reason"].as_str() {
                    said.push_str(&format!(" ({r})"));
                }
                if let Some(ports) = g["opened"]["ports"].as_str() {
                    said.push_str(&format!(" opened {ports}"));
                }
                if let Some(d) = g["decision"].as_str() {
                    said.push_str(&format!(" -> {d}"));
                }
                said
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "{} {} {} via {} to {} asked {}: device saw {}; {gateway}",
        s.time, s.knock_id, s.client, s.carrier, s.target, s.request, s.outcome
    )
}
