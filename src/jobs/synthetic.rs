//! Synthetic fleets for tests, benchmarks and demos: C-MAPSS-like degradation series (every
//! sensor drifts exponentially from its healthy level toward its level at failure, plus noise,
//! with FD001's levels and noise) written as archives in either layout. `linescan job synth`
//! writes one of any size.

use std::path::Path;

use hdf5::H5Type;
use hdf5::types::{FixedAscii, VarLenUnicode};

use crate::jobs::results::h5;

/// Generic-layout columns of C-MAPSS: 3 operational settings and 21 sensors.
pub fn cmapss_channels() -> Vec<String> {
    let mut names: Vec<String> = (1..=3).map(|i| format!("setting_{i}")).collect();
    names.extend((1..=21).map(|i| format!("s_{i}")));
    names
}

/// Mean of the first 20 cycles of the FD001 training engines, per column.
const HEALTHY: [f64; 24] = [
    4.115e-05, -3.55e-06, 100.0, 518.67, 642.381, 1586.84, 1402.76, 14.62, 21.6095, 553.951,
    2388.06, 9056.01, 1.3, 47.3525, 521.91, 2388.06, 8137.37, 8.41829, 0.03, 392.26, 2388.0, 100.0,
    38.9328, 23.3601,
];
/// Mean of the last 5 cycles (at failure).
const FAILED: [f64; 24] = [
    -9.4e-05, -1.26e-05, 100.0, 518.67, 643.67, 1602.29, 1428.93, 14.62, 21.61, 551.495, 2388.23,
    9097.99, 1.3, 48.1422, 519.809, 2388.23, 8166.87, 8.5204, 0.03, 396.24, 2388.0, 100.0, 38.446,
    23.07,
];
/// Cycle-to-cycle noise (standard deviation).
const NOISE: [f64; 24] = [
    0.00212658,
    0.000286531,
    0.0,
    0.0,
    0.293092,
    3.93103,
    3.90148,
    0.0,
    0.0012996,
    0.402849,
    0.0300856,
    2.0,
    0.0,
    0.0990608,
    0.298851,
    0.0294181,
    2.0,
    0.0196497,
    0.0,
    0.915479,
    0.0,
    0.0,
    0.0981305,
    0.0595673,
];

/// N-CMAPSS column names per block.
pub const W_VARS: [&str; 4] = ["alt", "Mach", "TRA", "T2"];
pub const XS_VARS: [&str; 14] = [
    "T24", "T30", "T48", "T50", "P15", "P2", "P21", "P24", "Ps30", "P40", "P50", "Nf", "Nc", "Wf",
];
pub const XV_VARS: [&str; 14] = [
    "T40", "P30", "P45", "W21", "W22", "W25", "W31", "W32", "W48", "W50", "SmFan", "SmLPC",
    "SmHPC", "phi",
];
pub const T_VARS: [&str; 10] = [
    "fan_eff_mod",
    "fan_flow_mod",
    "LPC_eff_mod",
    "LPC_flow_mod",
    "HPC_eff_mod",
    "HPC_flow_mod",
    "HPT_eff_mod",
    "HPT_flow_mod",
    "LPT_eff_mod",
    "LPT_flow_mod",
];

/// Rows of a fleet in memory: unit, cycle and `columns` values per row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub unit: Vec<i64>,
    pub cycle: Vec<i64>,
    /// Remaining cycles to failure at each row.
    pub rul: Vec<f64>,
    pub columns: Vec<String>,
    /// Row-major, `columns.len()` per row.
    pub values: Vec<f64>,
}

