//! `sluice`: the streaming chat gateway's command-line entry point.
//!
//! This is the edge of the program: it parses the command line and reports errors with `anyhow`.
//! The gateway itself is built on the patterns in the `sluice-flow` crate.

use clap::Parser;

/// sluice: a streaming chat gateway for OpenAI-compatible clients.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    println!(
        "sluice {}: the gateway is being built; see README.md for what runs today.",
        env!("CARGO_PKG_VERSION")
    );
    Ok(())
}
