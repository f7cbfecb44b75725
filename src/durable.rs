//! Files that survive a crash or a power cut whole: written beside their final name, flushed to
//! the disk, renamed over it, and the rename itself flushed (the folder). Without the two
//! flushes a rename can reach the disk before the data, and a power cut then leaves an empty
//! file under the final name (ext4 and XFS both allow it).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// `path` with `suffix` added to its whole file name (not in place of its extension), so the
/// names made for two files of one folder never meet.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The temporary name of `path` while it is written.
fn temporary_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

/// Writes `bytes` to `path` durably: readers see the old file or the new one, never a part.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let staged = stage(path, bytes)?;
    move_into_place(staged, path)
}

/// Writes `bytes` beside `path`, flushed to the disk, without touching `path`; returns the
/// file that `move_into_place` then moves over it. A failure, or the staged file dropped
/// unmoved, leaves nothing behind, so several files can be staged first and none replaced
/// when one cannot be written.
pub fn stage(path: &Path, bytes: &[u8]) -> io::Result<PartialFile> {
    let staged = PartialFile::new(temporary_path(path));
    std::fs::write(staged.path(), bytes)?;
    File::open(staged.path())?.sync_all()?;
    Ok(staged)
}

/// Renames the flushed file `staged` over `path`, and flushes the rename.
pub fn move_into_place(staged: PartialFile, path: &Path) -> io::Result<()> {
    rename_into_place(staged, path)?;
    sync_folder_of(path)
}

/// Renames the flushed file `staged` over `path` without flushing the rename, for a caller
/// that must tell a rename that failed (nothing changed) from a flush that failed (the file
/// is in place); `sync_folder_of` flushes it.
pub fn rename_into_place(staged: PartialFile, path: &Path) -> io::Result<()> {
    std::fs::rename(staged.path(), path)?;
    staged.kept();
    Ok(())
}

/// The second name of a file while a replacement of it may still be undone. It ends in
/// `.tmp`, so a crash leaves it to be removed like any unfinished write.
fn previous_path(path: &Path) -> PathBuf {
    with_suffix(path, ".previous.tmp")
}

