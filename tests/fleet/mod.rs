//! Fixtures of the sensor and job tests: synthetic degradation fleets written as archives on the
//! fly (both layouts, and broken ones), and helpers for the job API. Nothing here needs
//! ../shared.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::time::Duration;

use linescan::jobs::synthetic::{self, Table, UnitPlan};
use serde_json::Value;

pub const RUL_MODEL: &str = "rul_fd001";
pub const ANOMALY_MODEL: &str = "anomaly_fd001";

/// The channels the RUL model reads, in its order.
pub fn model_channels() -> Vec<String> {
    [
        "s_2", "s_3", "s_4", "s_7", "s_8", "s_9", "s_11", "s_12", "s_13", "s_14", "s_15", "s_17",
        "s_20", "s_21",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A small fleet: long run-to-failure units, a truncated one and one shorter than a window.
pub fn small_fleet() -> Table {
    synthetic::fleet(
        &[
            UnitPlan {
                unit: 11,
                observed: 220,
                life: 220,
            },
            UnitPlan {
                unit: 12,
                observed: 12,
                life: 180,
            },
            UnitPlan {
                unit: 13,
                observed: 150,
                life: 260,
            },
            UnitPlan {
                unit: 14,
                observed: 300,
                life: 300,
            },
            UnitPlan {
                unit: 15,
                observed: 31,
                life: 200,
            },
        ],
        42,
    )
}

/// A fleet of `units` run-to-failure units (lives 128..=362), about 245 rows each.
pub fn fleet_of(units: usize, seed: u64) -> Table {
    let mut rng = fastrand::Rng::with_seed(seed);
    let plans: Vec<UnitPlan> = (0..units)
        .map(|i| {
            let life = rng.usize(128..=362);
            UnitPlan {
                unit: 100 + i as i64,
                observed: life,
                life,
            }
        })
        .collect();
    synthetic::fleet(&plans, seed)
}

/// The generic columns in a shuffled order (channels are matched by name).
pub fn shuffled(table: &Table) -> Table {
    let mut names = table.columns.clone();
    names.reverse();
    names.swap(0, 7);
    table.select(&names)
}

pub fn write_generic(dir: &Path, name: &str, table: &Table) -> PathBuf {
    let path = dir.join(name);
    synthetic::write_generic(&path, table, true).expect("write generic archive");
    path
}

/// `linescan job run ARCHIVE --out OUT --quiet` on `repository`; panics with its output on
/// failure, returns its stdout.
pub fn job_run(repository: &Path, archive: &Path, out: &Path, extra: &[&str]) -> String {
    let output = job_run_output(repository, archive, out, extra);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "job run failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `linescan job run ARCHIVE --out OUT --quiet` on `repository`, whatever its outcome.
pub fn job_run_output(
    repository: &Path,
    archive: &Path,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "job",
        "run",
        archive.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--model-repository",
        repository.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    crate::common::run_cli(&args)
}

/// Rows of a result table read with the hdf5 crate.
pub struct ResultColumns {
    pub unit: Vec<i64>,
    pub cycle: Vec<i64>,
    pub rul: Vec<f32>,
    pub rul_std: Vec<f32>,
    pub rul_sigma: Vec<f32>,
    pub risk: Vec<u8>,
    pub anomaly: Vec<f32>,
    pub health: Vec<f32>,
    pub padded: Vec<u16>,
}

pub fn read_result(path: &Path) -> ResultColumns {
    let file = hdf5::File::open(path).expect("open result");
    fn column<T: hdf5::H5Type>(file: &hdf5::File, name: &str) -> Vec<T> {
        file.dataset(name).expect(name).read_raw::<T>().expect(name)
    }
    ResultColumns {
        unit: column(&file, "unit"),
        cycle: column(&file, "cycle"),
        rul: column(&file, "rul"),
        rul_std: column(&file, "rul_std"),
        rul_sigma: column(&file, "rul_sigma"),
        risk: column(&file, "risk"),
        anomaly: column(&file, "anomaly"),
        health: column(&file, "health"),
        padded: column(&file, "padded"),
    }
}

/// Every dataset and attribute of an HDF5 result, as comparable text and bytes (`skip` names
/// attributes left out).
pub fn result_fingerprint(path: &Path, skip: &[&str]) -> Vec<(String, Vec<u8>)> {
    let file = hdf5::File::open(path).expect("open result");
    let mut out = Vec::new();
    for group in ["/", "units"] {
        let group = file.group(group).expect("group");
        let mut names = group.member_names().expect("members");
        names.sort();
        for name in names {
            if let Ok(dataset) = group.dataset(&name) {
                let size = dataset.dtype().unwrap().size();
                let bytes: Vec<u8> = match size {
                    1 => dataset.read_raw::<u8>().unwrap(),
                    2 => bytemuck::cast_slice(&dataset.read_raw::<u16>().unwrap()).to_vec(),
                    4 => bytemuck::cast_slice(&dataset.read_raw::<u32>().unwrap()).to_vec(),
                    _ => bytemuck::cast_slice(&dataset.read_raw::<u64>().unwrap()).to_vec(),
                };
                out.push((format!("{}/{name}", group.name()), bytes));
            }
        }
    }
    let mut attributes = file.attr_names().unwrap();
    attributes.sort();
    for name in attributes {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let attribute = file.attr(&name).unwrap();
        let text = match attribute.dtype().unwrap().to_descriptor().unwrap() {
            hdf5::types::TypeDescriptor::VarLenUnicode => attribute
                .read_scalar::<hdf5::types::VarLenUnicode>()
                .unwrap()
                .to_string(),
            _ => format!("{:?}", attribute.read_raw::<f64>().unwrap()),
        };
        out.push((format!("@{name}"), text.into_bytes()));
    }
    out
}

/// Waits until the job reaches a final state (or `until` holds); returns its last status.
pub async fn wait_job(base: &str, id: &str, until: impl Fn(&Value) -> bool) -> Value {
    crate::common::poll_until(Duration::from_secs(120), async || {
        let status: Value = reqwest::get(format!("{base}/v1/jobs/{id}"))
            .await
            .expect("GET job")
            .json()
            .await
            .expect("job JSON");
        if until(&status) {
            Ok(status)
        } else {
            Err(format!("job {id} stuck: {status}"))
        }
    })
    .await
}

pub fn is_final(status: &Value) -> bool {
    matches!(
        status["state"].as_str(),
        Some("done" | "failed" | "cancelled")
    )
}

pub async fn submit_bytes(base: &str, body: Vec<u8>, query: &str) -> (u16, Value) {
    let request = reqwest::Client::new()
        .post(format!("{base}/v1/jobs{query}"))
        .header("Content-Type", "application/x-hdf5")
        .body(body);
    crate::common::status_and_json(request).await
}

/// Submits a server-side path job (`{"path": ...}` and any other fields); its id.
pub async fn submit_path(base: &str, submission: Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .json(&submission)
        .send()
        .await
        .expect("POST job");
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().expect("id").to_string()
}

pub async fn submit_file(base: &str, path: &Path) -> String {
    let (status, body) = submit_bytes(base, std::fs::read(path).unwrap(), "").await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("id").to_string()
}
