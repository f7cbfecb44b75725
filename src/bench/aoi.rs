//! Workloads for `linescan bench aoi`: boards streamed over HTTP to `/v1/inspect/{board}` with
//! templates registered first, or the same pipeline in-process. Test images stay encoded (decode
//! is part of what is measured); templates are prepared before measuring, as on a line.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::aoi::deeppcb;
use crate::aoi::pipeline::{Inspector, PreparedTemplate, StageTimings};
use crate::aoi::synthetic::{self, DefectKind};
use crate::bench::load::{Outcome, Workload, error_text};

/// One board of the workload: its name, encoded template and encoded test image.
pub struct BoardImages {
    pub board: String,
    pub template: Bytes,
    pub test: Bytes,
}

/// Board names of this run: a prefix of its own, so that a benchmark against a live server
/// neither replaces a line's templates nor meets another run's. The prefix holds a random run
/// id, not the process id, which repeats across containers (PID 1) and would let two runs
/// share, replace and delete each other's templates.
fn board_name(name: &str) -> String {
    format!("{}{name}", run_prefix())
}

fn run_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| format!("bench-{:08x}-", fastrand::u32(..)))
}

/// Real DeepPCB-format pairs from a list, or synthetic boards when no list is given.
pub fn load_boards(
    list: Option<&Path>,
    root: Option<&Path>,
    limit: usize,
) -> anyhow::Result<Vec<BoardImages>> {
    match (list, root) {
        (Some(list), Some(root)) => deeppcb::read_list(list, root)?
            .into_iter()
            .take(limit)
            .map(|pair| {
                let read = |p: &Path| {
                    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
                };
                Ok(BoardImages {
                    board: board_name(&format!("pcb-{}", pair.id)),
                    template: Bytes::from(read(&pair.template)?),
                    test: Bytes::from(read(&pair.test)?),
                })
            })
            .collect(),
        (None, None) => Ok((0..limit.min(16))
            .map(|i| {
                let defects = &DefectKind::ALL[..i % 7];
                let board = synthetic::board(defects, ((i % 3) as i64 - 1, 0));
                BoardImages {
                    board: board_name(&format!("synthetic-{i}")),
                    template: Bytes::from(synthetic::encode(
                        &board.template,
                        image::ImageFormat::Png,
                    )),
                    test: Bytes::from(synthetic::encode(&board.test, image::ImageFormat::Jpeg)),
                }
            })
            .collect()),
        _ => anyhow::bail!("give both --list and --root, or neither (synthetic boards)"),
    }
}

fn stage_outcome(timings: &StageTimings) -> Vec<(&'static str, Duration)> {
    StageTimings::STAGES
        .iter()
        .zip(timings.values())
        .map(|(stage, ms)| (*stage, Duration::from_secs_f64(ms / 1000.0)))
        .collect()
}

pub struct HttpAoiWorkload {
    url: String,
    boards: Vec<BoardImages>,
}

