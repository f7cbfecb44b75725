//! Results of a scored archive: an HDF5 file written as rows arrive (extensible chunked
//! datasets), and its CSV and JSON equivalents.
//!
//! HDF5 layout: one row per archive row (in archive order) with datasets `unit` (i64), `cycle`
//! (i64), `rul`, `rul_std` (ensemble spread), `rul_sigma` (calibrated error bar; f32, cycles), `risk` (u8: 0 normal, 1 warning, 2 critical, names in
//! the attribute `risk_levels`), `anomaly` (f32 0..1, NaN without an anomaly model), `health`
//! (f32 0..100), `padded` (u16: rows repeated at the front of the window, 0 for full
//! windows) and `held` (u32: values of the window held over gaps); the group `units` holds the
//! same columns at each unit's latest cycle, with `rows` for `padded`.
//! Root attributes name the model and its version, the settings and the source; `linescan_meta`
//! holds all of them as JSON.

use std::io::Write;
use std::path::Path;

use hdf5::H5Type;
use hdf5::types::VarLenUnicode;
use serde::{Deserialize, Serialize};

use crate::durable::{self, PartialFile};
use crate::jobs::gaps::MissingPolicy;
use crate::sensors::{AssessSettings, Risk};

/// Rows written to HDF5 per flush.
const FLUSH_ROWS: usize = 65_536;
/// Dataset chunk of the rows table and of the (much shorter) units table.
const ROW_CHUNK: usize = 16_384;
const UNIT_CHUNK: usize = 1_024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub index: usize,
    pub count: usize,
    /// Archive rows `[start, end)` this shard scored.
    pub rows_start: usize,
    pub rows_end: usize,
}

/// What a result was computed with; equal metadata (but the shard) is what lets shards merge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMeta {
    pub model: String,
    pub model_version: u64,
    pub anomaly_model: Option<String>,
    pub anomaly_model_version: Option<u64>,
    pub window: usize,
    pub channels: Vec<String>,
    pub padding: String,
    /// Windows per model run; batches are aligned to archive rows so results do not depend on
    /// where a run starts.
    pub batch_rows: usize,
    pub settings: AssessSettings,
    pub source: String,
    pub source_rows: usize,
    pub layout: String,
    pub partition: String,
    /// What the run did with gaps; results from before the option held none.
    #[serde(default)]
    pub missing: MissingPolicy,
    /// The preprocessing backend (`cpu`, `wgpu`, `cuda`) and the models' execution providers:
    /// they round differently, so shards merge only when computed alike. Results written
    /// before these fields have neither.
    #[serde(default)]
    pub preprocess: Option<String>,
    #[serde(default)]
    pub providers: Option<String>,
    pub shard: Option<ShardInfo>,
}

/// The fields in which two results' metadata differ, e.g. `missing "fail" vs "hold"`.
fn differences(a: &ResultMeta, b: &ResultMeta) -> String {
    let fields = |meta: &ResultMeta| match serde_json::to_value(meta) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (fields(a), fields(b));
    let mut found: Vec<String> = a
        .iter()
        .filter(|(key, value)| b.get(*key) != Some(value))
        .map(|(key, value)| {
            let other = b.get(key).unwrap_or(&serde_json::Value::Null);
            format!("{key} {value} vs {other}")
        })
        .collect();
    if found.is_empty() {
        found.push("their metadata".into());
    }
    found.join(", ")
}

/// Result columns for a run of rows (or of units).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Columns {
    pub unit: Vec<i64>,
    pub cycle: Vec<i64>,
    pub rul: Vec<f32>,
    pub rul_std: Vec<f32>,
    pub rul_sigma: Vec<f32>,
    pub risk: Vec<u8>,
    pub anomaly: Vec<f32>,
    pub health: Vec<f32>,
    /// Rows table: padded rows of the window. Units table: rows scored for the unit.
    pub count: Vec<u64>,
    /// Values of the window held over gaps (missing=hold).
    pub held: Vec<u32>,
}

