//! This process's CPU time, memory, file descriptors, start time and threads, read from `/proc`,
//! and exported to Prometheus under the standard `process_*` names. The `prometheus` crate's
//! own process collector rounds CPU time down to whole seconds, too coarse to tell how a
//! 10-second benchmark split the CPU.

use procfs::process::{Process, Stat};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, IntGauge, Opts};

/// One reading of `/proc/self/stat`.
struct Usage {
    /// User + system CPU seconds of every thread so far, to the clock tick.
    cpu_seconds: f64,
    resident_bytes: u64,
}

fn usage(stat: &Stat) -> Usage {
    Usage {
        cpu_seconds: (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64,
        resident_bytes: stat.rss * procfs::page_size(),
    }
}

/// User + system CPU seconds of every thread of this process so far, to the clock tick.
pub fn cpu_seconds() -> Option<f64> {
    let stat = Process::myself().ok()?.stat().ok()?;
    Some(usage(&stat).cpu_seconds)
}

/// The standard gauges beside CPU and memory, each read when scraped (None: not readable).
const GAUGES: [(&str, &str); 5] = [
    ("process_open_fds", "Number of open file descriptors."),
    (
        "process_max_fds",
        "Maximum number of open file descriptors.",
    ),
    (
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
    ),
    (
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
    ),
    ("process_threads", "Number of OS threads in the process."),
];

/// The values of `GAUGES`, in their order, from the process and its `stat` read once.
fn gauge_values(process: &Process, stat: Option<&Stat>) -> [Option<f64>; GAUGES.len()] {
    let max_fds = process
        .limits()
        .ok()
        .and_then(|limits| match limits.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(n) => Some(n as f64),
            procfs::process::LimitValue::Unlimited => None,
        });
    let started = stat.zip(procfs::boot_time_secs().ok()).map(|(stat, boot)| {
        boot as f64 + stat.starttime as f64 / procfs::ticks_per_second() as f64
    });
    [
        process.fd_count().ok().map(|n| n as f64),
        max_fds,
        started,
        stat.map(|stat| stat.vsize as f64),
        stat.map(|stat| stat.num_threads as f64),
    ]
}

/// Prometheus' standard `process_*` series, read when scraped: CPU seconds (to the tick),
/// resident and virtual memory, file descriptors, start time and threads.
pub struct ProcessCollector {
    cpu: Counter,
    /// Held while the counter is brought up to the reading: two scrapes at once would both
    /// add the same difference.
    cpu_update: std::sync::Mutex<()>,
    resident: IntGauge,
    gauges: Vec<Gauge>,
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
        let gauges: Vec<Gauge> = GAUGES
            .iter()
            .map(|(name, help)| Gauge::with_opts(Opts::new(*name, *help)).expect("valid gauge"))
            .collect();
        let descs = cpu
            .desc()
            .into_iter()
            .chain(resident.desc())
            .chain(gauges.iter().flat_map(|gauge| gauge.desc()))
            .cloned()
            .collect();
        ProcessCollector {
            cpu,
            cpu_update: std::sync::Mutex::new(()),
            resident,
            gauges,
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
        let process = Process::myself().ok();
        let stat = process.as_ref().and_then(|process| process.stat().ok());
        if let Some(usage) = stat.as_ref().map(usage) {
            // A counter only goes up: a reading older than the other scrape's adds nothing.
            let _updating = self.cpu_update.lock().unwrap_or_else(|e| e.into_inner());
            self.cpu
                .inc_by((usage.cpu_seconds - self.cpu.get()).max(0.0));
            self.resident.set(usage.resident_bytes as i64);
        }
        let mut families = self.cpu.collect();
        families.extend(self.resident.collect());
        // A value that cannot be read leaves its series out rather than exporting a stale one.
        let values = process.as_ref().map_or([None; GAUGES.len()], |process| {
            gauge_values(process, stat.as_ref())
        });
        for (gauge, value) in self.gauges.iter().zip(values) {
            if let Some(value) = value {
                gauge.set(value);
                families.extend(gauge.collect());
            }
        }
        families
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
        // Standard input, output and error at least; a limit above that; started before now.
        assert!(value(&text, "process_open_fds") >= 3.0, "{text}");
        assert!(value(&text, "process_max_fds") > value(&text, "process_open_fds"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value(&text, "process_start_time_seconds");
        assert!(
            started > now - 3600.0 && started <= now + 1.0,
            "{started} vs {now}"
        );
        assert!(value(&text, "process_threads") >= 1.0, "{text}");
        assert!(value(&text, "process_virtual_memory_bytes") > 1e6, "{text}");
    }
}
