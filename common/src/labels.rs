//! ImageNet class names and Reefline's marine table over them: the label table is read here and
//! nowhere else (the classifier names its predictions by it, the sink's exports list its classes).

use std::path::Path;

/// One ImageNet-1k class.
#[derive(Clone, Debug)]
pub struct Class {
    pub wnid: String,
    pub label: String,
    /// The marine group (`shark`, `bony_fish`, ...) if this class is a marine animal.
    pub marine_group: Option<&'static str>,
    /// A marine class's scientific name: genus and species when it is one species, else the
    /// taxon it covers (`Sphyrna`, `Scyphozoa`).
    pub scientific_name: Option<&'static str>,
}

/// The 1,000 classes in model output order.
#[derive(Clone, Debug)]
pub struct Labels(Vec<Class>);

/// The marine table, compiled in from `models/marine_groups.tsv`.
const MARINE_TABLE: &str = include_str!("../../models/marine_groups.tsv");

/// `(class index, group)` for every marine class.
pub fn marine_groups() -> impl Iterator<Item = (usize, &'static str)> {
    marine_table().map(|(index, group, _)| (index, group))
}

/// `(class index, group, scientific name)` for every marine class.
fn marine_table() -> impl Iterator<Item = (usize, &'static str, &'static str)> {
    data_lines(MARINE_TABLE).map(|cols| {
        let index = cols[0].parse().expect("marine table index is a number");
        (index, cols[1], cols.get(3).copied().expect("marine table rows have a scientific name"))
    })
}

fn data_lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(|l| l.split('\t').collect())
}

impl Labels {
    /// Reads `index \t wnid \t label` lines (as `scripts/assets.py` writes them).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading labels {}: {e}", path.display()))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut classes: Vec<Class> = data_lines(text)
            .enumerate()
            .map(|(i, cols)| match cols.as_slice() {
                [index, wnid, label] if index.parse() == Ok(i) => Ok(Class {
                    wnid: (*wnid).to_owned(),
                    label: (*label).to_owned(),
                    marine_group: None,
                    scientific_name: None,
                }),
                _ => Err(anyhow::anyhow!("labels line {} is not `{i}<TAB>wnid<TAB>label`", i + 1)),
            })
            .collect::<anyhow::Result<_>>()?;
        for (index, group, scientific_name) in marine_table() {
            let class = classes
                .get_mut(index)
                .ok_or_else(|| anyhow::anyhow!("marine table names class {index}, beyond the labels"))?;
            class.marine_group = Some(group);
            class.scientific_name = Some(scientific_name);
        }
        Ok(Self(classes))
    }

    pub fn get(&self, index: usize) -> Option<&Class> {
        self.0.get(index)
    }

    /// The classes, in model output order (a class's index is its position).
    pub fn iter(&self) -> impl Iterator<Item = &Class> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marine_table_covers_the_groups_and_leaves_freshwater_out() {
        let groups: std::collections::HashMap<usize, &str> = marine_groups().collect();
        assert_eq!(groups[&2], "shark"); // great white shark
        assert_eq!(groups[&6], "ray"); // stingray
        assert_eq!(groups[&148], "cetacean"); // killer whale
        assert_eq!(groups[&150], "pinniped"); // sea lion
        assert_eq!(groups[&149], "sirenian"); // dugong
        assert_eq!(groups[&107], "cnidarian"); // jellyfish
        assert_eq!(groups[&327], "echinoderm"); // starfish
        assert_eq!(groups[&122], "crustacean"); // American lobster
        assert_eq!(groups[&117], "mollusc"); // chambered nautilus
        assert_eq!(groups[&33], "sea_turtle"); // loggerhead
        assert_eq!(groups[&65], "sea_snake");
        assert_eq!(groups[&393], "bony_fish"); // clownfish
        for freshwater in [0, 1, 124, 395] {
            assert!(!groups.contains_key(&freshwater), "class {freshwater} is not marine");
        }
        assert_eq!(groups.len(), 39);
    }

    #[test]
    fn labels_carry_the_marine_group() {
        let text: String = (0..1000).map(|i| format!("{i}\tn{i:08}\tclass {i}\n")).collect();
        let labels = Labels::parse(&format!("# header\n{text}")).unwrap();
        assert_eq!(labels.len(), 1000);
        assert_eq!(labels.get(2).unwrap().marine_group, Some("shark"));
        assert_eq!(labels.get(281).unwrap().marine_group, None);
        assert!(Labels::parse("0\tn0\tx\n2\tn2\ty\n").is_err());
    }

    #[test]
    fn marine_classes_carry_their_scientific_name() {
        let text: String = (0..1000).map(|i| format!("{i}\tn{i:08}\tclass {i}\n")).collect();
        let labels = Labels::parse(&text).unwrap();
        let name = |i: usize| labels.get(i).unwrap().scientific_name;
        assert_eq!(name(2), Some("Carcharodon carcharias")); // great white shark: one species
        assert_eq!(name(33), Some("Caretta caretta")); // loggerhead
        assert_eq!(name(148), Some("Orcinus orca")); // killer whale
        assert_eq!(name(4), Some("Sphyrna")); // hammerheads: a genus
        assert_eq!(name(107), Some("Scyphozoa")); // jellyfish: a class
        assert_eq!(name(281), None); // tabby cat
        assert_eq!((0..1000).filter(|&i| name(i).is_some()).count(), 39, "every marine class has one");
    }
}
