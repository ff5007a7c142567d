//! Which models there are (`models/manifest.toml`), which ones a deployment serves, and the one a
//! request that names none gets: ingest checks a request's model against them, the classifier
//! loads them, the sink names their classes in its exports.
//!
//! A model is described by its manifest entry: its file, the input it takes (size, resize and
//! crop, normalisation), what its outputs are, and the class table (`[[labels]]`) that names them.
//! A new model, of any family, is a manifest entry and its files.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::labels::Labels;

/// The model settings every service shares.
#[derive(Clone, Debug, clap::Args)]
pub struct ModelSettings {
    /// The model manifest: every model's name, version, file, input and class table.
    #[arg(long = "models-manifest", env = "MODELS_MANIFEST", default_value = "models/manifest.toml")]
    pub manifest: PathBuf,

    /// Folder the manifest's model and class-table files are under (what `make setup` builds).
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
    /// The ONNX file, relative to [`ModelSettings::dir`]: `input[N,3,S,S]` → `output[N,C]`.
    pub onnx: PathBuf,
    /// The class table (a `[[labels]]` entry's name) that names its `C` outputs, in order.
    pub labels: String,
    /// Side `S` of the square input it takes.
    pub image_size: u32,
    /// How an image becomes that square: resized (bilinear, antialiased, as Pillow) so its shorter
    /// side is `round(image_size / crop_fraction)`, then the centre `image_size` square cropped.
    /// 0.875 is the ImageNet convention (224 of 256); 1 keeps the whole shorter side.
    pub crop_fraction: f64,
    /// Per channel (R, G, B), in pixel units 0–255: the input is `(pixel − mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// What the model outputs: `logits` (a softmax gives the scores) or `probabilities` (scores as
    /// they are).
    #[serde(default)]
    pub outputs: Outputs,
}

/// What a model's outputs are.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outputs {
    #[default]
    Logits,
    Probabilities,
}

/// A class table: what a model's outputs are called.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LabelSet {
    pub name: String,
    /// How many classes it has (its models' `C`).
    pub classes: u32,
    /// `index \t id \t label` lines in output order, relative to [`ModelSettings::dir`].
    pub file: PathBuf,
    /// Which classes are marine animals: `index \t group \t label \t scientific name` lines,
    /// relative to the manifest's folder; none if no class is.
    #[serde(default)]
    pub marine: Option<PathBuf>,
    /// Which classes are animals, as inclusive `[first, last]` index ranges (the MegaDetector
    /// and Camtrap DP exports count an image of any other class as not an animal).
    #[serde(default)]
    pub animals: Vec<[u32; 2]>,
}

/// The manifest as written.
#[derive(Clone, Debug, Deserialize)]
pub struct Manifest {
    #[serde(rename = "model")]
    pub models: Vec<Model>,
    #[serde(rename = "labels")]
    pub label_sets: Vec<LabelSet>,
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
    #[error("model `{model}` in the manifest: {reason}")]
    Invalid { model: String, reason: String },
    #[error("class table `{name}`: {reason}")]
    Labels { name: String, reason: String },
}

impl Manifest {
    /// Reads and checks the manifest at `path`: every model's input is one it can be given and
    /// its class table is listed.
    pub fn read(path: &Path) -> Result<Self, ModelsError> {
        let manifest_error = |reason: String| ModelsError::Manifest { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| manifest_error(e.to_string()))?;
        let manifest = toml::from_str::<Manifest>(&text).map_err(|e| manifest_error(e.to_string()))?;
        for model in &manifest.models {
            let invalid = |reason: &str| ModelsError::Invalid { model: model.name.clone(), reason: reason.to_owned() };
            if model.image_size == 0 {
                return Err(invalid("`image_size` must be at least 1"));
            }
            if !(model.crop_fraction > 0.0 && model.crop_fraction <= 1.0) {
                return Err(invalid("`crop_fraction` must be in (0, 1]"));
            }
            if model.std.iter().any(|s| !s.is_normal()) {
                return Err(invalid("`std` must be non-zero"));
            }
            if !manifest.label_sets.iter().any(|set| set.name == model.labels) {
                return Err(invalid(&format!("`labels` names `{}`, which no [[labels]] entry is", model.labels)));
            }
        }
        Ok(manifest)
    }

    /// The class table `model` names its outputs by.
    pub fn label_set(&self, model: &Model) -> &LabelSet {
        self.label_sets.iter().find(|set| set.name == model.labels).expect("checked by Manifest::read")
    }
}

impl ModelSettings {
    /// The manifest, read and checked.
    pub fn manifest(&self) -> Result<Manifest, ModelsError> {
        Manifest::read(&self.manifest)
    }

    /// The models served, in manifest order, with the default among them.
    pub fn load(&self) -> Result<Vec<Model>, ModelsError> {
        self.served(self.manifest()?.models)
    }

    /// Of `all` (a manifest's models), those served, in order, with the default among them.
    pub fn served(&self, all: Vec<Model>) -> Result<Vec<Model>, ModelsError> {
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
        under(&self.dir, &model.onnx)
    }

    /// The classes of the table `set`: its file read, its marine table and animal ranges applied.
    pub fn classes(&self, set: &LabelSet) -> Result<Labels, ModelsError> {
        let error = |reason: String| ModelsError::Labels { name: set.name.clone(), reason };
        let file = under(&self.dir, &set.file);
        let text = std::fs::read_to_string(&file).map_err(|e| error(format!("reading {}: {e}", file.display())))?;
        let marine = match &set.marine {
            None => String::new(),
            Some(marine) => {
                let path = under(self.manifest.parent().unwrap_or(Path::new(".")), marine);
                std::fs::read_to_string(&path).map_err(|e| error(format!("reading {}: {e}", path.display())))?
            }
        };
        let labels = Labels::parse(&text, &marine, &set.animals).map_err(|e| error(e.to_string()))?;
        if labels.len() != set.classes as usize {
            return Err(error(format!("{} lists {} classes, not {}", file.display(), labels.len(), set.classes)));
        }
        Ok(labels)
    }
}

