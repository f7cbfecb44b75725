//! The serving core over real HTTP: Open Inference Protocol health, metadata and infer (JSON and
//! binary), dynamic batching, overload (503), deadlines (504), bad input (4xx), graceful shutdown.

mod common;

use std::time::Duration;

use common::{Repository, Server, get_json, json_request, metric, onnx};
use serde_json::{Value, json};

/// The bundled model the serving tests run (the AOI defect classifier).
const MODEL: &str = "aoi_defect";

async fn post_json(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("POST")
}

async fn metadata(server: &Server) -> Value {
    let (status, metadata) = get_json(&format!("{}/v2/models/{MODEL}", server.url)).await;
    assert_eq!(status, 200, "{metadata}");
    metadata
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A binary tensor request: the JSON `header`, then the tensors' bytes.
async fn post_binary(url: &str, header: &[u8], tensors: &[u8]) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("Inference-Header-Content-Length", header.len().to_string())
        .header("Content-Type", "application/octet-stream")
        .body([header, tensors].concat())
        .send()
        .await
        .expect("POST")
}

fn infer_url(server: &Server) -> String {
    format!("{}/v2/models/{MODEL}/infer", server.url)
}

/// A server whose batcher waits up to `delay_us` for company and closes a batch early after
/// `gap_us` without arrivals (0: never early). The repository must outlive the server.
fn batching_server(delay_us: u64, gap_us: u64, flags: &[&str]) -> (Repository, Server) {
    let repository = Repository::with_models(&[MODEL]);
    repository
        .set(MODEL, "max_queue_delay_us", &delay_us.to_string())
        .set(MODEL, "max_arrival_gap_us", &gap_us.to_string());
    let server = Server::start(repository.path(), flags);
    (repository, server)
}

/// Batches of the test model that `reason` closed, from a `/metrics` text.
fn batches_closed_by(text: &str, reason: &str) -> f64 {
    let labels = [format!("model=\"{MODEL}\""), format!("reason=\"{reason}\"")];
    metric(
        text,
        "linescan_batch_close_total",
        &[&labels[0], &labels[1]],
    )
}

/// Sends one request with nothing else in flight, under a delay far beyond the default 30 s
/// deadline, and checks that it succeeded and that `reason` closed its batch.
async fn lone_request_closed_by(
    server: &Server,
    metadata: &Value,
    reason: &str,
) -> reqwest::Response {
    let response = post_json(&infer_url(server), &json_request(metadata, 1, 1)).await;
    assert_eq!(
        response.status(),
        200,
        "the lone request sat out max_queue_delay_us"
    );
    let text = server.metrics_text().await;
    assert_eq!(batches_closed_by(&text, reason), 1.0, "{text}");
    response
}

