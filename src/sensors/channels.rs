//! Channels are matched by name: the caller's columns may come in any order and, for archives,
//! may include columns the model does not use. The map says, for each model channel in input
//! order, which source column feeds it.

use std::collections::{HashMap, HashSet};

/// Why a set of source columns cannot feed a model; every problem is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelProblems {
    pub missing: Vec<String>,
    pub unknown: Vec<String>,
    pub duplicated: Vec<String>,
}

/// Names shown in a message before the rest are only counted: a body of 100,000 made-up
/// names gets an answer of a line, not a copy of itself.
const NAMES_SHOWN: usize = 20;

fn listed(names: &[String]) -> String {
    let shown = names[..names.len().min(NAMES_SHOWN)].join(", ");
    match names.len().saturating_sub(NAMES_SHOWN) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

impl std::fmt::Display for ChannelProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("missing", &self.missing),
            ("unknown", &self.unknown),
            ("duplicated", &self.duplicated),
        ]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(problem, names)| format!("{problem} channels: {}", listed(names)))
        .collect();
        f.write_str(&parts.join("; "))
    }
}

/// For each model channel (in model order), the index of the source column holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMap {
    pub columns: Vec<usize>,
    /// Columns of the source (so rows can be walked with the right stride).
    pub source_width: usize,
}

impl ChannelMap {
    /// Matches `source` names to the model's `channels`. Missing model channels, and model
    /// channels given more than once (which column?), are always errors; source columns the
    /// model does not use are errors unless `allow_extra`, each named once however often it
    /// repeats. Linear in the number of names.
    pub fn new(
        model_channels: &[String],
        source: &[String],
        allow_extra: bool,
    ) -> Result<ChannelMap, ChannelProblems> {
        let wanted: HashSet<&str> = model_channels.iter().map(String::as_str).collect();
        let mut position: HashMap<&str, usize> = HashMap::with_capacity(source.len());
        let mut repeated: HashSet<&str> = HashSet::new();
        let mut duplicated = Vec::new();
        let mut unknown = Vec::new();
        for (index, name) in source.iter().enumerate() {
            let first = position.insert(name.as_str(), index).is_none();
            if wanted.contains(name.as_str()) {
                if !first && repeated.insert(name.as_str()) {
                    duplicated.push(name.clone());
                }
            } else if first && !allow_extra {
                unknown.push(name.clone());
            }
        }
        let missing: Vec<String> = model_channels
            .iter()
            .filter(|c| !position.contains_key(c.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() || !unknown.is_empty() || !duplicated.is_empty() {
            return Err(ChannelProblems {
                missing,
                unknown,
                duplicated,
            });
        }
        Ok(ChannelMap {
            columns: model_channels
                .iter()
                .map(|c| position[c.as_str()])
                .collect(),
            source_width: source.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn matches_by_name_in_any_order() {
        let model = names(&["a", "b", "c"]);
        let map = ChannelMap::new(&model, &names(&["c", "a", "b"]), false).unwrap();
        assert_eq!(map.columns, vec![1, 2, 0]);
        let same = ChannelMap::new(&model, &model, false).unwrap();
        assert_eq!(same.columns, vec![0, 1, 2]);
        let wide = ChannelMap::new(&model, &names(&["x", "a", "b", "c"]), true).unwrap();
        assert_eq!(wide.columns, vec![1, 2, 3]);
        assert_eq!(wide.source_width, 4);
    }

    #[test]
    fn names_every_problem() {
        let model = names(&["a", "b", "c"]);
        let problems = ChannelMap::new(&model, &names(&["a", "a", "x"]), false).unwrap_err();
        assert_eq!(problems.missing, names(&["b", "c"]));
        assert_eq!(problems.unknown, names(&["x"]));
        assert_eq!(problems.duplicated, names(&["a"]));
        let text = problems.to_string();
        assert!(text.contains("missing channels: b, c"), "{text}");
        assert!(text.contains("unknown channels: x"), "{text}");
        let extra_ok = ChannelMap::new(&model, &names(&["a", "x"]), true).unwrap_err();
        assert!(extra_ok.unknown.is_empty());
    }

    #[test]
    fn a_repeated_column_the_model_does_not_use_is_not_a_duplicate() {
        let model = names(&["a", "b"]);
        let map = ChannelMap::new(&model, &names(&["x", "b", "x", "a"]), true).unwrap();
        assert_eq!(map.columns, vec![3, 1]);
        // Without extras allowed it is unknown, named once.
        let problems = ChannelMap::new(&model, &names(&["x", "b", "x", "a"]), false).unwrap_err();
        assert_eq!(problems.unknown, names(&["x"]));
        assert!(problems.duplicated.is_empty() && problems.missing.is_empty());
    }

    #[test]
    fn many_bad_names_are_counted_not_all_listed() {
        let model = names(&["a"]);
        let source: Vec<String> = (0..200_000)
            .map(|i| format!("n{}", i % 100_000))
            .chain(["a".to_string(), "a".to_string()])
            .collect();
        let problems = ChannelMap::new(&model, &source, false).unwrap_err();
        assert_eq!(problems.unknown.len(), 100_000);
        assert_eq!(problems.duplicated, names(&["a"]));
        let text = problems.to_string();
        assert!(
            text.starts_with("unknown channels: n0, n1, n2")
                && text.contains("n19 and 99980 more; duplicated channels: a"),
            "{text}"
        );
    }
}
