//! `poseidon image import|pull|ls|rm`: the local backend's image store from the command line.
//!
//! The commands work on the same store as a running service (`<statedir>/local/store`); the
//! store's lock makes that safe. Whether an environment uses an image is read from the
//! persisted environments (`<statedir>/environments.json`).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use poseidon_image::{ImageRecord, Progress, Store};
use serde::Deserialize;

use crate::cli::ImageCommand;
use crate::config::Config;

pub fn run(config_file: Option<&Path>, command: ImageCommand) -> anyhow::Result<()> {
    let env = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
    let config = Config::load(config_file, env)?;
    let local = crate::service::local_config(&config)?;
    let store = Store::open(local.store_config()).context("cannot open the image store")?;
    match command {
        ImageCommand::Import { file, tag } => {
            let records = if file.as_os_str() == "-" {
                poseidon_image::import_stream(&store, std::io::stdin().lock(), tag.as_deref())
            } else {
                poseidon_image::import(&store, &file, tag.as_deref())
            }
            .with_context(|| format!("cannot import {}", file.display()))?;
            records.iter().for_each(|r| println!("imported {} ({})", r.reference, short_id(&r.id)));
            Ok(())
        }
        ImageCommand::Pull { reference } => pull(&store, &config, &reference),
        ImageCommand::Ls => list(&store, &config),
        ImageCommand::Rm { reference } => {
            let environments = environments(&config)?;
            let record = store
                .remove(&reference, |record| users(&environments, record))
                .with_context(|| format!("cannot remove {reference}"))?;
            println!("removed {}", record.reference);
            Ok(())
        }
    }
}

fn pull(store: &Store, config: &Config, reference: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let display = Arc::new(Mutex::new(ProgressDisplay::new()));
    let progress = Arc::new(move |event| {
        display.lock().unwrap_or_else(|e| e.into_inner()).show(event);
    });
    let record = runtime
        .block_on(poseidon_image::pull(store, reference, &config.registries(), progress))
        .with_context(|| format!("cannot pull {reference}"))?;
    println!("pulled {} ({}, {})", record.reference, short_id(&record.id), size(record.size));
    Ok(())
}

/// Layer progress on stderr: redrawn in place on a terminal, one line per layer otherwise.
struct ProgressDisplay {
    terminal: bool,
    layers: usize,
}

impl ProgressDisplay {
    fn new() -> Self {
        Self { terminal: std::io::stderr().is_terminal(), layers: 0 }
    }

    fn show(&mut self, event: Progress) {
        let mut err = std::io::stderr().lock();
        let _ = match event {
            Progress::Manifest { layers, bytes } => {
                self.layers = layers;
                writeln!(err, "{layers} layers, {}", size(bytes))
            }
            Progress::LayerCached { index, digest } => {
                writeln!(
                    err,
                    "layer {}/{} {}: already stored",
                    index + 1,
                    self.layers,
                    short_id(&digest)
                )
            }
            Progress::Layer { index, digest, done, total } => {
                let line = format!(
                    "layer {}/{} {}: {} of {}",
                    index + 1,
                    self.layers,
                    short_id(&digest),
                    size(done),
                    size(total)
                );
                match (self.terminal, done == total) {
                    (true, false) => write!(err, "\r{line}\x1b[K"),
                    (true, true) => writeln!(err, "\r{line}\x1b[K"),
                    (false, true) => writeln!(err, "{line}"),
                    (false, false) => Ok(()),
                }
            }
            Progress::Unpacking => writeln!(err, "unpacking"),
        };
    }
}

fn list(store: &Store, config: &Config) -> anyhow::Result<()> {
    let environments = environments(config)?;
    let records = store.list().context("cannot read the image store")?;
    println!("{:<60} {:<14} {:>10}  USED BY", "REFERENCE", "ID", "SIZE");
    for record in records {
        let users = users(&environments, &record).join(",");
        println!(
            "{:<60} {:<14} {:>10}  {users}",
            record.reference,
            short_id(&record.id),
            size(record.size)
        );
    }
    Ok(())
}

/// The persisted environments' ids and images (only what we need of `environments.json`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Persisted {
    #[serde(default)]
    execution_environments: Vec<PersistedEnvironment>,
}

#[derive(Debug, Deserialize)]
struct PersistedEnvironment {
    id: serde_json::Value,
    image: String,
}

fn environments(config: &Config) -> anyhow::Result<Vec<PersistedEnvironment>> {
    let path = config.statedir.join("environments.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let persisted: Persisted = serde_json::from_slice(&bytes)
                .with_context(|| format!("cannot parse {}", path.display()))?;
            Ok(persisted.execution_environments)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Ids of the environments whose image names `record` (compared in normalised form).
fn users(environments: &[PersistedEnvironment], record: &ImageRecord) -> Vec<String> {
    environments
        .iter()
        .filter(|e| poseidon_image::normalize(&e.image).is_ok_and(|r| r == record.reference))
        .map(|e| e.id.to_string())
        .collect()
}

fn short_id(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} kB", b as f64 / 1024.0),
    }
}
