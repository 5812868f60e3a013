//! The command line.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "poseidon",
    version,
    about = "Runs learners' code for CodeOcean in isolated runners"
)]
pub struct Cli {
    /// The YAML configuration file (default: ./configuration.yaml, if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Default, Subcommand)]
pub enum Command {
    /// Serve the API (what `poseidon` alone does).
    #[default]
    Serve,
    /// Print the version.
    Version,
    /// Manage the local backend's image store (see docs/images.md).
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// Import a `docker save` archive or an OCI image layout (directory or tar).
    Import {
        /// The archive or layout directory; `-` reads an archive from stdin.
        file: PathBuf,
        /// Name the image(s) so instead of with the names the archive carries.
        #[arg(long, value_name = "REF")]
        tag: Option<String>,
    },
    /// Pull an image from its registry (`python:3.12` means `docker.io/library/python:3.12`).
    Pull { reference: String },
    /// List the stored images and the environments that use them.
    Ls,
    /// Remove an image; refused while an execution environment uses it.
    Rm { reference: String },
}

/// Go Poseidon's flag is `-config`; systemd units written for it keep working.
pub fn normalize_go_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    args.into_iter()
        .map(|arg| match arg.to_str() {
            Some("-config") => OsString::from("--config"),
            Some(other) if other.starts_with("-config=") => OsString::from(format!("-{other}")),
            _ => arg,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_go_flags(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn serve_is_the_default_and_go_flags_work() {
        let cli = parse(&["poseidon"]);
        assert!(cli.command.is_none() && cli.config.is_none());
        let cli = parse(&["poseidon", "-config", "/etc/p.yaml"]);
        assert_eq!(cli.config, Some(PathBuf::from("/etc/p.yaml")));
        let cli = parse(&["poseidon", "serve", "-config=/etc/q.yaml"]);
        assert!(matches!(cli.command, Some(Command::Serve)));
        assert_eq!(cli.config, Some(PathBuf::from("/etc/q.yaml")));
        assert!(matches!(parse(&["poseidon", "version"]).command, Some(Command::Version)));
        let cli = parse(&["poseidon", "image", "import", "a.tar", "--tag", "x:1", "-config", "c"]);
        assert!(matches!(
            cli.command,
            Some(Command::Image(ImageCommand::Import { tag: Some(_), .. }))
        ));
        assert_eq!(cli.config, Some(PathBuf::from("c")));
    }

    #[test]
    fn the_sandbox_entry_point_is_not_a_subcommand() {
        let args = ["poseidon", "sandbox-init"].map(OsString::from);
        assert!(Cli::try_parse_from(args).is_err());
    }
}
