//! Channels are matched by name: the caller's columns may come in any order and, for archives,
//! may include columns the model does not use. The map says, for each model channel in input
//! order, which source column feeds it.

use std::collections::HashMap;

/// Why a set of source columns cannot feed a model; every problem is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelProblems {
    pub missing: Vec<String>,
    pub unknown: Vec<String>,
    pub duplicated: Vec<String>,
}

impl std::fmt::Display for ChannelProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing channels: {}", self.missing.join(", ")));
        }
        if !self.unknown.is_empty() {
            parts.push(format!("unknown channels: {}", self.unknown.join(", ")));
        }
        if !self.duplicated.is_empty() {
            parts.push(format!(
                "duplicated channels: {}",
                self.duplicated.join(", ")
            ));
        }
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
    /// Matches `source` names to the model's `channels`. Missing and duplicated channels are
    /// always errors; source columns the model does not use are errors unless `allow_extra`.
    pub fn new(
        model_channels: &[String],
        source: &[String],
        allow_extra: bool,
    ) -> Result<ChannelMap, ChannelProblems> {
        let mut position: HashMap<&str, usize> = HashMap::with_capacity(source.len());
        let mut duplicated = Vec::new();
        for (index, name) in source.iter().enumerate() {
            if position.insert(name.as_str(), index).is_some() && !duplicated.contains(name) {
                duplicated.push(name.clone());
            }
        }
        let missing: Vec<String> = model_channels
            .iter()
            .filter(|c| !position.contains_key(c.as_str()))
            .cloned()
            .collect();
        let unknown: Vec<String> = if allow_extra {
            Vec::new()
        } else {
            source
                .iter()
                .filter(|s| !model_channels.contains(s))
                .cloned()
                .collect()
        };
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
}
