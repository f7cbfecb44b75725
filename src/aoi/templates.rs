//! Golden templates, one per board, kept on disk so they survive a restart:
//! `<dir>/<board>.image` (the bytes as uploaded) and `<dir>/<board>.json` (metadata), each
//! written to a temporary file and renamed, so a crash never leaves half a template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::aoi::pipeline::{AoiError, Inspector, PreparedTemplate};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateInfo {
    pub board: String,
    pub width: usize,
    pub height: usize,
    /// Otsu threshold found for the template.
    pub threshold: u8,
    /// Confidence at or above which a defect rejects the board (None: the model's default).
    pub reject_threshold: Option<f32>,
    /// Seconds since the Unix epoch.
    pub registered_at: u64,
    pub bytes: usize,
}

pub struct Board {
    pub info: TemplateInfo,
    pub template: Arc<PreparedTemplate>,
}

pub struct TemplateStore {
    dir: PathBuf,
    boards: RwLock<BTreeMap<String, Arc<Board>>>,
}

/// Board names: 1–128 characters of letters, digits, `.`, `_`, `-`, not starting with `.`.
pub fn validate_board_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "board name {name:?} is invalid: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

impl TemplateStore {
    /// Opens (creating) the folder and prepares every stored template. A stored template that no
    /// longer decodes is reported and left out, so one bad file does not stop the line.
    pub fn open(dir: &Path, inspector: &Inspector) -> anyhow::Result<TemplateStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create template folder {}: {e}", dir.display()))?;
        let mut boards = BTreeMap::new();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match Self::load_board(&path, inspector) {
                Ok(board) => {
                    boards.insert(board.info.board.clone(), Arc::new(board));
                }
                Err(error) => tracing::error!(file = %path.display(), %error, "template skipped"),
            }
        }
        tracing::info!(count = boards.len(), dir = %dir.display(), "templates loaded");
        Ok(TemplateStore {
            dir: dir.to_path_buf(),
            boards: RwLock::new(boards),
        })
    }

    fn load_board(json_path: &Path, inspector: &Inspector) -> anyhow::Result<Board> {
        let info: TemplateInfo = serde_json::from_slice(&std::fs::read(json_path)?)?;
        validate_board_name(&info.board).map_err(anyhow::Error::msg)?;
        let bytes = std::fs::read(json_path.with_extension("image"))?;
        let gray = inspector.decode(&bytes)?;
        Ok(Board {
            template: Arc::new(inspector.prepare_template(&gray)),
            info,
        })
    }

    pub fn get(&self, board: &str) -> Option<Arc<Board>> {
        self.boards
            .read()
            .expect("templates lock")
            .get(board)
            .cloned()
    }

    pub fn list(&self) -> Vec<TemplateInfo> {
        self.boards
            .read()
            .expect("templates lock")
            .values()
            .map(|b| b.info.clone())
            .collect()
    }

    pub fn image_path(&self, board: &str) -> PathBuf {
        self.dir.join(format!("{board}.image"))
    }

    /// Registers or replaces a board's template; returns whether it replaced one.
    pub fn put(
        &self,
        board: &str,
        bytes: &[u8],
        reject_threshold: Option<f32>,
        inspector: &Inspector,
    ) -> Result<(bool, TemplateInfo), AoiError> {
        let gray = inspector.decode(bytes)?;
        let template = inspector.prepare_template(&gray);
        let info = TemplateInfo {
            board: board.to_string(),
            width: gray.width,
            height: gray.height,
            threshold: template.threshold,
            reject_threshold,
            registered_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            bytes: bytes.len(),
        };
        let write = || -> std::io::Result<()> {
            write_atomically(&self.image_path(board), bytes)?;
            write_atomically(
                &self.dir.join(format!("{board}.json")),
                &serde_json::to_vec_pretty(&info).expect("template info serialises"),
            )
        };
        write().map_err(|e| AoiError::Setup(format!("cannot store template {board}: {e}")))?;
        let replaced = self
            .boards
            .write()
            .expect("templates lock")
            .insert(
                board.to_string(),
                Arc::new(Board {
                    info: info.clone(),
                    template: Arc::new(template),
                }),
            )
            .is_some();
        Ok((replaced, info))
    }

    /// Removes a board; returns whether it existed.
    pub fn delete(&self, board: &str) -> std::io::Result<bool> {
        let existed = self
            .boards
            .write()
            .expect("templates lock")
            .remove(board)
            .is_some();
        for extension in ["json", "image"] {
            match std::fs::remove_file(self.dir.join(format!("{board}.{extension}"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(existed)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_names_are_checked() {
        for good in ["board-1", "A.B_c", "x"] {
            assert!(validate_board_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "sp ace", &"x".repeat(129)] {
            assert!(validate_board_name(bad).is_err(), "{bad}");
        }
    }
}