impl Columns {
    pub fn len(&self) -> usize {
        self.unit.len()
    }

    pub fn is_empty(&self) -> bool {
        self.unit.is_empty()
    }

    pub fn clear(&mut self) {
        self.unit.clear();
        self.cycle.clear();
        self.rul.clear();
        self.rul_std.clear();
        self.rul_sigma.clear();
        self.risk.clear();
        self.anomaly.clear();
        self.health.clear();
        self.count.clear();
        self.held.clear();
    }

    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        unit: i64,
        cycle: i64,
        rul: f32,
        rul_std: f32,
        rul_sigma: f32,
        risk: Risk,
        anomaly: Option<f32>,
        health: f32,
        count: u64,
        held: u32,
    ) {
        self.unit.push(unit);
        self.cycle.push(cycle);
        self.rul.push(rul);
        self.rul_std.push(rul_std);
        self.rul_sigma.push(rul_sigma);
        self.risk.push(risk.code());
        self.anomaly.push(anomaly.unwrap_or(f32::NAN));
        self.health.push(health);
        self.count.push(count);
        self.held.push(held);
    }

    /// Row `i` copied from another table.
    pub fn push_from(&mut self, other: &Columns, i: usize) {
        self.unit.push(other.unit[i]);
        self.cycle.push(other.cycle[i]);
        self.rul.push(other.rul[i]);
        self.rul_std.push(other.rul_std[i]);
        self.rul_sigma.push(other.rul_sigma[i]);
        self.risk.push(other.risk[i]);
        self.anomaly.push(other.anomaly[i]);
        self.health.push(other.health[i]);
        self.count.push(other.count[i]);
        self.held.push(other.held[i]);
    }
}

/// An HDF5 error with what was being done, for `map_err`.
pub(crate) fn h5(context: &str) -> impl Fn(hdf5::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{context}: {e}")
}

/// One table (rows or units) of extensible 1-D datasets.
struct Table {
    unit: hdf5::Dataset,
    cycle: hdf5::Dataset,
    rul: hdf5::Dataset,
    rul_std: hdf5::Dataset,
    rul_sigma: hdf5::Dataset,
    risk: hdf5::Dataset,
    anomaly: hdf5::Dataset,
    health: hdf5::Dataset,
    count: hdf5::Dataset,
    held: hdf5::Dataset,
    len: usize,
    pending: Columns,
}

fn extensible<T: H5Type>(
    group: &hdf5::Group,
    name: &str,
    chunk: usize,
) -> anyhow::Result<hdf5::Dataset> {
    group
        .new_dataset::<T>()
        .chunk(chunk)
        .shape(0..)
        .create(name)
        .map_err(h5(name))
}

fn append<T: H5Type>(dataset: &hdf5::Dataset, start: usize, values: &[T]) -> anyhow::Result<()> {
    dataset
        .resize(start + values.len())
        .map_err(h5("resizing"))?;
    dataset
        .write_slice(values, start..start + values.len())
        .map_err(h5("writing"))
}

impl Table {
    fn create(group: &hdf5::Group, count_name: &str) -> anyhow::Result<Table> {
        let rows = count_name == "padded";
        let chunk = if rows { ROW_CHUNK } else { UNIT_CHUNK };
        Ok(Table {
            unit: extensible::<i64>(group, "unit", chunk)?,
            cycle: extensible::<i64>(group, "cycle", chunk)?,
            rul: extensible::<f32>(group, "rul", chunk)?,
            rul_std: extensible::<f32>(group, "rul_std", chunk)?,
            rul_sigma: extensible::<f32>(group, "rul_sigma", chunk)?,
            risk: extensible::<u8>(group, "risk", chunk)?,
            anomaly: extensible::<f32>(group, "anomaly", chunk)?,
            health: extensible::<f32>(group, "health", chunk)?,
            count: if rows {
                extensible::<u16>(group, count_name, chunk)?
            } else {
                extensible::<u64>(group, count_name, chunk)?
            },
            held: extensible::<u32>(group, "held", chunk)?,
            len: 0,
            pending: Columns::default(),
        })
    }

