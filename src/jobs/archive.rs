//! HDF5 fleet archives, read in chunks through hyperslab selections (never loaded whole).
//!
//! Two layouts are recognised by their datasets:
//!
//! - **generic**: `unit` (int, n), `cycle` (int, n) and `features` (float32/64, n × c) whose
//!   string attribute `channels` names the c columns (an array of strings, or one
//!   comma-separated string; on `features` or on the file root).
//! - **N-CMAPSS** (NASA's files): `A_dev` (n × 4: unit, cycle, Fc, hs; names in `A_var`) with
//!   the feature blocks `W_dev`, `X_s_dev`, `X_v_dev`, `T_dev` (names in `W_var`, `X_s_var`,
//!   `X_v_var`, `T_var`), `Y_dev`, and the `_test` twins. The partitions scored are chosen with
//!   `partition` (dev, test or all: dev then test).
//!
//! Rows of a unit must be contiguous and in cycle order (cycles never go back); a model's
//! channels are looked up by name among all the archive's columns and only the blocks that hold
//! them are read.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use hdf5::types::{FixedAscii, FixedUnicode, IntSize, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{IndexType, IterationOrder, LinkType};
use serde::{Deserialize, Serialize};

use crate::byte_size::readable;
use crate::sensors::channels::ChannelMap;

/// What is wrong with an archive, in words a user can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ArchiveError(pub String);

fn invalid(message: impl Into<String>) -> ArchiveError {
    ArchiveError(message.into())
}

/// Units an archive may hold: each costs about 50 bytes of bookkeeping while it is scored, so
/// ids that compress to nothing cannot run the server out of memory.
const MAX_UNITS: usize = 1_000_000;

/// Rows read per hyperslab when scanning ids.
const SCAN_ROWS: usize = 65_536;

const HDF5_SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// N-CMAPSS: the `_dev` and then the `_test` datasets (generic archives have one).
    #[default]
    All,
    /// N-CMAPSS: the `_dev` datasets only.
    Dev,
    /// N-CMAPSS: the `_test` datasets only.
    Test,
}

impl Partition {
    pub fn name(self) -> &'static str {
        match self {
            Partition::All => "all",
            Partition::Dev => "dev",
            Partition::Test => "test",
        }
    }

    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Partition::All => &["dev", "test"],
            Partition::Dev => &["dev"],
            Partition::Test => &["test"],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Generic,
    #[serde(rename = "n-cmapss")]
    NCmapss,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Generic => "generic",
            Layout::NCmapss => "n-cmapss",
        }
    }
}

/// An integer column: a 1-D dataset, or one column of a 2-D one.
struct IdColumn {
    /// What the column holds, for messages: "unit id" or "cycle".
    what: &'static str,
    dataset: hdf5::Dataset,
    column: Option<usize>,
    stored: IdType,
}

/// How ids are stored, which decides what HDF5's conversion to i64 would hide.
#[derive(Clone, Copy)]
enum IdType {
    /// Signed integers, or unsigned ones of up to 32 bits: every value converts exactly.
    Exact,
    /// 64-bit unsigned: values above i64::MAX would be clipped to it.
    Unsigned64,
    /// Floating point (N-CMAPSS stores its ids so): fractions would be cut, NaN made up.
    Float,
}

impl IdType {
    fn of(dataset: &hdf5::Dataset) -> Result<IdType, hdf5::Error> {
        Ok(match dataset.dtype()?.to_descriptor()? {
            TypeDescriptor::Float(_) => IdType::Float,
            TypeDescriptor::Unsigned(IntSize::U8) => IdType::Unsigned64,
            _ => IdType::Exact,
        })
    }
}

impl IdColumn {
    fn new(
        what: &'static str,
        dataset: hdf5::Dataset,
        column: Option<usize>,
    ) -> Result<Self, ArchiveError> {
        let stored = IdType::of(&dataset).map_err(hdf5_error(what))?;
        Ok(IdColumn {
            what,
            dataset,
            column,
            stored,
        })
    }

    /// Rows `[start, end)` of the column; `row_offset` turns them into archive rows for
    /// messages. A value that is not a whole number within i64 is refused with its row.
    fn read(&self, start: usize, end: usize, row_offset: usize) -> Result<Vec<i64>, ArchiveError> {
        let failed = hdf5_error(self.what);
        let not_whole = |i: usize, value: String| {
            invalid(format!(
                "{} {value} at row {} is not a whole number within the signed 64-bit range \
                 (unit ids and cycles are integers)",
                self.what,
                row_offset + start + i,
            ))
        };
        match self.stored {
            IdType::Exact => self.slice::<i64>(start, end).map_err(failed),
            IdType::Unsigned64 => {
                let values = self.slice::<u64>(start, end).map_err(failed)?;
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| i64::try_from(v).map_err(|_| not_whole(i, v.to_string())))
                    .collect()
            }
            IdType::Float => {
                let values = self.slice::<f64>(start, end).map_err(failed)?;
                // 2^63 is exact in f64; every whole f64 below it in magnitude fits an i64.
                let limit = 9_223_372_036_854_775_808.0;
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        if v.fract() == 0.0 && v.abs() < limit {
                            Ok(v as i64)
                        } else {
                            Err(not_whole(i, v.to_string()))
                        }
                    })
                    .collect()
            }
        }
    }

    fn slice<T: hdf5::H5Type>(&self, start: usize, end: usize) -> Result<Vec<T>, hdf5::Error> {
        let values = match self.column {
            None => self.dataset.read_slice_1d::<T, _>(start..end)?,
            Some(column) => self.dataset.read_slice_1d::<T, _>((start..end, column))?,
        };
        Ok(values.into_raw_vec_and_offset().0)
    }
}

