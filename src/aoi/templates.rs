//! Golden templates, one per board, kept on disk so they survive a restart:
//! `<dir>/<board>.image` (the bytes as uploaded) and `<dir>/<board>.json` (metadata), each
//! written to a temporary file and renamed, so a crash never leaves half a template.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::aoi::pipeline::{AoiError, Inspector, MIN_TEMPLATE_SIDE, PreparedTemplate};
use crate::byte_size::readable;
use crate::disk_reserve::DiskReserve;
use crate::durable;

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

impl Board {
    fn memory_bytes(&self) -> u64 {
        self.template.memory_bytes()
    }
}

/// Whether a template of `needed` bytes fits beside `used` under `limit`; why not, and what to
/// do, otherwise.
fn fits(used: u64, needed: u64, limit: u64) -> Result<(), String> {
    if used + needed <= limit {
        return Ok(());
    }
    Err(format!(
        "this template takes {} in memory and the other templates {}, above the {} allowed \
         (--max-template-bytes / LINESCAN_MAX_TEMPLATE_BYTES); delete boards no longer inspected \
         (DELETE /v1/templates/{{board}}) or start the server with a larger limit",
        readable(needed),
        readable(used),
        readable(limit)
    ))
}

pub struct TemplateStore {
    dir: PathBuf,
    boards: RwLock<BTreeMap<String, Arc<Board>>>,
    /// Boards whose stored template failed to load at start, with the reason; their files stay
    /// until the board is registered again or deleted.
    unloaded: RwLock<BTreeMap<String, String>>,
    /// Held across a change's file writes and its map update, so concurrent PUTs and DELETEs
    /// apply one after the other and the folder always matches what is served.
    changes: Mutex<()>,
    /// Memory the served templates may take together (`--max-template-bytes`).
    memory_limit: u64,
    /// Free space a registration leaves on the disk (`--job-min-free-bytes`): an upload is
    /// stored as sent, so its bytes, not its pixels, are what fill a disk.
    reserve: DiskReserve,
}

/// Board names: 1–128 ASCII letters, digits, `.`, `_`, `-`, not starting with `.` (they name
/// files on every file system).
pub fn validate_board_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        return Ok(());
    }
    // A long name is quoted by its start only.
    let shown: String = name.chars().take(40).collect();
    let shown = if shown.len() < name.len() {
        format!("{shown:?}... ({} characters)", name.chars().count())
    } else {
        format!("{shown:?}")
    };
    Err(format!(
        "board name {shown} is invalid: use 1-128 ASCII letters (a-z, A-Z), digits, '.', '_' or \
         '-', not starting with '.'"
    ))
}

