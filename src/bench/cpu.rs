//! CPU time spent while a benchmark measures: by this process (the load generator, or the model
//! itself when in-process) and by the server under test, read from its `/metrics`. On a machine
//! that runs both, throughput alone hides how much of the CPU the load generator took.

use std::time::Instant;

use serde::Serialize;

/// The standard Prometheus series with a server's CPU seconds (linescan's: `process_stats`).
const SERVER_CPU_SERIES: &str = "process_cpu_seconds_total";

/// CPU used over the measured interval, in cores (CPU seconds per wall-clock second).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct CpuUse {
    /// This process: the load generator, or ONNX Runtime and the pipeline when in-process.
    pub bench_cores: f64,
    /// The server under test; None in-process, or when it exports no `process_cpu_seconds_total`.
    pub server_cores: Option<f64>,
}

impl CpuUse {
    /// The cores that did the inference: the server's, or this process's when there is none.
    pub fn inference_cores(&self, over_http: bool) -> Option<f64> {
        if over_http {
            self.server_cores
        } else {
            Some(self.bench_cores)
        }
    }

    pub fn describe(&self) -> String {
        match self.server_cores {
            Some(server) => format!(
                "server {server:.2} cores, load generator {:.2} cores",
                self.bench_cores
            ),
            None => format!("{:.2} cores", self.bench_cores),
        }
    }
}

/// Inferences per CPU second of whatever ran the model, when that CPU is known.
pub fn inferences_per_cpu_second(inferences_per_s: f64, cores: Option<f64>) -> Option<f64> {
    cores
        .filter(|cores| *cores > 0.0)
        .map(|cores| inferences_per_s / cores)
}

/// The CPU seconds in a Prometheus text exposition, if it has the standard process series.
pub fn cpu_seconds_in(metrics: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(SERVER_CPU_SERIES)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// One reading of both clocks.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    at: Instant,
    own: f64,
    server: Option<f64>,
}

impl CpuSample {
    /// Reads this process's CPU time only (in-process runs).
    pub fn own() -> CpuSample {
        CpuSample {
            at: Instant::now(),
            own: crate::process_stats::cpu_seconds().unwrap_or(f64::NAN),
            server: None,
        }
    }

    /// Reads this process's CPU time and the server's from `{server}/metrics`; a server that
    /// cannot be read gives no server figure rather than failing the benchmark.
    pub async fn with_server(client: &reqwest::Client, server: &str) -> CpuSample {
        let metrics = async {
            let response = client.get(format!("{server}/metrics")).send().await.ok()?;
            response.text().await.ok()
        };
        let server = metrics.await.as_deref().and_then(cpu_seconds_in);
        CpuSample {
            server,
            ..CpuSample::own()
        }
    }

    /// The CPU used between `self` and a later sample.
    pub fn until(&self, later: &CpuSample) -> CpuUse {
        let seconds = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        CpuUse {
            bench_cores: (later.own - self.own) / seconds,
            server_cores: self
                .server
                .zip(later.server)
                .map(|(before, after)| (after - before) / seconds),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cpu_is_read_from_the_process_series_only() {
        let text = "# HELP process_cpu_seconds_total Total user and system CPU time.\n\
                    # TYPE process_cpu_seconds_total counter\n\
                    process_cpu_seconds_total_other 9\n\
                    process_cpu_seconds_total 12.5\n";
        assert_eq!(cpu_seconds_in(text), Some(12.5));
        assert_eq!(cpu_seconds_in("linescan_requests_total 3\n"), None);
    }

    #[test]
    fn cores_are_cpu_seconds_per_second_on_each_side() {
        let at = Instant::now();
        let first = CpuSample {
            at,
            own: 10.0,
            server: Some(100.0),
        };
        let later = CpuSample {
            at: at + std::time::Duration::from_secs(4),
            own: 12.0,
            server: Some(106.0),
        };
        let used = first.until(&later);
        assert_eq!(used.bench_cores, 0.5);
        assert_eq!(used.server_cores, Some(1.5));
        assert_eq!(used.inference_cores(true), Some(1.5));
        assert_eq!(used.inference_cores(false), Some(0.5));
        let no_server = CpuSample {
            server: None,
            ..later
        };
        assert_eq!(first.until(&no_server).server_cores, None);
    }

    #[test]
    fn throughput_per_cpu_second_needs_a_known_cpu() {
        assert_eq!(inferences_per_cpu_second(1000.0, Some(2.0)), Some(500.0));
        assert_eq!(inferences_per_cpu_second(1000.0, None), None);
        assert_eq!(inferences_per_cpu_second(1000.0, Some(0.0)), None);
    }
}
