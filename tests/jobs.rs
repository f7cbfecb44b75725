//! Fleet jobs over real HTTP and offline: submission (body, multipart, server-side path),
//! progress, results as HDF5/CSV/JSON, cancellation, restarts, bad archives, the N-CMAPSS layout,
//! shards that merge to the one-run result, and `linescan rul cmapss`.

mod common;
mod fleet;

use std::path::{Path, PathBuf};

use common::{Repository, Server, run_cli};
use fleet::*;
use linescan::jobs::synthetic::{self, XS_VARS};
use serde_json::{Value, json};

struct Setup {
    repository: Repository,
    data: tempfile::TempDir,
    files: tempfile::TempDir,
}

fn setup() -> Setup {
    Setup {
        repository: Repository::with_models(&[RUL_MODEL, ANOMALY_MODEL]),
        data: tempfile::tempdir().unwrap(),
        files: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn server(&self, extra: &[&str]) -> Server {
        let mut args = vec!["--data-dir", self.data.path().to_str().unwrap()];
        args.extend_from_slice(extra);
        Server::start(self.repository.path(), &args)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.files.path().join(name)
    }

    /// `linescan job run` on this repository; panics with its output on failure.
    fn job_run(&self, archive: &Path, out: &Path, extra: &[&str]) -> String {
        job_run(self.repository.path(), archive, out, extra)
    }
}

async fn get(url: String) -> reqwest::Response {
    reqwest::get(url).await.expect("GET")
}

/// `DELETE /v1/jobs/{job}` (`job` may carry a query), answered 200: its JSON.
async fn delete_job(server_url: &str, job: &str) -> Value {
    let response = reqwest::Client::new()
        .delete(format!("{server_url}/v1/jobs/{job}"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(response.status(), 200, "DELETE {job}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn job_lifecycle_with_results_in_every_format() {
    let setup = setup();
    let server = setup.server(&[]);
    let table = small_fleet();
    let archive = write_generic(setup.files.path(), "fleet.h5", &shuffled(&table));
    let id = submit_file(&server.url, &archive).await;
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["progress"], 1.0);
    assert_eq!(status["rows_done"], table.rows() as u64);
    assert_eq!(status["rows_total"], table.rows() as u64);
    assert_eq!(status["units"], 5);
    assert!(status["rows_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(status["model"], RUL_MODEL);
    assert!(status["error"].is_null());
    // The run ended and its rows were scored, in /metrics too.
    let metrics = server.metrics_text().await;
    let model = format!("model=\"{RUL_MODEL}\"");
    assert_eq!(
        common::metric(
            &metrics,
            "linescan_jobs_ended_total",
            &[&model, "state=\"done\""]
        ),
        1.0,
        "{metrics}"
    );
    // No job failed, and the series says so (it exists at 0 from the start).
    let failed = format!("linescan_jobs_ended_total{{{model},state=\"failed\"}} 0");
    assert!(
        metrics.lines().any(|l| l == failed),
        "no {failed} in {metrics}"
    );
    assert_eq!(
        common::metric(&metrics, "linescan_job_rows_total", &[&model]),
        table.rows() as f64
    );

    // HDF5 (the default format).
    let response = get(format!("{}/v1/jobs/{id}/result", server.url)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-hdf5");
    let h5 = setup.file("result.h5");
    std::fs::write(&h5, response.bytes().await.unwrap()).unwrap();
    let rows = read_result(&h5);
    assert_eq!(rows.unit, table.unit);
    assert_eq!(rows.cycle, table.cycle);
    // Every row is scored, the short unit (12 cycles) and the first cycles of each unit padded.
    let short: Vec<u16> = (0..table.rows())
        .filter(|r| table.unit[*r] == 12)
        .map(|r| rows.padded[r])
        .collect();
    assert_eq!(short, (18..=29).rev().collect::<Vec<u16>>());
    assert!(rows.health.iter().all(|h| (0.0..=100.0).contains(h)));
    assert!(rows.anomaly.iter().all(|a| (0.0..=1.0).contains(a)));
    assert!(rows.risk.iter().all(|r| *r <= 2));
    assert!(
        rows.rul_sigma
            .iter()
            .zip(&rows.rul_std)
            .all(|(s, d)| s >= d)
    );
    // Degradation shows: unit 14's RUL falls to its end, where it is at risk.
    let unit14: Vec<usize> = (0..table.rows()).filter(|r| table.unit[*r] == 14).collect();
    let last = *unit14.last().unwrap();
    assert!(rows.rul[unit14[40]] > rows.rul[last] + 40.0);
    assert_eq!(rows.risk[last], 2, "critical at failure");
    let file = hdf5::File::open(&h5).unwrap();
    let model: hdf5::types::VarLenUnicode = file.attr("model").unwrap().read_scalar().unwrap();
    assert_eq!(model.as_str(), RUL_MODEL);
    let version: u64 = file.attr("model_version").unwrap().read_scalar().unwrap();
    assert_eq!(version, 1);
    assert_eq!(
        file.dataset("units/unit")
            .unwrap()
            .read_raw::<i64>()
            .unwrap(),
        vec![11, 12, 13, 14, 15]
    );

    // CSV rows and units, JSON; the models that scored them come as headers.
    let csv = get(format!("{}/v1/jobs/{id}/result?format=csv", server.url)).await;
    let header = |name: &str| csv.headers()[name].to_str().unwrap().to_string();
    assert_eq!(header("x-linescan-model"), RUL_MODEL);
    assert_eq!(header("x-linescan-model-version"), "1");
    assert_eq!(header("x-linescan-anomaly-model"), ANOMALY_MODEL);
    assert_eq!(header("x-linescan-anomaly-model-version"), "1");
    let csv = csv.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "unit,cycle,rul,rul_std,rul_sigma,risk,anomaly,health,padded,held"
    );
    assert_eq!(lines.len(), table.rows() + 1);
    let fields: Vec<&str> = lines[last + 1].split(',').collect();
    assert_eq!(fields[0], "14");
    assert_eq!(fields[1], "300");
    assert_eq!(fields[2].parse::<f32>().unwrap(), rows.rul[last]);
    assert_eq!(fields[5], "critical");
    let units_csv = get(format!(
        "{}/v1/jobs/{id}/result?format=csv&view=units",
        server.url
    ))
    .await
    .text()
    .await
    .unwrap();
    assert_eq!(units_csv.lines().count(), 6);
    assert!(units_csv.lines().nth(4).unwrap().starts_with("14,300,"));
    let json: Value = get(format!("{}/v1/jobs/{id}/result?format=json", server.url))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(json["meta"]["model"], RUL_MODEL);
    assert_eq!(json["rows"].as_array().unwrap().len(), table.rows());
    assert_eq!(
        json["rows"][last]["rul"].as_f64().unwrap() as f32,
        rows.rul[last]
    );
    assert_eq!(json["units"][3]["rows"], 300);
    assert_eq!(
        json["units"][3]["health"].as_f64().unwrap() as f32,
        rows.health[last]
    );
    let bad = get(format!("{}/v1/jobs/{id}/result?format=xml", server.url)).await;
    assert_eq!(bad.status(), 400);
    let message = bad.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains(r#"format="xml" is not one of h5, csv, json"#),
        "{message}"
    );
    let units_json = get(format!(
        "{}/v1/jobs/{id}/result?format=json&view=units",
        server.url
    ))
    .await;
    assert_eq!(units_json.status(), 422);
    assert!(
        units_json
            .text()
            .await
            .unwrap()
            .contains("hold both tables")
    );
    assert_eq!(
        get(format!("{}/v1/jobs/nope", server.url)).await.status(),
        404
    );

    // The offline command runs the same code path: same numbers.
    let offline = setup.file("offline.h5");
    setup.job_run(&archive, &offline, &[]);
    let offline_rows = read_result(&offline);
    assert_eq!(offline_rows.rul, rows.rul);
    assert_eq!(offline_rows.health, rows.health);

    // Listing, then DELETE of a finished job leaves it alone unless purged.
    let list: Value = get(format!("{}/v1/jobs", server.url))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["jobs"][0]["id"], id.as_str());
    let kept = delete_job(&server.url, &id).await;
    assert_eq!(kept["state"], "done");
    let purged = delete_job(&server.url, &format!("{id}?purge=true")).await;
    assert_eq!(
        (&purged["purged"], &purged["result"]),
        (&Value::Bool(true), &Value::Null),
        "no link to a result that is gone: {purged}"
    );
    assert_eq!(
        get(format!("{}/v1/jobs/{id}", server.url)).await.status(),
        404
    );
    assert!(!setup.data.path().join("jobs").join(&id).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_during_a_result_download_removes_the_job_whole() {
    let setup = setup();
    let server = setup.server(&[]);
    let archive = write_generic(setup.files.path(), "fleet.h5", &fleet_of(40, 3));
    // The JSON export takes long enough that the purge lands while it runs (before the purge
    // renamed the folder away: 500 "Directory not empty" in 4 of 6 tries, the job half removed).
    for round in 0..4 {
        let id = submit_file(&server.url, &archive).await;
        let status = wait_job(&server.url, &id, is_final).await;
        assert_eq!(status["state"], "done", "{status}");
        let download = tokio::spawn(get(format!(
            "{}/v1/jobs/{id}/result?format=json",
            server.url
        )));
        tokio::time::sleep(std::time::Duration::from_millis(round * 5)).await;
        let purged = delete_job(&server.url, &format!("{id}?purge=true")).await;
        assert_eq!(purged["purged"], true, "{purged}");
        let response = download.await.unwrap();
        match response.status().as_u16() {
            200 => {
                let result: Value = response.json().await.unwrap();
                assert!(result["meta"].is_object());
            }
            // Removed while it was read, or before the download looked the job up.
            404 => {
                let error: Value = response.json().await.unwrap();
                assert!(
                    common::error_message(&error).starts_with(&format!("no job {id}")),
                    "{error}"
                );
            }
            other => panic!(
                "the download answered {other}: {}",
                response.text().await.unwrap()
            ),
        }
        assert_eq!(
            get(format!("{}/v1/jobs/{id}", server.url)).await.status(),
            404
        );
        let left: Vec<_> = std::fs::read_dir(setup.data.path().join("jobs"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn a_repeated_column_the_model_does_not_use_is_ignored() {
    let setup = setup();
    let table = small_fleet();
    let mut repeated = table.clone();
    assert_eq!(repeated.columns[..2], ["setting_1", "setting_2"]);
    repeated.columns[0] = "x".into();
    repeated.columns[1] = "x".into();
    let plain = write_generic(setup.files.path(), "plain.h5", &table);
    let archive = write_generic(setup.files.path(), "repeated.h5", &repeated);
    let (expected, got) = (setup.file("plain.h5.out.h5"), setup.file("repeated.out.h5"));
    setup.job_run(&plain, &expected, &[]);
    setup.job_run(&archive, &got, &[]);
    assert_eq!(read_result(&got).rul, read_result(&expected).rul);
    let check = run_cli(&["job", "check", archive.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_and_server_side_path_submissions() {
    let setup = setup();
    let allowed = tempfile::tempdir().unwrap();
    let table = small_fleet();
    let inside = write_generic(allowed.path(), "inside.h5", &table);
    let outside = write_generic(setup.files.path(), "outside.h5", &table);

    // Paths are refused unless --jobs-allow-path is given.
    let server = setup.server(&[]);
    let client = reqwest::Client::new();
    let refused = client
        .post(format!("{}/v1/jobs", server.url))
        .json(&serde_json::json!({"path": inside}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    assert!(refused.text().await.unwrap().contains("--jobs-allow-path"));

    // Multipart: the one file part is the archive. Other fields and a second file are refused
    // by name rather than dropped unread.
    let boundary = "linescan-test-boundary";
    let archive_bytes = std::fs::read(&inside).unwrap();
    let form = |parts: &[(&str, Option<&str>, &[u8])]| {
        let mut body = Vec::new();
        for (name, filename, content) in parts {
            let file = filename.map_or(String::new(), |f| format!("; filename=\"{f}\""));
            body.extend(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n"
                )
                .into_bytes(),
            );
            body.extend_from_slice(content);
            body.extend_from_slice(b"\r\n");
        }
        body.extend(format!("--{boundary}--\r\n").into_bytes());
        body
    };
    let post_form = |body: Vec<u8>| {
        client
            .post(format!("{}/v1/jobs?warning=100&critical=50", server.url))
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
    };
    for (parts, fragment) in [
        (
            vec![
                ("model", None, b"rul_x".as_slice()),
                ("archive", Some("fleet-a.h5"), archive_bytes.as_slice()),
            ],
            "multipart field \"model\" is not taken",
        ),
        (
            vec![
                ("archive", Some("fleet-a.h5"), archive_bytes.as_slice()),
                ("second", Some("fleet-b.h5"), archive_bytes.as_slice()),
            ],
            "got a second file (field \"second\")",
        ),
    ] {
        let response = post_form(form(&parts)).await.unwrap();
        assert_eq!(response.status(), 422);
        let answer: Value = response.json().await.unwrap();
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(fragment), "{error}");
    }
    let listed: Value = client
        .get(format!("{}/v1/jobs", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["jobs"],
        serde_json::json!([]),
        "refused forms leave no job"
    );
    let response = post_form(form(&[(
        "archive",
        Some("fleet-a.h5"),
        archive_bytes.as_slice(),
    )]))
    .await
    .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["source"], "fleet-a.h5");
    assert_eq!(status["settings"]["warning"], 100.0);
    drop(server);

    let server = setup.server(&["--jobs-allow-path", allowed.path().to_str().unwrap()]);
    for (path, fragment) in [
        (outside.to_str().unwrap().to_string(), "outside the folder"),
        // Whether a file outside exists is not told.
        ("../outside.h5".to_string(), "outside the folder"),
        ("/no/such/file.h5".to_string(), "outside the folder"),
        ("missing.h5".to_string(), "cannot be read"),
        ("sub/../missing.h5".to_string(), "cannot be read"),
    ] {
        let response = client
            .post(format!("{}/v1/jobs", server.url))
            .json(&serde_json::json!({"path": path}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{path}");
        let text = response.text().await.unwrap();
        assert!(text.contains(fragment), "{path}: {text}");
    }
    let id = submit_path(
        &server.url,
        serde_json::json!({"path": "inside.h5", "model": RUL_MODEL}),
    )
    .await;
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["rows_done"], table.rows() as u64);
    // Unknown models and empty bodies are refused at submission.
    let (code, body) =
        submit_bytes(&server.url, std::fs::read(&inside).unwrap(), "?model=rul_x").await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = submit_bytes(&server.url, Vec::new(), "").await;
    assert_eq!(code, 422);
    // A name that cannot be stored is refused at submission, in the query or the body.
    let (code, body) =
        submit_bytes(&server.url, std::fs::read(&inside).unwrap(), "?name=a%00b").await;
    assert_eq!(code, 422, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("control character"), "{body}");
    // An option in both the query and the body must agree.
    for (query, body, fragment) in [
        (
            "?missing=hold",
            serde_json::json!({"path": "inside.h5", "missing": "fail"}),
            "\"missing\" is \"hold\" in the query and \"fail\" in the body",
        ),
        (
            "",
            serde_json::json!({"path": "inside.h5", "name": "a\u{0}b"}),
            "\"name\" holds the control character",
        ),
    ] {
        let response = client
            .post(format!("{}/v1/jobs{query}", server.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{body}");
        let answer: Value = response.json().await.unwrap();
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(fragment), "{body}: {error}");
    }
    // JSON that does not parse is a 400; JSON of the wrong shape a 422 in the client's words.
    for (body, expected, fragment) in [
        ("{\"path\": ", 400, "not valid JSON"),
        ("[\"inside.h5\"]", 422, "a JSON submission is {\"path\""),
    ] {
        let response = client
            .post(format!("{}/v1/jobs", server.url))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{body}");
        let answer: Value = response.json().await.unwrap();
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(fragment), "{body}: {error}");
        assert!(!error.contains("struct"), "{body}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_and_cancellation() {
    let setup = setup();
    // One worker, small chunks with a pause after each: the first job runs for about 15 s,
    // so it is still running when purged below, however slow the machine; a cancel lands at
    // its next chunk.
    let server = setup.server(&[
        "--job-workers",
        "1",
        "--job-chunk-rows",
        "1000",
        "--job-throttle-ms",
        "1000",
        "--job-max-pending",
        "2",
    ]);
    let table = fleet_of(60, 3);
    let archive = write_generic(setup.files.path(), "big.h5", &table);
    let running = submit_file(&server.url, &archive).await;
    let queued = submit_file(&server.url, &archive).await;

    // A third waiting job is one more than --job-max-pending: refused, and nothing is stored.
    let response = reqwest::Client::new()
        .post(format!("{}/v1/jobs", server.url))
        .body(std::fs::read(&archive).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "10");
    let body: Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(
            "2 jobs are queued or running, the most this server takes (--job-max-pending"
        ),
        "{error}"
    );
    assert_eq!(
        job_folders(setup.data.path()),
        2,
        "the refused upload left a job folder"
    );

    // The queued job is cancelled at once.
    let cancelled = delete_job(&server.url, &queued).await;
    assert_eq!(cancelled["state"], "cancelled");
    // A queued job purged in the same call is stopped at once, so it goes with its files.
    let purged_at_once = submit_file(&server.url, &archive).await;
    let response = delete_job(&server.url, &format!("{purged_at_once}?purge=true")).await;
    assert_eq!(
        (&response["state"], &response["purged"]),
        (&json!("cancelled"), &json!(true)),
        "{response}"
    );
    assert!(
        !setup
            .data
            .path()
            .join("jobs")
            .join(&purged_at_once)
            .exists()
    );
    let gone = get(format!("{}/v1/jobs/{purged_at_once}", server.url)).await;
    assert_eq!(gone.status(), 404);

    // The running one reports progress, then stops at its next chunk.
    let status = wait_job(&server.url, &running, |s| {
        s["state"] == "running" && s["progress"].as_f64().unwrap() > 0.0
    })
    .await;
    let progress = status["progress"].as_f64().unwrap();
    assert!(progress > 0.0 && progress < 1.0, "{status}");
    assert!(status["rows_per_second"].as_f64().unwrap() > 0.0);
    let not_ready = get(format!("{}/v1/jobs/{running}/result", server.url)).await;
    assert_eq!(not_ready.status(), 503);
    assert!(not_ready.headers().contains_key("retry-after"));
    // A query that can never be served is refused at once, not "retry later".
    let never = get(format!(
        "{}/v1/jobs/{running}/result?format=json&view=units",
        server.url
    ))
    .await;
    assert_eq!(never.status(), 422);
    // A purge of a job still running cancels it and says it purged nothing yet.
    let response = delete_job(&server.url, &format!("{running}?purge=true")).await;
    assert_eq!(response["purged"], false, "{response}");
    // The answer says the stop is on its way, not only that the job still runs.
    assert_eq!(response["cancel_requested"], true, "{response}");
    let status = wait_job(&server.url, &running, is_final).await;
    assert_eq!(status["state"], "cancelled", "{status}");
    let gone = get(format!("{}/v1/jobs/{running}/result", server.url)).await;
    assert_eq!(gone.status(), 404);
    assert!(
        !setup
            .data
            .path()
            .join("jobs")
            .join(&running)
            .join("result.h5")
            .exists()
    );
    let status = wait_job(&server.url, &queued, is_final).await;
    assert_eq!(status["state"], "cancelled");
    assert_eq!(
        status["attempts"], 0,
        "a job cancelled while queued never runs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_survive_restarts() {
    let setup = setup();
    let table = fleet_of(40, 5);
    let archive = write_generic(setup.files.path(), "fleet.h5", &table);
    let expected = setup.file("expected.h5");
    setup.job_run(&archive, &expected, &[]);

    // Killed mid-job: the next server re-queues it from the beginning.
    let throttled = ["--job-chunk-rows", "500", "--job-throttle-ms", "100"];
    let server = setup.server(&throttled);
    let id = submit_file(&server.url, &archive).await;
    wait_job(&server.url, &id, |s| {
        s["state"] == "running" && s["rows_done"].as_u64().unwrap() > 0
    })
    .await;
    drop(server); // SIGKILL
    let state: Value = serde_json::from_slice(
        &std::fs::read(setup.data.path().join("jobs").join(&id).join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["state"], "running", "left as it was when killed");
    let server = setup.server(&[]);
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(
        (&status["attempts"], &status["runs_lost"]),
        (&json!(2), &json!(1))
    );
    let result = setup.data.path().join("jobs").join(&id).join("result.h5");
    assert_eq!(read_result(&result).rul, read_result(&expected).rul);
    drop(server); // one server per data folder
    let killed = id;

    // A clean stop (SIGTERM) leaves a running job queued for the next start.
    let mut server = setup.server(&throttled);
    let id = submit_file(&server.url, &archive).await;
    wait_job(&server.url, &id, |s| s["state"] == "running").await;
    server.terminate();
    assert!(
        server
            .wait_exit(std::time::Duration::from_secs(60))
            .success()
    );
    let state: Value = serde_json::from_slice(
        &std::fs::read(setup.data.path().join("jobs").join(&id).join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["state"], "queued");
    let server = setup.server(&[]);
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    // Finished jobs stay finished across restarts.
    drop(server);
    let server = setup.server(&[]);
    let list: Value = get(format!("{}/v1/jobs", server.url))
        .await
        .json()
        .await
        .unwrap();
    let mut listed: Vec<(String, String)> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_str().unwrap().into(), j["state"].to_string()))
        .collect();
    listed.sort();
    let mut expected_jobs = vec![
        (killed.clone(), "\"done\"".to_string()),
        (id.clone(), "\"done\"".to_string()),
    ];
    expected_jobs.sort();
    assert_eq!(
        listed, expected_jobs,
        "both jobs, finished, after a restart"
    );
    drop(server);

    // A job cancelled while it runs stays cancelled, even when the server dies before the
    // worker reaches its next chunk (2 s away here).
    let slow = ["--job-chunk-rows", "500", "--job-throttle-ms", "2000"];
    let server = setup.server(&slow);
    let id = submit_file(&server.url, &archive).await;
    wait_job(&server.url, &id, |s| s["state"] == "running").await;
    delete_job(&server.url, &id).await;
    drop(server); // SIGKILL
    let server = setup.server(&[]);
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "cancelled", "{status}");
    drop(server);

    // A server-side path job is not run again by a start whose --jobs-allow-path no longer
    // covers its file: it fails with the reason.
    let allowed = tempfile::tempdir().unwrap();
    write_generic(allowed.path(), "inside.h5", &table);
    let mut args = slow.to_vec();
    args.extend(["--jobs-allow-path", allowed.path().to_str().unwrap()]);
    let server = setup.server(&args);
    let id = submit_path(&server.url, serde_json::json!({"path": "inside.h5"})).await;
    wait_job(&server.url, &id, |s| s["state"] == "running").await;
    drop(server); // SIGKILL
    let server = setup.server(&[]);
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("--jobs-allow-path"), "{error}");
    drop(server);

    // A job the server dies under three times (an archive that crashes the HDF5 library would
    // do it at every start) is failed at the next start instead of run again.
    let mut id = String::new();
    for lost in 1..=3 {
        let server = setup.server(&throttled);
        if lost == 1 {
            id = submit_file(&server.url, &archive).await;
        }
        let status = wait_job(&server.url, &id, |s| {
            s["state"] == "running" && s["rows_done"].as_u64().unwrap() > 0
        })
        .await;
        assert_eq!(status["runs_lost"], lost - 1, "{status}");
        drop(server); // SIGKILL
    }
    let server = setup.server(&[]);
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "failed", "{status}");
    assert_eq!(status["runs_lost"], 3, "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("stopped 3 times while running it"),
        "{error}"
    );
    drop(server);

    // An exit its operator asked for (SIGQUIT, or a second stop signal) is not a run lost.
    let mut server = setup.server(&throttled);
    let id = submit_file(&server.url, &archive).await;
    wait_job(&server.url, &id, |s| {
        s["state"] == "running" && s["rows_done"].as_u64().unwrap() > 0
    })
    .await;
    server.signal("QUIT");
    assert_eq!(
        server.wait_exit(std::time::Duration::from_secs(10)).code(),
        Some(130)
    );
    let server = setup.server(&[]);
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["runs_lost"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_job_reads_only_the_file_it_was_given() {
    let setup = setup();
    let table = fleet_of(20, 5);
    let busy = write_generic(setup.files.path(), "busy.h5", &table);
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(allowed.path().join("sub")).unwrap();
    write_generic(&allowed.path().join("sub"), "x.h5", &table);
    write_generic(outside.path(), "x.h5", &fleet_of(3, 5));
    let slow = [
        "--job-workers",
        "1",
        "--job-chunk-rows",
        "100",
        "--job-throttle-ms",
        "2000",
    ];
    let mut args = slow.to_vec();
    args.extend(["--jobs-allow-path", allowed.path().to_str().unwrap()]);
    let server = setup.server(&args);
    // The one worker is busy, so the path job waits in the queue.
    let blocker = submit_file(&server.url, &busy).await;
    wait_job(&server.url, &blocker, |s| s["state"] == "running").await;
    let id = submit_path(&server.url, json!({"path": "sub/x.h5"})).await;
    // Its folder is swapped for a link to another one before it runs.
    let sub = allowed.path().join("sub");
    std::fs::rename(&sub, allowed.path().join("sub.before")).unwrap();
    std::os::unix::fs::symlink(outside.path(), &sub).unwrap();
    delete_job(&server.url, &blocker).await;
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("is outside the folder jobs may read") && error.contains("submit it again"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_are_removed_after_the_retention_period() {
    let setup = setup();
    let archive = write_generic(setup.files.path(), "fleet.h5", &small_fleet());
    let long = write_generic(setup.files.path(), "long.h5", &fleet_of(40, 5));
    let (done, unfinished) = {
        let server = setup.server(&["--job-chunk-rows", "500", "--job-throttle-ms", "1000"]);
        let done = submit_file(&server.url, &archive).await;
        assert_eq!(
            wait_job(&server.url, &done, is_final).await["state"],
            "done"
        );
        // Killed while running: older than the retention at the next start, but unfinished.
        let unfinished = submit_file(&server.url, &long).await;
        wait_job(&server.url, &unfinished, |s| s["state"] == "running").await;
        (done, unfinished)
    };
    // 0.0002 hours = 0.72 s: both jobs were submitted longer ago than that once the server is
    // back, and the first one ended longer ago.
    std::thread::sleep(std::time::Duration::from_millis(800));
    let server = setup.server(&["--job-retention-hours", "0.0002"]);
    assert_eq!(
        get(format!("{}/v1/jobs/{done}", server.url)).await.status(),
        404
    );
    assert!(!setup.data.path().join("jobs").join(&done).exists());
    // The retention counts from a job's end: the unfinished one runs again to its end.
    let status = wait_job(&server.url, &unfinished, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_job_files_are_recovered_at_start() {
    let setup = setup();
    let archive = write_generic(setup.files.path(), "fleet.h5", &fleet_of(12, 9));
    let expected = setup.file("expected.h5");
    setup.job_run(&archive, &expected, &[]);
    let server = setup.server(&[]);
    let truncated = submit_file(&server.url, &archive).await;
    let unreadable = submit_file(&server.url, &archive).await;
    let whole = submit_file(&server.url, &archive).await;
    for id in [&truncated, &unreadable, &whole] {
        assert_eq!(wait_job(&server.url, id, is_final).await["state"], "done");
    }
    // A result cut short while the server runs is refused, not served as whole.
    let jobs = setup.data.path().join("jobs");
    let result = jobs.join(&truncated).join("result.h5");
    let length = std::fs::metadata(&result).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&result)
        .unwrap()
        .set_len(length / 2)
        .unwrap();
    for format in ["h5", "csv"] {
        let answer = reqwest::get(format!(
            "{}/v1/jobs/{truncated}/result?format={format}",
            server.url
        ))
        .await
        .unwrap();
        assert_eq!(answer.status(), 500, "{format}");
        let message = answer.text().await.unwrap();
        assert!(
            message.contains("is damaged") && message.contains("runs the job again"),
            "{format}: {message}"
        );
    }
    drop(server);
    // That result, a state file garbled while the server was down, and a CSV export that the
    // killed server left unfinished beside a whole result.
    std::fs::write(jobs.join(&unreadable).join("state.json"), b"{\"id\": ").unwrap();
    let export = jobs.join(&whole).join("result.csv.partial");
    std::fs::write(&export, b"unit,cycle,rul\n1,1,").unwrap();

    let server = setup.server(&[]);
    // The unfinished export is removed; the whole result is kept and served, not run again.
    assert!(!export.exists());
    let status = wait_job(&server.url, &whole, is_final).await;
    assert_eq!(
        (&status["state"], &status["attempts"]),
        (&json!("done"), &json!(1))
    );
    let csv = reqwest::get(format!("{}/v1/jobs/{whole}/result?format=csv", server.url))
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(csv.text().await.unwrap().starts_with("unit,cycle,rul,"));
    // The job whose result was damaged runs again and gives the same result.
    let status = wait_job(&server.url, &truncated, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["attempts"], 2);
    assert_eq!(read_result(&result).rul, read_result(&expected).rul);
    // The job whose state was lost is listed as failed, says why, and can be purged.
    let (code, status) = common::get_json(&format!("{}/v1/jobs/{unreadable}", server.url)).await;
    assert_eq!(code, 200);
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("could not be read") && error.contains("state.json.damaged"),
        "{error}"
    );
    assert!(jobs.join(&unreadable).join("state.json.damaged").exists());
    delete_job(&server.url, &format!("{unreadable}?purge=true")).await;
    assert!(!jobs.join(&unreadable).exists());
}

/// Archives that are wrong in every way the issue lists, each with what its failure must say.
fn bad_archives(setup: &Setup) -> Vec<(&'static str, Vec<u8>, Vec<&'static str>)> {
    let table = small_fleet();
    let good = write_generic(setup.files.path(), "good.h5", &table);
    let good_bytes = std::fs::read(&good).unwrap();
    let mut cases = Vec::new();
    cases.push((
        "not hdf5",
        b"unit,cycle,s_2\n1,1,642.1\n".to_vec(),
        vec!["not an HDF5 file"],
    ));
    cases.push((
        "truncated",
        good_bytes[..good_bytes.len() / 2].to_vec(),
        vec!["is truncated: it holds"],
    ));
    let write = |name: &str, build: &dyn Fn(&hdf5::File)| {
        let path = setup.file(name);
        let file = hdf5::File::create(&path).unwrap();
        build(&file);
        drop(file);
        std::fs::read(path).unwrap()
    };
    let n = table.rows();
    let features: Vec<f32> = table.values.iter().map(|v| *v as f32).collect();
    let names: Vec<hdf5::types::VarLenUnicode> =
        table.columns.iter().map(|c| c.parse().unwrap()).collect();
    let put_features = |file: &hdf5::File, values: &[f32], names: &[hdf5::types::VarLenUnicode]| {
        let width = names.len();
        let ds = file
            .new_dataset::<f32>()
            .shape([values.len() / width, width])
            .create("features")
            .unwrap();
        ds.write_raw(values).unwrap();
        ds.new_attr::<hdf5::types::VarLenUnicode>()
            .shape(names.len())
            .create("channels")
            .unwrap()
            .write_raw(names)
            .unwrap();
    };
    let put = |file: &hdf5::File, name: &str, values: &[i64]| {
        file.new_dataset::<i64>()
            .shape(values.len())
            .create(name)
            .unwrap()
            .write_raw(values)
            .unwrap();
    };
    cases.push((
        "missing dataset",
        write("missing.h5", &|f| {
            put(f, "unit", &table.unit);
            put_features(f, &features, &names);
        }),
        vec!["missing dataset(s) cycle"],
    ));
    cases.push((
        "nothing known",
        write("empty.h5", &|f| put(f, "temperature", &[1, 2, 3])),
        vec!["neither the generic layout", "temperature"],
    ));
    cases.push((
        "mismatched lengths",
        write("mismatch.h5", &|f| {
            put(f, "unit", &table.unit);
            put(f, "cycle", &table.cycle[..n - 1]);
            put_features(f, &features, &names);
        }),
        vec![&*Box::leak(
            format!("unit has {n} rows but cycle has {}", n - 1).into_boxed_str(),
        )],
    ));
    // Without s_3 and s_11 (columns 5 and 13 of the generic layout).
    let keep: Vec<usize> = (0..24).filter(|c| *c != 5 && *c != 13).collect();
    let narrow: Vec<f32> = features
        .chunks_exact(24)
        .flat_map(|row| keep.iter().map(|c| row[*c]).collect::<Vec<_>>())
        .collect();
    let narrow_names: Vec<_> = keep.iter().map(|c| names[*c].clone()).collect();
    cases.push((
        "missing channels",
        write("channels.h5", &|f| {
            put(f, "unit", &table.unit);
            put(f, "cycle", &table.cycle);
            put_features(f, &narrow, &narrow_names);
        }),
        vec!["missing channels: s_3, s_11"],
    ));
    // NaN in s_4 (column 6) at row 100 (unit 11, cycle 101).
    let mut with_nan = features.clone();
    with_nan[100 * 24 + 6] = f32::NAN;
    cases.push((
        "nan",
        write("nan.h5", &|f| {
            put(f, "unit", &table.unit);
            put(f, "cycle", &table.cycle);
            put_features(f, &with_nan, &names);
        }),
        vec!["NaN in channel s_4 at row 100 (unit 11, cycle 101)"],
    ));
    // Finite, but so large (s_2, column 4) that the network's output overflows.
    let mut overflowing = features.clone();
    overflowing[100 * 24 + 4] = 3e38;
    cases.push((
        "overflowing value",
        write("overflow.h5", &|f| {
            put(f, "unit", &table.unit);
            put(f, "cycle", &table.cycle);
            put_features(f, &overflowing, &names);
        }),
        vec!["row 100 (unit 11, cycle 101): the model's"],
    ));
    // A NaN in a column the model does not read is harmless: see the good job below.
    let mut units = table.unit.clone();
    units[5] = 14;
    cases.push((
        "units not contiguous",
        write("contiguous.h5", &|f| {
            put(f, "unit", &units);
            put(f, "cycle", &table.cycle);
            put_features(f, &features, &names);
        }),
        vec!["rows of unit 11 are not contiguous"],
    ));
    cases.push((
        "no channel names",
        write("names.h5", &|f| {
            put(f, "unit", &table.unit);
            put(f, "cycle", &table.cycle);
            f.new_dataset::<f32>()
                .shape([n, 24])
                .create("features")
                .unwrap()
                .write_raw(&features)
                .unwrap();
        }),
        vec!["string attribute \"channels\""],
    ));
    cases.push((
        "N-CMAPSS auxiliary not 2-D",
        write("a1d.h5", &|f| {
            f.new_dataset::<f32>()
                .shape([n])
                .create("A_dev")
                .unwrap()
                .write_raw(&vec![1.0f32; n])
                .unwrap();
            f.new_dataset::<f32>()
                .shape([n, 24])
                .create("X_s_dev")
                .unwrap()
                .write_raw(&features)
                .unwrap();
        }),
        vec!["A_dev has shape [", "it must be 2-D"],
    ));
    cases
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_archives_fail_their_own_job_only() {
    let setup = setup();
    let server = setup.server(&["--job-workers", "3"]);
    let mut ids = Vec::new();
    for (name, bytes, fragments) in bad_archives(&setup) {
        let (status, body) = submit_bytes(
            &server.url,
            bytes,
            &format!("?name={}", name.replace(' ', "-")),
        )
        .await;
        assert_eq!(status, 202, "{name}: {body}");
        ids.push((name, body["id"].as_str().unwrap().to_string(), fragments));
    }
    // A good archive whose unused setting column holds NaN, submitted among the bad ones.
    let mut table = small_fleet();
    table.values[10 * 24] = f64::NAN;
    let good = write_generic(setup.files.path(), "good-nan-setting.h5", &table);
    let good_id = submit_file(&server.url, &good).await;
    for (name, id, fragments) in &ids {
        let status = wait_job(&server.url, id, is_final).await;
        assert_eq!(status["state"], "failed", "{name}: {status}");
        let error = status["error"].as_str().unwrap();
        for fragment in fragments {
            assert!(
                error.contains(fragment),
                "{name}: {fragment:?} not in {error:?}"
            );
        }
        let result = get(format!("{}/v1/jobs/{id}/result", server.url)).await;
        assert_eq!(result.status(), 404);
        assert!(result.text().await.unwrap().contains("failed"));
    }
    let status = wait_job(&server.url, &good_id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");

    // The offline command reports the same problems.
    for (name, bytes, fragments) in bad_archives(&setup).into_iter().take(3) {
        let path = setup.file(&format!("{}.h5", name.replace(' ', "-")));
        std::fs::write(&path, bytes).unwrap();
        let out = setup.file("never.h5");
        let output = job_run_output(setup.repository.path(), &path, &out, &[]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(fragments[0]), "{name}: {stderr}");
        assert!(!out.exists());
    }
    // An N-CMAPSS partition asked of a generic archive is refused, not ignored.
    let output = job_run_output(
        setup.repository.path(),
        &good,
        &setup.file("never.h5"),
        &["--partition", "dev"],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("partition dev selects N-CMAPSS datasets"),
        "{stderr}"
    );
}

#[test]
fn shards_merge_to_exactly_the_one_run_result() {
    let setup = setup();
    // Enough rows for several model batches, so shards start inside batches.
    let table = fleet_of(30, 9);
    assert!(table.rows() > 4000);
    let archive = write_generic(setup.files.path(), "fleet.h5", &table);
    let whole = setup.file("whole.h5");
    setup.job_run(&archive, &whole, &[]);
    for count in [2usize, 3, 7] {
        let mut parts = Vec::new();
        for index in 0..count {
            let part = setup.file(&format!("part-{index}-of-{count}.h5"));
            let shard = format!("{index}/{count}");
            let printed =
                setup.job_run(&archive, &part, &["--shard", &shard, "--chunk-rows", "777"]);
            assert!(printed.contains(&format!("shard {shard}")), "{printed}");
            parts.push(part);
        }
        parts.reverse(); // any order
        let merged = setup.file(&format!("merged-{count}.h5"));
        let mut args = vec!["job", "merge"];
        args.extend(parts.iter().map(|p| p.to_str().unwrap()));
        args.extend(["--out", merged.to_str().unwrap()]);
        let output = run_cli(&args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            result_fingerprint(&merged, &[]),
            result_fingerprint(&whole, &[]),
            "{count} shards"
        );
        // Missing a shard is refused.
        let output = run_cli(&[
            "job",
            "merge",
            parts[0].to_str().unwrap(),
            "--out",
            setup.file("partial.h5").to_str().unwrap(),
        ]);
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains("exactly once"));
    }
    // A merge of the first of two shards with `second`, refused: what it printed.
    let refused_merge = |second: &Path, out: &str| {
        let output = run_cli(&[
            "job",
            "merge",
            setup.file("part-0-of-2.h5").to_str().unwrap(),
            second.to_str().unwrap(),
            "--out",
            setup.file(out).to_str().unwrap(),
        ]);
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    // Shards of different splits are named with their split.
    let stderr = refused_merge(&setup.file("part-1-of-3.h5"), "mixed.h5");
    assert!(
        stderr.contains("different splits: 0/2 (")
            && stderr.contains("part-0-of-2.h5), 1/3 (")
            && stderr.contains("part-1-of-3.h5)"),
        "{stderr}"
    );
    // Shards of another archive with the same name and row count (its units cut one row
    // earlier) do not join with these: rows would be lost or scored twice.
    let mut shifted = table.clone();
    let width = table.columns.len();
    shifted.unit.remove(0);
    shifted.cycle.remove(0);
    shifted.rul.remove(0);
    shifted.values.drain(..width);
    shifted.unit.push(*table.unit.last().unwrap());
    shifted.cycle.push(table.cycle.last().unwrap() + 1);
    shifted.rul.push(table.rul.last().unwrap() - 1.0);
    shifted
        .values
        .extend_from_slice(&table.values[table.values.len() - width..]);
    let elsewhere = tempfile::tempdir().unwrap();
    let other = write_generic(elsewhere.path(), "fleet.h5", &shifted);
    let other_part = setup.file("other-1-of-2.h5");
    setup.job_run(&other, &other_part, &["--shard", "1/2"]);
    let stderr = refused_merge(&other_part, "crossed.h5");
    assert!(
        stderr.contains("the shards come from different archives"),
        "{stderr}"
    );
    // A shard computed with other settings is refused, naming what differs.
    let lenient_part = setup.file("lenient-1-of-2.h5");
    setup.job_run(
        &archive,
        &lenient_part,
        &["--shard", "1/2", "--missing", "hold"],
    );
    let stderr = refused_merge(&lenient_part, "unlike.h5");
    assert!(
        stderr.contains("computed differently") && stderr.contains("missing \"fail\" vs \"hold\""),
        "{stderr}"
    );
    // A shard written as CSV is named, with the way to write one that merges.
    let csv_part = setup.file("part-1-of-2.csv");
    setup.job_run(&archive, &csv_part, &["--shard", "1/2"]);
    let stderr = refused_merge(&csv_part, "from-csv.h5");
    assert!(
        stderr.contains("part-1-of-2.csv is not an HDF5 result")
            && stderr.contains("--out NAME.h5"),
        "{stderr}"
    );
    // CSV and JSON straight from the command.
    let csv = setup.file("whole.csv");
    setup.job_run(&archive, &csv, &[]);
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap().lines().count(),
        table.rows() + 1
    );
    let json = setup.file("whole.json");
    setup.job_run(&archive, &json, &[]);
    let parsed: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(parsed["rows"].as_array().unwrap().len(), table.rows());
}

#[tokio::test(flavor = "multi_thread")]
async fn ncmapss_archives_score_like_the_same_rows_in_the_generic_layout() {
    let setup = setup();
    // A model "trained on" N-CMAPSS channels: the RUL model with its 14 channels renamed to the
    // X_s sensors (the numbers do not matter here, the column mapping does).
    let renamed = Repository::with_models(&[RUL_MODEL]);
    let names: Vec<String> = XS_VARS.iter().map(|n| format!("\"{n}\"")).collect();
    renamed.set(RUL_MODEL, "channels", &format!("[{}]", names.join(", ")));
    let dev = small_fleet();
    let mut test = fleet_of(3, 8);
    for unit in test.unit.iter_mut() {
        *unit += 1000;
    }
    let model_order: Vec<String> = model_channels();
    let as_xs = |t: &linescan::jobs::synthetic::Table| t.select(&model_order).renamed(&XS_VARS);
    let archive = setup.file("N-CMAPSS_DS00.h5");
    synthetic::write_ncmapss(&archive, &as_xs(&dev), Some(&as_xs(&test))).unwrap();
    let mut both = as_xs(&dev);
    let test_xs = as_xs(&test);
    both.unit.extend(&test_xs.unit);
    both.cycle.extend(&test_xs.cycle);
    both.rul.extend(&test_xs.rul);
    both.values.extend(&test_xs.values);
    let generic = setup.file("generic.h5");
    synthetic::write_generic(&generic, &shuffled(&both), false).unwrap();

    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        renamed.path(),
        &["--data-dir", data.path().to_str().unwrap()],
    );
    let id = submit_file(&server.url, &archive).await;
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["rows_done"], both.rows() as u64);
    let ncmapss_result = data.path().join("jobs").join(&id).join("result.h5");
    let generic_result = setup.file("generic-result.h5");
    let output = run_cli(&[
        "job",
        "run",
        generic.to_str().unwrap(),
        "--out",
        generic_result.to_str().unwrap(),
        "--model-repository",
        renamed.path().to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let a = read_result(&ncmapss_result);
    let b = read_result(&generic_result);
    assert_eq!(a.unit, b.unit);
    assert_eq!(a.cycle, b.cycle);
    assert_eq!(a.rul, b.rul);
    let file = hdf5::File::open(&ncmapss_result).unwrap();
    let layout: hdf5::types::VarLenUnicode = file.attr("layout").unwrap().read_scalar().unwrap();
    assert_eq!(layout.as_str(), "n-cmapss");
    // Only the test partition.
    let id = {
        let (code, body) = submit_bytes(
            &server.url,
            std::fs::read(&archive).unwrap(),
            "?partition=test",
        )
        .await;
        assert_eq!(code, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    };
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["rows_done"], test.rows() as u64, "{status}");
    drop(server);

    // The FD001 model cannot read N-CMAPSS channels: the job says which are missing.
    let server = setup.server(&[]);
    let id = submit_file(&server.url, &archive).await;
    let status = wait_job(&server.url, &id, is_final).await;
    assert_eq!(status["state"], "failed");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("missing channels: s_2, s_3"), "{error}");
    assert!(error.contains("T24"), "names what the archive has: {error}");
}

#[test]
fn rul_cmapss_predicts_the_last_window_of_every_unit() {
    let setup = setup();
    let table = small_fleet();
    // C-MAPSS text: unit, cycle, 3 settings, 21 sensors, space separated (units interleaved
    // order is fine: rows are grouped by unit and sorted by cycle).
    let mut text = String::new();
    let mut order: Vec<usize> = (0..table.rows()).collect();
    order.reverse();
    for r in order {
        text.push_str(&format!("{} {}", table.unit[r], table.cycle[r]));
        for v in &table.values[r * 24..(r + 1) * 24] {
            text.push_str(&format!(" {v:.6}"));
        }
        text.push_str(" \n");
    }
    let input = setup.file("test_FD00X.txt");
    std::fs::write(&input, &text).unwrap();
    let out = setup.file("pred.csv");
    let rul_cmapss = || {
        run_cli(&[
            "rul",
            "cmapss",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--model-repository",
            setup.repository.path().to_str().unwrap(),
        ])
    };
    let output = rul_cmapss();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 units had fewer than 30 cycles"));
    let csv = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "unit,rul");
    assert_eq!(lines.len(), 6);
    let units: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(units, ["11", "12", "13", "14", "15"]);
    // The same as the job's per-unit result (the archive holds the same 6-decimal values).
    let mut rounded = table.clone();
    for v in rounded.values.iter_mut() {
        *v = format!("{v:.6}").parse().unwrap();
    }
    let archive = setup.file("rounded.h5");
    synthetic::write_generic(&archive, &rounded, false).unwrap();
    let result = setup.file("rounded-result.h5");
    setup.job_run(&archive, &result, &[]);
    let file = hdf5::File::open(&result).unwrap();
    let unit_rul = file
        .dataset("units/rul")
        .unwrap()
        .read_raw::<f32>()
        .unwrap();
    for (line, rul) in lines[1..].iter().zip(unit_rul) {
        let predicted: f32 = line.split(',').nth(1).unwrap().parse().unwrap();
        assert!((predicted - rul).abs() < 1e-3, "{line} vs {rul}");
    }
    // A malformed file says where.
    let first_row = text.lines().next().unwrap().to_string();
    let mut fields: Vec<&str> = first_row.split_whitespace().collect();
    let cycle = fields[1].to_string();
    fields[2] = "abc";
    for (content, fragment) in [
        ("1 1 0.5\n".to_string(), "line 1 has 3 columns".to_string()),
        (
            format!("{}\n", fields.join(" ")),
            "line 1, column 3 (setting_1): \"abc\" is not a number".to_string(),
        ),
        (
            format!("{first_row}\n{first_row}\n"),
            format!("has cycle {cycle} twice"),
        ),
        (
            format!("1.5 {}\n", first_row.split_once(' ').unwrap().1),
            "line 1, column 1 (unit): 1.5 is not a whole number".to_string(),
        ),
        ("\n".to_string(), "holds no rows".to_string()),
    ] {
        std::fs::write(&input, &content).unwrap();
        let output = rul_cmapss();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&fragment), "{fragment}: {stderr}");
    }
    // An archive given where text belongs is named as such.
    std::fs::copy(&archive, &input).unwrap();
    let stderr = String::from_utf8_lossy(&rul_cmapss().stderr).to_string();
    assert!(stderr.contains("is an HDF5 archive"), "{stderr}");
}

#[test]
fn offline_commands_refuse_to_overwrite_their_input() {
    let setup = setup();
    let archive = write_generic(setup.files.path(), "fleet.h5", &small_fleet());
    let before = std::fs::read(&archive).unwrap();
    // `job run input --out out` fails saying `why`, and the input keeps its bytes.
    let refused = |input: &Path, out: &Path, why: &str| {
        let output = job_run_output(setup.repository.path(), input, out, &[]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(why), "{stderr}");
        assert_eq!(
            std::fs::read(input).unwrap(),
            before,
            "{} changed",
            input.display()
        );
    };
    refused(&archive, &archive, "is the input");
    // Nor the file the result is written to before it is moved over --out.
    let partial = setup.file("out.h5.partial");
    std::fs::copy(&archive, &partial).unwrap();
    refused(&partial, &setup.file("out.h5"), "is where this run writes");
    // A CSV run scores into a file of its own beside --out, which it removes: an input named
    // like the older fixed name is left alone.
    let named_like = setup.file("r.scoring.h5");
    std::fs::copy(&archive, &named_like).unwrap();
    let output = job_run_output(
        setup.repository.path(),
        &named_like,
        &setup.file("r.csv"),
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read(&named_like).unwrap(), before);
    let mut files: Vec<String> = std::fs::read_dir(setup.files.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["fleet.h5", "out.h5.partial", "r.csv", "r.scoring.h5"],
        "left behind or removed"
    );
    // job synth refuses another format, and a folder named like an archive, before anything
    // is written.
    let folder = setup.file("folder.h5");
    std::fs::create_dir(&folder).unwrap();
    for (out, error) in [
        (setup.file("fleet.csv"), "job synth writes HDF5"),
        (folder, "is a folder"),
    ] {
        let out = out.to_str().unwrap();
        let output = run_cli(&["job", "synth", "--out", out, "--rows", "10"]);
        assert!(!output.status.success());
        assert!(String::from_utf8_lossy(&output.stderr).contains(error));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_above_the_limit_is_refused_with_both_sizes() {
    let setup = setup();
    let server = setup.server(&["--job-max-upload-bytes", "1000"]);
    let archive = write_generic(setup.files.path(), "fleet.h5", &small_fleet());
    let bytes = std::fs::read(&archive).unwrap();
    let size = bytes.len();
    let (status, body) = submit_bytes(&server.url, bytes, "").await;
    assert_eq!(status, 413, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "request body of {size} bytes (the archive, or the form that holds it) above the \
             limit of 1000 bytes"
        )),
        "{error}"
    );
}

/// Sends a request head asking `Expect: 100-continue` for a body of `length` bytes, and reads
/// the first answer: `100 Continue`, or a refusal read to the end of the connection it closes.
fn ask_to_continue(
    address: &str,
    target: &str,
    headers: &str,
    length: usize,
) -> (std::net::TcpStream, String) {
    use std::io::Read;
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "POST {target} HTTP/1.1\r\nHost: {address}\r\n{headers}Content-Length: {length}\r\n\
         Expect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8];
    while !answer.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "closed after {answer:?}"
        );
        answer.push(byte[0]);
    }
    if !answer.starts_with(b"HTTP/1.1 100 ") {
        // A refusal closes the connection, so its body ends with it.
        stream.read_to_end(&mut answer).unwrap();
    }
    (stream, String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_asking_to_continue_are_refused_before_the_body_is_sent() {
    let setup = setup();
    let archive = write_generic(setup.files.path(), "fleet.h5", &small_fleet());
    let bytes = std::fs::read(&archive).unwrap();
    let limit = (bytes.len() + 10).to_string();
    let server = setup.server(&[
        "--job-max-upload-bytes",
        &limit,
        "--max-body-bytes",
        "5000",
        "--api-key",
        "k3y",
    ]);
    let address = server.url.trim_start_matches("http://").to_string();
    let key = "Authorization: Bearer k3y\r\n";
    let refusals = [
        (
            "/v1/jobs",
            "",
            bytes.len(),
            "401",
            "missing or wrong API key",
        ),
        ("/v1/jobs", key, 1 << 30, "413", "--job-max-upload-bytes"),
        (
            "/v1/jobs?model=nope",
            key,
            1000,
            "404",
            "no sensor model nope",
        ),
        ("/v1/jobs?modle=x", key, 1000, "400", "bad query string"),
        (
            "/v2/models/rul_fd001/infer",
            key,
            6000,
            "413",
            "--max-body-bytes",
        ),
        (
            "/v2/models/nope/infer",
            key,
            1000,
            "404",
            "model nope is not loaded",
        ),
        (
            "/v2/models/rul_fd001/infer",
            "Authorization: Bearer k3y\r\nContent-Type: image/png\r\n",
            1000,
            "415",
            "Content-Type image/png is not accepted on infer",
        ),
        ("/v1/rul/nope", key, 1000, "404", "no sensor model nope"),
        (
            "/v1/jobs?model=rul_fd001",
            "Authorization: Bearer k3y\r\nContent-Encoding: br\r\n",
            1000,
            "415",
            "Content-Encoding \\\"br\\\" is not accepted",
        ),
        (
            "/v1/jobs",
            "Authorization: Bearer k3y\r\nContent-Type: application/json\r\n",
            100_000,
            "413",
            "exceeds the limit of 65536 bytes",
        ),
        (
            "/v2/repository/index",
            key,
            10_000,
            "413",
            "the repository index's limit",
        ),
        (
            "/v1/inspect/board-7",
            key,
            1000,
            "404",
            "AOI is not enabled",
        ),
    ];
    for (target, headers, length, status, error) in refusals {
        let address = address.clone();
        let (_, answer) =
            tokio::task::spawn_blocking(move || ask_to_continue(&address, target, headers, length))
                .await
                .unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{target}: {answer}"
        );
        assert!(answer.contains("connection: close"), "{target}: {answer}");
        assert!(answer.contains(error), "{target}: {answer}");
    }
    // Counted like the routes' answers, under a route of their own.
    let metrics = server.metrics_text().await;
    let early = ["route=\"expect: 100-continue\""];
    let counted = common::metric(&metrics, "linescan_http_responses_total", &early);
    assert_eq!(counted, refusals.len() as f64, "{metrics}");

    // A submission that may go on is told to continue, then answered as usual.
    let (mut stream, answer) = tokio::task::spawn_blocking(move || {
        ask_to_continue(&address, "/v1/jobs?model=rul_fd001", key, bytes.len())
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 100 Continue"), "{answer}");
    let archive_bytes = std::fs::read(&archive).unwrap();
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        stream.write_all(&archive_bytes).unwrap();
        let mut answer = [0u8; 64];
        let read = stream.read(&mut answer).unwrap();
        String::from_utf8_lossy(&answer[..read]).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 202 "), "{answer}");
}

/// The archive with one byte pattern changed so that the HDF5 library (libhdf5 1.10) crashes
/// reading its `channels` attribute: the first object of the global heap that holds the
/// names claims 2^40 bytes.
fn crashing_copy(archive: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(archive).unwrap();
    let heap = bytes
        .windows(4)
        .position(|w| w == b"GCOL")
        .expect("the channel names are in a global heap");
    // Signature, version, reserved, collection size (8), then the first object's index (2),
    // reference count (2), reserved (4) and size (8).
    let size = heap + 24;
    bytes[size..size + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_that_crashes_the_hdf5_library_fails_its_job_not_the_server() {
    let setup = setup();
    let good = write_generic(setup.files.path(), "fleet.h5", &small_fleet());
    let crashing = setup.file("crashing.h5");
    std::fs::write(&crashing, crashing_copy(&good)).unwrap();
    // The library really does crash on it (outside the server).
    let output = common::command(common::BIN)
        .args(["job", "check-in-process"])
        .arg(&crashing)
        .output()
        .unwrap();
    assert!(
        std::os::unix::process::ExitStatusExt::signal(&output.status).is_some(),
        "{output:?}"
    );
    // `job check` reads it in a child and says so.
    let output = run_cli(&["job", "check", crashing.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("crashing.h5 crashed the HDF5 library (SIGSEGV)"),
        "{stderr}"
    );
    let output = run_cli(&["job", "check", good.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(said.contains("generic layout"), "{said}");
    // `job run` checks in a child too: it exits with the reason, not with the crash.
    let out = setup.file("crashing.csv");
    let output = common::command(common::BIN)
        .args(["job", "run", "--quiet", "--out"])
        .arg(&out)
        .arg(&crashing)
        .arg("--model-repository")
        .arg(setup.repository.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("crashed the HDF5 library (SIGSEGV)"),
        "{stderr}"
    );
    assert!(!out.exists());

    let server = setup.server(&[]);
    let crashed = submit_file(&server.url, &crashing).await;
    let status = wait_job(&server.url, &crashed, is_final).await;
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("upload.h5 crashed the HDF5 library (SIGSEGV)"),
        "{error}"
    );
    // The server lived through it and still scores.
    let fine = submit_file(&server.url, &good).await;
    let status = wait_job(&server.url, &fine, is_final).await;
    assert_eq!(status["state"], "done", "{status}");
}

/// Job folders under the data folder (one per stored job).
fn job_folders(data: &Path) -> usize {
    std::fs::read_dir(data.join("jobs"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn submissions_stop_short_of_the_free_space_kept_on_the_disk() {
    let setup = setup();
    let archive = write_generic(setup.files.path(), "fleet.h5", &small_fleet());
    {
        // More kept free than any disk has: refused before anything is stored, path jobs too.
        let server = setup.server(&[
            "--job-min-free-bytes",
            &u64::MAX.to_string(),
            "--jobs-allow-path",
            setup.files.path().to_str().unwrap(),
        ]);
        let (status, body) = submit_bytes(&server.url, std::fs::read(&archive).unwrap(), "").await;
        assert_eq!(status, 507, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("B free; ") && error.contains("--job-min-free-bytes"),
            "{error}"
        );
        let response = reqwest::Client::new()
            .post(format!("{}/v1/jobs", server.url))
            .json(&json!({"path": "fleet.h5"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 507);
        assert_eq!(job_folders(setup.data.path()), 0);
    }

    // Room at the start but not for the whole upload: it stops when it would pass the
    // reserve, and the part written is removed. The upload is streamed without a length, so
    // only the writes can tell. The margins are wide because the tests beside this one write
    // and delete archives of up to ~20 MB on the same disk; only the 128 MiB of room is written.
    let free = rustix::fs::statvfs(setup.data.path()).unwrap();
    let free = free.f_bavail * free.f_frsize;
    let server = setup.server(&["--job-min-free-bytes", &(free - (128 << 20)).to_string()]);
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let answer = tokio::task::spawn_blocking(move || chunked_upload(&address, 1 << 30))
        .await
        .unwrap();
    // The server may close the connection before the client has sent all it streams, and
    // then its answer can be lost with the connection; the server counts it either way.
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
        assert!(answer.contains(" MB more would go "), "{answer}");
    }
    let metrics = server.metrics_text().await;
    let refused = ["route=\"/v1/jobs\"", "status=\"507\""];
    let counted = common::metric(&metrics, "linescan_http_responses_total", &refused);
    assert_eq!(counted, 1.0, "{metrics}");
    assert_eq!(job_folders(setup.data.path()), 0);
    let (status, body) = common::get_json(&format!("{}/v1/jobs", server.url)).await;
    assert_eq!(
        (status, body["jobs"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{body}"
    );
}

/// POSTs `size` zero bytes to /v1/jobs in 1 MiB chunks (no Content-Length), ignoring a
/// connection closed under it; what came back.
fn chunked_upload(address: &str, size: usize) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let head =
        format!("POST /v1/jobs HTTP/1.1\r\nHost: {address}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let chunk = [
        format!("{:x}\r\n", 1 << 20).into_bytes(),
        vec![0u8; 1 << 20],
        b"\r\n".to_vec(),
    ]
    .concat();
    let sent = stream.write_all(head.as_bytes()).and_then(|()| {
        for _ in 0..size >> 20 {
            stream.write_all(&chunk)?;
        }
        stream.write_all(b"0\r\n\r\n")
    });
    drop(sent);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn sigterm_stops_job_run_without_leaving_a_partial_result() {
    let setup = setup();
    let archive = setup.file("big.h5");
    let synth = run_cli(&[
        "job",
        "synth",
        "--rows",
        "200000",
        "--out",
        archive.to_str().unwrap(),
    ]);
    assert!(synth.status.success());
    let out = setup.file("result.h5");
    let partial = setup.file("result.h5.partial");
    let child = common::command(common::BIN)
        .args(["job", "run", archive.to_str().unwrap(), "--out"])
        .arg(&out)
        .args(["--quiet", "--chunk-rows", "500", "--in-flight", "1"])
        .arg("--model-repository")
        .arg(setup.repository.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The partial file appears once scoring has begun.
    let stderr = stopped_once_written(child, &partial);
    assert!(
        stderr.contains("interrupted (SIGTERM) before the end") && stderr.contains("not written"),
        "{stderr}"
    );
    assert!(!partial.exists() && !out.exists(), "{stderr}");
}

/// Sends SIGTERM to `child` once `partial` exists; checks that it exits 130 and returns what it
/// printed on stderr.
fn stopped_once_written(child: std::process::Child, partial: &Path) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !partial.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no {}",
            partial.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    common::signal(child.id(), "TERM");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    stderr
}

#[test]
fn a_stopped_job_synth_leaves_the_file_it_would_replace_as_it_was() {
    let setup = setup();
    let archive = write_generic(setup.files.path(), "fleet.h5", &small_fleet());
    let before = std::fs::read(&archive).unwrap();
    let partial = setup.file("fleet.h5.partial");
    // Far more rows than it can write before the signal.
    let child = common::command(common::BIN)
        .args(["job", "synth", "--rows", "500000000", "--out"])
        .arg(&archive)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = stopped_once_written(child, &partial);
    assert!(stderr.contains("interrupted (SIGTERM)"), "{stderr}");
    assert!(!partial.exists(), "{stderr}");
    assert_eq!(std::fs::read(&archive).unwrap(), before);
}

/// A copy of `table` with each `(row, column)` cell set to `value`.
fn with_value(table: &synthetic::Table, cells: &[(usize, usize)], value: f64) -> synthetic::Table {
    let mut changed = table.clone();
    let width = table.columns.len();
    for &(row, column) in cells {
        changed.values[row * width + column] = value;
    }
    changed
}

#[tokio::test(flavor = "multi_thread")]
async fn gaps_are_held_only_when_asked_and_counted_per_window() {
    let setup = setup();
    let table = fleet_of(30, 9);
    let width = table.columns.len();
    let column = |name: &str| table.columns.iter().position(|c| c == name).unwrap();
    let (s_4, s_2, setting) = (column("s_4"), column("s_2"), column("setting_1"));
    let unit_first = |row: usize| {
        (0..=row)
            .rev()
            .find(|r| *r == 0 || table.unit[r - 1] != table.unit[*r])
            .unwrap()
    };
    // A lone gap mid-unit, three rows of two channels out in another unit (one of them NaN in
    // a column the model does not read), and an infinity.
    let lone = 1000;
    let run = 2500..2503;
    assert!(unit_first(lone) + 40 < lone && unit_first(run.start) + 40 < run.start);
    let mut cells = vec![(lone, s_4)];
    cells.extend(run.clone().flat_map(|r| [(r, s_4), (r, s_2)]));
    let mut gappy = with_value(&table, &cells, f64::NAN);
    gappy.values[run.start * width + setting] = f64::NAN;
    gappy.values[3000 * width + s_2] = f64::INFINITY;
    let archive = write_generic(setup.files.path(), "gappy.h5", &gappy);

    // By default the first gap fails the run.
    let output = job_run_output(
        setup.repository.path(),
        &archive,
        &setup.file("fail.h5"),
        &[],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("NaN in channel s_4 at row {lone}")),
        "{stderr}"
    );

    // Held: the same result as the archive with each gap filled by hand from the row before.
    let held = setup.file("held.h5");
    let printed = setup.job_run(&archive, &held, &["--missing", "hold"]);
    assert!(
        printed.contains("8 values were NaN, infinite or beyond float32"),
        "{printed}"
    );
    let mut filled = gappy.clone();
    for (row, column) in cells.iter().copied().chain([(3000, s_2)]) {
        filled.values[row * width + column] = filled.values[(row - 1) * width + column];
    }
    let by_hand = setup.file("by-hand.h5");
    setup.job_run(
        &write_generic(setup.files.path(), "filled.h5", &filled),
        &by_hand,
        &[],
    );
    let (held_rows, by_hand_rows) = (read_result(&held), read_result(&by_hand));
    assert_eq!(held_rows.rul, by_hand_rows.rul);
    assert_eq!(held_rows.anomaly, by_hand_rows.anomaly);
    // Each window counts the held values it read: the lone gap in the 30 windows that end at
    // it and after it, the run's six values, the infinity.
    let counts = hdf5::File::open(&held)
        .unwrap()
        .dataset("held")
        .unwrap()
        .read_raw::<u32>()
        .unwrap();
    let expected: Vec<u32> = (0..table.rows())
        .map(|row| {
            let oldest = (row + 1).saturating_sub(30).max(unit_first(row));
            let window = oldest..=row;
            let in_window = |r: usize| window.contains(&r) && table.unit[r] == table.unit[row];
            cells.iter().filter(|(r, _)| in_window(*r)).count() as u32 + u32::from(in_window(3000))
        })
        .collect();
    assert_eq!(counts, expected);
    assert_eq!(counts.iter().filter(|c| **c > 0).count(), 30 + 32 + 30);
    // ... and shards of a held run merge to it.
    let parts: Vec<PathBuf> = (0..3)
        .map(|index| {
            let part = setup.file(&format!("held-{index}-of-3.h5"));
            let shard = format!("{index}/3");
            setup.job_run(
                &archive,
                &part,
                &[
                    "--missing",
                    "hold",
                    "--shard",
                    &shard,
                    "--chunk-rows",
                    "777",
                ],
            );
            part
        })
        .collect();
    let merged = setup.file("held-merged.h5");
    let mut args = vec!["job", "merge"];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--out", merged.to_str().unwrap()]);
    assert!(run_cli(&args).status.success());
    assert_eq!(
        result_fingerprint(&merged, &[]),
        result_fingerprint(&held, &[])
    );

    // A unit's first value has nothing to hold over it.
    let first = unit_first(lone);
    let leading = write_generic(
        setup.files.path(),
        "leading.h5",
        &with_value(&table, &[(first, s_2)], f64::NAN),
    );
    let output = job_run_output(
        setup.repository.path(),
        &leading,
        &setup.file("leading-out.h5"),
        &["--missing", "hold"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("NaN in channel s_2 at row {first}"))
            && stderr.contains("is the unit's first value of the channel"),
        "{stderr}"
    );
    // Only its own shard fails: the shard before it reads the unit's first rows to fill its
    // last batch, and keeps none of them.
    let before = setup.job_run(
        &archive,
        &setup.file("shard-0.h5"),
        &["--missing", "hold", "--shard", "0/2"],
    );
    let shard_end: usize = before
        .split("rows 0..")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|end| end.parse().ok())
        .unwrap_or_else(|| panic!("no row range in {before}"));
    assert_eq!(unit_first(shard_end), shard_end);
    assert_ne!(
        shard_end % 1024,
        0,
        "the shard's last batch reads past its rows"
    );
    let next_unit = write_generic(
        setup.files.path(),
        "next-unit.h5",
        &with_value(&table, &[(shard_end, s_2)], f64::NAN),
    );
    for (shard, fails) in [("0/2", false), ("1/2", true)] {
        let output = job_run_output(
            setup.repository.path(),
            &next_unit,
            &setup.file(&format!("next-unit-{}.h5", &shard[..1])),
            &["--missing", "hold", "--shard", shard],
        );
        assert_eq!(!output.status.success(), fails, "shard {shard}: {output:?}");
    }

    // Over HTTP: the option in the query string, the count in the job's status, the column in
    // the CSV.
    let server = setup.server(&[]);
    let (status, accepted) = submit_bytes(
        &server.url,
        std::fs::read(&archive).unwrap(),
        "?missing=hold",
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["missing"], "hold");
    let id = accepted["id"].as_str().unwrap();
    let done = wait_job(&server.url, id, is_final).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["values_held"], 8);
    let csv = get(format!("{}/v1/jobs/{id}/result?format=csv", server.url))
        .await
        .text()
        .await
        .unwrap();
    let header = csv.lines().next().unwrap();
    assert!(header.ends_with(",padded,held"), "{header}");
    let lone_line = csv.lines().nth(lone + 1).unwrap();
    assert!(lone_line.ends_with(",0,1"), "{lone_line}");
    let (status, refused) = submit_bytes(
        &server.url,
        std::fs::read(&archive).unwrap(),
        "?missing=skip",
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("unknown variant `skip`, expected `fail` or `hold`"),
        "{refused}"
    );
}