impl TemplateStore {
    /// Opens (creating) the folder and prepares the stored templates in board name order, each
    /// one that still fits in `memory_limit` bytes. A stored template that no longer decodes,
    /// or does not fit, is reported and left out, so one bad file does not stop the line.
    pub fn open(
        dir: &Path,
        inspector: &Inspector,
        memory_limit: u64,
        reserve: DiskReserve,
    ) -> anyhow::Result<TemplateStore> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create template folder {}: {e}", dir.display()))?;
        let mut boards = BTreeMap::new();
        let mut unloaded = BTreeMap::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .collect();
        // By board name, so which boards fit under the memory limit does not depend on the
        // order of the folder's entries.
        paths.sort_by(|a, b| a.file_stem().cmp(&b.file_stem()));
        let mut memory = 0;
        for path in paths {
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => {}
                // A write cut short by a crash (the file it was replacing is still whole), or
                // the previous image a replacement kept until its record was in place.
                Some("tmp") => {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {
                            tracing::warn!(file = %path.display(), "removed an unfinished template write")
                        }
                        Err(error) => {
                            tracing::error!(file = %path.display(), %error, "cannot remove an unfinished template write")
                        }
                    }
                    continue;
                }
                _ => continue,
            }
            let name = path.file_stem().unwrap_or_default().to_string_lossy();
            match Self::load_board(&path, inspector) {
                // A board that does not fit is left out; a smaller one after it may still fit.
                Ok(board) => match fits(memory, board.memory_bytes(), memory_limit) {
                    Ok(()) => {
                        memory += board.memory_bytes();
                        boards.insert(board.info.board.clone(), Arc::new(board));
                    }
                    Err(reason) => {
                        tracing::warn!(board = %name, %reason, "stored template not loaded");
                        unloaded.insert(name.to_string(), reason);
                    }
                },
                Err(error) => {
                    let reason = format!("{error:#}");
                    tracing::error!(board = %name, %reason, "stored template not loaded");
                    unloaded.insert(name.to_string(), reason);
                }
            }
        }
        tracing::info!(
            count = boards.len(),
            not_loaded = unloaded.len(),
            memory_bytes = memory,
            dir = %dir.display(),
            "templates loaded"
        );
        Ok(TemplateStore {
            dir: dir.to_path_buf(),
            boards: RwLock::new(boards),
            unloaded: RwLock::new(unloaded),
            changes: Mutex::new(()),
            memory_limit,
            reserve,
        })
    }

    fn load_board(json_path: &Path, inspector: &Inspector) -> anyhow::Result<Board> {
        use anyhow::Context;
        let named = |path: &Path| format!("{}", path.display());
        let info: TemplateInfo =
            serde_json::from_slice(&std::fs::read(json_path).with_context(|| named(json_path))?)
                .with_context(|| named(json_path))?;
        validate_board_name(&info.board)
            .map_err(anyhow::Error::msg)
            .with_context(|| named(json_path))?;
        // The file name is the board: a record claiming another board would shadow it.
        let stem = json_path.file_stem().and_then(|s| s.to_str());
        anyhow::ensure!(
            stem == Some(info.board.as_str()),
            "{}: names board {:?}, but the file belongs to board {:?}",
            json_path.display(),
            info.board,
            stem.unwrap_or_default()
        );
        let image_path = json_path.with_extension("image");
        let bytes = std::fs::read(&image_path).with_context(|| named(&image_path))?;
        let template = prepare(inspector, &bytes).with_context(|| named(&image_path))?;
        // A replacement cut short between its two files leaves the new image with the old
        // record: what the image determines is taken from the image.
        let measured = TemplateInfo {
            width: template.width,
            height: template.height,
            threshold: template.threshold,
            bytes: bytes.len(),
            ..info.clone()
        };
        if measured != info {
            tracing::warn!(
                board = %info.board,
                "the template record did not match its image (a replacement cut short); \
                 size and threshold taken from the image"
            );
        }
        Ok(Board {
            template: Arc::new(template),
            info: measured,
        })
    }

    pub fn get(&self, board: &str) -> Option<Arc<Board>> {
        self.boards
            .read()
            .expect("templates lock")
            .get(board)
            .cloned()
    }

    /// Why a board's stored template was not loaded at start, if it was not.
    pub fn unloaded(&self, board: &str) -> Option<String> {
        self.unloaded
            .read()
            .expect("templates lock")
            .get(board)
            .cloned()
    }

    /// Boards served, and boards on disk whose template did not load.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.boards.read().expect("templates lock").len(),
            self.unloaded.read().expect("templates lock").len(),
        )
    }

    /// Memory the served templates take, and the limit on it.
    pub fn memory(&self) -> (u64, u64) {
        (self.memory_used_besides(None), self.memory_limit)
    }

    /// Memory the served templates take, `board`'s left out.
    fn memory_used_besides(&self, board: Option<&str>) -> u64 {
        self.boards
            .read()
            .expect("templates lock")
            .values()
            .filter(|b| Some(b.info.board.as_str()) != board)
            .map(|b| b.memory_bytes())
            .sum()
    }

    /// The boards served, and those on disk whose template did not load at start (with the
    /// reason), by name. Both maps are read at one instant (writers hold one lock at a time, so
    /// this cannot deadlock): a PUT that moves a board from the second to the first never shows
    /// it in neither.
    pub fn list(&self) -> (Vec<TemplateInfo>, Vec<(String, String)>) {
        let boards = self.boards.read().expect("templates lock");
        let unloaded = self.unloaded.read().expect("templates lock");
        (
            boards.values().map(|b| b.info.clone()).collect(),
            unloaded
                .iter()
                .map(|(b, r)| (b.clone(), r.clone()))
                .collect(),
        )
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
        let template = prepare(inspector, bytes)?;
        let info = TemplateInfo {
            board: board.to_string(),
            width: template.width,
            height: template.height,
            threshold: template.threshold,
            reject_threshold,
            registered_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            bytes: bytes.len(),
        };
        let write = || -> std::io::Result<()> {
            let image = self.image_path(board);
            let record = self.dir.join(format!("{board}.json"));
            // Both files are written before either replaces the board's, so a failure (a full
            // disk) leaves the stored template as it was, as the refusal says.
            // A staged file not moved into place is removed when it is dropped.
            let staged_image = durable::stage(&image, bytes)?;
            let record_bytes = serde_json::to_vec_pretty(&info).expect("template info serialises");
            let staged_record = durable::stage(&record, &record_bytes)?;
            // The image first, flushed: a stop between the two renames leaves the new image
            // with the old record, which loading recognises (`load_board`). Any failure until
            // the record is in place takes the new image back out, so the refusal leaves the
            // template as it was.
            let previous_image = durable::keep_previous(&image)?;
            durable::rename_into_place(staged_image, &image)?;
            let placed = durable::sync_folder_of(&image)
                .and_then(|()| durable::rename_into_place(staged_record, &record));
            if let Err(error) = placed {
                if let Err(undo) = durable::restore_previous(previous_image, &image) {
                    tracing::error!(file = %image.display(), error = %undo,
                        "cannot put the previous template image back");
                }
                return Err(error);
            }
            // Both files are in place and served from here on; only their flush is unconfirmed.
            if let Err(error) = durable::sync_folder_of(&record) {
                tracing::error!(file = %record.display(), %error, "template record not flushed");
            }
            Ok(())
        };
        let _change = self.changes.lock().expect("template changes lock");
        // Checked under the change lock, against the boards it would stay beside.
        fits(
            self.memory_used_besides(Some(board)),
            template.memory_bytes(),
            self.memory_limit,
        )
        .map_err(AoiError::TemplatesFull)?;
        self.reserve
            .check(bytes.len() as u64)
            .map_err(AoiError::TemplatesFull)?;
        write().map_err(|e| AoiError::Setup(format!("cannot store template {board}: {e}")))?;
        let served = self
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
        // A board listed as not loaded existed too: its template is replaced.
        let listed = self
            .unloaded
            .write()
            .expect("templates lock")
            .remove(board)
            .is_some();
        Ok((served || listed, info))
    }

    /// Removes a board; returns whether it existed. Its record goes first: if that fails the
    /// board stays, served and on disk; once it is gone, so is the board, and a leftover image
    /// is only logged (the next PUT of the board replaces it).
    pub fn delete(&self, board: &str) -> std::io::Result<bool> {
        let _change = self.changes.lock().expect("template changes lock");
        let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        match std::fs::remove_file(self.dir.join(format!("{board}.json"))) {
            Err(e) if !not_found(&e) => return Err(e),
            _ => {}
        }
        let loaded = self
            .boards
            .write()
            .expect("templates lock")
            .remove(board)
            .is_some();
        let unloaded = self
            .unloaded
            .write()
            .expect("templates lock")
            .remove(board)
            .is_some();
        let existed = loaded || unloaded;
        let image = self.image_path(board);
        match std::fs::remove_file(&image) {
            Err(error) if !not_found(&error) => {
                tracing::warn!(file = %image.display(), %error, "template image left behind");
            }
            _ => {}
        }
        Ok(existed)
    }
}

