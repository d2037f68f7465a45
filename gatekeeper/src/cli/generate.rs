//! `gatekeeper generate`: man pages and shell completions, made from the
//! same command definitions the CLI parses with, so they never drift from
//! `--help`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Subcommand};
use clap_complete::Shell;

use super::Cli;

/// Write man pages or shell completions (the package ships both).
///
/// Example: gatekeeper generate completions bash > /etc/bash_completion.d/gatekeeper
#[derive(Subcommand, Debug)]
pub enum Generate {
    /// One man page per command (gatekeeper.1, gatekeeper-run.1, ...) in DIR.
    Man(ManArgs),
    /// The completion script for SHELL, on stdout.
    Completions(CompletionsArgs),
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Where to write the pages (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    shell: Shell,
}

pub fn generate(g: Generate) -> Result<()> {
    match g {
        Generate::Man(m) => {
            std::fs::create_dir_all(&m.out).with_context(|| format!("creating {}", m.out.display()))?;
            clap_mangen::generate_to(Cli::command(), &m.out)
                .with_context(|| format!("writing man pages into {}", m.out.display()))?;
            let pages = std::fs::read_dir(&m.out)?.count();
            eprintln!("wrote {pages} man pages into {}", m.out.display());
            Ok(())
        }
        Generate::Completions(c) => {
            let mut script = Vec::new();
            clap_complete::generate(c.shell, &mut Cli::command(), "gatekeeper", &mut script);
            // A closed pipe (`| head`) ends the output quietly.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
    }
}
