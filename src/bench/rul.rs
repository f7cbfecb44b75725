//! Workload: live sensor windows (`POST /v1/rul/{model}`) built from synthetic degradation
//! series, for single-request latency and throughput of the sensor API.

use anyhow::Context;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::json;

use crate::bench::load::{Outcome, Workload, send_timed};
use crate::jobs::synthetic::{self, UnitPlan};

/// Distinct request bodies rotated through.
const BODY_VARIANTS: usize = 16;

#[derive(Deserialize)]
struct ModelInfo {
    window: usize,
    channels: Vec<String>,
}

pub struct RulWorkload {
    server: String,
    url: String,
    model: String,
    windows: usize,
    bodies: Vec<Bytes>,
}

impl RulWorkload {
    /// Reads the model's window and channels and prepares request bodies of `windows` windows.
    pub async fn prepare(
        client: &reqwest::Client,
        base_url: &str,
        model: &str,
        windows: usize,
    ) -> anyhow::Result<RulWorkload> {
        let url = format!("{base_url}/v1/rul/{model}");
        let response = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        anyhow::ensure!(
            response.status().is_success(),
            "{url} answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
        let info: ModelInfo = response.json().await.context("sensor model info")?;
        let cmapss = synthetic::cmapss_channels();
        anyhow::ensure!(
            info.channels.iter().all(|c| cmapss.contains(c)),
            "bench rul makes C-MAPSS-like windows; model {model} reads other channels"
        );
        let plans: Vec<UnitPlan> = (0..BODY_VARIANTS * windows.max(1))
            .map(|i| UnitPlan {
                unit: i as i64,
                observed: 40 + (i * 37) % 260,
                life: 300,
            })
            .collect();
        let table = synthetic::fleet(&plans, 7).select(&info.channels);
        let width = info.channels.len();
        let mut all_windows = Vec::new();
        let mut start = 0;
        for plan in &plans {
            let end = start + plan.observed;
            // Units shorter than the window send what they have; the server pads them.
            let rows: Vec<Vec<f64>> = (end.saturating_sub(info.window).max(start)..end)
                .map(|r| table.values[r * width..(r + 1) * width].to_vec())
                .collect();
            all_windows.push(json!({"unit": plan.unit, "channels": info.channels, "values": rows}));
            start = end;
        }
        let bodies = all_windows
            .chunks(windows.max(1))
            .map(|chunk| Bytes::from(serde_json::to_vec(&json!(chunk)).expect("JSON")))
            .collect();
        Ok(RulWorkload {
            server: base_url.into(),
            url,
            model: model.to_string(),
            windows: windows.max(1),
            bodies,
        })
    }
}

impl Workload for RulWorkload {
    fn send<'a>(&'a self, client: &'a reqwest::Client, sequence: u64) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let body = self.bodies[sequence as usize % self.bodies.len()].clone();
            let request = client
                .post(&self.url)
                .header("Content-Type", "application/json")
                .body(body);
            send_timed(request).await
        })
    }

    fn rows(&self) -> usize {
        self.windows
    }
    fn row_name(&self) -> &'static str {
        "window"
    }

    fn describe(&self) -> (String, String) {
        (self.url.clone(), self.model.clone())
    }

    fn server(&self) -> Option<&str> {
        Some(&self.server)
    }
}