/// The smallest share of a template's pixels in its rarer colour, after binarisation (1 in
/// 10,000: 41 pixels of a 640x640 board): below it the template is one colour, with nothing to
/// align a board on, and any blank image would pass against it. Three DeepPCB templates are
/// white throughout; the sparsest other one has 0.05 % copper.
const MIN_MINORITY_SHARE: f64 = 0.0001;

/// A template decoded and binarised, refused when it is too small to align or of one colour
/// (also one stored before these limits, so it is listed as not loaded rather than served).
fn prepare(inspector: &Inspector, bytes: &[u8]) -> Result<PreparedTemplate, AoiError> {
    let gray = inspector.decode(bytes)?;
    if gray.width.min(gray.height) < MIN_TEMPLATE_SIDE {
        return Err(AoiError::TemplateTooSmall {
            width: gray.width,
            height: gray.height,
        });
    }
    let template = inspector.prepare_template(&gray);
    let pixels = (template.width * template.height) as f64;
    let foreground = template.bits.count_ones() as f64 / pixels;
    let minority = foreground.min(1.0 - foreground);
    if minority < MIN_MINORITY_SHARE {
        return Err(AoiError::TemplateUniform {
            percent: 100.0 * foreground.max(1.0 - foreground),
        });
    }
    Ok(template)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_names_are_checked() {
        for good in ["board-1", "A.B_c", "x"] {
            assert!(validate_board_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "../x",
            "sp ace",
            "café",
            &"x".repeat(129),
        ] {
            assert!(validate_board_name(bad).is_err(), "{bad}");
        }
        let error = validate_board_name(&"y".repeat(300)).unwrap_err();
        assert!(
            error.starts_with(&format!(
                "board name \"{}\"... (300 characters)",
                "y".repeat(40)
            )),
            "{error}"
        );
    }
}
