//! This process's CPU time and memory, read from `/proc`, and exported to Prometheus under the
//! standard `process_*` names. The `prometheus` crate's own process collector rounds CPU time
//! down to whole seconds, too coarse to tell how a 10-second benchmark split the CPU.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, IntGauge, Opts};

/// One reading of `/proc/self/stat`.
struct Usage {
    /// User + system CPU seconds of every thread so far, to the clock tick.
    cpu_seconds: f64,
    resident_bytes: u64,
}

fn usage() -> Option<Usage> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    Some(Usage {
        cpu_seconds: (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64,
        resident_bytes: stat.rss * procfs::page_size(),
    })
}

/// User + system CPU seconds of every thread of this process so far, to the clock tick.
pub fn cpu_seconds() -> Option<f64> {
    usage().map(|usage| usage.cpu_seconds)
}

/// `process_cpu_seconds_total` and `process_resident_memory_bytes`, read when scraped.
pub struct ProcessCollector {
    cpu: Counter,
    resident: IntGauge,
    descs: Vec<Desc>,
}

impl ProcessCollector {
    pub fn new() -> ProcessCollector {
        let cpu = Counter::with_opts(Opts::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        ))
        .expect("valid counter");
        let resident = IntGauge::with_opts(Opts::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        ))
        .expect("valid gauge");
        let descs = cpu
            .desc()
            .into_iter()
            .chain(resident.desc())
            .cloned()
            .collect();
        ProcessCollector {
            cpu,
            resident,
            descs,
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        ProcessCollector::new()
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(usage) = usage() {
            // A counter only goes up; two scrapes at once may both add, hence the floor at 0.
            self.cpu
                .inc_by((usage.cpu_seconds - self.cpu.get()).max(0.0));
            self.resident.set(usage.resident_bytes as i64);
        }
        self.cpu
            .collect()
            .into_iter()
            .chain(self.resident.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    fn scrape(collector: &ProcessCollector) -> String {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&collector.collect(), &mut text)
            .expect("text encoding");
        String::from_utf8(text).expect("UTF-8")
    }

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    #[test]
    fn exports_cpu_seconds_finer_than_a_second_and_resident_memory() {
        let collector = ProcessCollector::new();
        let before = value(&scrape(&collector), "process_cpu_seconds_total");
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        // Spin until the clock has seen 50 ms of CPU, however busy the machine is.
        while cpu_seconds().unwrap() - before < 0.05 && std::time::Instant::now() < give_up {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let text = scrape(&collector);
        let after = value(&text, "process_cpu_seconds_total");
        assert!(after - before >= 0.05, "{before} -> {after}");
        assert!(
            value(&text, "process_resident_memory_bytes") > 1e6,
            "{text}"
        );
    }
}