    fn push_from(&mut self, other: &Columns, i: usize) -> anyhow::Result<()> {
        self.pending.push_from(other, i);
        if self.pending.len() >= FLUSH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = &self.pending;
        let start = self.len;
        append(&self.unit, start, &p.unit)?;
        append(&self.cycle, start, &p.cycle)?;
        append(&self.rul, start, &p.rul)?;
        append(&self.rul_std, start, &p.rul_std)?;
        append(&self.rul_sigma, start, &p.rul_sigma)?;
        append(&self.risk, start, &p.risk)?;
        append(&self.anomaly, start, &p.anomaly)?;
        append(&self.health, start, &p.health)?;
        if self.count.dtype().map(|t| t.size()).unwrap_or(8) == 2 {
            let counts: Vec<u16> = p.count.iter().map(|c| *c as u16).collect();
            append(&self.count, start, &counts)?;
        } else {
            append(&self.count, start, &p.count)?;
        }
        append(&self.held, start, &p.held)?;
        self.len += p.len();
        self.pending.clear();
        Ok(())
    }
}

fn string_attr(location: &hdf5::Location, name: &str, value: &str) -> anyhow::Result<()> {
    let value: VarLenUnicode = value
        .parse()
        .map_err(|e| anyhow::anyhow!("attribute {name}: {e}"))?;
    location
        .new_attr::<VarLenUnicode>()
        .create(name)
        .and_then(|a| a.write_scalar(&value))
        .map_err(h5(name))
}

fn number_attr<T: H5Type>(location: &hdf5::Location, name: &str, value: T) -> anyhow::Result<()> {
    location
        .new_attr::<T>()
        .create(name)
        .and_then(|a| a.write_scalar(&value))
        .map_err(h5(name))
}

/// Streams result rows into an HDF5 file (written to `<path>.partial`, renamed on finish; a
/// writer dropped unfinished, or failing, removes it).
pub struct ResultWriter {
    // Closed before the partial file is removed: fields drop in this order.
    file: hdf5::File,
    rows: Table,
    units: Table,
    partial: PartialFile,
    path: std::path::PathBuf,
}

/// Where `ResultWriter` writes the result for `path` until it is finished.
pub fn partial_path(path: &Path) -> std::path::PathBuf {
    // The whole name plus `.partial`, so `r.h5` and `r.hdf5` are written apart.
    durable::with_suffix(path, ".partial")
}

impl ResultWriter {
    pub fn create(path: &Path, meta: &ResultMeta) -> anyhow::Result<ResultWriter> {
        let partial = PartialFile::new(partial_path(path));
        let file = hdf5::File::create(partial.path())
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", partial.path().display()))?;
        write_meta(&file, meta)?;
        let rows = Table::create(&file, View::Rows.count_name())?;
        let units_group = file.create_group("units").map_err(h5("units"))?;
        let units = Table::create(&units_group, View::Units.count_name())?;
        Ok(ResultWriter {
            file,
            rows,
            units,
            partial,
            path: path.to_path_buf(),
        })
    }

    pub fn push_row(&mut self, rows: &Columns, i: usize) -> anyhow::Result<()> {
        self.rows.push_from(rows, i)
    }

    pub fn push_unit(&mut self, units: &Columns, i: usize) -> anyhow::Result<()> {
        self.units.push_from(units, i)
    }

    /// Flushes, closes and moves the file into place.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.rows.flush()?;
        self.units.flush()?;
        number_attr(&self.file, "rows", self.rows.len as u64)?;
        number_attr(&self.file, "units", self.units.len as u64)?;
        let ResultWriter {
            file,
            rows,
            units,
            partial,
            path,
        } = self;
        drop(rows);
        drop(units);
        file.close().map_err(h5("closing the result"))?;
        durable::replace(partial, &path)
            .map_err(|e| anyhow::anyhow!("cannot move the result to {}: {e}", path.display()))
    }
}