/// Deletes the templates a run registered; stops at the first failure and says how many are
/// left (a server that went away would fail every one the same way).
pub async fn remove_templates(client: &reqwest::Client, url: &str, boards: &[String]) {
    for (done, board) in boards.iter().enumerate() {
        // A bounded wait: a server that stopped answering must not hold the exit.
        let deleted = client
            .delete(format!("{url}/v1/templates/{board}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let failure = match deleted {
            Ok(response) if response.status().is_success() || response.status() == 404 => continue,
            Ok(response) => format!("it answered {}", response.status()),
            Err(error) => crate::bench::load::error_chain(&error),
        };
        eprintln!(
            "could not delete the benchmark's templates from {url}: {} of {} left, named \
             {}* ({failure})",
            boards.len() - done,
            boards.len(),
            run_prefix()
        );
        return;
    }
}

impl HttpAoiWorkload {
    /// Registers every board's template on the server (none may exist there already), adding
    /// each name to `registered` as its upload starts.
    pub async fn prepare(
        client: &reqwest::Client,
        url: &str,
        boards: Vec<BoardImages>,
        registered: &std::sync::Mutex<Vec<String>>,
    ) -> anyhow::Result<HttpAoiWorkload> {
        for board in &boards {
            let templates = format!("{url}/v1/templates/{}", board.board);
            let existing = client
                .get(&templates)
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?;
            anyhow::ensure!(
                existing.status() == reqwest::StatusCode::NOT_FOUND,
                "{templates} answered {} before the benchmark registered it; it does not replace \
                 or delete a template it did not make",
                existing.status()
            );
            // Recorded before the upload: an upload cut short (Ctrl-C) may still land.
            registered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(board.board.clone());
            let response = client
                .put(&templates)
                .body(board.template.clone())
                .send()
                .await
                .with_context(|| format!("cannot reach {url}"))?;
            anyhow::ensure!(
                response.status().is_success(),
                "registering {} answered {}: {}",
                board.board,
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(HttpAoiWorkload {
            url: url.to_string(),
            boards,
        })
    }
}

impl Workload for HttpAoiWorkload {
    fn send<'a>(&'a self, client: &'a reqwest::Client, sequence: u64) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let board = &self.boards[sequence as usize % self.boards.len()];
            let sent = client
                .post(format!("{}/v1/inspect/{}", self.url, board.board))
                .body(board.test.clone())
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(error) => return Outcome::connection_failed(&error),
            };
            let status = response.status();
            let bytes = response.bytes().await.unwrap_or_default();
            let body: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
            let timings = body
                .as_ref()
                .and_then(|b| serde_json::from_value::<StageTimings>(b["timings_ms"].clone()).ok());
            let failed = !status.is_success() || timings.is_none();
            Outcome {
                failure: failed.then(|| status.as_u16().to_string()),
                detail: failed.then(|| error_text(&bytes)),
                stages: timings.as_ref().map(stage_outcome).unwrap_or_default(),
                batch_rows: None,
            }
        })
    }

    fn rows(&self) -> usize {
        1
    }
    fn row_name(&self) -> &'static str {
        "board"
    }

    fn describe(&self) -> (String, String) {
        (
            format!("{}/v1/inspect", self.url),
            format!("aoi ({} boards)", self.boards.len()),
        )
    }

    fn server(&self) -> Option<&str> {
        Some(&self.url)
    }
}

pub struct InProcessAoiWorkload {
    inspector: Arc<Inspector>,
    boards: Vec<(Arc<PreparedTemplate>, Bytes)>,
}

impl InProcessAoiWorkload {
    pub fn prepare(
        inspector: Arc<Inspector>,
        boards: Vec<BoardImages>,
    ) -> anyhow::Result<InProcessAoiWorkload> {
        let boards = boards
            .into_iter()
            .map(|b| {
                let gray = inspector.decode(&b.template)?;
                Ok((Arc::new(inspector.prepare_template(&gray)), b.test))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(InProcessAoiWorkload { inspector, boards })
    }
}

impl Workload for InProcessAoiWorkload {
    fn send<'a>(&'a self, _client: &'a reqwest::Client, sequence: u64) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let (template, test) = self.boards[sequence as usize % self.boards.len()].clone();
            let inspector = self.inspector.clone();
            let prepared =
                tokio::task::spawn_blocking(move || inspector.prepare(&test, &template)).await;
            let inspection = match prepared {
                Ok(Ok(board)) => {
                    self.inspector
                        .finish(board, self.inspector.params.score_threshold)
                        .await
                }
                Ok(Err(error)) => Err(error),
                Err(_) => {
                    return Outcome {
                        failure: Some("panic".into()),
                        ..Outcome::default()
                    };
                }
            };
            match inspection {
                Ok(inspection) => Outcome {
                    stages: stage_outcome(&inspection.timings_ms),
                    ..Outcome::default()
                },
                Err(error) => Outcome {
                    failure: Some("error".into()),
                    detail: Some(error.to_string()),
                    ..Outcome::default()
                },
            }
        })
    }

    fn rows(&self) -> usize {
        1
    }
    fn row_name(&self) -> &'static str {
        "board"
    }

    fn describe(&self) -> (String, String) {
        (
            "in-process".into(),
            format!("aoi ({} boards)", self.boards.len()),
        )
    }

    fn server(&self) -> Option<&str> {
        None
    }
}
