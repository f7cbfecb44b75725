//! Reading an archive whole without scoring it, and doing so in a child process before a
//! server job runs. The HDF5 library can crash on a malformed file (a one-byte change in a
//! global heap segfaults `H5Aread` in libhdf5 1.10): in the child, that ends the check, not
//! the server and every job in it.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::byte_size::readable;
use crate::jobs::archive::{Archive, ArchiveError, Layout, Partition};
use crate::jobs::runner::Control;

/// Rows read at a time.
const CHUNK_ROWS: usize = 16_384;

/// What a whole read found.
#[derive(Debug)]
pub struct Checked {
    pub layout: Layout,
    pub rows: usize,
    pub units: usize,
    pub channels: usize,
}

/// Opens the archive and reads what a job can read: its layout and names, every unit and
/// cycle, and every dataset holding a channel named once. A dataset whose names all appear
/// elsewhere too feeds no model (which column would a name mean?), so no job reads it and
/// neither does this check.
pub fn read_whole(path: &Path, partition: Partition) -> Result<Checked, ArchiveError> {
    let archive = Archive::open(path, partition)?;
    let units = archive.scan_units(&|| true)?.len();
    // The names given once: a repeated name cannot be a model's channel, so no job reads it
    // alone; its dataset is read when it holds another name given once.
    let mut uses = std::collections::HashMap::new();
    for name in archive.channels() {
        *uses.entry(name.as_str()).or_insert(0) += 1;
    }
    let channels: Vec<String> = archive
        .channels()
        .iter()
        .filter(|name| uses[name.as_str()] == 1)
        .cloned()
        .collect();
    let reader = archive.features(&channels)?;
    let mut values = Vec::new();
    let mut start = 0;
    while start < archive.rows() {
        let end = (start + CHUNK_ROWS).min(archive.rows());
        reader.read(start, end, &mut values)?;
        start = end;
    }
    Ok(Checked {
        layout: archive.layout(),
        rows: archive.rows(),
        units,
        channels: archive.channels().len(),
    })
}

/// How a check in a child process ended.
#[derive(Debug, PartialEq)]
pub enum ChildCheck {
    /// The child read it all (`read`), or failed with an error of its own (the job's own read
    /// gives that error with the job's context), or was stopped from outside: the job goes on.
    Finished { read: bool },
    /// The child died of this crash signal while reading: the archive crashes the library.
    Crashed(i32),
    /// The child was still reading after this long (for the archive's size) and was killed.
    TimedOut(Duration),
    /// The child's resident memory passed this many bytes and it was killed.
    OverMemory(u64),
    /// `control` said to stop; the child was killed.
    Stopped(Control),
}

impl ChildCheck {
    /// Why the archive (called `name`) must not be read: it crashed the library, or its check
    /// ran out of time or memory. None when the check finished or was stopped from outside.
    pub fn refusal(&self, name: &str) -> Option<String> {
        match self {
            ChildCheck::Crashed(signal) => Some(format!(
                "{name} crashed the HDF5 library ({}) in the process that checks archives before \
                 they are read: the archive is damaged, and it was not read",
                signal_name(*signal)
            )),
            ChildCheck::TimedOut(limit) => Some(format!(
                "reading {name} whole took longer than {} s in the process that checks archives \
                 before they are read (a damaged archive can make the HDF5 library loop): it was \
                 not read",
                limit.as_secs()
            )),
            ChildCheck::OverMemory(limit) => Some(format!(
                "reading {name} whole took more than {} of memory in the process that checks \
                 archives before they are read (a dataset decompresses to far more than its \
                 chunks declare): it was not read",
                readable(*limit)
            )),
            ChildCheck::Finished { .. } | ChildCheck::Stopped(_) => None,
        }
    }
}

/// Resident memory a check may reach. A whole read holds one chunk of rows of every column
/// (at most 1,024 columns of 16,384 rows: 134 MB as f64) and HDF5 chunks of at most 16 MiB;
/// the 1M-row synthetic archive peaks at 29 MB. What passes it decompresses to more than its
/// chunks declare: libhdf5 1.10 grows a deflate chunk's buffer without bound (a 1.6 MB file
/// took 1 GB), and the job's own read would take as much in the server.
const MEMORY_LIMIT: u64 = 512 << 20;

/// How long a check may take: two minutes, plus a second for every 5 MB (a disk reading
/// 5 MB/s); a loop in the library on a damaged file would otherwise hold a job worker for ever.
pub fn time_limit(archive_bytes: u64) -> Duration {
    Duration::from_secs(120 + archive_bytes / 5_000_000)
}

