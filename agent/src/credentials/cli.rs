//! `sandbox-egress credentials ...`.

use anyhow::{bail, Result};

use super::placeholder::{is_valid_name, placeholder};

#[derive(clap::Subcommand)]
pub enum CredentialsCommand {
    /// Print the placeholder a sandbox holds instead of provider NAME's
    /// secret (the same on every agent and across restarts)
    Placeholder { name: String },
}

pub fn run(command: CredentialsCommand) -> Result<()> {
    match command {
        CredentialsCommand::Placeholder { name } => {
            if !is_valid_name(&name) {
                bail!("{name:?} is not a provider name: 1 to 64 letters, digits, '-' or '_'");
            }
            println!("{}", placeholder(&name));
        }
    }
    Ok(())
}