fn write_meta(file: &hdf5::File, meta: &ResultMeta) -> anyhow::Result<()> {
    string_attr(file, "linescan_meta", &serde_json::to_string(meta)?)?;
    string_attr(file, "model", &meta.model)?;
    number_attr(file, "model_version", meta.model_version)?;
    string_attr(
        file,
        "anomaly_model",
        meta.anomaly_model.as_deref().unwrap_or(""),
    )?;
    number_attr(
        file,
        "anomaly_model_version",
        meta.anomaly_model_version.unwrap_or(0),
    )?;
    number_attr(file, "window", meta.window as u64)?;
    string_attr(file, "padding", &meta.padding)?;
    string_attr(file, "risk_levels", "normal,warning,critical")?;
    number_attr(file, "risk_critical", meta.settings.critical)?;
    number_attr(file, "risk_warning", meta.settings.warning)?;
    number_attr(
        file,
        "health_anomaly_weight",
        meta.settings.health_anomaly_weight,
    )?;
    string_attr(file, "source", &meta.source)?;
    string_attr(file, "layout", &meta.layout)?;
    string_attr(file, "missing", meta.missing.name())?;
    if let Some(shard) = &meta.shard {
        string_attr(file, "shard", &format!("{}/{}", shard.index, shard.count))?;
    }
    Ok(())
}

/// A finished result file, read back in chunks.
pub struct ResultReader {
    file: hdf5::File,
    pub meta: ResultMeta,
}

/// Which table of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum View {
    #[default]
    Rows,
    Units,
}

impl View {
    /// The name of the count column of this table: padded cycles per row, rows per unit.
    fn count_name(self) -> &'static str {
        match self {
            View::Rows => "padded",
            View::Units => "rows",
        }
    }
}

/// A finished job's result's metadata, when it opens and holds its `rows` rows (a file damaged
/// or removed while the server was down does not).
pub fn check(path: &Path, rows: u64) -> anyhow::Result<ResultMeta> {
    let reader = ResultReader::open(path)?;
    let found = reader.len(View::Rows)?;
    anyhow::ensure!(
        found as u64 == rows,
        "result {} holds {found} rows, the job wrote {rows}",
        path.display()
    );
    Ok(reader.meta)
}

impl ResultReader {
    pub fn open(path: &Path) -> anyhow::Result<ResultReader> {
        let file = hdf5::File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open result {}: {e}", path.display()))?;
        let meta: VarLenUnicode = file
            .attr("linescan_meta")
            .and_then(|a| a.read_scalar())
            .map_err(|e| anyhow::anyhow!("{} is not a linescan result: {e}", path.display()))?;
        let meta = serde_json::from_str(meta.as_str())?;
        Ok(ResultReader { file, meta })
    }

    fn group(&self, view: View) -> anyhow::Result<hdf5::Group> {
        match view {
            View::Rows => self.file.group("/").map_err(h5("root")),
            View::Units => self.file.group("units").map_err(h5("units")),
        }
    }

    pub fn len(&self, view: View) -> anyhow::Result<usize> {
        let group = self.group(view)?;
        let shape = group.dataset("unit").map_err(h5("unit"))?.shape();
        match shape.as_slice() {
            [rows] => Ok(*rows),
            _ => anyhow::bail!("unit must be 1-D (one value a row), it has shape {shape:?}"),
        }
    }