/// A 2-D block of feature columns with their names.
struct Block {
    dataset: hdf5::Dataset,
    names: Vec<String>,
}

/// One run of rows: the whole generic archive, or one N-CMAPSS partition.
struct Part {
    label: String,
    /// First row of this part in archive row numbers.
    offset: usize,
    rows: usize,
    unit: IdColumn,
    cycle: IdColumn,
    blocks: Vec<Block>,
}

pub struct Archive {
    layout: Layout,
    parts: Vec<Part>,
    rows: usize,
    channels: Vec<String>,
    // Keeps the file open as long as its datasets are used.
    _file: hdf5::File,
}

/// A unit's rows: `[first_row, first_row + rows)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitSpan {
    pub unit: i64,
    pub first_row: usize,
    pub rows: usize,
}

impl UnitSpan {
    pub fn end(&self) -> usize {
        self.first_row + self.rows
    }
}

fn hdf5_error(context: &str) -> impl Fn(hdf5::Error) -> ArchiveError + '_ {
    move |e| invalid(format!("{context}: {e}"))
}

/// Whether the file carries the HDF5 signature (at 0 or a power of two from 512, for files with
/// a user block).
pub fn has_signature(path: &Path) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut offset = 0u64;
    let mut buffer = [0u8; 8];
    while offset + 8 <= size && offset <= 1 << 20 {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(offset))?;
        file.read_exact(&mut buffer)?;
        if &buffer == HDF5_SIGNATURE {
            return Ok(true);
        }
        offset = if offset == 0 { 512 } else { offset * 2 };
    }
    Ok(false)
}

/// A list of names from a string attribute or dataset: an array of strings (fixed or variable
/// length, ASCII or UTF-8) or one comma-separated string. Padding (NUL, spaces) is trimmed.
pub fn read_names(container: &hdf5::Container) -> Result<Vec<String>, hdf5::Error> {
    // Read whole, at up to 256 bytes a name: a table of millions would take gigabytes.
    if container.size() > MAX_COLUMNS {
        return Err(format!(
            "holds {} names; at most {MAX_COLUMNS} columns are accepted",
            container.size()
        )
        .into());
    }
    let descriptor = container.dtype()?.to_descriptor()?;
    let raw: Vec<String> = match descriptor {
        TypeDescriptor::VarLenUnicode => container
            .read_raw::<VarLenUnicode>()?
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        TypeDescriptor::VarLenAscii => container
            .read_raw::<VarLenAscii>()?
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        TypeDescriptor::FixedAscii(_) => container
            .read_raw::<FixedAscii<256>>()?
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        TypeDescriptor::FixedUnicode(_) => container
            .read_raw::<FixedUnicode<256>>()?
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        other => return Err(format!("holds {other}, not strings").into()),
    };
    let clean = |s: &str| {
        s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string()
    };
    if raw.len() == 1 && raw[0].contains(',') {
        return Ok(raw[0].split(',').map(clean).collect());
    }
    Ok(raw.iter().map(|s| clean(s)).collect())
}