/// Keeps the file at `path` under a second name (a hard link, or a copy where the file system
/// has none) while it is replaced, so that `restore_previous` can undo the replacement. The
/// second name goes when the returned file is dropped; `None` when `path` has no file.
pub fn keep_previous(path: &Path) -> io::Result<Option<PartialFile>> {
    let previous = PartialFile::new(previous_path(path));
    match std::fs::remove_file(previous.path()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let kept = std::fs::hard_link(path, previous.path())
        .or_else(|_| std::fs::copy(path, previous.path()).map(drop));
    match kept {
        Ok(()) => Ok(Some(previous)),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !path.exists() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Undoes a replacement of `path`: moves its `previous` file back over it, or removes it
/// when it had none before. A previous file that cannot be moved back stays where it is (until
/// the next start's sweep of `.tmp` files), named in the error, as the one copy left.
pub fn restore_previous(previous: Option<PartialFile>, path: &Path) -> io::Result<()> {
    match previous {
        Some(previous) => {
            if let Err(error) = std::fs::rename(previous.path(), path) {
                let kept = previous.path().to_path_buf();
                previous.kept();
                return Err(io::Error::new(
                    error.kind(),
                    format!("{error}; the previous file is kept as {}", kept.display()),
                ));
            }
            previous.kept();
            sync_folder_of(path)
        }
        None => {
            std::fs::remove_file(path)?;
            sync_folder_of(path)
        }
    }
}

/// Checks that `write` can write `path` (its folder takes files) without touching a file
/// already there: creates and removes the temporary, or opens it for writing if it exists.
pub fn check_writable(path: &Path) -> io::Result<()> {
    let temporary = temporary_path(path);
    let mut options = std::fs::OpenOptions::new();
    match options.write(true).create_new(true).open(&temporary) {
        Ok(_) => std::fs::remove_file(temporary),
        // Someone else's file of that name is left as it is (`write` replaces it later).
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            options.create_new(false).open(&temporary).map(drop)
        }
        Err(e) => Err(e),
    }
}

/// Moves the finished file `written` over `path` durably (its data first, then the rename);
/// when that fails, `written` is removed.
pub fn replace(written: PartialFile, path: &Path) -> io::Result<()> {
    File::open(written.path())?.sync_all()?;
    move_into_place(written, path)
}

/// Flushes a folder's entries (a rename or a removal in it) to the disk.
pub fn sync_folder_of(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => File::open(folder)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// A file being written, removed when dropped unless it was kept: an error or a stop on the
/// way leaves nothing behind.
pub struct PartialFile(Option<PathBuf>);

impl PartialFile {
    pub fn new(path: PathBuf) -> PartialFile {
        PartialFile(Some(path))
    }

    pub fn path(&self) -> &Path {
        self.0.as_deref().expect("a partial file not yet kept")
    }

    /// The file has been moved into place: nothing to remove.
    fn kept(mut self) {
        self.0 = None;
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_the_file_and_leaves_no_temporary() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("state.json");
        write(&path, b"first").unwrap();
        write(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(temporary_path(&path), folder.path().join("state.json.tmp"));
        assert!(!temporary_path(&path).exists());
        assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 1);
        check_writable(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 1);
        assert!(check_writable(&folder.path().join("missing/state.json")).is_err());
        // A file that happens to have the temporary's name is not removed by the check.
        std::fs::write(temporary_path(&path), b"someone's").unwrap();
        check_writable(&path).unwrap();
        assert_eq!(std::fs::read(temporary_path(&path)).unwrap(), b"someone's");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("b.json");
        write(&path, b"old").unwrap();
        // The temporary name is taken by a folder, so the new content cannot be written.
        std::fs::create_dir(temporary_path(&path)).unwrap();
        assert!(write(&path, b"new").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn a_replacement_can_be_undone_until_its_previous_file_is_dropped() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("b.image");
        let files = || std::fs::read_dir(folder.path()).unwrap().count();
        write(&path, b"old").unwrap();
        let previous = keep_previous(&path).unwrap();
        write(&path, b"new").unwrap();
        restore_previous(previous, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(files(), 1);
        // Kept, then dropped: the replacement stays and the second name goes.
        let previous = keep_previous(&path).unwrap();
        assert_eq!(files(), 2);
        write(&path, b"new").unwrap();
        drop(previous);
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(files(), 1);
        // A file that did not exist before is removed.
        let fresh = folder.path().join("c.image");
        let previous = keep_previous(&fresh).unwrap();
        assert!(previous.is_none());
        write(&fresh, b"new").unwrap();
        restore_previous(previous, &fresh).unwrap();
        assert!(!fresh.exists());
        // A second name left by a crash is replaced, not an error.
        std::fs::write(previous_path(&path), b"stale").unwrap();
        let previous = keep_previous(&path).unwrap();
        write(&path, b"newer").unwrap();
        restore_previous(previous, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(files(), 1);
        // A previous file that cannot be moved back (a folder now stands in its place) is kept,
        // as the one copy left, and named.
        let previous = keep_previous(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("held")).unwrap();
        let error = restore_previous(previous, &path).unwrap_err().to_string();
        assert!(error.contains("the previous file is kept as"), "{error}");
        assert_eq!(std::fs::read(previous_path(&path)).unwrap(), b"new");
    }

    #[test]
    fn a_staged_file_replaces_nothing_until_it_is_moved_into_place() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("b.image");
        write(&path, b"old").unwrap();
        let staged = stage(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        move_into_place(staged, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 1);
        // A file that cannot be written (here: its folder is gone) leaves nothing behind.
        assert!(stage(&folder.path().join("gone/b.image"), b"x").is_err());
        assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 1);
    }
}