    /// Rows `[start, end)` of a table.
    pub fn read(&self, view: View, start: usize, end: usize) -> anyhow::Result<Columns> {
        let group = self.group(view)?;
        fn column<T: H5Type>(
            group: &hdf5::Group,
            name: &str,
            start: usize,
            end: usize,
        ) -> anyhow::Result<Vec<T>> {
            Ok(group
                .dataset(name)
                .and_then(|d| d.read_slice_1d::<T, _>(start..end))
                .map_err(h5(name))?
                .into_raw_vec_and_offset()
                .0)
        }
        let count_name = view.count_name();
        Ok(Columns {
            unit: column(&group, "unit", start, end)?,
            cycle: column(&group, "cycle", start, end)?,
            rul: column(&group, "rul", start, end)?,
            rul_std: column(&group, "rul_std", start, end)?,
            rul_sigma: column(&group, "rul_sigma", start, end)?,
            risk: column(&group, "risk", start, end)?,
            anomaly: column(&group, "anomaly", start, end)?,
            health: column(&group, "health", start, end)?,
            count: column(&group, count_name, start, end)?,
            // Results written before gaps could be held have no `held`: none were.
            held: if group.link_exists("held") {
                column(&group, "held", start, end)?
            } else {
                vec![0; end - start]
            },
        })
    }

    /// Every chunk of a table in order.
    pub fn for_each_chunk(
        &self,
        view: View,
        mut visit: impl FnMut(&Columns) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let len = self.len(view)?;
        let mut start = 0;
        while start < len {
            let end = (start + FLUSH_ROWS).min(len);
            visit(&self.read(view, start, end)?)?;
            start = end;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    H5,
    Csv,
    Json,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::H5 => "h5",
            Format::Csv => "csv",
            Format::Json => "json",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::H5 => "application/x-hdf5",
            Format::Csv => "text/csv",
            Format::Json => "application/json",
        }
    }

    /// From a file name's extension (.h5/.hdf5, .csv, .json).
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "h5" | "hdf5" | "he5" => Some(Format::H5),
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

fn risk_name(code: u8) -> &'static str {
    Risk::from_code(code).map_or("unknown", Risk::name)
}

/// CSV of one table: `unit,cycle,rul,rul_std,rul_sigma,risk,anomaly,health,padded,held` (`rows`
/// for `padded` in units);
/// anomaly is empty without an anomaly model.
pub fn write_csv(reader: &ResultReader, view: View, out: &mut dyn Write) -> anyhow::Result<()> {
    let count_name = view.count_name();
    writeln!(
        out,
        "unit,cycle,rul,rul_std,rul_sigma,risk,anomaly,health,{count_name},held"
    )?;
    reader.for_each_chunk(view, |c| {
        for i in 0..c.len() {
            let anomaly = if c.anomaly[i].is_nan() {
                String::new()
            } else {
                c.anomaly[i].to_string()
            };
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{}",
                c.unit[i],
                c.cycle[i],
                c.rul[i],
                c.rul_std[i],
                c.rul_sigma[i],
                risk_name(c.risk[i]),
                anomaly,
                c.health[i],
                c.count[i],
                c.held[i]
            )?;
        }
        Ok(())
    })
}

fn write_json_rows(reader: &ResultReader, view: View, out: &mut dyn Write) -> anyhow::Result<()> {
    let count_name = view.count_name();
    let mut first = true;
    reader.for_each_chunk(view, |c| {
        for i in 0..c.len() {
            let anomaly = if c.anomaly[i].is_nan() {
                "null".to_string()
            } else {
                c.anomaly[i].to_string()
            };
            write!(
                out,
                "{}{{\"unit\":{},\"cycle\":{},\"rul\":{},\"rul_std\":{},\"rul_sigma\":{},\"risk\":\"{}\",\"anomaly\":{},\"health\":{},\"{count_name}\":{},\"held\":{}}}",
                if first { "\n" } else { ",\n" },
                c.unit[i],
                c.cycle[i],
                c.rul[i],
                c.rul_std[i],
                c.rul_sigma[i],
                risk_name(c.risk[i]),
                anomaly,
                c.health[i],
                c.count[i],
                c.held[i]
            )?;
            first = false;
        }
        Ok(())
    })
}