fn under(dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() { path.to_owned() } else { dir.join(path) }
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
    fn the_manifest_describes_each_models_input_and_classes() {
        let manifest = settings(&[], "efficientnet-lite0").manifest().unwrap();
        let lite0 = &manifest.models[0];
        assert_eq!((lite0.crop_fraction, lite0.mean, lite0.std), (0.875, [127.0; 3], [128.0; 3]));
        assert_eq!(lite0.outputs, Outputs::Logits);
        let imagenet = manifest.label_set(lite0);
        assert_eq!((imagenet.name.as_str(), imagenet.classes), ("imagenet-1k", 1000));
        assert_eq!(imagenet.animals, [[0, 397]]);
        assert!(manifest.models.iter().all(|m| m.labels == "imagenet-1k"));
    }

    #[test]
    fn unknown_or_unserved_names_are_refused_naming_the_setting() {
        let err = settings(&["efficientnet-b7"], "efficientnet-lite0").load().unwrap_err();
        assert_eq!(err.to_string(), "`MODELS` names `efficientnet-b7`, which the manifest does not list");
        let err = settings(&["efficientnet-lite1"], "efficientnet-lite0").load().unwrap_err();
        assert_eq!(err.to_string(), "`DEFAULT_MODEL` is `efficientnet-lite0`, which is not among the models served");
    }

    /// A folder of its own for one test.
    fn scratch_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("reefline-models-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A manifest of one model described by `model` (TOML lines) over one class table.
    fn manifest_with(model: &str) -> Result<Manifest, ModelsError> {
        let dir = scratch_dir();
        let text = format!(
            "[[labels]]\nname = \"fish\"\nclasses = 2\nfile = \"fish.tsv\"\n\n[[model]]\nname = \"m\"\n\
             version = \"1\"\nonnx = \"m.onnx\"\n{model}\n"
        );
        std::fs::write(dir.join("manifest.toml"), text).unwrap();
        let read = Manifest::read(&dir.join("manifest.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
        read
    }

    #[test]
    fn a_class_table_is_read_with_its_marine_table_and_its_count_checked() {
        let dir = scratch_dir();
        std::fs::create_dir_all(dir.join("tables")).unwrap();
        std::fs::write(dir.join("tables/fish.tsv"), "# index\tid\tlabel\n0\tf0\tcod\n1\tf1\tempty frame\n").unwrap();
        std::fs::write(dir.join("marine.tsv"), "0\tbony_fish\tcod\tGadus morhua\n").unwrap();
        let settings = ModelSettings {
            manifest: dir.join("manifest.toml"),
            dir: dir.clone(),
            served: vec![],
            default: String::new(),
        };
        let table = |classes: u32| LabelSet {
            name: "fish".into(),
            classes,
            file: "tables/fish.tsv".into(),
            marine: Some("marine.tsv".into()),
            animals: vec![[0, 0]],
        };
        let labels = settings.classes(&table(2)).unwrap();
        let cod = labels.get(0).unwrap();
        assert_eq!((cod.label.as_str(), cod.animal, cod.marine_group.as_deref()), ("cod", true, Some("bony_fish")));
        assert_eq!(cod.scientific_name.as_deref(), Some("Gadus morhua"));
        assert!(!labels.get(1).unwrap().animal);
        let err = settings.classes(&table(3)).unwrap_err().to_string();
        assert!(err.starts_with("class table `fish`: ") && err.ends_with("lists 2 classes, not 3"), "{err}");
        let err = settings.classes(&LabelSet { marine: Some("gone.tsv".into()), ..table(2) }).unwrap_err().to_string();
        assert!(err.contains("gone.tsv"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_model_whose_input_or_classes_cannot_be_served_is_refused_naming_the_field() {
        let input = "image_size = 96\ncrop_fraction = 1.0\nmean = [0.0, 0.0, 0.0]\nstd = [255.0, 255.0, 255.0]";
        let ok = manifest_with(&format!("labels = \"fish\"\n{input}")).unwrap();
        assert_eq!(ok.models[0].outputs, Outputs::Logits);
        let err = manifest_with(&format!("labels = \"birds\"\n{input}")).unwrap_err();
        assert_eq!(err.to_string(), "model `m` in the manifest: `labels` names `birds`, which no [[labels]] entry is");
        let err = manifest_with(&format!("labels = \"fish\"\n{}", input.replace("1.0", "1.5"))).unwrap_err();
        assert_eq!(err.to_string(), "model `m` in the manifest: `crop_fraction` must be in (0, 1]");
        let err = manifest_with(&format!("labels = \"fish\"\n{}", input.replace("[255.0, 255.0", "[0.0, 255.0")))
            .unwrap_err();
        assert_eq!(err.to_string(), "model `m` in the manifest: `std` must be non-zero");
        let err =
            manifest_with(&format!("labels = \"fish\"\n{}", input.replace("crop_fraction = 1.0\n", ""))).unwrap_err();
        assert!(err.to_string().contains("missing field `crop_fraction`"), "{err}");
        let err = manifest_with(&format!("labels = \"fish\"\noutputs = \"odds\"\n{input}")).unwrap_err();
        assert!(err.to_string().contains("unknown variant `odds`"), "{err}");
    }
}