/// (bytes present, bytes expected) from HDF5's "truncated file: eof = N, ..., stored_eof = M".
fn truncation(message: &str) -> Option<(u64, u64)> {
    let rest = &message[message.find("truncated file")?..];
    let number_after = |key: &str| -> Option<u64> {
        let start = rest.find(key)? + key.len();
        rest[start..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((number_after("eof =")?, number_after("stored_eof =")?))
}

fn check_numeric(name: &str, dataset: &hdf5::Dataset) -> Result<(), ArchiveError> {
    let descriptor = dataset
        .dtype()
        .and_then(|t| t.to_descriptor())
        .map_err(hdf5_error(name))?;
    match descriptor {
        TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) | TypeDescriptor::Float(_) => {
            Ok(())
        }
        other => Err(invalid(format!(
            "dataset {name} holds {other}; numbers are expected"
        ))),
    }
}

impl Archive {
    /// Opens and validates the archive: that it is HDF5, which layout it has, that the datasets
    /// exist with consistent shapes and that the channels are named.
    pub fn open(path: &Path, partition: Partition) -> Result<Archive, ArchiveError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        Self::open_named(path, &name, partition)
    }

    /// [`Archive::open`], naming the archive `name` in messages (an upload's own name).
    pub fn open_named(
        path: &Path,
        name: &str,
        partition: Partition,
    ) -> Result<Archive, ArchiveError> {
        match has_signature(path) {
            Ok(true) => {}
            Ok(false) => {
                return Err(invalid(format!(
                    "{name} is not an HDF5 file (no HDF5 signature); jobs take HDF5 archives \
                     (generic or N-CMAPSS layout, see README)"
                )));
            }
            // The path too: for an upload it is the server's copy, which is what went missing.
            Err(e) => {
                return Err(invalid(format!(
                    "cannot read {name} ({}): {e}",
                    path.display()
                )));
            }
        }
        let file = hdf5::File::open(path).map_err(|e| {
            let message = e.to_string();
            match truncation(&message) {
                Some((have, expected)) => invalid(format!(
                    "{name} is truncated: it holds {have} bytes but its HDF5 header says \
                     {expected} (a copy or upload cut short?)"
                )),
                // HDF5 takes a shared lock to read; only a writer's exclusive lock refuses it.
                None if message.contains("unable to lock file") => invalid(format!(
                    "{name} is locked by another process that has it open for writing (HDF5 \
                     file lock); score it once that writer has closed it, or score a copy"
                )),
                None => invalid(format!(
                    "{name} cannot be opened as HDF5 (truncated or corrupt file?): {message}"
                )),
            }
        })?;
        let members: HashSet<String> = file
            .member_names()
            .map_err(hdf5_error("listing the archive"))?
            .into_iter()
            .collect();
        let generic = ["unit", "cycle", "features"];
        let ncmapss_markers = ["A_dev", "A_test", "W_dev", "X_s_dev", "W_test", "X_s_test"];
        let (layout, parts) = if generic.iter().any(|d| members.contains(*d)) {
            let missing: Vec<&str> = generic
                .iter()
                .copied()
                .filter(|d| !members.contains(*d))
                .collect();
            if !missing.is_empty() {
                return Err(invalid(format!(
                    "generic layout: missing dataset(s) {} (needs unit, cycle, features)",
                    missing.join(", ")
                )));
            }
            if partition != Partition::All {
                return Err(invalid(format!(
                    "partition {} selects N-CMAPSS datasets (_dev or _test); {name} has the \
                     generic layout, one set of rows: leave the partition at all",
                    partition.name()
                )));
            }
            (Layout::Generic, vec![Self::generic_part(&file)?])
        } else if ncmapss_markers.iter().any(|d| members.contains(*d)) {
            (
                Layout::NCmapss,
                Self::ncmapss_parts(&file, &members, partition)?,
            )
        } else {
            let mut found: Vec<&String> = members.iter().collect();
            found.sort();
            return Err(invalid(format!(
                "missing datasets: the archive has neither the generic layout (unit, cycle, \
                 features) nor the N-CMAPSS layout (A_dev, W_dev, X_s_dev, ... or their _test \
                 twins); it holds: {}",
                if found.is_empty() {
                    "nothing".to_string()
                } else {
                    found
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        };
        // Block by block, not only the flattened names: readers pick blocks by their index in
        // the first partition (a block without columns adds no names but shifts the others).
        let block_names = |part: &Part| -> Vec<Vec<String>> {
            part.blocks.iter().map(|b| b.names.clone()).collect()
        };
        let first = block_names(&parts[0]);
        for part in &parts[1..] {
            if block_names(part) != first {
                return Err(invalid(format!(
                    "partitions {} and {} name different channels (or hold them in other \
                     datasets)",
                    parts[0].label, part.label
                )));
            }
        }
        let channels: Vec<String> = first.into_iter().flatten().collect();
        let rows = parts.iter().map(|p| p.rows).sum();
        Ok(Archive {
            layout,
            parts,
            rows,
            channels,
            _file: file,
        })
    }

    fn dataset(file: &hdf5::File, name: &str) -> Result<hdf5::Dataset, ArchiveError> {
        let elsewhere = |how: &str| {
            invalid(format!(
                "dataset {name} {how}; an archive must hold its data itself (the server reads \
                 no other file on behalf of an archive)"
            ))
        };
        // Checked before opening: following an external link opens the file it names.
        let external = file
            .find_link(IndexType::Name, IterationOrder::Native, |link, info| {
                Ok((link == name && info.link_type == LinkType::External).then_some(()))
            })
            .map_err(hdf5_error("listing the archive"))?;
        if external.is_some() {
            return Err(elsewhere("is an external link to another file"));
        }
        let dataset = file
            .dataset(name)
            .map_err(|e| invalid(format!("dataset {name} cannot be opened: {e}")))?;
        // A soft link can still lead through an external link further down.
        if dataset.filename() != file.filename() {
            return Err(elsewhere("lies in another file"));
        }
        let creation = dataset
            .dcpl()
            .map_err(|e| invalid(format!("reading the storage of dataset {name}: {e}")))?;
        if creation.layout() == hdf5::dataset::Layout::Virtual {
            return Err(elsewhere(
                "is a virtual dataset (its data lie in other files)",
            ));
        }
        if !creation.external().is_empty() {
            return Err(elsewhere("keeps its values in external raw files"));
        }
        if let Some(chunk) = creation.chunk() {
            let element = dataset.dtype().map(|t| t.size()).unwrap_or(8);
            let bytes = chunk
                .iter()
                .try_fold(element, |total, &dim| total.checked_mul(dim))
                .unwrap_or(usize::MAX);
            if bytes > MAX_CHUNK_BYTES {
                return Err(invalid(format!(
                    "dataset {name} is stored in chunks of {chunk:?} ({} each); at most {} are \
                     accepted, since every read unpacks whole chunks: rewrite it with smaller \
                     ones (h5py: chunks=True; h5repack: -l {name}:CHUNK=<smaller dims>)",
                    readable(bytes as u64),
                    readable(MAX_CHUNK_BYTES as u64),
                )));
            }
        }
        Ok(dataset)
    }

    fn generic_part(file: &hdf5::File) -> Result<Part, ArchiveError> {
        let unit = Self::dataset(file, "unit")?;
        let cycle = Self::dataset(file, "cycle")?;
        let features = Self::dataset(file, "features")?;
        for (name, dataset) in [("unit", &unit), ("cycle", &cycle), ("features", &features)] {
            check_numeric(name, dataset)?;
        }
        let (unit_shape, cycle_shape, feature_shape) =
            (unit.shape(), cycle.shape(), features.shape());
        if unit_shape.len() != 1 || cycle_shape.len() != 1 {
            return Err(invalid(format!(
                "unit and cycle must be 1-D (unit has shape {unit_shape:?}, cycle {cycle_shape:?})"
            )));
        }
        if feature_shape.len() != 2 {
            return Err(invalid(format!(
                "features must be 2-D (rows x channels), it has shape {feature_shape:?}"
            )));
        }
        let rows = unit_shape[0];
        for (name, n) in [("cycle", cycle_shape[0]), ("features", feature_shape[0])] {
            if n != rows {
                return Err(invalid(format!(
                    "mismatched lengths: unit has {rows} rows but {name} has {n}"
                )));
            }
        }
        let named = |attribute: hdf5::Result<hdf5::Attribute>, on: &str| {
            attribute
                .ok()
                .map(|a| {
                    read_names(&a).map_err(|e| invalid(format!("attribute channels {on}: {e}")))
                })
                .transpose()
        };
        let names = match (
            named(features.attr("channels"), "on features")?,
            named(file.attr("channels"), "on the file")?,
        ) {
            // Two lists that disagree leave the columns' meaning open: refuse to guess.
            (Some(on_features), Some(on_file)) if on_features != on_file => {
                return Err(invalid(format!(
                    "the channels attribute on features ({}) and on the file ({}) differ; keep \
                     one, or make them equal",
                    on_features.join(","),
                    on_file.join(",")
                )));
            }
            (Some(names), _) | (None, Some(names)) => names,
            (None, None) => {
                return Err(invalid(
                    "missing attribute: features needs a string attribute \"channels\" \
                     naming its columns",
                ));
            }
        };
        if names.len() != feature_shape[1] {
            return Err(invalid(format!(
                "attribute channels names {} columns but features has {}",
                names.len(),
                feature_shape[1]
            )));
        }
        check_width("features", feature_shape[1])?;
        Ok(Part {
            label: "archive".into(),
            offset: 0,
            rows,
            unit: IdColumn::new("unit id", unit, None)?,
            cycle: IdColumn::new("cycle", cycle, None)?,
            blocks: vec![Block {
                dataset: features,
                names,
            }],
        })
    }

    fn ncmapss_parts(
        file: &hdf5::File,
        members: &HashSet<String>,
        partition: Partition,
    ) -> Result<Vec<Part>, ArchiveError> {
        let mut parts = Vec::new();
        let mut offset = 0;
        for suffix in partition.suffixes() {
            let auxiliary = format!("A_{suffix}");
            let present: Vec<String> = ["W", "X_s", "X_v", "T", "Y", "A"]
                .iter()
                .map(|b| format!("{b}_{suffix}"))
                .filter(|d| members.contains(d))
                .collect();
            if present.is_empty() && partition == Partition::All {
                continue;
            }
            if !members.contains(&auxiliary) {
                return Err(invalid(format!(
                    "N-CMAPSS layout: missing dataset {auxiliary} (unit and cycle of every row)"
                )));
            }
            let a = Self::dataset(file, &auxiliary)?;
            check_numeric(&auxiliary, &a)?;
            let a_shape = a.shape();
            if a_shape.len() != 2 {
                return Err(invalid(format!(
                    "N-CMAPSS layout: {auxiliary} has shape {a_shape:?}; it must be 2-D, one row \
                     per sample and one column per name of A_var (unit, cycle, ...)"
                )));
            }
            let a_names = if members.contains("A_var") {
                read_names(&*Self::dataset(file, "A_var")?)
                    .map_err(|e| invalid(format!("A_var: {e}")))?
            } else {
                vec!["unit".into(), "cycle".into(), "Fc".into(), "hs".into()]
            };
            let find = |column: &str| {
                a_names
                    .iter()
                    .position(|n| n == column)
                    .filter(|i| *i < a_shape[1])
                    .ok_or_else(|| {
                        invalid(format!(
                            "{auxiliary} has no column \"{column}\" (A_var: {})",
                            a_names.join(", ")
                        ))
                    })
            };
            let (unit_column, cycle_column) = (find("unit")?, find("cycle")?);
            let rows = a_shape[0];
            let mut blocks = Vec::new();
            for block in ["W", "X_s", "X_v", "T", "Y"] {
                let name = format!("{block}_{suffix}");
                if !members.contains(&name) {
                    continue;
                }
                let dataset = Self::dataset(file, &name)?;
                check_numeric(&name, &dataset)?;
                let shape = dataset.shape();
                if shape.first() != Some(&rows) {
                    return Err(invalid(format!(
                        "mismatched lengths: {auxiliary} has {rows} rows but {name} has {}",
                        shape.first().copied().unwrap_or(0)
                    )));
                }
                if block == "Y" {
                    continue; // the target, not an input
                }
                if shape.len() != 2 {
                    return Err(invalid(format!(
                        "{name} must be 2-D (rows x columns), it has shape {shape:?}"
                    )));
                }
                let var = format!("{block}_var");
                if !members.contains(&var) {
                    return Err(invalid(format!(
                        "N-CMAPSS layout: missing dataset {var} (names of the {name} columns)"
                    )));
                }
                let names = read_names(&*Self::dataset(file, &var)?)
                    .map_err(|e| invalid(format!("{var}: {e}")))?;
                if names.len() != shape[1] {
                    return Err(invalid(format!(
                        "{var} names {} columns but {name} has {}",
                        names.len(),
                        shape[1]
                    )));
                }
                check_width(&name, shape[1])?;
                blocks.push(Block { dataset, names });
            }
            if blocks.is_empty() {
                return Err(invalid(format!(
                    "N-CMAPSS layout: partition {suffix} has no feature dataset (W_{suffix}, \
                     X_s_{suffix}, X_v_{suffix} or T_{suffix})"
                )));
            }
            parts.push(Part {
                label: (*suffix).to_string(),
                offset,
                rows,
                unit: IdColumn::new("unit id", a.clone(), Some(unit_column))?,
                cycle: IdColumn::new("cycle", a, Some(cycle_column))?,
                blocks,
            });
            offset += rows;
        }
        if parts.is_empty() {
            return Err(invalid(format!(
                "N-CMAPSS layout: no {} partition in the archive",
                partition.name()
            )));
        }
        Ok(parts)
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Every column name the archive offers.
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// The label of the part holding archive row `row`.
    fn part_of(&self, row: usize) -> &str {
        self.parts
            .iter()
            .find(|part| (part.offset..part.offset + part.rows).contains(&row))
            .map_or("", |part| part.label.as_str())
    }

    /// The parts overlapping `[start, end)` with the local row range of each.
    fn pieces(&self, start: usize, end: usize) -> impl Iterator<Item = (&Part, usize, usize)> {
        self.parts.iter().filter_map(move |part| {
            let from = start.max(part.offset);
            let to = end.min(part.offset + part.rows);
            (from < to).then(|| (part, from - part.offset, to - part.offset))
        })
    }

    /// Unit and cycle of rows `[start, end)`.
    pub fn read_ids(&self, start: usize, end: usize) -> Result<(Vec<i64>, Vec<i64>), ArchiveError> {
        let mut units = Vec::with_capacity(end - start);
        let mut cycles = Vec::with_capacity(end - start);
        for (part, from, to) in self.pieces(start, end) {
            units.extend(part.unit.read(from, to, part.offset)?);
            cycles.extend(part.cycle.read(from, to, part.offset)?);
        }
        Ok((units, cycles))
    }

    /// Reads every unit and cycle once, in chunks: the units' row spans in archive order.
    /// Rows of a unit must be contiguous with cycles that never go back. `keep_going` is asked
    /// between chunks (cancellation).
    pub fn scan_units(&self, keep_going: &dyn Fn() -> bool) -> Result<Vec<UnitSpan>, ArchiveError> {
        let mut spans: Vec<UnitSpan> = Vec::new();
        let mut seen: HashSet<i64> = HashSet::new();
        let mut last_cycle = i64::MIN;
        let mut start = 0;
        while start < self.rows {
            if !keep_going() {
                return Err(invalid("cancelled"));
            }
            let end = (start + SCAN_ROWS).min(self.rows);
            let (units, cycles) = self.read_ids(start, end)?;
            for (i, (&unit, &cycle)) in units.iter().zip(&cycles).enumerate() {
                let row = start + i;
                // A unit never runs on from one partition into the next.
                let part_starts = row > 0 && self.parts.iter().any(|part| part.offset == row);
                match spans.last_mut() {
                    Some(span) if span.unit == unit && !part_starts => {
                        if cycle < last_cycle {
                            return Err(invalid(format!(
                                "cycles of unit {unit} go back at row {row} (cycle {cycle} after \
                                 {last_cycle}); rows of a unit must be in cycle order"
                            )));
                        }
                        span.rows += 1;
                    }
                    _ => {
                        if !seen.insert(unit) {
                            let earlier = spans.iter().find(|s| s.unit == unit).expect("seen");
                            let (before, now) =
                                (self.part_of(earlier.first_row), self.part_of(row));
                            if before != now {
                                return Err(invalid(format!(
                                    "unit {unit} is in both partitions {before} and {now}: \
                                     score them apart, with partition={before} and \
                                     partition={now}"
                                )));
                            }
                            return Err(invalid(format!(
                                "rows of unit {unit} are not contiguous: rows {}..{} and again \
                                 from row {row}; sort the archive by unit, then cycle",
                                earlier.first_row,
                                earlier.end()
                            )));
                        }
                        if spans.len() == MAX_UNITS {
                            return Err(invalid(format!(
                                "more than {MAX_UNITS} units (a new one at row {row}); split the \
                                 archive by unit range and score the parts as separate jobs"
                            )));
                        }
                        spans.push(UnitSpan {
                            unit,
                            first_row: row,
                            rows: 1,
                        });
                    }
                }
                last_cycle = cycle;
            }
            start = end;
        }
        Ok(spans)
    }

    /// A reader of the model's channels, or the channels the archive lacks.
    pub fn features(&self, model_channels: &[String]) -> Result<FeatureReader<'_>, ArchiveError> {
        // Only the blocks that hold a model channel are read.
        let needed: Vec<usize> = self.parts[0]
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.names.iter().any(|n| model_channels.contains(n)))
            .map(|(i, _)| i)
            .collect();
        let names: Vec<String> = needed
            .iter()
            .flat_map(|i| self.parts[0].blocks[*i].names.iter().cloned())
            .collect();
        let map = ChannelMap::new(model_channels, &names, true).map_err(|problems| {
            let mut message = format!("the archive's channels cannot feed the model: {problems}");
            if !problems.missing.is_empty() {
                message.push_str(&format!(" (the archive has: {})", self.channels.join(", ")));
            }
            invalid(message)
        })?;
        Ok(FeatureReader {
            archive: self,
            blocks: needed,
            map,
        })
    }
}

/// Largest chunk a dataset may be stored in: HDF5 unpacks a whole chunk for any read that
/// touches it (a 2 MB archive declaring one 1 GB chunk took 1 GB per read). Python's h5py
/// chooses chunks of at most 1 MiB.
const MAX_CHUNK_BYTES: usize = 16 << 20;

/// Columns a feature dataset may have: its rows are read whole, so a chunk's memory grows
/// with the width (1,024 columns of 16,384 rows are 134 MB as f64).
const MAX_COLUMNS: usize = 1024;

fn check_width(dataset: &str, columns: usize) -> Result<(), ArchiveError> {
    if columns > MAX_COLUMNS {
        return Err(invalid(format!(
            "{dataset} has {columns} columns; at most {MAX_COLUMNS} are accepted (rows are read \
             whole): write the model's channels to an archive of their own"
        )));
    }
    Ok(())
}

/// Reads the columns that feed a model, rows at a time.
pub struct FeatureReader<'a> {
    archive: &'a Archive,
    blocks: Vec<usize>,
    pub map: ChannelMap,
}

impl FeatureReader<'_> {
    /// Rows `[start, end)` of the needed blocks side by side (`map.source_width` values a row),
    /// as f64, into `out` (cleared first).
    pub fn read(&self, start: usize, end: usize, out: &mut Vec<f64>) -> Result<(), ArchiveError> {
        out.clear();
        let width = self.map.source_width;
        out.reserve((end - start) * width);
        for (part, from, to) in self.archive.pieces(start, end) {
            let mut columns: Vec<(Vec<f64>, usize)> = Vec::with_capacity(self.blocks.len());
            for &index in &self.blocks {
                let block = &part.blocks[index];
                let values = block
                    .dataset
                    .read_slice_2d::<f64, _>((from..to, ..))
                    .map_err(hdf5_error(&format!(
                        "reading rows {}..{} of {}",
                        part.offset + from,
                        part.offset + to,
                        block.dataset.name()
                    )))?
                    .into_raw_vec_and_offset()
                    .0;
                columns.push((values, block.names.len()));
            }
            if columns.len() == 1 {
                out.extend_from_slice(&columns[0].0);
                continue;
            }
            for row in 0..to - from {
                for (values, block_width) in &columns {
                    out.extend_from_slice(&values[row * block_width..(row + 1) * block_width]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_is_read_from_the_hdf5_message() {
        let message = "H5Fopen(): unable to open file: truncated file: eof = 1000, \
                       sblock->base_addr = 0, stored_eof = 5000";
        assert_eq!(truncation(message), Some((1000, 5000)));
        assert_eq!(truncation("unable to open file"), None);
    }

    #[test]
    fn an_archive_locked_by_a_writer_is_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.h5");
        let file = hdf5::File::create(&path).unwrap();
        file.new_dataset::<i64>()
            .shape(3)
            .create("unit")
            .unwrap()
            .write_raw(&[1i64, 1, 1])
            .unwrap();
        drop(file);
        let open_error = || {
            Archive::open(&path, Partition::All)
                .err()
                .expect("the archive lacks datasets")
                .to_string()
        };
        // The exclusive flock an HDF5 writer in another process holds.
        let writer = std::fs::File::open(&path).unwrap();
        writer.lock().unwrap();
        let locked = open_error();
        assert!(
            locked.contains("fleet.h5 is locked by another process"),
            "{locked}"
        );
        writer.unlock().unwrap();
        let unlocked = open_error();
        assert!(
            unlocked.contains("missing dataset(s) cycle, features"),
            "{unlocked}"
        );
    }

    #[test]
    fn channel_names_come_as_arrays_or_one_comma_separated_string() {
        let dir = tempfile::tempdir().unwrap();
        let file = hdf5::File::create(dir.path().join("names.h5")).unwrap();
        let joined: VarLenUnicode = "a, b,c".parse().unwrap();
        let scalar = file.new_attr::<VarLenUnicode>().create("joined").unwrap();
        scalar.write_scalar(&joined).unwrap();
        assert_eq!(read_names(&scalar).unwrap(), ["a", "b", "c"]);
        let fixed: Vec<FixedAscii<8>> = ["T24", "Nf"]
            .iter()
            .map(|s| FixedAscii::from_ascii(s.as_bytes()).unwrap())
            .collect();
        let array = file
            .new_attr::<FixedAscii<8>>()
            .shape(2)
            .create("fixed")
            .unwrap();
        array.write_raw(&fixed).unwrap();
        assert_eq!(read_names(&array).unwrap(), ["T24", "Nf"]);
        let numbers = file.new_attr::<f32>().shape(2).create("numbers").unwrap();
        assert!(read_names(&numbers).is_err());
        // More names than columns are accepted: refused before they are read.
        let many = file
            .new_dataset::<FixedAscii<1>>()
            .shape(MAX_COLUMNS + 1)
            .create("many")
            .unwrap();
        let error = read_names(&many).unwrap_err().to_string();
        assert!(
            error.contains("holds 1025 names; at most 1024 columns"),
            "{error}"
        );
    }

    /// Creates the `unit` dataset of a test archive.
    type MakeUnit<'a> = Box<dyn FnOnce(&hdf5::File) + 'a>;

    /// The 4 x 1 `features` dataset of a test archive, with its channel name.
    fn add_features(file: &hdf5::File) {
        let features = file
            .new_dataset::<f64>()
            .shape([4, 1])
            .create("features")
            .unwrap();
        features.write_raw(&[0.0, 1.0, 2.0, 3.0]).unwrap();
        let names: VarLenUnicode = "x".parse().unwrap();
        features
            .new_attr::<VarLenUnicode>()
            .create("channels")
            .unwrap()
            .write_scalar(&names)
            .unwrap();
    }

    /// The `unit` dataset of a test archive whose 4 rows are one unit.
    fn one_unit(file: &hdf5::File) {
        file.new_dataset::<i64>()
            .shape(4)
            .create("unit")
            .unwrap()
            .write_raw(&[1i64, 1, 1, 1])
            .unwrap();
    }

    /// A generic archive of 4 rows whose `unit` dataset `make_unit` creates.
    fn archive_with_unit(path: &Path, make_unit: impl FnOnce(&hdf5::File)) {
        let file = hdf5::File::create(path).unwrap();
        make_unit(&file);
        file.new_dataset::<i64>()
            .shape(4)
            .create("cycle")
            .unwrap()
            .write_raw(&[1i64, 2, 3, 4])
            .unwrap();
        add_features(&file);
    }

    #[test]
    fn partitions_must_hold_their_channels_in_the_same_datasets() {
        use crate::jobs::synthetic::{UnitPlan, fleet, write_ncmapss};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.h5");
        let plan = |unit| UnitPlan {
            unit,
            observed: 40,
            life: 40,
        };
        write_ncmapss(&path, &fleet(&[plan(1)], 1), Some(&fleet(&[plan(2)], 2))).unwrap();
        // The dev partition's W block has no columns (and W_var no names), the test partition
        // none: the flattened channel names agree, the blocks do not.
        let file = hdf5::File::append(&path).unwrap();
        for name in ["W_dev", "W_test", "W_var"] {
            file.unlink(name).unwrap();
        }
        file.new_dataset::<f64>()
            .shape([40, 0])
            .create("W_dev")
            .unwrap();
        file.new_dataset::<FixedAscii<8>>()
            .shape(0)
            .create("W_var")
            .unwrap();
        drop(file);
        let error = Archive::open(&path, Partition::All)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("partitions dev and test name different channels"),
            "{error}"
        );
        // Each partition alone reads.
        for partition in [Partition::Dev, Partition::Test] {
            assert!(Archive::open(&path, partition).is_ok());
        }
    }

    #[test]
    fn data_kept_in_other_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Another file on the server that an archive points at.
        let secret = dir.path().join("secret.h5");
        let other = hdf5::File::create(&secret).unwrap();
        other
            .new_dataset::<i64>()
            .shape(4)
            .create("unit")
            .unwrap()
            .write_raw(&[7i64, 7, 7, 7])
            .unwrap();
        drop(other);
        let raw = dir.path().join("secret.bin");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        let secret_name = secret.to_str().unwrap().to_string();
        let raw_name = raw.to_str().unwrap().to_string();
        let cases: Vec<(&str, MakeUnit<'_>, &str)> = vec![
            (
                "link.h5",
                Box::new(|file: &hdf5::File| {
                    file.link_external(&secret_name, "unit", "unit").unwrap()
                }),
                "dataset unit is an external link to another file",
            ),
            (
                "soft.h5",
                Box::new(|file: &hdf5::File| {
                    file.link_external(&secret_name, "/", "elsewhere").unwrap();
                    file.link_soft("/elsewhere/unit", "unit").unwrap();
                }),
                "dataset unit lies in another file",
            ),
            (
                "raw.h5",
                Box::new(|file: &hdf5::File| {
                    file.new_dataset::<i64>()
                        .shape(4)
                        .external(&raw_name, 0, 32)
                        .create("unit")
                        .unwrap();
                }),
                "dataset unit keeps its values in external raw files",
            ),
            (
                "virtual.h5",
                Box::new(|file: &hdf5::File| {
                    file.new_dataset::<i64>()
                        .shape(4)
                        .virtual_map(&secret_name, "unit", 4, .., 4, ..)
                        .create("unit")
                        .unwrap();
                }),
                "dataset unit is a virtual dataset",
            ),
        ];
        for (name, make_unit, expected) in cases {
            let path = dir.path().join(name);
            archive_with_unit(&path, make_unit);
            let error = Archive::open(&path, Partition::All).err().unwrap().0;
            assert!(error.contains(expected), "{name}: {error}");
        }
        // The same archive holding its own ids opens.
        let own = dir.path().join("own.h5");
        archive_with_unit(&own, one_unit);
        assert!(Archive::open(&own, Partition::All).is_ok());
    }

    #[test]
    fn ids_that_are_not_whole_numbers_are_refused_with_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let scan = |name: &str, make_unit: MakeUnit<'static>| {
            let path = dir.path().join(name);
            archive_with_unit(&path, make_unit);
            let archive = Archive::open(&path, Partition::All).unwrap();
            archive.scan_units(&|| true).map_err(|e| e.0)
        };
        let floats = |values: [f64; 4]| -> MakeUnit<'static> {
            Box::new(move |file: &hdf5::File| {
                let unit = file.new_dataset::<f64>().shape(4).create("unit").unwrap();
                unit.write_raw(&values).unwrap();
            })
        };
        // Whole numbers stored as floats (N-CMAPSS does so) are ids like any other.
        let spans = scan("whole.h5", floats([1.0, 1.0, 2.0, 2.0])).unwrap();
        assert_eq!(spans.iter().map(|s| s.unit).collect::<Vec<_>>(), [1, 2]);
        for (name, values, expected) in [
            (
                "half.h5",
                [1.0, 1.0, 1.5, 2.0],
                "unit id 1.5 at row 2 is not a whole number",
            ),
            (
                "nan.h5",
                [1.0, f64::NAN, 2.0, 2.0],
                "unit id NaN at row 1 is not a whole number",
            ),
            (
                "huge.h5",
                [1.0, 1.0, 1e19, 1e19],
                "unit id 10000000000000000000 at row 2",
            ),
        ] {
            let error = scan(name, floats(values)).unwrap_err();
            assert!(error.contains(expected), "{name}: {error}");
        }
        let beyond = scan(
            "u64.h5",
            Box::new(|file: &hdf5::File| {
                let unit = file.new_dataset::<u64>().shape(4).create("unit").unwrap();
                unit.write_raw(&[1u64, 1, 1 << 63, 1 << 63]).unwrap();
            }),
        )
        .unwrap_err();
        assert!(
            beyond.contains("unit id 9223372036854775808 at row 2"),
            "{beyond}"
        );
    }

    #[test]
    fn datasets_in_huge_chunks_are_refused_before_any_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big_chunks.h5");
        // Four values in one declared chunk of 3 M (24 MB unpacked, a few KB compressed).
        archive_with_unit(&path, |file| {
            file.new_dataset::<i64>()
                .shape(4..)
                .chunk(3_000_000)
                .deflate(9)
                .create("unit")
                .unwrap()
                .write_raw(&[3i64, 3, 4, 4])
                .unwrap();
        });
        let error = Archive::open(&path, Partition::All).err().unwrap().0;
        assert!(
            error.contains("dataset unit is stored in chunks of [3000000] (24.00 MB each)")
                && error.contains("at most 16.78 MB"),
            "{error}"
        );
    }

    #[test]
    fn lzf_compressed_archives_read() {
        // h5py's own compression, common in archives written from Python.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lzf.h5");
        archive_with_unit(&path, |file| {
            file.new_dataset::<i64>()
                .shape(4)
                .chunk(2)
                .lzf()
                .create("unit")
                .unwrap()
                .write_raw(&[3i64, 3, 4, 4])
                .unwrap();
        });
        let archive = Archive::open(&path, Partition::All).unwrap();
        let spans = archive.scan_units(&|| true).unwrap();
        assert_eq!(spans.iter().map(|s| s.unit).collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn a_unit_in_both_ncmapss_partitions_is_named_with_them() {
        use crate::jobs::synthetic::{self, UnitPlan};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overlap.h5");
        let plan = UnitPlan {
            unit: 1,
            observed: 5,
            life: 100,
        };
        let table = synthetic::fleet(&[plan], 1);
        synthetic::write_ncmapss(&path, &table, Some(&table)).unwrap();
        let archive = Archive::open(&path, Partition::All).unwrap();
        let error = archive.scan_units(&|| true).unwrap_err().0;
        assert!(
            error.contains("unit 1 is in both partitions dev and test")
                && error.contains("partition=dev and partition=test"),
            "{error}"
        );
    }

    #[test]
    fn cycles_going_back_are_refused_with_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.h5");
        let file = hdf5::File::create(&path).unwrap();
        let put = |name: &str, values: &[i64]| {
            file.new_dataset::<i64>()
                .shape(values.len())
                .create(name)
                .unwrap()
                .write_raw(values)
                .unwrap();
        };
        put("unit", &[1, 1, 1, 2]);
        put("cycle", &[1, 3, 2, 1]);
        add_features(&file);
        drop(file);
        let archive = Archive::open(&path, Partition::All).unwrap();
        assert_eq!(archive.channels(), ["x"]);
        let error = archive.scan_units(&|| true).unwrap_err();
        assert!(
            error
                .0
                .contains("cycles of unit 1 go back at row 2 (cycle 2 after 3)"),
            "{}",
            error.0
        );
    }

    #[test]
    fn channel_lists_on_features_and_on_the_file_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        for (on_file, expected) in [
            ("x", Ok(["x"])),
            ("y", Err("(x) and on the file (y) differ")),
        ] {
            let path = dir.path().join(format!("{on_file}.h5"));
            archive_with_unit(&path, |file| {
                one_unit(file);
                let names: VarLenUnicode = on_file.parse().unwrap();
                file.new_attr::<VarLenUnicode>()
                    .create("channels")
                    .unwrap()
                    .write_scalar(&names)
                    .unwrap();
            });
            match (Archive::open(&path, Partition::All), expected) {
                (Ok(archive), Ok(names)) => assert_eq!(archive.channels(), names),
                (Err(error), Err(fragment)) => assert!(error.0.contains(fragment), "{}", error.0),
                (got, _) => panic!("{on_file}: {:?}", got.map(|a| a.channels().to_vec())),
            }
        }
    }

    #[test]
    fn a_features_dataset_wider_than_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (columns, refused) in [(MAX_COLUMNS, false), (MAX_COLUMNS + 1, true)] {
            let table = crate::jobs::synthetic::Table {
                unit: vec![1, 1],
                cycle: vec![1, 2],
                rul: vec![1.0, 0.0],
                columns: (0..columns).map(|c| format!("c{c}")).collect(),
                values: vec![0.0; 2 * columns],
            };
            let path = dir.path().join(format!("{columns}.h5"));
            crate::jobs::synthetic::write_generic(&path, &table, true).unwrap();
            match Archive::open(&path, Partition::All) {
                Ok(_) => assert!(!refused, "{columns} columns accepted"),
                Err(error) => {
                    assert!(refused, "{}", error.0);
                    assert!(error.0.contains("at most 1024"), "{}", error.0);
                }
            }
        }
    }

    #[test]
    fn the_signature_is_found_after_a_user_block_too() {
        let dir = tempfile::tempdir().unwrap();
        let at = |offset: usize| {
            let path = dir.path().join(format!("at-{offset}"));
            let mut bytes = vec![b' '; offset];
            bytes.extend_from_slice(HDF5_SIGNATURE);
            bytes.extend_from_slice(&[0; 64]);
            std::fs::write(&path, bytes).unwrap();
            has_signature(&path).unwrap()
        };
        assert!(at(0) && at(512) && at(4096));
        assert!(!at(100), "the superblock is only at 0 or 512 * 2^k");
    }
}
