//! Class tables: what a model's outputs are called, which of them are animals, and Reefline's
//! marine table over them. A table is read here and nowhere else (the classifier names its
//! predictions by it, the sink's exports list its classes); the manifest says which files make it
//! (`models::ModelSettings::classes`).

use std::sync::Arc;

/// One class of a model's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Class {
    /// The class's identifier in its table (an ImageNet class's WordNet id).
    pub wnid: String,
    pub label: String,
    /// Whether the class is an animal (the manifest's `animals` ranges).
    pub animal: bool,
    /// The marine group (`shark`, `bony_fish`, ...) if this class is a marine animal.
    pub marine_group: Option<String>,
    /// A marine class's scientific name: genus and species when it is one species, else the
    /// taxon it covers (`Sphyrna`, `Scyphozoa`).
    pub scientific_name: Option<String>,
}

/// A model's classes in output order; cheap to clone.
#[derive(Clone, Debug)]
pub struct Labels(Arc<Vec<Class>>);

/// Lines of a tab-separated table that are not comments or blank, split into columns.
fn data_lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty())
        .map(|(n, l)| (n + 1, l.split('\t').collect()))
}

impl Labels {
    /// A table from its `index \t id \t label` lines (as `scripts/assets.py` writes them), with
    /// the marine table's `index \t group \t label \t scientific name` lines applied and the
    /// classes in `animals` (inclusive index ranges) marked as animals.
    pub fn parse(text: &str, marine: &str, animals: &[[u32; 2]]) -> anyhow::Result<Self> {
        let mut classes: Vec<Class> = data_lines(text)
            .enumerate()
            .map(|(i, (line, cols))| match cols.as_slice() {
                [index, wnid, label] if index.parse() == Ok(i) => Ok(Class {
                    wnid: (*wnid).to_owned(),
                    label: (*label).to_owned(),
                    animal: animals.iter().any(|[first, last]| (*first as usize..=*last as usize).contains(&i)),
                    marine_group: None,
                    scientific_name: None,
                }),
                _ => Err(anyhow::anyhow!("line {line} is not `{i}<TAB>id<TAB>label`")),
            })
            .collect::<anyhow::Result<_>>()?;
        for (line, cols) in data_lines(marine) {
            let [index, group, _, scientific_name] = cols.as_slice() else {
                anyhow::bail!("marine table line {line} is not `index<TAB>group<TAB>label<TAB>scientific name`");
            };
            let class = index
                .parse::<usize>()
                .ok()
                .and_then(|index| classes.get_mut(index))
                .ok_or_else(|| anyhow::anyhow!("marine table line {line} names class {index}, not in the table"))?;
            class.marine_group = Some((*group).to_owned());
            class.scientific_name = Some((*scientific_name).to_owned());
        }
        Ok(Self(Arc::new(classes)))
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

    const MARINE: &str = include_str!("../../models/marine_groups.tsv");

    /// 1,000 placeholder classes with Reefline's marine table, the first 398 animals (ImageNet's).
    fn imagenet_like() -> Labels {
        let text: String = (0..1000).map(|i| format!("{i}\tn{i:08}\tclass {i}\n")).collect();
        Labels::parse(&format!("# header\n{text}"), MARINE, &[[0, 397]]).unwrap()
    }

    #[test]
    fn marine_table_covers_the_groups_and_leaves_freshwater_out() {
        let labels = imagenet_like();
        let group = |i: usize| labels.get(i).unwrap().marine_group.as_deref();
        assert_eq!(group(2), Some("shark")); // great white shark
        assert_eq!(group(6), Some("ray")); // stingray
        assert_eq!(group(148), Some("cetacean")); // killer whale
        assert_eq!(group(150), Some("pinniped")); // sea lion
        assert_eq!(group(149), Some("sirenian")); // dugong
        assert_eq!(group(107), Some("cnidarian")); // jellyfish
        assert_eq!(group(327), Some("echinoderm")); // starfish
        assert_eq!(group(122), Some("crustacean")); // American lobster
        assert_eq!(group(117), Some("mollusc")); // chambered nautilus
        assert_eq!(group(33), Some("sea_turtle")); // loggerhead
        assert_eq!(group(65), Some("sea_snake"));
        assert_eq!(group(393), Some("bony_fish")); // clownfish
        for freshwater in [0, 1, 124, 395] {
            assert_eq!(group(freshwater), None, "class {freshwater} is not marine");
        }
        assert_eq!(labels.iter().filter(|c| c.marine_group.is_some()).count(), 39);
    }

    #[test]
    fn marine_classes_carry_their_scientific_name() {
        let labels = imagenet_like();
        let name = |i: usize| labels.get(i).unwrap().scientific_name.as_deref();
        assert_eq!(name(2), Some("Carcharodon carcharias")); // great white shark: one species
        assert_eq!(name(33), Some("Caretta caretta")); // loggerhead
        assert_eq!(name(148), Some("Orcinus orca")); // killer whale
        assert_eq!(name(4), Some("Sphyrna")); // hammerheads: a genus
        assert_eq!(name(107), Some("Scyphozoa")); // jellyfish: a class
        assert_eq!(name(281), None); // tabby cat
        assert_eq!(labels.iter().filter(|c| c.scientific_name.is_some()).count(), 39, "every marine class has one");
    }

    #[test]
    fn animals_are_the_classes_in_the_ranges() {
        let labels = imagenet_like();
        assert!(labels.get(0).unwrap().animal && labels.get(397).unwrap().animal);
        assert!(!labels.get(398).unwrap().animal && !labels.get(999).unwrap().animal);
    }

    #[test]
    fn a_table_out_of_order_or_a_marine_row_beyond_it_is_refused_naming_the_line() {
        let err = Labels::parse("0\tn0\tx\n2\tn2\ty\n", "", &[]).unwrap_err();
        assert_eq!(err.to_string(), "line 2 is not `1<TAB>id<TAB>label`");
        let err = Labels::parse("0\tn0\tx\n", "# head\n3\tshark\tx\tSqualus", &[]).unwrap_err();
        assert_eq!(err.to_string(), "marine table line 2 names class 3, not in the table");
        let err = Labels::parse("0\tn0\tx\n", "0\tshark", &[]).unwrap_err();
        assert_eq!(err.to_string(), "marine table line 1 is not `index<TAB>group<TAB>label<TAB>scientific name`");
    }
}