impl Table {
    pub fn rows(&self) -> usize {
        self.unit.len()
    }

    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// The same rows with the columns renamed.
    pub fn renamed(mut self, names: &[&str]) -> Table {
        assert_eq!(names.len(), self.width());
        self.columns = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Only these columns, in this order.
    pub fn select(&self, names: &[String]) -> Table {
        let index: Vec<usize> = names
            .iter()
            .map(|n| self.columns.iter().position(|c| c == n).expect("column"))
            .collect();
        let mut values = Vec::with_capacity(self.rows() * index.len());
        for row in self.values.chunks_exact(self.width()) {
            values.extend(index.iter().map(|i| row[*i]));
        }
        Table {
            unit: self.unit.clone(),
            cycle: self.cycle.clone(),
            rul: self.rul.clone(),
            columns: names.to_vec(),
            values,
        }
    }
}

/// One synthetic unit: observed for `observed` cycles of a life ending in failure at `life`.
#[derive(Debug, Clone, Copy)]
pub struct UnitPlan {
    pub unit: i64,
    pub observed: usize,
    pub life: usize,
}

fn gaussian(rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(1e-300);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Appends the rows of one unit (24 C-MAPSS columns) to `table`.
pub fn degrade(plan: UnitPlan, rng: &mut fastrand::Rng, table: &mut Table) {
    const SHARPNESS: f64 = 4.0;
    let scale = SHARPNESS.exp() - 1.0;
    for cycle in 1..=plan.observed {
        let progress = cycle as f64 / plan.life as f64;
        let drift = ((SHARPNESS * progress).exp() - 1.0) / scale;
        table.unit.push(plan.unit);
        table.cycle.push(cycle as i64);
        table.rul.push((plan.life - cycle) as f64);
        for c in 0..24 {
            let value = HEALTHY[c] + (FAILED[c] - HEALTHY[c]) * drift + NOISE[c] * gaussian(rng);
            table.values.push(value);
        }
    }
}

/// A fleet of units with the C-MAPSS columns.
pub fn fleet(plans: &[UnitPlan], seed: u64) -> Table {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut table = Table {
        columns: cmapss_channels(),
        ..Table::default()
    };
    for plan in plans {
        degrade(*plan, &mut rng, &mut table);
    }
    table
}

fn dataset<T: H5Type>(
    file: &hdf5::File,
    name: &str,
    shape: &[usize],
    values: &[T],
) -> anyhow::Result<hdf5::Dataset> {
    let dataset = file
        .new_dataset::<T>()
        .shape(shape)
        .create(name)
        .map_err(h5(name))?;
    dataset.write_raw(values).map_err(h5(name))?;
    Ok(dataset)
}

/// Writes `table` as a generic archive: `unit`, `cycle`, `features` (f32 or f64) with the
/// `channels` attribute (an array of variable-length strings, as h5py writes a list of str).
pub fn write_generic(path: &Path, table: &Table, f32_features: bool) -> anyhow::Result<()> {
    let file = hdf5::File::create(path).map_err(h5("create"))?;
    dataset(&file, "unit", &[table.rows()], &table.unit)?;
    dataset(&file, "cycle", &[table.rows()], &table.cycle)?;
    let shape = [table.rows(), table.width()];
    let features = if f32_features {
        let values: Vec<f32> = table.values.iter().map(|v| *v as f32).collect();
        dataset(&file, "features", &shape, &values)?
    } else {
        dataset(&file, "features", &shape, &table.values)?
    };
    let names: Vec<VarLenUnicode> = table
        .columns
        .iter()
        .map(|c| c.parse().expect("no NUL in names"))
        .collect();
    features
        .new_attr::<VarLenUnicode>()
        .shape(names.len())
        .create("channels")
        .and_then(|a| a.write_raw(&names))
        .map_err(h5("channels"))?;
    Ok(())
}

fn names_dataset(file: &hdf5::File, name: &str, names: &[&str]) -> anyhow::Result<()> {
    // NASA's files hold fixed-length byte strings (h5py writes numpy "S" arrays so).
    let values: Vec<FixedAscii<16>> = names
        .iter()
        .map(|n| FixedAscii::from_ascii(n.as_bytes()).expect("ascii name"))
        .collect();
    dataset(file, name, &[names.len()], &values)?;
    Ok(())
}

/// Writes an N-CMAPSS archive: `dev` (and `test`) tables whose columns include the 14 `X_s`
/// sensors (any order); `W` takes the table's W_VARS columns when present (else zeros), `X_v`
/// and `T` are filled with deterministic values, `Y` is the RUL and `A` holds unit, cycle, Fc, hs.
pub fn write_ncmapss(path: &Path, dev: &Table, test: Option<&Table>) -> anyhow::Result<()> {
    let file = hdf5::File::create(path).map_err(h5("create"))?;
    for (suffix, table) in [("dev", Some(dev)), ("test", test)] {
        let Some(table) = table else { continue };
        let n = table.rows();
        let block = |names: &[&str], fill: f64| -> Vec<f64> {
            let index: Vec<Option<usize>> = names
                .iter()
                .map(|name| table.columns.iter().position(|c| c == name))
                .collect();
            let mut out = Vec::with_capacity(n * names.len());
            for (r, row) in table.values.chunks_exact(table.width()).enumerate() {
                for (k, i) in index.iter().enumerate() {
                    out.push(i.map_or(fill * (r % 7 + k) as f64, |i| row[i]));
                }
            }
            out
        };
        dataset(&file, &format!("W_{suffix}"), &[n, 4], &block(&W_VARS, 0.0))?;
        dataset(
            &file,
            &format!("X_s_{suffix}"),
            &[n, 14],
            &block(&XS_VARS, 0.0),
        )?;
        dataset(
            &file,
            &format!("X_v_{suffix}"),
            &[n, 14],
            &block(&XV_VARS, 0.5),
        )?;
        dataset(
            &file,
            &format!("T_{suffix}"),
            &[n, 10],
            &block(&T_VARS, -0.001),
        )?;
        dataset(&file, &format!("Y_{suffix}"), &[n, 1], &table.rul)?;
        let mut auxiliary = Vec::with_capacity(n * 4);
        for r in 0..n {
            auxiliary.extend([
                table.unit[r] as f64,
                table.cycle[r] as f64,
                1.0 + (table.unit[r] % 3) as f64,
                if table.rul[r] > 60.0 { 1.0 } else { 0.0 },
            ]);
        }
        dataset(&file, &format!("A_{suffix}"), &[n, 4], &auxiliary)?;
    }
    names_dataset(&file, "W_var", &W_VARS)?;
    names_dataset(&file, "X_s_var", &XS_VARS)?;
    names_dataset(&file, "X_v_var", &XV_VARS)?;
    names_dataset(&file, "T_var", &T_VARS)?;
    names_dataset(&file, "A_var", &["unit", "cycle", "Fc", "hs"])?;
    Ok(())
}

/// Writes a generic archive of about `rows` rows (C-MAPSS columns, f32 features) unit by unit,
/// appending in chunks so memory stays small whatever the size. Lives are drawn from 128..=362
/// cycles (FD001's range); returns (rows, units). Fails, the file unfinished, once `stopped`
/// says so (asked between chunks).
pub fn write_large_generic(
    path: &Path,
    rows: usize,
    seed: u64,
    stopped: &dyn Fn() -> bool,
) -> anyhow::Result<(usize, usize)> {
    const FLUSH: usize = 65_536;
    let file = hdf5::File::create(path).map_err(h5("create"))?;
    let width = 24;
    let unit_ds = file
        .new_dataset::<i64>()
        .chunk(FLUSH)
        .shape(0..)
        .create("unit")
        .map_err(h5("unit"))?;
    let cycle_ds = file
        .new_dataset::<i64>()
        .chunk(FLUSH)
        .shape(0..)
        .create("cycle")
        .map_err(h5("cycle"))?;
    let features = file
        .new_dataset::<f32>()
        .chunk((FLUSH / 16, width))
        .shape((0.., width))
        .create("features")
        .map_err(h5("features"))?;
    let names: Vec<VarLenUnicode> = cmapss_channels()
        .iter()
        .map(|c| c.parse().expect("name"))
        .collect();
    features
        .new_attr::<VarLenUnicode>()
        .shape(names.len())
        .create("channels")
        .and_then(|a| a.write_raw(&names))
        .map_err(h5("channels"))?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut table = Table::default();
    let mut written = 0;
    let mut units = 0;
    let flush = |table: &mut Table, written: &mut usize| -> anyhow::Result<()> {
        let n = table.rows();
        if n == 0 {
            return Ok(());
        }
        let end = *written + n;
        unit_ds.resize(end).map_err(h5("unit"))?;
        unit_ds
            .write_slice(&table.unit, *written..end)
            .map_err(h5("unit"))?;
        cycle_ds.resize(end).map_err(h5("cycle"))?;
        cycle_ds
            .write_slice(&table.cycle, *written..end)
            .map_err(h5("cycle"))?;
        let values: Vec<f32> = table.values.iter().map(|v| *v as f32).collect();
        features.resize((end, width)).map_err(h5("features"))?;
        let view = ndarray_view(&values, n, width);
        features
            .write_slice(view, (*written..end, ..))
            .map_err(h5("features"))?;
        *written = end;
        *table = Table::default();
        Ok(())
    };
    while written + table.rows() < rows {
        let life = rng.usize(128..=362);
        let observed = life.min(rows - written - table.rows());
        units += 1;
        degrade(
            UnitPlan {
                unit: units as i64,
                observed,
                life,
            },
            &mut rng,
            &mut table,
        );
        if table.rows() >= FLUSH {
            flush(&mut table, &mut written)?;
            anyhow::ensure!(!stopped(), "stopped after {written} rows");
        }
    }
    flush(&mut table, &mut written)?;
    Ok((written, units))
}

fn ndarray_view(values: &[f32], rows: usize, width: usize) -> ndarray::ArrayView2<'_, f32> {
    ndarray::ArrayView2::from_shape((rows, width), values).expect("shape")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::archive::{Archive, Partition};

    #[test]
    fn units_drift_toward_their_failure_levels() {
        let table = fleet(
            &[UnitPlan {
                unit: 7,
                observed: 200,
                life: 200,
            }],
            1,
        );
        assert_eq!(table.rows(), 200);
        let s4 = table.columns.iter().position(|c| c == "s_4").unwrap();
        let mean = |rows: std::ops::Range<usize>| {
            rows.clone().map(|r| table.values[r * 24 + s4]).sum::<f64>() / rows.len() as f64
        };
        assert!(mean(0..20) < 1406.0 && mean(190..200) > 1420.0);
        assert_eq!(table.rul[199], 0.0);
    }

    #[test]
    fn both_layouts_read_back_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let plans = [
            UnitPlan {
                unit: 1,
                observed: 50,
                life: 150,
            },
            UnitPlan {
                unit: 2,
                observed: 12,
                life: 140,
            },
        ];
        let table = fleet(&plans, 3);
        let cmapss: Vec<String> = cmapss_channels();
        let xs_source: Vec<String> = cmapss[3..17].to_vec();
        let xs = table.select(&xs_source).renamed(&XS_VARS);
        let generic_path = dir.path().join("g.h5");
        let ncmapss_path = dir.path().join("n.h5");
        write_generic(&generic_path, &xs, false).unwrap();
        write_ncmapss(&ncmapss_path, &xs, Some(&xs)).unwrap();
        let generic = Archive::open(&generic_path, Partition::All).unwrap();
        let ncmapss = Archive::open(&ncmapss_path, Partition::Dev).unwrap();
        // dev and test repeat the same units here, which a whole-archive scan refuses.
        let both = Archive::open(&ncmapss_path, Partition::All).unwrap();
        assert_eq!(both.rows(), 124);
        let error = both.scan_units(&|| true).unwrap_err();
        assert!(
            error
                .0
                .contains("unit 1 is in both partitions dev and test"),
            "{}",
            error.0
        );
        let wanted: Vec<String> = ["P2", "T24", "Wf"].iter().map(|s| s.to_string()).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        generic
            .features(&wanted)
            .unwrap()
            .read(10, 40, &mut a)
            .unwrap();
        let reader = ncmapss.features(&wanted).unwrap();
        reader.read(10, 40, &mut b).unwrap();
        let mut picked = Vec::new();
        crate::sensors::window::Scaler::new(&crate::sensors::params::SensorParams {
            window: 1,
            channels: wanted.clone(),
            scaling: String::new(),
            offset: vec![0.0; 3],
            scale: vec![1.0; 3],
            rul_cap: 1.0,
            padding: crate::sensors::params::Padding::RepeatFirst,
        })
        .scale_rows(&b, &reader.map, &mut picked)
        .unwrap();
        let generic_map = generic.features(&wanted).unwrap().map;
        let mut expected = Vec::new();
        for row in a.chunks_exact(14) {
            expected.extend(generic_map.columns.iter().map(|c| row[*c] as f32));
        }
        assert_eq!(picked, expected);
        assert_eq!(
            ncmapss.read_ids(0, 62).unwrap(),
            generic.read_ids(0, 62).unwrap()
        );
        let spans = ncmapss.scan_units(&|| true).unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!((spans[1].first_row, spans[1].rows), (50, 12));
    }

    #[test]
    fn large_archives_are_written_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.h5");
        let (rows, units) = write_large_generic(&path, 70_001, 5, &|| false).unwrap();
        assert_eq!(rows, 70_001);
        let archive = Archive::open(&path, Partition::All).unwrap();
        assert_eq!(archive.rows(), 70_001);
        assert_eq!(archive.scan_units(&|| true).unwrap().len(), units);
    }
}
