//! Which models there are (`models/manifest.toml`), which ones a deployment serves, and the one a
//! request that names none gets: ingest checks a request's model against them, the classifier
//! loads them.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The model settings every service shares.
#[derive(Clone, Debug, clap::Args)]
pub struct ModelSettings {
    /// The model manifest: every model's name, version, file and input size.
    #[arg(long = "models-manifest", env = "MODELS_MANIFEST", default_value = "models/manifest.toml")]
    pub manifest: PathBuf,

    /// Folder the manifest's model files are under (what `make setup` builds).
    #[arg(long = "models-dir", env = "MODELS_DIR", default_value = ".cache")]
    pub dir: PathBuf,

    /// Comma-separated names of the models served; empty: every model of the manifest.
    #[arg(long = "models", env = "MODELS", default_value = "", value_delimiter = ',')]
    pub served: Vec<String>,

    /// The model a request that names none is classified with.
    #[arg(long = "default-model", env = "DEFAULT_MODEL", default_value = "efficientnet-lite0")]
    pub default: String,
}

/// One model of the manifest.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Model {
    pub name: String,
    /// Written into every result it produces.
    pub version: String,
    /// Side of the square input it takes.
    pub image_size: u32,
    /// The ONNX file, relative to [`ModelSettings::dir`].
    pub onnx: PathBuf,
}

#[derive(Deserialize)]
struct Manifest {
    model: Vec<Model>,
}

/// A problem with the model settings, found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("reading the model manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("`MODELS` names `{0}`, which the manifest does not list")]
    Unknown(String),
    #[error("`DEFAULT_MODEL` is `{0}`, which is not among the models served")]
    DefaultNotServed(String),
}

impl ModelSettings {
    /// The models served, in manifest order, with the default among them.
    pub fn load(&self) -> Result<Vec<Model>, ModelsError> {
        let manifest_error = |reason: String| ModelsError::Manifest { path: self.manifest.clone(), reason };
        let text = std::fs::read_to_string(&self.manifest).map_err(|e| manifest_error(e.to_string()))?;
        let all = toml::from_str::<Manifest>(&text).map_err(|e| manifest_error(e.to_string()))?.model;
        let served: Vec<&String> = self.served.iter().filter(|name| !name.trim().is_empty()).collect();
        if let Some(unknown) = served.iter().find(|name| !all.iter().any(|m| &&m.name == *name)) {
            return Err(ModelsError::Unknown(unknown.to_string()));
        }
        let models: Vec<Model> =
            all.into_iter().filter(|m| served.is_empty() || served.iter().any(|name| **name == m.name)).collect();
        if !models.iter().any(|m| m.name == self.default) {
            return Err(ModelsError::DefaultNotServed(self.default.clone()));
        }
        Ok(models)
    }

    /// Where `model`'s ONNX file is.
    pub fn path(&self, model: &Model) -> PathBuf {
        if model.onnx.is_absolute() { model.onnx.clone() } else { Path::new(&self.dir).join(&model.onnx) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(served: &[&str], default: &str) -> ModelSettings {
        ModelSettings {
            manifest: Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/manifest.toml"),
            dir: ".cache".into(),
            served: served.iter().map(|s| s.to_string()).collect(),
            default: default.into(),
        }
    }

    #[test]
    fn every_model_of_the_manifest_is_served_unless_narrowed() {
        let all = settings(&[""], "efficientnet-lite0").load().unwrap();
        let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "efficientnet-lite0-int8"]
        );
        assert_eq!(all.iter().map(|m| m.image_size).collect::<Vec<_>>(), [224, 240, 260, 224]);
        let two = settings(&["efficientnet-lite2", "efficientnet-lite0"], "efficientnet-lite2").load().unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(
            settings(&[], "efficientnet-lite0").path(&two[0]),
            Path::new(".cache/models/efficientnet-lite0.onnx")
        );
    }

    #[test]
    fn unknown_or_unserved_names_are_refused_naming_the_setting() {
        let err = settings(&["efficientnet-b7"], "efficientnet-lite0").load().unwrap_err();
        assert_eq!(err.to_string(), "`MODELS` names `efficientnet-b7`, which the manifest does not list");
        let err = settings(&["efficientnet-lite1"], "efficientnet-lite0").load().unwrap_err();
        assert_eq!(err.to_string(), "`DEFAULT_MODEL` is `efficientnet-lite0`, which is not among the models served");
    }
}
