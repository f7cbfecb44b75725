//! CPU time spent while a benchmark measures: by this process (the load generator, or the model
//! itself when in-process) and by the server under test, read from its `/metrics`. On a machine
//! that runs both, throughput alone hides how much of the CPU the load generator took.

use std::time::{Duration, Instant};

use serde::Serialize;

/// The standard Prometheus series with a server's CPU seconds (linescan's: `process_stats`).
const SERVER_CPU_SERIES: &str = "process_cpu_seconds_total";

/// CPU used over the measured interval, in cores (CPU seconds per wall-clock second).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuUse {
    /// This process: the load generator, or ONNX Runtime and the pipeline when in-process.
    pub bench_cores: f64,
    /// The server under test; None in-process, or when it could not be read (see below).
    pub server_cores: Option<f64>,
    /// Why a server's CPU is unknown: its `/metrics` unreadable, without the series, or too slow
    /// to answer for the reading to be placed in time.
    pub server_unknown: Option<String>,
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
            // Over HTTP this process is only the load generator; in-process it runs the model.
            None if self.server_unknown.is_some() => {
                format!("load generator {:.2} cores", self.bench_cores)
            }
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

/// The server's CPU seconds at one reading.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ServerCpu {
    /// No server: the model runs in this process.
    None,
    Seconds(f64),
    Unreadable,
    NotExported,
}

/// One reading of both clocks.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    /// When the reading was taken: for the server, the middle of its `/metrics` round trip.
    at: Instant,
    /// Half that round trip: how far from `at` the server may have read its clock.
    slack: Duration,
    own: f64,
    server: ServerCpu,
}

/// How long a reading waits for the server's `/metrics`.
const METRICS_WAIT: Duration = Duration::from_secs(2);

/// The share of the measured interval that the readings' slack may take before the server's
/// figure is refused (at 4,096 connections a `/metrics` answer can wait seconds in line).
const MAX_SLACK_SHARE: f64 = 0.05;

impl CpuSample {
    /// Reads this process's CPU time only (in-process runs).
    pub fn own() -> CpuSample {
        CpuSample {
            at: Instant::now(),
            slack: Duration::ZERO,
            own: crate::process_stats::cpu_seconds().unwrap_or(f64::NAN),
            server: ServerCpu::None,
        }
    }

    /// Reads this process's CPU time and the server's from `{server}/metrics`; a server that
    /// cannot be read gives no server figure rather than failing the benchmark.
    pub async fn with_server(client: &reqwest::Client, server: &str) -> CpuSample {
        let asked = Instant::now();
        let metrics = async {
            let response = client.get(format!("{server}/metrics")).send().await.ok()?;
            response.text().await.ok()
        };
        // A stalled server must not hold the report back for the client's whole timeout.
        let metrics = tokio::time::timeout(METRICS_WAIT, metrics);
        let server = match metrics.await.ok().flatten() {
            None => ServerCpu::Unreadable,
            Some(text) => cpu_seconds_in(&text).map_or(ServerCpu::NotExported, ServerCpu::Seconds),
        };
        let round_trip = asked.elapsed();
        CpuSample {
            at: asked + round_trip / 2,
            slack: round_trip / 2,
            server,
            ..CpuSample::own()
        }
    }

    /// The CPU used between `self` and a later sample.
    pub fn until(&self, later: &CpuSample) -> CpuUse {
        let interval = later.at.duration_since(self.at);
        let seconds = interval.as_secs_f64().max(1e-9);
        let slack = self.slack + later.slack;
        let (server_cores, server_unknown) = match (self.server, later.server) {
            (ServerCpu::None, _) | (_, ServerCpu::None) => (None, None),
            (ServerCpu::Unreadable, _) | (_, ServerCpu::Unreadable) => (
                None,
                Some(format!(
                    "the server's /metrics could not be read within {} s at the start or end",
                    METRICS_WAIT.as_secs()
                )),
            ),
            (ServerCpu::NotExported, _) | (_, ServerCpu::NotExported) => (
                None,
                Some("the server exports no process_cpu_seconds_total".into()),
            ),
            _ if slack.as_secs_f64() > MAX_SLACK_SHARE * seconds => (
                None,
                Some(format!(
                    "the server took {:.0} ms to answer /metrics, too long to time its CPU over \
                     {seconds:.1} s",
                    2.0 * slack.as_secs_f64() * 1e3
                )),
            ),
            (ServerCpu::Seconds(before), ServerCpu::Seconds(after)) => {
                (Some((after - before) / seconds), None)
            }
        };
        CpuUse {
            bench_cores: (later.own - self.own) / seconds,
            server_cores,
            server_unknown,
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
            slack: Duration::from_millis(1),
            own: 10.0,
            server: ServerCpu::Seconds(100.0),
        };
        let later = CpuSample {
            at: at + Duration::from_secs(4),
            slack: Duration::from_millis(1),
            own: 12.0,
            server: ServerCpu::Seconds(106.0),
        };
        let used = first.until(&later);
        assert_eq!(used.bench_cores, 0.5);
        assert_eq!(used.server_cores, Some(1.5));
        assert_eq!(used.inference_cores(true), Some(1.5));
        assert_eq!(used.inference_cores(false), Some(0.5));
        let no_server = CpuSample {
            server: ServerCpu::None,
            ..later
        };
        assert_eq!(first.until(&no_server).server_cores, None);
        assert_eq!(first.until(&no_server).server_unknown, None);
    }

    #[test]
    fn a_server_figure_that_cannot_be_placed_in_time_is_refused_with_the_reason() {
        let at = Instant::now();
        let reading = |after_s: u64, slack_ms: u64, server| CpuSample {
            at: at + Duration::from_secs(after_s),
            slack: Duration::from_millis(slack_ms),
            own: 1.0,
            server,
        };
        // /metrics answered after a 2 s wait in line: the interval is unknown to ±40 %.
        let used = reading(0, 1, ServerCpu::Seconds(0.0)).until(&reading(
            5,
            1000,
            ServerCpu::Seconds(9.0),
        ));
        assert_eq!(used.server_cores, None);
        assert!(used.server_unknown.unwrap().contains("to answer /metrics"));
        let used =
            reading(0, 1, ServerCpu::Unreadable).until(&reading(5, 1, ServerCpu::Seconds(9.0)));
        assert!(used.server_unknown.unwrap().contains("could not be read"));
        let used =
            reading(0, 1, ServerCpu::NotExported).until(&reading(5, 1, ServerCpu::NotExported));
        assert!(
            used.server_unknown
                .unwrap()
                .contains("no process_cpu_seconds_total")
        );
    }

    #[test]
    fn throughput_per_cpu_second_needs_a_known_cpu() {
        assert_eq!(inferences_per_cpu_second(1000.0, Some(2.0)), Some(500.0));
        assert_eq!(inferences_per_cpu_second(1000.0, None), None);
        assert_eq!(inferences_per_cpu_second(1000.0, Some(0.0)), None);
    }
}