/// Reads the archive whole in a child process (this executable's `job check-in-process`),
/// asking `control` every 50 ms whether to stop; the child's output is shown with
/// `show_output`, else discarded. Fails only when the child cannot be started.
pub fn in_child(
    path: &Path,
    partition: Partition,
    control: &dyn Fn() -> Control,
    show_output: bool,
) -> std::io::Result<ChildCheck> {
    let limit = time_limit(std::fs::metadata(path)?.len());
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["job", "check-in-process", "--partition", partition.name()])
        .arg(path)
        // Its own process group: a Ctrl-C at the server's terminal is the server's to handle,
        // not a crash of the check.
        .process_group(0)
        .stdin(Stdio::null());
    if !show_output {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let server = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe and the closure allocates nothing. The
    // child is killed when the thread that started it ends (a server killed outright
    // included), so no check outlives its job; a server that died before the prctl took
    // effect is seen as a changed parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != server {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(verdict(status));
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(ChildCheck::TimedOut(limit));
        }
        // Read between polls: a read at 1 GB/s passes it by some 50 MB before it is seen.
        if resident_bytes(child.id()).is_some_and(|bytes| bytes > MEMORY_LIMIT) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(ChildCheck::OverMemory(MEMORY_LIMIT));
        }
        match control() {
            Control::Go => std::thread::sleep(Duration::from_millis(50)),
            stop => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(ChildCheck::Stopped(stop));
            }
        }
    }
}

/// A process's resident memory, from `/proc/PID/statm`; None once it is gone.
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system setting.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The signals a crash ends a process with, by name.
const CRASHES: [(i32, &str); 5] = [
    (libc::SIGSEGV, "SIGSEGV"),
    (libc::SIGABRT, "SIGABRT"),
    (libc::SIGBUS, "SIGBUS"),
    (libc::SIGFPE, "SIGFPE"),
    (libc::SIGILL, "SIGILL"),
];

fn verdict(status: ExitStatus) -> ChildCheck {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(signal) if CRASHES.iter().any(|(s, _)| *s == signal) => ChildCheck::Crashed(signal),
        _ => ChildCheck::Finished {
            read: status.success(),
        },
    }
}

/// A crash signal's name, or its number.
fn signal_name(signal: i32) -> String {
    CRASHES
        .iter()
        .find(|(s, _)| *s == signal)
        .map_or_else(|| format!("signal {signal}"), |(_, name)| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_read_counts_rows_units_and_channels() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("fleet.h5");
        let (rows, units) =
            crate::jobs::synthetic::write_large_generic(&path, 3000, 5, &|| false).unwrap();
        let checked = read_whole(&path, Partition::All).unwrap();
        assert_eq!(
            (checked.rows, checked.units, checked.channels),
            (rows, units, 24)
        );
        assert_eq!(checked.layout, Layout::Generic);
    }

    #[test]
    fn a_file_that_is_not_hdf5_is_refused_by_name() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("notes.h5");
        std::fs::write(&path, b"not an archive").unwrap();
        let error = read_whole(&path, Partition::All).unwrap_err().to_string();
        assert!(error.contains("notes.h5 is not an HDF5 file"), "{error}");
    }

    #[test]
    fn resident_memory_is_read_for_a_live_process_only() {
        let own = resident_bytes(std::process::id()).unwrap();
        assert!(own > 1 << 20, "{own}");
        assert_eq!(resident_bytes(u32::MAX), None);
        let refusal = ChildCheck::OverMemory(MEMORY_LIMIT)
            .refusal("a.h5")
            .unwrap();
        assert!(
            refusal.contains("a.h5 whole took more than 536.9 MB"),
            "{refusal}"
        );
    }

    #[test]
    fn big_archives_get_more_time() {
        assert_eq!(time_limit(0), Duration::from_secs(120));
        assert_eq!(time_limit(16_000_000_000), Duration::from_secs(3320));
    }

    #[test]
    fn a_child_killed_by_a_signal_is_a_crash() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            verdict(ExitStatus::from_raw(libc::SIGSEGV)),
            ChildCheck::Crashed(libc::SIGSEGV)
        );
        assert_eq!(
            verdict(ExitStatus::from_raw(1 << 8)),
            ChildCheck::Finished { read: false }
        );
        assert_eq!(
            verdict(ExitStatus::from_raw(0)),
            ChildCheck::Finished { read: true }
        );
        // Killed from outside (an operator, a stopping server): not the archive's doing.
        assert_eq!(
            verdict(ExitStatus::from_raw(libc::SIGTERM)),
            ChildCheck::Finished { read: false }
        );
        assert_eq!(signal_name(libc::SIGSEGV), "SIGSEGV");
    }

    #[test]
    fn only_a_crash_or_a_check_out_of_time_refuses_the_archive() {
        let crash = ChildCheck::Crashed(libc::SIGBUS).refusal("a.h5").unwrap();
        assert!(
            crash.starts_with("a.h5 crashed the HDF5 library (SIGBUS)"),
            "{crash}"
        );
        let slow = ChildCheck::TimedOut(Duration::from_secs(121));
        assert!(slow.refusal("a.h5").unwrap().contains("longer than 121 s"));
        assert_eq!(ChildCheck::Finished { read: true }.refusal("a.h5"), None);
        assert_eq!(ChildCheck::Stopped(Control::Cancel).refusal("a.h5"), None);
    }
}