/// JSON: `{"meta": {...}, "rows": [...], "units": [...]}`, written as it is read.
pub fn write_json(reader: &ResultReader, out: &mut dyn Write) -> anyhow::Result<()> {
    write!(
        out,
        "{{\"meta\":{},\"rows\":[",
        serde_json::to_string(&reader.meta)?
    )?;
    write_json_rows(reader, View::Rows, out)?;
    write!(out, "],\"units\":[")?;
    write_json_rows(reader, View::Units, out)?;
    writeln!(out, "]}}")?;
    Ok(())
}

/// Converts a finished HDF5 result to CSV or JSON at `out` (written aside, then renamed); an
/// HDF5 result is served and kept as it is, so `Format::H5` is refused.
pub fn export(result: &Path, format: Format, view: View, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        format != Format::H5,
        "{} is HDF5 already: nothing to export",
        result.display()
    );
    let reader = ResultReader::open(result)?;
    // A name of its own, so two requests exporting at once do not write the same file; a
    // failed export leaves nothing behind (the result itself is untouched).
    let partial =
        PartialFile::new(out.with_extension(format!("partial-{:08x}", fastrand::u32(..))));
    let file = std::fs::File::create(partial.path())
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", partial.path().display()))?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    match format {
        Format::Csv => write_csv(&reader, view, &mut writer)?,
        Format::Json => write_json(&reader, &mut writer)?,
        Format::H5 => unreachable!(),
    }
    writer.flush()?;
    drop(writer);
    durable::replace(partial, out)?;
    Ok(())
}

