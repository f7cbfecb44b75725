//! The free space a server keeps on its data folder's disk. Job submissions and uploads, and
//! template registrations, stop short of it, so that a full disk does not also fail the job
//! records and results written beside them.

use std::path::PathBuf;

use crate::byte_size::readable;

#[derive(Debug, Clone)]
pub struct DiskReserve {
    folder: PathBuf,
    /// Bytes left free; 0 turns the check off.
    keep_free: u64,
}

impl DiskReserve {
    pub fn new(folder: PathBuf, keep_free: u64) -> DiskReserve {
        DiskReserve { folder, keep_free }
    }

    /// Whether `incoming` more bytes (0: not known yet) still leave the reserve free; why not
    /// otherwise, in words for the client (the folder is named in the server's log only). A
    /// file system whose free space cannot be read is refused too: nothing says there is room.
    pub fn check(&self, incoming: u64) -> Result<(), String> {
        if self.keep_free == 0 {
            return Ok(());
        }
        let stats = rustix::fs::statvfs(&self.folder).map_err(|error| {
            tracing::warn!(folder = %self.folder.display(), %error, "cannot read the free space");
            format!("cannot read the free space of the data folder's disk: {error}")
        })?;
        let available = stats.f_bavail.saturating_mul(stats.f_frsize);
        let left = available.saturating_sub(incoming);
        if left >= self.keep_free {
            return Ok(());
        }
        let what = if incoming == 0 {
            "a submission".to_string()
        } else {
            format!("{} more", readable(incoming))
        };
        // The shortfall, as the two sizes around it can read the same.
        Err(format!(
            "the data folder's disk has {} free; {what} would go {} into the {} kept free \
             (--job-min-free-bytes / LINESCAN_JOB_MIN_FREE_BYTES); make room, e.g. remove \
             finished jobs with DELETE /v1/jobs/{{id}}?purge=true or unused templates with \
             DELETE /v1/templates/{{board}}",
            readable(available),
            readable(self.keep_free - left),
            readable(self.keep_free)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_above_the_free_space_refuses_and_says_how_much_is_free() {
        let folder = tempfile::tempdir().unwrap();
        let refused = DiskReserve::new(folder.path().into(), u64::MAX)
            .check(0)
            .unwrap_err();
        assert!(
            refused.contains("B free; a submission would go "),
            "{refused}"
        );
        let refused = DiskReserve::new(folder.path().into(), u64::MAX)
            .check(5_000_000)
            .unwrap_err();
        assert!(refused.contains("5.00 MB more"), "{refused}");
    }

    #[test]
    fn a_small_reserve_takes_a_small_file_and_zero_turns_the_check_off() {
        let folder = tempfile::tempdir().unwrap();
        DiskReserve::new(folder.path().into(), 1).check(1).unwrap();
        DiskReserve::new(folder.path().join("missing"), 0)
            .check(u64::MAX)
            .unwrap();
    }

    #[test]
    fn an_unreadable_folder_is_refused() {
        let refused = DiskReserve::new("/no/such/folder".into(), 1)
            .check(0)
            .unwrap_err();
        assert!(refused.contains("cannot read the free space"), "{refused}");
    }
}
