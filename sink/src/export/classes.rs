//! The classes the exports name: every class table of the model manifest numbered in one sequence
//! (the first table's class `i` is `i`, as ImageNet's always were; a later table's follow every
//! earlier table's classes), and each model's table, so that a result's class index becomes an
//! id no other table's class shares, and whether it is an animal.

use std::collections::{BTreeSet, HashMap};

use reefline_common::labels::Labels;
use reefline_common::models::ModelSettings;

/// One class table as the exports see it.
#[derive(Debug)]
struct Table {
    /// Its first class's id.
    first: i32,
    /// Its classes' names, where its file could be read (ids and animals need only the manifest).
    labels: Option<Labels>,
    animals: Vec<[u32; 2]>,
}

/// The manifest's class tables and which model names its outputs by which.
#[derive(Debug, Default)]
pub struct Classes {
    tables: Vec<Table>,
    /// Model name → its table; a model the manifest no longer lists reads as the first table's.
    models: HashMap<String, usize>,
}

impl Classes {
    /// Reads the manifest (an error if it cannot be) and its class tables (a table that cannot be
    /// read is logged, and its classes are named from the results that hold them).
    pub fn load(settings: &ModelSettings) -> anyhow::Result<Self> {
        let manifest = settings.manifest()?;
        let mut first = 0i32;
        let tables = manifest
            .label_sets
            .iter()
            .map(|set| {
                let labels = settings
                    .classes(set)
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "exports name this table's classes only as results hold them"),
                    )
                    .ok();
                let table = Table { first, labels, animals: set.animals.clone() };
                first += set.classes as i32;
                table
            })
            .collect();
        let table_of = |name: &str| manifest.label_sets.iter().position(|set| set.name == name).unwrap_or(0);
        let models = manifest.models.iter().map(|m| (m.name.clone(), table_of(&m.labels))).collect();
        Ok(Self { tables, models })
    }

    /// The repository manifest's tables (ids and animals; no names: no table's file is read).
    #[cfg(test)]
    pub fn for_tests() -> Self {
        let settings = ModelSettings {
            manifest: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/manifest.toml"),
            dir: "/nonexistent".into(),
            served: vec![],
            default: String::new(),
        };
        Self::load(&settings).expect("the repository manifest reads")
    }

    /// The table `model` names its outputs by.
    pub fn table(&self, model: &str) -> usize {
        self.models.get(model).copied().unwrap_or(0)
    }

    /// The export id of class `index` of `model`'s outputs.
    pub fn id(&self, model: &str, index: i32) -> i32 {
        self.tables.get(self.table(model)).map_or(0, |t| t.first) + index
    }

    /// Whether class `index` of `model`'s outputs is an animal.
    pub fn is_animal(&self, model: &str, index: i32) -> bool {
        let Some(table) = self.tables.get(self.table(model)) else { return false };
        u32::try_from(index).is_ok_and(|i| table.animals.iter().any(|[first, last]| (*first..=*last).contains(&i)))
    }

    /// Every class of the tables `used` (the first table's where none is), by id, with its label.
    pub fn named(&self, used: &BTreeSet<usize>) -> Vec<(i32, String)> {
        let first = BTreeSet::from([0]);
        let used = if used.is_empty() { &first } else { used };
        used.iter()
            .filter_map(|&t| self.tables.get(t))
            .filter_map(|t| Some((t.first, t.labels.as_ref()?)))
            .flat_map(|(first, labels)| {
                labels.iter().enumerate().map(move |(i, c)| (first + i as i32, c.label.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Classes {
        let imagenet = Labels::parse("0\tn0\ttench\n1\tn1\tgoldfish\n2\tn2\tshark\n", "", &[[0, 2]]).unwrap();
        let fish = Labels::parse("0\ta\tcod\n1\tb\tempty\n", "", &[[0, 0]]).unwrap();
        Classes {
            tables: vec![
                Table { first: 0, labels: Some(imagenet), animals: vec![[0, 2]] },
                Table { first: 3, labels: Some(fish), animals: vec![[0, 0]] },
            ],
            models: HashMap::from([("lite".to_owned(), 0), ("fish".to_owned(), 1)]),
        }
    }

    #[test]
    fn every_tables_classes_have_ids_of_their_own() {
        let c = classes();
        assert_eq!((c.id("lite", 2), c.id("fish", 0), c.id("fish", 1)), (2, 3, 4));
        // A model the manifest no longer lists reads as the first table's.
        assert_eq!(c.id("retired", 1), 1);
        assert!(c.is_animal("fish", 0) && !c.is_animal("fish", 1) && c.is_animal("lite", 2));
        assert!(!c.is_animal("lite", -1));
        let names = |used: &[usize]| c.named(&used.iter().copied().collect());
        assert_eq!(names(&[]).len(), 3);
        assert_eq!(names(&[1]), [(3, "cod".to_owned()), (4, "empty".to_owned())]);
        assert_eq!(names(&[0, 1]).len(), 5);
    }
}