/// Merges shard results (any order) into the result one run over the whole archive gives.
pub fn merge(parts: &[std::path::PathBuf], out: &Path) -> anyhow::Result<ResultMeta> {
    anyhow::ensure!(!parts.is_empty(), "nothing to merge");
    // Each reader stays with its path, so messages name the right file after sorting.
    let mut shards = Vec::with_capacity(parts.len());
    for path in parts {
        anyhow::ensure!(
            crate::jobs::archive::has_signature(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
            "{} is not an HDF5 result: shards are merged from their .h5 results (write each \
             shard with `job run --shard i/N --out NAME.h5`)",
            path.display()
        );
        let reader = ResultReader::open(path)?;
        let Some(shard) = reader.meta.shard.clone() else {
            anyhow::bail!(
                "{} is not a shard (it was written without --shard)",
                path.display()
            );
        };
        shards.push((shard, reader, path));
    }
    shards.sort_by_key(|(shard, _, _)| shard.index);
    let described = || {
        shards
            .iter()
            .map(|(s, _, path)| format!("{}/{} ({})", s.index, s.count, path.display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let count = shards[0].0.count;
    anyhow::ensure!(
        shards.iter().all(|(s, _, _)| s.count == count),
        "the shards come from different splits: {}",
        described()
    );
    anyhow::ensure!(
        shards.iter().map(|(s, _, _)| s.index).eq(0..count),
        "the shards do not cover 0..{count} exactly once: {}",
        described()
    );
    // Shards of one archive cut it into consecutive row ranges; shards of two archives that
    // share a name and a row count cut it elsewhere (rows would be lost or doubled).
    let source_rows = shards[0].1.meta.source_rows;
    let mut next_row = 0;
    for (shard, _, path) in &shards {
        anyhow::ensure!(
            shard.rows_start == next_row,
            "{} scored rows {}..{} but the shards before it end at row {next_row}: the shards \
             come from different archives (or versions of one)",
            path.display(),
            shard.rows_start,
            shard.rows_end
        );
        next_row = shard.rows_end;
    }
    anyhow::ensure!(
        next_row == source_rows,
        "the shards end at row {next_row} but the archive has {source_rows} rows: they come \
         from different archives (or versions of one)"
    );
    let mut meta = shards[0].1.meta.clone();
    meta.shard = None;
    for (_, reader, path) in &shards {
        let mut other = reader.meta.clone();
        other.shard = None;
        anyhow::ensure!(
            other == meta,
            "{} was computed differently from the shards before it: {}",
            path.display(),
            differences(&meta, &other)
        );
    }
    let readers: Vec<ResultReader> = shards.into_iter().map(|(_, reader, _)| reader).collect();
    let mut writer = ResultWriter::create(out, &meta)?;
    for reader in &readers {
        reader.for_each_chunk(View::Rows, |c| {
            (0..c.len()).try_for_each(|i| writer.push_row(c, i))
        })?;
        reader.for_each_chunk(View::Units, |c| {
            (0..c.len()).try_for_each(|i| writer.push_unit(c, i))
        })?;
    }
    writer.finish()?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ResultMeta {
        ResultMeta {
            model: "rul_fd001".into(),
            model_version: 1,
            anomaly_model: None,
            anomaly_model_version: None,
            window: 30,
            channels: vec!["s_2".into()],
            padding: "repeat_first".into(),
            batch_rows: 256,
            settings: AssessSettings::default(),
            source: "fleet.h5".into(),
            source_rows: 0,
            layout: "generic".into(),
            partition: "all".into(),
            missing: MissingPolicy::default(),
            preprocess: Some("cpu".into()),
            providers: Some("cpu / cpu".into()),
            shard: None,
        }
    }

    #[test]
    fn shards_preprocessed_on_different_backends_do_not_merge() {
        let folder = tempfile::tempdir().unwrap();
        let shard = |index: usize, preprocess: &str| {
            let path = folder.path().join(format!("part-{index}.h5"));
            let meta = ResultMeta {
                preprocess: Some(preprocess.into()),
                shard: Some(ShardInfo {
                    index,
                    count: 2,
                    rows_start: 0,
                    rows_end: 0,
                }),
                ..meta()
            };
            ResultWriter::create(&path, &meta)
                .unwrap()
                .finish()
                .unwrap();
            path
        };
        let parts = [shard(0, "cpu"), shard(1, "wgpu")];
        let error = merge(&parts, &folder.path().join("merged.h5"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("computed differently")
                && error.contains("preprocess \"cpu\" vs \"wgpu\""),
            "{error}"
        );
        let alike = [shard(0, "wgpu"), shard(1, "wgpu")];
        assert!(merge(&alike, &folder.path().join("merged.h5")).is_ok());
    }

    #[test]
    fn an_unfinished_result_leaves_no_file_and_a_finished_one_only_its_own() {
        let folder = tempfile::tempdir().unwrap();
        let out = folder.path().join("result.h5");
        let partial = folder.path().join("result.h5.partial");
        let writer = ResultWriter::create(&out, &meta()).unwrap();
        assert!(partial.exists());
        // An error on the way (a `?` in a merge, a failed run) drops the writer.
        drop(writer);
        assert!(!partial.exists() && !out.exists());
        ResultWriter::create(&out, &meta())
            .unwrap()
            .finish()
            .unwrap();
        assert!(!partial.exists() && out.exists());
        assert_eq!(ResultReader::open(&out).unwrap().meta, meta());
        // Another extension is written apart from it.
        assert_eq!(
            partial_path(&folder.path().join("result.hdf5")),
            folder.path().join("result.hdf5.partial")
        );
    }

    #[test]
    fn a_result_whose_unit_is_not_a_column_is_refused_not_a_panic() {
        let folder = tempfile::tempdir().unwrap();
        let out = folder.path().join("result.h5");
        ResultWriter::create(&out, &meta())
            .unwrap()
            .finish()
            .unwrap();
        let file = hdf5::File::append(&out).unwrap();
        file.unlink("unit").unwrap();
        file.new_dataset::<i64>().create("unit").unwrap();
        drop(file);
        let reader = ResultReader::open(&out).unwrap();
        let error = reader.len(View::Rows).unwrap_err().to_string();
        assert!(error.contains("unit must be 1-D"), "{error}");
    }
}