/// A numeric `X-Linescan-*` response header.
fn header_number(response: &reqwest::Response, name: &str) -> u64 {
    response.headers()[name].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_metadata_and_json_inference() {
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(
        repository.path(),
        &["--instances", "3", "--providers", "cpu"],
    );

    assert_eq!(
        get_json(&format!("{}/v2/health/live", server.url)).await.0,
        200
    );
    assert_eq!(
        get_json(&format!("{}/v2/health/ready", server.url)).await.0,
        200
    );
    // The counters alerts watch exist at 0 before anything has happened: Prometheus takes a
    // series' first sample as its base, so a first failure would otherwise not be counted.
    let text = server.metrics_text().await;
    for (name, reason) in [
        ("linescan_inference_request_failure_total", "timeout"),
        ("linescan_inference_request_failure_total", "queue_full"),
        ("linescan_batch_close_total", "delay"),
    ] {
        let reason = format!("reason=\"{reason}\"");
        assert!(
            text.lines().any(|l| l.starts_with(name)
                && l.contains(&format!("model=\"{MODEL}\""))
                && l.contains(&reason)
                && l.ends_with(" 0")),
            "no {name} {reason} at 0 in {text}"
        );
    }
    let (status, server_meta) = get_json(&format!("{}/v2", server.url)).await;
    assert_eq!(status, 200);
    assert_eq!(server_meta["name"], "linescan");
    assert!(
        server_meta["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );
    // A body encoding other than gzip or deflate is named in a 415.
    let brotli = reqwest::Client::new()
        .post(infer_url(&server))
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "br")
        .body(vec![0u8; 16])
        .send()
        .await
        .unwrap();
    assert_eq!(brotli.status(), 415);
    let error: Value = brotli.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("Content-Encoding \"br\""),
        "{error}"
    );
    // Model control is not offered, and says so rather than "no route".
    let unload = reqwest::Client::new()
        .post(format!(
            "{}/v2/repository/models/{MODEL}/unload",
            server.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unload.status(), 501);
    let error: Value = unload.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("restart the server"),
        "{error}"
    );

    // Triton's repository index: an empty body or {"ready": bool}; anything else is refused.
    let client = reqwest::Client::new();
    let index_url = format!("{}/v2/repository/index", server.url);
    for (body, expected) in [
        ("", 200),
        ("{\"ready\": true}", 200),
        ("{", 400),
        ("{\"x\": 1}", 400),
    ] {
        let response = client.post(&index_url).body(body).send().await.unwrap();
        assert_eq!(response.status(), expected, "{body}");
        if expected == 200 {
            let index: Value = response.json().await.unwrap();
            assert_eq!(index[0]["name"], MODEL, "{index}");
            assert_eq!(index[0]["state"], "READY", "{index}");
        }
    }

    // The model's series exist before its first request.
    let text = server.metrics_text().await;
    for series in [
        "linescan_inference_count_total",
        "linescan_inference_exec_count_total",
        "linescan_inference_request_success_total",
        "linescan_inference_pending_requests",
    ] {
        let model_label = format!("model=\"{MODEL}\"");
        assert!(
            text.lines()
                .any(|l| l.starts_with(series) && l.contains(&model_label) && l.ends_with(" 0")),
            "{series} of {MODEL} at 0 missing:\n{text}"
        );
    }
    let metadata = metadata(&server).await;
    assert_eq!(metadata["name"], MODEL);
    assert_eq!(
        metadata["inputs"][0]["shape"][0], -1,
        "batch dimension first"
    );
    let (status, _) = get_json(&format!(
        "{}/v2/models/{MODEL}/versions/1/ready",
        server.url
    ))
    .await;
    assert_eq!(status, 200);
    let (status, config) = get_json(&format!("{}/v2/models/{MODEL}/config", server.url)).await;
    assert_eq!(status, 200);
    assert!(config["max_batch_size"].as_u64().unwrap() >= 1);
    // The configuration as it runs: the flags' instances and providers, not the file's.
    assert_eq!(config["instance_group"]["count"], 3, "{config}");
    assert_eq!(config["runtime"]["execution_providers"], json!(["cpu"]));

    let response = post_json(&infer_url(&server), &json_request(&metadata, 3, 1)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model_name"], MODEL);
    for (output, spec) in body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(metadata["outputs"].as_array().unwrap())
    {
        assert_eq!(output["name"], spec["name"]);
        assert_eq!(output["shape"][0], 3);
        let expected: usize = common::concrete_shape(&spec["shape"], 3).iter().product();
        assert_eq!(output["data"].as_array().unwrap().len(), expected);
    }
    // Class probabilities come out of a softmax: every row sums to one.
    let probs: Vec<f64> = body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let classes = probs.len() / 3;
    for row in probs.chunks(classes) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{row:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_tensors_give_the_same_answer_as_json() {
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(repository.path(), &[]);
    let metadata = metadata(&server).await;
    let request = json_request(&metadata, 2, 7);
    let json_body: Value = post_json(&infer_url(&server), &request)
        .await
        .json()
        .await
        .unwrap();

    // Same inputs as binary blobs after the JSON header, outputs requested as binary.
    let (body, header_length) = common::binary_request(&metadata, 2, 7);
    let mut header: Value = serde_json::from_slice(&body[..header_length]).unwrap();
    header["parameters"] = json!({"binary_data_output": true});
    let header = serde_json::to_vec(&header).unwrap();
    let response = post_binary(&infer_url(&server), &header, &body[header_length..]).await;
    assert_eq!(response.status(), 200);
    let header_length = header_number(&response, "Inference-Header-Content-Length") as usize;
    let bytes = response.bytes().await.unwrap();
    let binary_header: Value = serde_json::from_slice(&bytes[..header_length]).unwrap();
    let mut offset = header_length;
    let (binary_outputs, json_outputs) = (
        binary_header["outputs"].as_array().unwrap(),
        json_body["outputs"].as_array().unwrap(),
    );
    assert_eq!(
        binary_outputs.len(),
        metadata["outputs"].as_array().unwrap().len()
    );
    assert_eq!(binary_outputs.len(), json_outputs.len());
    for (binary_output, json_output) in binary_outputs.iter().zip(json_outputs) {
        let size = binary_output["parameters"]["binary_data_size"]
            .as_u64()
            .unwrap() as usize;
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[offset..offset + size]);
        offset += size;
        let expected: Vec<f32> = json_output["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(values, expected, "output {}", binary_output["name"]);
    }
    assert_eq!(offset, bytes.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_latest_version_answers_unless_a_request_names_one() {
    let repository = Repository::with_models(&[MODEL]);
    let model = repository.path().join(MODEL);
    std::fs::create_dir(model.join("2")).unwrap();
    std::fs::copy(model.join("1/model.onnx"), model.join("2/model.onnx")).unwrap();
    async fn infer(server: &Server, version: &str) -> (u16, Value) {
        let url = format!("{}/v2/models/{MODEL}{version}/infer", server.url);
        let body = json_request(&metadata(server).await, 1, 5);
        let response = post_json(&url, &body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    // Default policy: only the latest version is loaded.
    let server = Server::start(repository.path(), &[]);
    assert_eq!(metadata(&server).await["versions"], json!(["2"]));
    let (status, answer) = infer(&server, "").await;
    assert_eq!((status, &answer["model_version"]), (200, &json!("2")));
    let (status, answer) = infer(&server, "/versions/1").await;
    assert_eq!(status, 404, "{answer}");
    drop(server);

    // Every version loaded: a request without one gets the latest, one naming 1 gets 1.
    let config = model.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("version_policy = \"all\"\n{text}")).unwrap();
    let server = Server::start(repository.path(), &[]);
    assert_eq!(metadata(&server).await["versions"], json!(["1", "2"]));
    for (version, answered) in [("", "2"), ("/versions/1", "1"), ("/versions/2", "2")] {
        let (status, answer) = infer(&server, version).await;
        assert_eq!(
            (status, &answer["model_version"]),
            (200, &json!(answered)),
            "{version}: {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn alive_but_not_ready_while_models_load() {
    let repository = Repository::with_models(&[MODEL]);
    // Sixteen sessions to load and warm up keep the loader busy for seconds after the server
    // listens (about 3 s on the 2-core machine).
    let server = Server::spawn(repository.path(), &["--instances", "16"]);
    let (status, ready) = get_json(&format!("{}/v2/health/ready", server.url)).await;
    assert_eq!((status, &ready["ready"]), (503, &json!(false)), "{ready}");
    assert_eq!(common::status_of(&server.url, "/v2/health/live"), Some(200));
    let response = post_json(&infer_url(&server), &json!({"inputs": []})).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let error: Value = response.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("models are still loading"),
        "{error}"
    );
    server.wait_ready();
    assert_eq!(metadata(&server).await["name"], MODEL);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_form_batches_larger_than_one() {
    // One session: with a second one idle, the idle-session rule would rightly run requests
    // that arrive slower than they execute in batches of one, and this test would measure
    // the machine's timing instead of batching.
    let (_repository, server) = batching_server(50_000, 0, &["--instances", "1"]);
    let metadata = metadata(&server).await;
    let requests = (0..16).map(|i| {
        let body = json_request(&metadata, 1, i);
        let url = infer_url(&server);
        tokio::spawn(async move { post_json(&url, &body).await.status().as_u16() })
    });
    for request in requests.collect::<Vec<_>>() {
        assert_eq!(request.await.unwrap(), 200);
    }
    let text = server.metrics_text().await;
    let model = format!("model=\"{MODEL}\"");
    let inferences = metric(&text, "linescan_inference_count_total", &[&model]);
    let executions = metric(&text, "linescan_inference_exec_count_total", &[&model]);
    let rows = metric(&text, "linescan_batch_size_sum", &[&model]);
    let batches = metric(&text, "linescan_batch_size_count", &[&model]);
    assert_eq!(inferences, 16.0, "{text}");
    assert!(
        executions < 16.0,
        "16 requests ran in {executions} executions"
    );
    assert!(rows / batches > 1.0, "mean batch {}", rows / batches);
    assert_eq!(
        metric(&text, "linescan_inference_request_success_total", &[&model]),
        16.0
    );
    assert!(text.contains("linescan_queue_duration_seconds_bucket"));
    assert!(text.contains("linescan_compute_duration_seconds_bucket"));
    assert!(text.contains("linescan_request_duration_seconds_bucket"));
    for lane in ["live", "bulk"] {
        let series = format!("linescan_queue_depth{{lane=\"{lane}\",{model}");
        assert!(text.contains(&series), "no {series} in {text}");
    }
    // Every request ran and was answered: none is held any more.
    assert_eq!(pending(&text), 0.0, "{text}");
    assert!(
        metric(&text, "process_cpu_seconds_total", &[]) > 0.0,
        "{text}"
    );
    assert!(
        metric(&text, "process_resident_memory_bytes", &[]) > 1e6,
        "{text}"
    );
    // With the gap off and one session, the delay or a full batch closes batches.
    let closed = |reason: &str| batches_closed_by(&text, reason);
    assert_eq!(closed("gap"), 0.0, "{text}");
    assert_eq!(
        closed("delay") + closed("full") + closed("idle"),
        executions,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_queue_closes_the_batch_before_its_delay() {
    // Without the arrival gap a lone request would wait out the whole 10-minute delay.
    let (_repository, server) = batching_server(600_000_000, 300_000, &["--instances", "1"]);
    let metadata = metadata(&server).await;
    let alone = lone_request_closed_by(&server, &metadata, "gap").await;
    assert_eq!(header_number(&alone, "X-Linescan-Batch-Rows"), 1);
    // It did wait for company, for the gap: the worker closes only 300 ms after taking it.
    let queued_us = header_number(&alone, "X-Linescan-Queue-Us");
    assert!(queued_us >= 299_000, "queued {queued_us} us");
    // Requests sent together still arrive within the gap of each other and share a batch.
    let rows = futures_util::future::join_all((0..4).map(|i| {
        let url = infer_url(&server);
        let body = json_request(&metadata, 1, 10 + i);
        async move {
            let response = post_json(&url, &body).await;
            assert_eq!(response.status(), 200);
            header_number(&response, "X-Linescan-Batch-Rows")
        }
    }))
    .await;
    assert!(rows.iter().any(|r| *r > 1), "batch rows {rows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_takes_the_next_request_at_once() {
    // Two sessions, no arrival gap: only the idle second session can close this batch early.
    let (_repository, server) = batching_server(600_000_000, 0, &["--instances", "2"]);
    let metadata = metadata(&server).await;
    lone_request_closed_by(&server, &metadata, "idle").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503_with_retry_after() {
    let repository = Repository::with_models(&[MODEL]);
    repository.set(MODEL, "max_queue_size", "1");
    let server = Server::start(repository.path(), &["--instances", "1", "--threads", "1"]);
    let metadata = metadata(&server).await;
    let max_batch = {
        let (_, config) = get_json(&format!("{}/v2/models/{MODEL}/config", server.url)).await;
        config["max_batch_size"].as_u64().unwrap() as usize
    };
    // Large binary requests (cheap to send, slow to run) keep the single worker busy while many
    // more arrive.
    let (body, header_length) = common::binary_request(&metadata, max_batch, 3);
    let client = reqwest::Client::new();
    let requests: Vec<_> = (0..48)
        .map(|_| {
            let request = client
                .post(infer_url(&server))
                .header("Inference-Header-Content-Length", header_length.to_string())
                .header("Content-Type", "application/octet-stream")
                .body(body.clone());
            tokio::spawn(async move {
                let response = request.send().await.expect("POST");
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("Retry-After")
                    .map(|v| v.to_str().unwrap().to_string());
                let body: Value = response.json().await.unwrap_or(Value::Null);
                (status, retry_after, body)
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for request in requests {
        let (status, retry_after, body) = request.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                refused += 1;
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert!(body["error"].as_str().unwrap().contains("queue"), "{body}");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "{ok} ok, {refused} refused");
    let text = server.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "linescan_inference_request_failure_total",
            &["reason=\"queue_full\""]
        ),
        refused as f64
    );
    assert_eq!(
        common::status_of(&server.url, "/v2/health/ready"),
        Some(200)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_whose_client_left_are_dropped_before_inference() {
    use std::io::Write;
    // One session that waits 3 s for company: the requests below sit in its forming batch.
    let (_repository, server) = batching_server(3_000_000, 0, &["--instances", "1"]);
    let metadata = metadata(&server).await;
    let address = server.url.trim_start_matches("http://").to_string();
    let path = format!("/v2/models/{MODEL}/infer");
    let clients: Vec<std::net::TcpStream> = (0..8)
        .map(|seed| {
            let body = json_request(&metadata, 1, seed).to_string();
            let mut client = std::net::TcpStream::connect(&address).unwrap();
            write!(
                client,
                "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            client
        })
        .collect();
    // The requests reach the forming batch (which waits 3 s) before their clients go.
    wait_pending(&server, 8.0).await;
    drop(clients);
    let cancelled = |text: &str| {
        metric(
            text,
            "linescan_inference_request_failure_total",
            &["reason=\"cancelled\""],
        )
    };
    let text = server.wait_metrics(|text| cancelled(text) >= 8.0).await;
    assert_eq!(cancelled(&text), 8.0, "{text}");
    // The forming batch lets them go when it closes, unrun.
    wait_pending(&server, 0.0).await;
    let text = server.metrics_text().await;
    let model = format!("model=\"{MODEL}\"");
    assert_eq!(
        metric(&text, "linescan_inference_exec_count_total", &[&model]),
        0.0,
        "nothing ran for clients that left: {text}"
    );
    // The server goes on answering those who stay.
    let response = post_json(&infer_url(&server), &json_request(&metadata, 1, 9)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passed_deadline_answers_504() {
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(repository.path(), &[]);
    let metadata = metadata(&server).await;
    let mut body = json_request(&metadata, 1, 5);
    body["parameters"] = json!({"timeout": 1});
    let response = post_json(&infer_url(&server), &body).await;
    assert_eq!(response.status(), 504);
    let error: Value = response.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("deadline"),
        "{error}"
    );
    // As in Triton, 0 is no timeout of the request's own.
    body["parameters"] = json!({"timeout": 0});
    let response = post_json(&infer_url(&server), &body).await;
    assert_eq!(response.status(), 200);
    let text = server.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "linescan_inference_request_failure_total",
            &["reason=\"timeout\""]
        ),
        1.0
    );
    // The expired request's batch never ran, so it is not among the batches closed.
    let model = format!("model=\"{MODEL}\"");
    assert_eq!(
        metric(&text, "linescan_batch_close_total", &[&model]),
        metric(&text, "linescan_inference_exec_count_total", &[&model]),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_right_4xx_and_the_server_stays_healthy() {
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(repository.path(), &["--max-body-bytes", "2000000"]);
    let metadata = metadata(&server).await;
    let client = reqwest::Client::new();
    let url = infer_url(&server);
    let good = json_request(&metadata, 1, 9);
    let input = &metadata["inputs"][0];

    let mut wrong_shape = good.clone();
    wrong_shape["inputs"][0]["shape"] = json!([1, 1]);
    // The metadata's -1 sent back as a size: named as such, not as a mismatch with itself.
    let mut minus_one = good.clone();
    minus_one["inputs"][0]["shape"] = input["shape"].clone();
    let mut listed_parameter = good.clone();
    listed_parameter["parameters"] = json!({"tags": vec![0; 100_000]});
    let mut deep_shape = good.clone();
    deep_shape["inputs"][0]["shape"] = json!(vec![1; 33]);
    let mut wrong_dtype = good.clone();
    wrong_dtype["inputs"][0]["datatype"] = json!("INT32");
    let mut unknown_output = good.clone();
    unknown_output["outputs"] = json!([{"name": "nope"}]);
    let first_output = metadata["outputs"][0]["name"].clone();
    let mut output_twice = good.clone();
    output_twice["outputs"] = json!([{"name": first_output}, {"name": first_output}]);
    let mut classification = good.clone();
    classification["outputs"] =
        json!([{"name": first_output, "parameters": {"classification": 2}}]);
    let mut beyond_fp32 = good.clone();
    beyond_fp32["inputs"][0]["data"][0] = json!(1e39);
    // A name that is half the body: the answer names it without echoing all of it.
    let mut long_name = good.clone();
    long_name["inputs"][0]["name"] = json!("n".repeat(500_000));
    let mut too_many = good.clone();
    too_many["inputs"][0]["data"]
        .as_array_mut()
        .unwrap()
        .push(json!(1.0));

    // Binary tensor bodies whose sizes do not add up.
    let (binary, header_length) = common::binary_request(&metadata, 1, 9);
    let (header, tensors) = binary.split_at(header_length);
    let binary_post = |body: Vec<u8>, header_length: String| {
        client
            .post(&url)
            .header("Inference-Header-Content-Length", header_length)
            .header("Content-Type", "application/octet-stream")
            .body(body)
    };
    let with_input = |change: &dyn Fn(&mut Value)| {
        let mut header: Value = serde_json::from_slice(header).unwrap();
        change(&mut header["inputs"][0]);
        let header = serde_json::to_vec(&header).unwrap();
        (header.len().to_string(), header)
    };
    let size = tensors.len();
    let (short_length, short_header) =
        with_input(&|input| input["parameters"]["binary_data_size"] = json!(size - 4));
    let (both_length, both_header) = with_input(&|input| input["data"] = json!([0.0]));

    // A gzip bomb: 3 KB sent, 3 MB once inflated, past the 2 MB limit.
    let bomb = gzip(&vec![b' '; 3_000_000]);
    assert!(bomb.len() < 10_000);

    let cases: Vec<(reqwest::RequestBuilder, u16, String)> = vec![
        (
            client
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Content-Encoding", "gzip")
                .body(bomb),
            413,
            "exceeds the limit".into(),
        ),
        (
            binary_post(binary.clone(), (binary.len() + 1).to_string()),
            400,
            format!(
                "is {} but the body has only {} bytes",
                binary.len() + 1,
                binary.len()
            ),
        ),
        (
            binary_post(binary.clone(), "twelve".into()),
            400,
            "must be a byte count".into(),
        ),
        (
            binary_post([&binary[..], &[0; 4]].concat(), header_length.to_string()),
            400,
            "4 bytes of binary data follow the JSON header but no input claims them".into(),
        ),
        (
            binary_post(
                binary[..binary.len() - 4].to_vec(),
                header_length.to_string(),
            ),
            400,
            format!(
                "binary_data_size is {size} bytes but only {} remain",
                size - 4
            ),
        ),
        (
            binary_post([&short_header[..], &tensors[4..]].concat(), short_length),
            422,
            format!("binary_data_size is {} bytes, shape", size - 4),
        ),
        (
            binary_post([&both_header[..], tensors].concat(), both_length),
            400,
            "has both \"data\" and binary_data_size".into(),
        ),
        // A parameter on a route that takes none is refused, not ignored.
        (
            client.post(format!("{url}?timout=5")).json(&good),
            400,
            "unknown field `timout` (this route takes no parameters)".into(),
        ),
        (
            client.get(format!("{}/v2/health/ready?verbose=1", server.url)),
            400,
            "bad query string \"verbose=1\"".into(),
        ),
        (
            client
                .post(&url)
                .body("{\"inputs\": [")
                .header("Content-Type", "application/json"),
            400,
            "malformed".into(),
        ),
        // Parameters are scalars and shapes short: refused while read, not held in memory.
        (
            client.post(&url).json(&listed_parameter),
            400,
            "invalid type: sequence, expected a boolean, number or string".into(),
        ),
        (
            client.post(&url).json(&deep_shape),
            400,
            "a list of more than 32 items (at most 32)".into(),
        ),
        (client.post(&url).json(&wrong_shape), 422, "shape".into()),
        (
            client.post(&url).json(&minus_one),
            422,
            "has dimension -1 at index 0".into(),
        ),
        (
            client.post(&url).json(&wrong_dtype),
            422,
            "datatype INT32".into(),
        ),
        (
            client.post(&url).json(&unknown_output),
            422,
            "unknown output".into(),
        ),
        (
            client.post(&url).json(&output_twice),
            422,
            "is requested twice".into(),
        ),
        (
            client.post(&url).json(&classification),
            422,
            "classification".into(),
        ),
        (
            client.post(&url).json(&too_many),
            422,
            "values given".into(),
        ),
        (
            client.post(&url).json(&beyond_fp32),
            422,
            "is beyond the FP32 range".into(),
        ),
        (
            client.post(&url).json(&long_name),
            422,
            "nnnn [... 498".into(),
        ),
        (
            client.post(&url).json(&json!({"inputs": []})),
            422,
            format!("missing input(s): {}", input["name"].as_str().unwrap()),
        ),
        (
            client
                .post(format!("{}/v2/models/nope/infer", server.url))
                .json(&good),
            404,
            "nope".into(),
        ),
        (
            client
                .post(format!("{}/v2/models/{MODEL}/versions/9/infer", server.url))
                .json(&good),
            404,
            "version 9".into(),
        ),
        // Wrong methods under the per-model scopes get 405, unknown paths the JSON 404.
        (
            client.get(&url),
            405,
            format!("GET is not served on /v2/models/{MODEL}/infer; it takes POST"),
        ),
        (
            client
                .post(format!("{}/v2/models/{MODEL}", server.url))
                .json(&good),
            405,
            "it takes GET, HEAD".into(),
        ),
        (
            client.get(format!("{}/v2/models/{MODEL}/bogus", server.url)),
            404,
            "no route".into(),
        ),
        (
            client.get(format!("{}/v2/models/{MODEL}/versions/1/bogus", server.url)),
            404,
            "no route".into(),
        ),
        (
            client
                .post(&url)
                .body(vec![b' '; 3_000_000])
                .header("Content-Type", "application/json"),
            413,
            "exceeds the limit".into(),
        ),
        (
            client
                .post(&url)
                .body("x")
                .header("Content-Type", "image/png"),
            415,
            "image/png".into(),
        ),
        (
            client.get(format!("{}/v3/unknown", server.url)),
            404,
            "no route".into(),
        ),
    ];
    for (request, status, message) in cases {
        let response = request.send().await.unwrap();
        let got = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(got, status, "expected {status} for {message}: {text:?}");
        assert!(text.len() < 4096, "a {}-byte answer", text.len());
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let error = common::error_message(&body);
        assert!(
            error.contains(&message),
            "{status}: {error:?} lacks {message:?}"
        );
    }
    let wrong_method = client.delete(&url).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(wrong_method.headers()["Allow"], "POST");
    // Still healthy and serving; probes that send HEAD get the GET's status.
    assert_eq!(
        common::status_of(&server.url, "/v2/health/ready"),
        Some(200)
    );
    let probe = client
        .head(format!("{}/v2/health/ready", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), 200);
    assert_eq!(post_json(&url, &good).await.status(), 200);
    // A compressed request is answered as the plain one.
    let plain: Value = post_json(&url, &good).await.json().await.unwrap();
    let compressed = client
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gzip(&serde_json::to_vec(&good).unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(compressed.status(), 200);
    assert_eq!(compressed.json::<Value>().await.unwrap(), plain);
    // The model counts the 19 requests its infer handler refused (the binary, JSON and tensor
    // cases); those refused before it (query string, size, media type, routes) are not its.
    let text = server.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "linescan_inference_request_failure_total",
            &["reason=\"invalid_input\""]
        ),
        19.0,
        "{text}"
    );
}

/// Requests of the model the batcher holds that have not started running.
fn pending(metrics: &str) -> f64 {
    metric(
        metrics,
        "linescan_inference_pending_requests",
        &[&format!("model=\"{MODEL}\"")],
    )
}

/// Waits until the batcher holds `count` requests of the model not yet running.
async fn wait_pending(server: &Server, count: f64) {
    server.wait_metrics(|text| pending(text) == count).await;
}

/// Starts a server whose requests wait up to `delay_us` for company, sends four, and waits
/// until the batcher holds them. Each request's task returns its status, or 0 without an answer.
async fn server_with_requests_in_flight(
    delay_us: u64,
) -> (Repository, Server, Vec<tokio::task::JoinHandle<u16>>) {
    let (repository, server) = batching_server(delay_us, 0, &["--instances", "1"]);
    let metadata = metadata(&server).await;
    let requests = (0..4)
        .map(|i| {
            let body = json_request(&metadata, 1, i);
            let url = infer_url(&server);
            tokio::spawn(async move {
                match reqwest::Client::new().post(&url).json(&body).send().await {
                    Ok(response) => response.status().as_u16(),
                    Err(_) => 0,
                }
            })
        })
        .collect();
    wait_pending(&server, 4.0).await;
    (repository, server, requests)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_and_ctrl_c_finish_in_flight_requests_then_exit() {
    // actix-web's own handler would drop in-flight requests on SIGINT. The requests wait 25 s
    // for company, but a stopping server runs them at once: an exit within 10 s shows it.
    for signal in ["TERM", "INT"] {
        let (_repository, mut server, requests) = server_with_requests_in_flight(25_000_000).await;
        server.signal(signal);
        for request in requests {
            assert_eq!(
                request.await.unwrap(),
                200,
                "in-flight request lost at SIG{signal}"
            );
        }
        let status = server.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "SIG{signal}: exit status {status:?}");
        assert_eq!(
            common::status_of(&server.url, "/v2/health/live"),
            None,
            "still accepting after SIG{signal}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_server_still_batches_the_requests_queued_behind_a_running_batch() {
    // The first request's batch multiplies matrices for about a second (its value sets the
    // work); six cheap requests queue behind it, then the server is told to stop.
    const SLOW: f32 = 12_000.0;
    let repository = Repository::with_models(&[]);
    let folder = repository.path().join("slow");
    std::fs::create_dir_all(folder.join("1")).unwrap();
    std::fs::write(folder.join("1/model.onnx"), onnx::slow_model()).unwrap();
    std::fs::write(
        folder.join("config.toml"),
        "name = \"slow\"\nmax_batch_size = 8\n\
         [[input]]\nname = \"x\"\ndatatype = \"FP32\"\nshape = [1]\n\
         [[output]]\nname = \"y\"\ndatatype = \"FP32\"\nshape = [1]\n",
    )
    .unwrap();
    let mut server = Server::start(repository.path(), &["--instances", "1", "--threads", "1"]);
    let url = format!("{}/v2/models/slow/infer", server.url);
    let send = |value: f32| {
        let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [value]}]});
        let url = url.clone();
        tokio::spawn(async move {
            let response = post_json(&url, &body).await;
            let answered = std::time::Instant::now();
            let status = response.status().as_u16();
            (
                status,
                header_number(&response, "X-Linescan-Batch-Rows"),
                answered,
            )
        })
    };
    let model = ["model=\"slow\""];
    let running = send(SLOW);
    server
        .wait_metrics(|text| metric(text, "linescan_batch_close_total", &model) == 1.0)
        .await;
    let queued: Vec<_> = (0..6).map(|_| send(1.0)).collect();
    server
        .wait_metrics(|text| metric(text, "linescan_inference_pending_requests", &model) == 6.0)
        .await;
    server.terminate();
    let stopped = std::time::Instant::now();
    let (status, rows, answered) = running.await.unwrap();
    assert_eq!((status, rows), (200, 1));
    assert!(
        answered > stopped,
        "the slow batch ended before the stop: the test did not reach a drain"
    );
    for request in queued {
        let (status, rows, _) = request.await.unwrap();
        assert_eq!(
            (status, rows),
            (200, 6),
            "queued requests drained one by one"
        );
    }
    assert!(server.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn a_stalled_request_body_is_refused_after_the_body_timeout() {
    use std::io::{Read, Write};
    let repository = Repository::with_models(&[MODEL]);
    let args = ["--body-timeout", "1", "--max-body-bytes", "5000"];
    let mut server = Server::start(repository.path(), &args);
    let address = server.url.strip_prefix("http://").unwrap().to_owned();
    let infer = format!("/v2/models/{MODEL}/infer");
    let cases = [
        // Read, until the client stops sending.
        (
            infer.as_str(),
            1000,
            "408",
            "no byte of the request body arrived for 1 s",
        ),
        // Refused from the head, once what was sent of the body is drained: the drain gives
        // up when the client stalls too.
        (
            infer.as_str(),
            100_000,
            "413",
            "exceeds the limit of 5000 bytes",
        ),
        ("/v1/jobs", 10, "404", "sensors are not enabled"),
    ];
    for (target, length, status, error) in cases {
        let mut stalled = std::net::TcpStream::connect(&address).unwrap();
        stalled
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            stalled,
            "POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = stalled.read_to_string(&mut answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{target}: {answer}"
        );
        assert!(answer.contains(error), "{target}: {answer}");
    }
    // Nothing holds a graceful stop any more.
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_being_read_share_one_memory_limit() {
    use std::io::Write;
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(
        repository.path(),
        &[
            "--max-body-bytes",
            "1000000",
            "--max-body-memory",
            "1500000",
        ],
    );
    let url = infer_url(&server);
    // A client that declares a 1 MB body and trickles it: its body holds 1 MB of the 1.5 MB.
    let address = server.url.trim_start_matches("http://").to_string();
    let mut trickling = std::net::TcpStream::connect(&address).unwrap();
    write!(
        trickling,
        "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000\r\n\r\n{{"
    )
    .unwrap();
    // A 900 kB body sent until it is answered with `status`.
    let big_body_answered = async |status: u16| {
        common::poll_until(Duration::from_secs(30), async || {
            let response = reqwest::Client::new()
                .post(&url)
                .header("Content-Type", "application/json")
                .body(vec![b' '; 900_000])
                .send()
                .await
                .unwrap();
            if response.status() == status {
                Ok(response)
            } else {
                Err(response.status().to_string())
            }
        })
        .await
    };
    let refused = big_body_answered(503).await;
    assert_eq!(refused.headers()["Retry-After"], "1");
    let error: Value = refused.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("--max-body-memory"),
        "{error}"
    );
    // Once that client is gone, its share is free again: the same body is read (and found
    // not to be JSON).
    drop(trickling);
    let error: Value = big_body_answered(400).await.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("malformed"),
        "{error}"
    );
}

#[test]
fn a_second_stop_signal_or_sigquit_exits_at_once() {
    for signals in [&["INT", "INT"][..], &["TERM", "INT"], &["QUIT"]] {
        let repository = Repository::with_models(&[MODEL]);
        let mut server = Server::start(repository.path(), &[]);
        // A request whose body never comes: a graceful stop would wait the 30 s
        // --shutdown-timeout for it.
        let address = server.url.strip_prefix("http://").unwrap().to_owned();
        let mut stalled = std::net::TcpStream::connect(address).unwrap();
        std::io::Write::write_all(
            &mut stalled,
            format!(
                "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        for signal in signals {
            server.signal(signal);
            std::thread::sleep(Duration::from_millis(300));
        }
        let status = server.wait_exit(Duration::from_secs(10));
        assert_eq!(
            status.code(),
            Some(130),
            "{signals:?}: exit status {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_guards_everything_but_probes_and_metrics() {
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(repository.path(), &["--api-key", "k3y"]);
    let client = reqwest::Client::new();
    let model_url = format!("{}/v2/models/{MODEL}", server.url);
    let refused = client.get(&model_url).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["WWW-Authenticate"], "Bearer");
    let authorised = client
        .get(&model_url)
        .bearer_auth("k3y")
        .send()
        .await
        .unwrap();
    assert_eq!(authorised.status(), 200);
    let lower_case = client
        .get(&model_url)
        .header("Authorization", "bearer k3y")
        .send()
        .await
        .unwrap();
    assert_eq!(lower_case.status(), 200, "the scheme is case-insensitive");
    let wrong = client.get(&model_url).bearer_auth("k3y2").send().await;
    assert_eq!(wrong.unwrap().status(), 401);
    assert_eq!(common::status_of(&server.url, "/metrics"), Some(200));
    // The load generator sends the key as well.
    let bench = |key: &[&str]| {
        let mut args = vec!["bench", "infer", "--url", &server.url, "--model", MODEL];
        args.extend_from_slice(&["--concurrency", "1", "--duration", "0.3", "--warmup", "0"]);
        args.extend_from_slice(key);
        common::run_cli(&args)
    };
    let refused = bench(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{refused:?}"
    );
    let keyed = bench(&["--api-key", "k3y"]);
    assert!(keyed.status.success(), "{keyed:?}");
    // A URL with a trailing slash is the same server.
    let slashed = format!("{}/", server.url);
    let mut args = vec!["bench", "infer", "--url", &slashed, "--model", MODEL];
    args.extend_from_slice(&["--concurrency", "1", "--duration", "0.3", "--warmup", "0"]);
    args.extend_from_slice(&["--api-key", "k3y"]);
    let output = common::run_cli(&args);
    assert!(output.status.success(), "{output:?}");
    // Batches the model cannot take, and a report that could not be written, fail up front.
    for (extra, expected) in [
        (vec!["--batch", "100000"], "max_batch_size"),
        (
            vec!["--report", "/nonexistent-folder/r.json"],
            "cannot write the report",
        ),
    ] {
        let mut args = vec!["bench", "infer", "--url", &server.url, "--model", MODEL];
        args.extend_from_slice(&["--duration", "30", "--api-key", "k3y"]);
        args.extend_from_slice(&extra);
        let output = common::run_cli(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "{stderr}"
        );
    }
    // A run that fails leaves no report behind, not even an empty one.
    let folder = tempfile::tempdir().unwrap();
    let report = folder.path().join("r.json");
    let mut args = vec!["bench", "infer", "--url", &server.url, "--model", "nope"];
    args.extend_from_slice(&["--api-key", "k3y", "--report", report.to_str().unwrap()]);
    let output = common::run_cli(&args);
    assert!(!output.status.success(), "{output:?}");
    assert_eq!(std::fs::read_dir(folder.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn merged_requests_of_several_rows_get_their_own_rows_back() {
    // A wide window so all five arrive within it even on a loaded machine.
    let (_repository, server) = batching_server(1_500_000, 0, &["--instances", "1"]);
    let metadata = metadata(&server).await;
    let requests: Vec<Value> = (1..=5)
        .map(|rows| json_request(&metadata, rows, 100 + rows as u64))
        .collect();
    // Sent together: they wait for each other and run as one batch of 15 rows.
    let merged: Vec<Value> = futures_util::future::join_all(requests.iter().map(|body| {
        let url = infer_url(&server);
        let body = body.clone();
        async move {
            let response = post_json(&url, &body).await;
            assert_eq!(response.headers()["X-Linescan-Batch-Rows"], "15");
            response.json::<Value>().await.unwrap()
        }
    }))
    .await;
    for (body, together) in requests.iter().zip(&merged) {
        // Alone: each in a batch of its own.
        let alone: Value = post_json(&infer_url(&server), body)
            .await
            .json()
            .await
            .unwrap();
        let (alone, together) = (
            alone["outputs"].as_array().unwrap(),
            together["outputs"].as_array().unwrap(),
        );
        assert!(!alone.is_empty());
        assert_eq!(alone.len(), together.len());
        for (a, b) in alone.iter().zip(together) {
            assert_eq!(a["shape"], b["shape"]);
            let (a, b) = (a["data"].as_array().unwrap(), b["data"].as_array().unwrap());
            assert!(!a.is_empty());
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-4,
                    "{x} vs {y}"
                );
            }
        }
    }
    // Triton's statistics add up the same way: ten requests of 30 rows in six batches, one of
    // 15 rows and one of each size 1..=5.
    let (status, stats) = get_json(&format!("{}/v2/models/{MODEL}/stats", server.url)).await;
    assert_eq!(status, 200, "{stats}");
    let stats = &stats["model_stats"][0];
    assert_eq!(
        (&stats["name"], &stats["version"]),
        (&json!(MODEL), &json!("1"))
    );
    assert_eq!(stats["inference_count"], 30);
    assert_eq!(stats["execution_count"], 6);
    for stage in [
        "success",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
    ] {
        let tally = &stats["inference_stats"][stage];
        assert_eq!(tally["count"], 10, "{stage}: {tally}");
        assert!(tally["ns"].as_u64().unwrap() > 0, "{stage}: {tally}");
    }
    assert_eq!(stats["inference_stats"]["fail"]["count"], 0);
    let sizes: Vec<(u64, u64)> = stats["batch_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let size = b["batch_size"].as_u64().unwrap();
            (size, b["compute_infer"]["count"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(sizes, [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (15, 1)]);
    // Every model at once, and the extension is announced.
    let (_, all) = get_json(&format!("{}/v2/models/stats", server.url)).await;
    assert_eq!(all["model_stats"].as_array().unwrap().len(), 1, "{all}");
    let (_, server_metadata) = get_json(&format!("{}/v2", server.url)).await;
    assert!(
        server_metadata["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("statistics"))
    );
    let (status, unknown) = get_json(&format!("{}/v2/models/nope/stats", server.url)).await;
    assert_eq!(status, 404, "{unknown}");
}

#[test]
fn the_load_generator_reports_latency_and_stops_on_total_failure() {
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(repository.path(), &[]);
    let files = tempfile::tempdir().unwrap();
    let report = files.path().join("report.json");
    let bench = |batch: &str, url: &str, rate: &[&str]| {
        let mut args = vec![
            "bench",
            "infer",
            "--url",
            url,
            "--model",
            MODEL,
            "--binary",
            "--batch",
            batch,
            "--concurrency",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend_from_slice(rate);
        common::run_cli(&args)
    };
    let output = bench("2", &server.url, &[]);
    assert!(output.status.success(), "{output:?}");
    let figures: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(figures["requests_ok"].as_u64().unwrap() > 0, "{figures}");
    assert_eq!(figures["requests_failed"], 0, "{figures}");
    assert_eq!(figures["batch"], 2);
    assert!(
        figures["latency"]["p99_ms"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    assert!(
        figures["stages"]["queue"]["count"].as_u64().unwrap() > 0,
        "{figures}"
    );
    // The server's CPU comes from its /metrics, the load generator's from /proc.
    assert!(
        figures["cpu"]["server_cores"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    assert!(
        figures["cpu"]["bench_cores"].as_f64().unwrap() > 0.0,
        "{figures}"
    );
    // Closed loop: at most the 2 clients' last requests are unanswered when the run ends.
    assert!(
        figures["requests_unanswered"].as_u64().unwrap() <= 2,
        "{figures}"
    );
    // Open loop: what the rate asked for and did not get answered is counted.
    let output = bench("2", &server.url, &["--rate", "100000"]);
    assert!(output.status.success(), "{output:?}");
    let figures: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(
        figures["requests_unanswered"].as_u64().unwrap() > 0,
        "2 in flight cannot answer 100,000 requests/s: {figures}"
    );
    // Every request refused (bodies above a tiny limit): the run fails and says why.
    let strict = Server::start(repository.path(), &["--max-body-bytes", "1000"]);
    let output = bench("2", &strict.url, &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("every request failed") && stderr.contains("exceeds the limit of 1000"),
        "{stderr}"
    );
}

/// A repository with one echo model made on the fly: every input `(name, ONNX type, datatype)`
/// of shape `[batch, width]` (width -1: variable) comes back as `<name>_echo` in its own type
/// and as `<name>_fp32`.
fn echo_repository(model: &str, inputs: &[(&str, i64, &str)], width: i64) -> Repository {
    let repository = Repository::with_models(&[]);
    let folder = repository.path().join(model);
    std::fs::create_dir_all(folder.join("1")).unwrap();
    let types: Vec<_> = inputs
        .iter()
        .map(|(name, kind, _)| (*name, *kind))
        .collect();
    let onnx_model = onnx::echo_and_cast_model(&types, width);
    std::fs::write(folder.join("1/model.onnx"), onnx_model).unwrap();
    let tensor = |name: &str, datatype: &str| {
        format!("name = \"{name}\"\ndatatype = \"{datatype}\"\nshape = [{width}]\n")
    };
    let mut config = format!("name = \"{model}\"\nmax_batch_size = 8\n");
    for (name, _, datatype) in inputs {
        config += &format!("[[input]]\n{}", tensor(name, datatype));
    }
    for (name, _, datatype) in inputs {
        config += &format!("[[output]]\n{}", tensor(&format!("{name}_echo"), datatype));
        config += &format!("[[output]]\n{}", tensor(&format!("{name}_fp32"), "FP32"));
    }
    std::fs::write(folder.join("config.toml"), config).unwrap();
    repository
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_onnx_runtime_fails_answers_500_and_the_model_goes_on() {
    let repository = Repository::with_models(&[]);
    let folder = repository.path().join("add");
    std::fs::create_dir_all(folder.join("1")).unwrap();
    std::fs::write(folder.join("1/model.onnx"), onnx::add_model()).unwrap();
    let tensor = |name: &str| format!("name = \"{name}\"\ndatatype = \"FP32\"\nshape = [-1]\n");
    std::fs::write(
        folder.join("config.toml"),
        format!(
            "name = \"add\"\nmax_batch_size = 8\n[[input]]\n{}[[input]]\n{}[[output]]\n{}",
            tensor("x"),
            tensor("y"),
            tensor("sum")
        ),
    )
    .unwrap();
    let server = Server::start(repository.path(), &[]);
    let url = format!("{}/v2/models/add/infer", server.url);
    let request = |x: Vec<f32>, y: Vec<f32>| {
        json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, x.len()], "data": x},
            {"name": "y", "datatype": "FP32", "shape": [1, y.len()], "data": y},
        ]})
    };
    // Widths 2 and 3 pass every check of the config (-1) but do not broadcast.
    let failed = post_json(&url, &request(vec![1.0, 2.0], vec![1.0, 2.0, 3.0])).await;
    assert_eq!(failed.status(), 500);
    let error: Value = failed.json().await.unwrap();
    assert!(
        {
            let message = common::error_message(&error);
            message.starts_with("inference failed: ") && message.contains("Add")
        },
        "{error}"
    );
    // The model goes on serving.
    let answer = post_json(&url, &request(vec![1.0, 2.0], vec![10.0, 20.0])).await;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(
        answer["outputs"][0]["data"],
        json!([11.0, 22.0]),
        "{answer}"
    );
    // Triton's statistics: the failed request in `fail`, with no execution; /metrics counts it
    // by reason.
    let (_, stats) = get_json(&format!("{}/v2/models/add/stats", server.url)).await;
    let stats = &stats["model_stats"][0];
    assert_eq!(
        (
            &stats["inference_stats"]["fail"]["count"],
            &stats["inference_stats"]["success"]["count"],
            &stats["execution_count"]
        ),
        (&json!(1), &json!(1), &json!(1)),
        "{stats}"
    );
    let text = server.metrics_text().await;
    let failures = metric(
        &text,
        "linescan_inference_request_failure_total",
        &["model=\"add\"", "reason=\"inference\""],
    );
    assert_eq!(failures, 1.0, "{text}");
    // The counters agree with the statistics: one successful execution of one row; both
    // batches that ran have a close reason.
    for name in [
        "linescan_inference_exec_count_total",
        "linescan_inference_count_total",
    ] {
        assert_eq!(
            metric(&text, name, &["model=\"add\""]),
            1.0,
            "{name}: {text}"
        );
    }
    let closed = metric(&text, "linescan_batch_close_total", &["model=\"add\""]);
    assert_eq!(closed, 2.0, "{text}");
}

/// `half`: FP16 input `x` and BF16 input `b` (`[batch, 3]`).
fn half_precision_repository() -> Repository {
    echo_repository(
        "half",
        &[("x", onnx::FLOAT16, "FP16"), ("b", onnx::BFLOAT16, "BF16")],
        3,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_variable_dimension_is_sized_by_the_values_sent_not_the_declared_shape() {
    let repository = echo_repository("var", &[("x", onnx::FLOAT, "FP32")], -1);
    let server = Server::start(repository.path(), &[]);
    let url = format!("{}/v2/models/var/infer", server.url);
    let request = |shape: Value, data: Value| json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]});
    // Declared shapes far beyond the one value sent: refused, not allocated.
    for (width, fragment) in [
        (1_000_000_000_000_i64, "1 values given"),
        (2_305_843_009_213_693_951, "1 values given"),
        (i64::MAX, "shape is too large"),
    ] {
        let response = post_json(&url, &request(json!([1, width]), json!([1.0]))).await;
        assert_eq!(response.status(), 422, "width {width}");
        let body: Value = response.json().await.unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(fragment), "{message}");
    }
    // The server is still up, and a variable width works.
    let response = post_json(&url, &request(json!([2, 3]), json!([1, 2, 3, 4, 5, 6]))).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["outputs"][0]["shape"], json!([2, 3]), "{body}");
    assert_eq!(
        body["outputs"][0]["data"],
        json!([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn json_data_far_beyond_the_model_is_refused_while_it_is_read() {
    // At most 8 rows of 3 values: 24 in a legal request.
    let repository = echo_repository("fixed", &[("x", onnx::FLOAT, "FP32")], 3);
    let server = Server::start(repository.path(), &[]);
    let url = format!("{}/v2/models/fixed/infer", server.url);
    let request = |rows: usize| {
        let data: Vec<f32> = (0..rows * 3).map(|i| i as f32).collect();
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 3], "data": data}]})
    };
    // Just over the limit the shape check says which limit; far over it the request is refused
    // as too large before the rest of its data is held.
    for (rows, status, fragment) in [
        (9, 422, "exceeds max_batch_size 8"),
        (
            1000,
            413,
            "holds more than 48 values, twice what model fixed takes",
        ),
    ] {
        let response = post_json(&url, &request(rows)).await;
        assert_eq!(response.status(), status, "{rows} rows");
        let body: Value = response.json().await.unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(fragment), "{message}");
    }
    assert_eq!(post_json(&url, &request(8)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn fp16_and_bf16_tensors_in_json_and_binary() {
    let repository = half_precision_repository();
    let server = Server::start(repository.path(), &[]);
    let url = format!("{}/v2/models/half/infer", server.url);
    let (_, metadata) = get_json(&format!("{}/v2/models/half", server.url)).await;
    assert_eq!(metadata["inputs"][0]["datatype"], "FP16", "{metadata}");
    assert_eq!(metadata["inputs"][1]["datatype"], "BF16", "{metadata}");

    // JSON: numbers are rounded to the type (0.1 is not an FP16 or BF16 number) and come back
    // as the FP32 numbers they became.
    let x = [0.5, 1.5, -2.25, 65504.0, 0.1, -0.0];
    let b = [1.0, 3.0e38, -0.5, 0.1, 256.0, 2.0e-3];
    let request = json!({"inputs": [
        {"name": "x", "datatype": "FP16", "shape": [2, 3], "data": x},
        {"name": "b", "datatype": "BF16", "shape": [2, 3], "data": b},
    ]});
    let response = post_json(&url, &request).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let output = |name: &str| -> Vec<f32> {
        let output = body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("no output {name} in {body}"));
        output["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    let x16: Vec<f32> = x.iter().map(|v| half::f16::from_f64(*v).to_f32()).collect();
    let b16: Vec<f32> = b
        .iter()
        .map(|v| half::bf16::from_f64(*v).to_f32())
        .collect();
    assert_eq!(x16[4], 0.099975586);
    assert_eq!(output("x_echo"), x16);
    assert_eq!(output("x_fp32"), x16);
    assert_eq!(output("b_echo"), b16);
    assert_eq!(output("b_fp32"), b16);

    // Binary: the 16-bit patterns go through untouched, both ways.
    let x_bits: Vec<u8> = x
        .iter()
        .flat_map(|v| half::f16::from_f64(*v).to_le_bytes())
        .collect();
    let b_bits: Vec<u8> = b
        .iter()
        .flat_map(|v| half::bf16::from_f64(*v).to_le_bytes())
        .collect();
    let header = serde_json::to_vec(&json!({
        "inputs": [
            {"name": "x", "datatype": "FP16", "shape": [2, 3], "parameters": {"binary_data_size": 12}},
            {"name": "b", "datatype": "BF16", "shape": [2, 3], "parameters": {"binary_data_size": 12}},
        ],
        "outputs": [{"name": "x_echo", "parameters": {"binary_data": true}},
                    {"name": "b_echo", "parameters": {"binary_data": true}}],
    }))
    .unwrap();
    let response = post_binary(&url, &header, &[x_bits.as_slice(), &b_bits].concat()).await;
    assert_eq!(response.status(), 200);
    let header_length = header_number(&response, "Inference-Header-Content-Length") as usize;
    let bytes = response.bytes().await.unwrap();
    let reply: Value = serde_json::from_slice(&bytes[..header_length]).unwrap();
    assert_eq!(reply["outputs"][0]["datatype"], "FP16", "{reply}");
    assert_eq!(reply["outputs"][1]["datatype"], "BF16", "{reply}");
    assert_eq!(
        &bytes[header_length..],
        [x_bits, b_bits].concat().as_slice()
    );

    // NaN and ±Infinity in JSON, both ways, as Triton writes them (bare tokens).
    let body = r#"{"inputs": [
        {"name": "x", "datatype": "FP16", "shape": [1, 3], "data": [NaN, -Infinity, 1]},
        {"name": "b", "datatype": "BF16", "shape": [1, 3], "data": [Infinity, 0, 2]}]}"#;
    let response = reqwest::Client::new()
        .post(&url)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains(r#""data":[NaN,-Infinity,1.0]"#), "{text}");
    assert!(text.contains(r#""data":[Infinity,0.0,2.0]"#), "{text}");

    // Beyond the type's range: named, 422.
    let too_big = json!({"inputs": [
        {"name": "x", "datatype": "FP16", "shape": [1, 3], "data": [1.0, 70000.0, 2.0]},
        {"name": "b", "datatype": "BF16", "shape": [1, 3], "data": [1.0, 1.0, 1.0]},
    ]});
    let response = post_json(&url, &too_big).await;
    assert_eq!(response.status(), 422);
    let message = response.json::<Value>().await.unwrap()["error"].to_string();
    assert!(
        message.contains("70000.0 is beyond the FP16 range (±65504)"),
        "{message}"
    );
}

/// A KServe v2 server without Triton's `/config` extension (like the FastAPI reference): model
/// metadata and an infer route that answers every request.
async fn server_without_config() -> (String, actix_web::dev::ServerHandle) {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let server = HttpServer::new(|| {
        App::new()
            .route(
                "/v2/models/plain",
                web::get().to(|| async {
                    HttpResponse::Ok().json(json!({"name": "plain", "inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [-1, 3]}]}))
                }),
            )
            .route(
                "/v2/models/plain/infer",
                web::post().to(|| async { HttpResponse::Ok().json(json!({"outputs": []})) }),
            )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let url = format!("http://{}", server.addrs()[0]);
    let running = server.run();
    let handle = running.handle();
    tokio::spawn(running);
    (url, handle)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_load_generator_runs_against_a_server_without_the_config_extension() {
    let (url, handle) = server_without_config().await;
    let output = tokio::task::spawn_blocking(move || {
        let mut args = vec!["bench", "infer", "--url", url.as_str(), "--model", "plain"];
        args.extend_from_slice(&["--batch", "2", "--concurrency", "1"]);
        args.extend_from_slice(&["--duration", "0.3", "--warmup", "0"]);
        common::run_cli(&args)
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    handle.stop(false).await;
}
