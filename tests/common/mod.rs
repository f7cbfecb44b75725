//! Shared harness of the integration tests: a real `linescan serve` process on an ephemeral port,
//! over a temporary model repository made from the bundled models.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod onnx;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_linescan");

/// A command for a child of the test process, which inherits no descriptor but stdio.
///
/// HDF5 opens files without `O_CLOEXEC` and holds an `flock` on them. A server that one test
/// thread starts while another writes an archive would keep that lock for its whole life, and
/// re-creating or opening the archive then fails with EAGAIN (seen in CI as "unable to lock
/// file").
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    // SAFETY: the hook only calls close_range, which is async-signal-safe and touches no memory;
    // CLOSE_RANGE_CLOEXEC leaves std's own exec-error pipe working.
    unsafe {
        command.pre_exec(|| {
            let flags = libc::CLOSE_RANGE_CLOEXEC as libc::c_int;
            match libc::close_range(3, libc::c_uint::MAX, flags) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    command
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where test models come from: the bundled `models/`, or `LINESCAN_TEST_MODELS` to run the
/// suite against another repository.
pub fn models_root() -> PathBuf {
    std::env::var_os("LINESCAN_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"))
}

/// A temporary model repository holding copies of bundled models, configs edited per test.
pub struct Repository {
    pub dir: tempfile::TempDir,
}

impl Repository {
    pub fn with_models(models: &[&str]) -> Repository {
        let dir = tempfile::tempdir().expect("temp dir");
        for model in models {
            copy_dir(&models_root().join(model), &dir.path().join(model));
        }
        Repository { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Rewrites a key of the model's config.toml (first occurrence of `key = ...`).
    pub fn set(&self, model: &str, key: &str, value: &str) -> &Repository {
        let path = self.path().join(model).join("config.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        let mut replaced = false;
        let lines: Vec<String> = text
            .lines()
            .map(|line| {
                let is_key = line.split('=').next().map(str::trim) == Some(key);
                if is_key && !replaced {
                    replaced = true;
                    format!("{key} = {value}")
                } else {
                    line.to_string()
                }
            })
            .collect();
        assert!(replaced, "{key} not found in {}", path.display());
        std::fs::write(&path, lines.join("\n") + "\n").expect("write config");
        self
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    let entries =
        std::fs::read_dir(from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display()));
    for entry in entries.flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

pub struct Server {
    child: Child,
    pub url: String,
    /// The data folder of a server started without `--data-dir` (each server locks its own).
    _data: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts the server and waits until it is ready.
    pub fn start(repository: &Path, extra: &[&str]) -> Server {
        let server = Self::spawn(repository, extra);
        server.wait_ready();
        server
    }

    /// Starts the server and returns once it listens (not necessarily ready).
    pub fn spawn(repository: &Path, extra: &[&str]) -> Server {
        let data = own_data_dir(extra);
        let mut child = command(BIN)
            .args(["serve", "--port", "0", "--model-repository"])
            .arg(repository)
            .args(extra)
            .args(
                data.iter()
                    .flat_map(|d| [Path::new("--data-dir"), d.path()]),
            )
            .current_dir(repo_root())
            .env("LINESCAN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start linescan");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address");
        let url = line
            .trim()
            .strip_prefix("linescan listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Server {
            child,
            url,
            _data: data,
        }
    }

    /// The Prometheus text at `/metrics`.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Polls `/metrics` until `until` holds for its text, which it returns (at most 60 s).
    pub async fn wait_metrics(&self, until: impl Fn(&str) -> bool) -> String {
        poll_until(Duration::from_secs(60), async || {
            let text = self.metrics_text().await;
            if until(&text) { Ok(text) } else { Err(text) }
        })
        .await
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if status_of(&self.url, "/v2/health/ready") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server at {} not ready after 120 s", self.url);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named as `kill` takes it: "TERM", "INT", ...
    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends process `pid` the signal named as `kill` takes it: "TERM", "INT", ...
pub fn signal(pid: u32, name: &str) {
    let status = command("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// The status of a GET, over a plain socket so polling needs no async runtime.
pub fn status_of(base_url: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let address = base_url.strip_prefix("http://")?;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// GET a URL; its status and JSON body (Null when not JSON).
pub async fn get_json(url: &str) -> (u16, Value) {
    status_and_json(reqwest::Client::new().get(url)).await
}

/// The `error` text of a JSON error answer (a test failure naming the body when it has none).
pub fn error_message(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
}

/// Sends the request; the answer's status and JSON body (Null when not JSON).
pub async fn status_and_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("send the request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Calls `probe` every 20 ms until it gives `Ok`, whose value it returns; after `limit`, fails
/// the test with the last `Err`, which describes what was seen instead.
pub async fn poll_until<T>(
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(Instant::now() < deadline, "after {limit:?}: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A data folder of its own for a server whose arguments name none: tests run in parallel, and
/// each server locks its folder.
fn own_data_dir(serve_args: &[&str]) -> Option<tempfile::TempDir> {
    (!serve_args.contains(&"--data-dir")).then(|| tempfile::tempdir().expect("data dir"))
}

/// How long a command run by `run_cli` may take: a `serve` expected to refuse its settings
/// that starts serving instead fails the test here rather than hanging it.
const CLI_LIMIT: Duration = Duration::from_secs(300);

/// Runs `linescan` with arguments to completion (a `serve` gets its own data folder), killing
/// it after `CLI_LIMIT`.
pub fn run_cli(args: &[&str]) -> std::process::Output {
    let data = (args.first() == Some(&"serve"))
        .then(|| own_data_dir(args))
        .flatten();
    let mut child = command(BIN)
        .args(args)
        .args(
            data.iter()
                .flat_map(|d| [Path::new("--data-dir"), d.path()]),
        )
        .current_dir(repo_root())
        .env("LINESCAN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run linescan");
    // Read while it runs, so a full pipe cannot stop it.
    let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).map(|_| bytes)
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CLI_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for linescan") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("linescan {args:?} still ran after {CLI_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap().expect("linescan's stdout"),
        stderr: stderr.join().unwrap().expect("linescan's stderr"),
    }
}

/// Random inputs for every model input at a batch size, as a v2 JSON request.
pub fn json_request(metadata: &Value, batch: usize, seed: u64) -> Value {
    let mut rng = fastrand::Rng::with_seed(seed);
    let inputs: Vec<Value> = metadata["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|input| {
            let shape = concrete_shape(&input["shape"], batch);
            let count: usize = shape.iter().product();
            let data: Vec<f32> = (0..count).map(|_| rng.f32()).collect();
            json!({"name": input["name"], "datatype": input["datatype"], "shape": shape, "data": data})
        })
        .collect();
    json!({ "inputs": inputs })
}

/// The same random inputs as Triton binary tensors: (body, JSON header length).
pub fn binary_request(metadata: &Value, batch: usize, seed: u64) -> (Vec<u8>, usize) {
    let request = json_request(metadata, batch, seed);
    let mut inputs = Vec::new();
    let mut blobs: Vec<u8> = Vec::new();
    for input in request["inputs"].as_array().expect("inputs") {
        let values: Vec<f32> = input["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        inputs.push(
            json!({"name": input["name"], "datatype": "FP32", "shape": input["shape"],
            "parameters": {"binary_data_size": values.len() * 4}}),
        );
        blobs.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    let mut body = serde_json::to_vec(&json!({ "inputs": inputs })).expect("header");
    let header_length = body.len();
    body.extend_from_slice(&blobs);
    (body, header_length)
}

pub fn concrete_shape(shape: &Value, batch: usize) -> Vec<usize> {
    shape
        .as_array()
        .expect("shape")
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = d.as_i64().expect("dim");
            if i == 0 && d == -1 {
                batch
            } else {
                d.max(1) as usize
            }
        })
        .collect()
}

/// Sum of a metric's samples whose labels contain every `label="value"` given.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name) && labels.iter().all(|label| l.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
