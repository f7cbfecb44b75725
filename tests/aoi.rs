//! AOI over real HTTP with synthetic boards drawn in code: template lifecycle, inspection of clean
//! and defective boards (also misregistered and grey), batch and multipart forms, per-board reject
//! thresholds, persistence across restarts, and every error path.

mod common;

use common::{Repository, Server};
use linescan::aoi::synthetic::{self, DefectKind, SyntheticBoard};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

const MODEL: &str = "aoi_defect";

fn png(image: &linescan::aoi::image_io::GrayImage) -> Vec<u8> {
    synthetic::encode(image, image::ImageFormat::Png)
}

fn start(extra: &[&str]) -> (Repository, Server) {
    start_configured(&[], extra)
}

/// `start`, with `settings` (key, value) rewritten in the defect model's config.toml.
fn start_configured(settings: &[(&str, &str)], extra: &[&str]) -> (Repository, Server) {
    let repository = Repository::with_models(&[MODEL]);
    for (key, value) in settings {
        repository.set(MODEL, key, value);
    }
    let server = Server::start(repository.path(), extra);
    (repository, server)
}

async fn put_template(server: &Server, board: &str, body: Vec<u8>, query: &str) -> (u16, Value) {
    let url = format!("{}/v1/templates/{board}{query}", server.url);
    common::status_and_json(reqwest::Client::new().put(url).body(body)).await
}

async fn inspect(server: &Server, board: &str, body: Vec<u8>) -> (u16, Value) {
    let url = format!("{}/v1/inspect/{board}", server.url);
    common::status_and_json(reqwest::Client::new().post(url).body(body)).await
}

fn overlaps(a: &[i64; 4], b: &Value) -> bool {
    let b: Vec<i64> = b
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]
}

/// Every drawn defect is covered by a reported defect box.
fn assert_finds_every_defect(board: &SyntheticBoard, result: &Value) {
    let defects = result["defects"].as_array().unwrap();
    for (kind, drawn) in &board.defects {
        assert!(
            defects.iter().any(|d| overlaps(drawn, &d["box"])),
            "{kind:?} at {drawn:?} not found in {result}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn template_lifecycle_and_inspection_verdicts() {
    let (_repository, server) = start(&[]);
    let clean = synthetic::board(&[], (0, 0));
    let (status, info) = put_template(&server, "board-a", png(&clean.template), "").await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(640), Some(640))
    );
    let (status, _) = put_template(&server, "board-a", png(&clean.template), "").await;
    assert_eq!(status, 200, "replacing answers 200");

    let (status, info) = common::get_json(&format!("{}/v1/templates/board-a", server.url)).await;
    assert_eq!((status, info["board"].as_str()), (200, Some("board-a")));
    let image = reqwest::get(format!("{}/v1/templates/board-a/image", server.url))
        .await
        .unwrap();
    assert_eq!(image.headers()["content-type"], "image/png");
    assert_eq!(image.bytes().await.unwrap().to_vec(), png(&clean.template));
    let (_, list) = common::get_json(&format!("{}/v1/templates", server.url)).await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);

    // A clean board passes with no defects.
    let (status, result) = inspect(&server, "board-a", png(&clean.test)).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["verdict"], "PASS", "{result}");
    assert_eq!(result["defects"].as_array().unwrap().len(), 0);
    for stage in [
        "decode",
        "binarize",
        "align",
        "candidates",
        "crops",
        "classify",
        "detections",
        "total",
    ] {
        assert!(
            result["timings_ms"][stage].as_f64().is_some(),
            "{stage} missing: {result}"
        );
    }

    // A board with all six defects is rejected and each defect is boxed, with a class and a confidence.
    let defective = synthetic::board(&DefectKind::ALL, (0, 0));
    let (status, result) = inspect(
        &server,
        "board-a",
        synthetic::encode(&defective.test, image::ImageFormat::Jpeg),
    )
    .await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["verdict"], "REJECT");
    assert_finds_every_defect(&defective, &result);
    for defect in result["defects"].as_array().unwrap() {
        let class = defect["class"].as_str().unwrap();
        assert!(
            DefectKind::ALL.iter().any(|k| k.class_name() == class),
            "{class}"
        );
        let confidence = defect["confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&confidence));
    }

    let response = reqwest::Client::new()
        .delete(format!("{}/v1/templates/board-a", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let (status, error) = inspect(&server, "board-a", png(&clean.test)).await;
    assert_eq!(status, 404, "{error}");
    assert!(common::error_message(&error).contains("board-a"));

    let metrics = server.metrics_text().await;
    assert!(metrics.contains("linescan_stage_duration_seconds_bucket{backend=\"cpu\",pipeline=\"aoi\",stage=\"align\""), "{metrics}");
    // Every route's latency, failures included (the 404 above).
    assert!(
        metrics.contains(
            "linescan_http_request_duration_seconds_count{route=\"/v1/inspect/{board}\"}"
        ),
        "{metrics}"
    );
    // One clean and one defective board; every reported defect counted by class; the board
    // deleted, so no template is left.
    let reported = result["defects"].as_array().unwrap();
    let mut expected = vec![
        "linescan_aoi_inspections_total{verdict=\"PASS\"} 1".to_string(),
        "linescan_aoi_inspections_total{verdict=\"REJECT\"} 1".to_string(),
        "linescan_aoi_templates{state=\"loaded\"} 0".to_string(),
        "linescan_http_responses_total{route=\"/v1/inspect/{board}\",status=\"404\"} 1".to_string(),
        "linescan_http_responses_total{route=\"/v1/templates/{board}\",status=\"201\"} 1"
            .to_string(),
    ];
    for kind in DefectKind::ALL {
        let class = kind.class_name();
        let count = reported.iter().filter(|d| d["class"] == class).count();
        expected.push(format!(
            "linescan_aoi_defects_total{{class=\"{class}\"}} {count}"
        ));
    }
    for line in expected {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn misregistered_and_grey_boards_are_still_inspected() {
    let (_repository, server) = start(&[]);
    let clean = synthetic::board(&[], (0, 0));
    put_template(&server, "b", png(&clean.template), "").await;

    let shifted = synthetic::board(&DefectKind::ALL, (3, -2));
    let (_, result) = inspect(&server, "b", png(&shifted.test)).await;
    assert_eq!(result["verdict"], "REJECT", "{result}");
    assert_finds_every_defect(&shifted, &result);
    // The response says how the board was registered, and how well.
    let alignment = &result["alignment"];
    assert_eq!(
        (
            &alignment["dx"],
            &alignment["dy"],
            &alignment["at_search_limit"]
        ),
        (&json!(3), &json!(-2), &json!(false)),
        "{result}"
    );
    assert!(alignment["mismatch"].as_f64().unwrap() < 0.05, "{result}");
    assert_eq!(alignment["matches_template"], true, "{result}");
    // An inverted image (the wrong polarity) or noise does not match the template: rejected,
    // whatever the classifier makes of it.
    let mut inverted = clean.test.clone();
    inverted.pixels.iter_mut().for_each(|p| *p = 255 - *p);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut noise = clean.test.clone();
    noise.pixels.iter_mut().for_each(|p| *p = rng.u8(..));
    for image in [inverted, noise] {
        let (_, result) = inspect(&server, "b", png(&image)).await;
        let alignment = &result["alignment"];
        assert!(alignment["mismatch"].as_f64().unwrap() > 0.3, "{result}");
        assert_eq!(alignment["matches_template"], false, "{result}");
        assert_eq!(result["verdict"], "REJECT", "{result}");
    }
    let (_, result) = inspect(&server, "b", png(&synthetic::board(&[], (2, 2)).test)).await;
    assert_eq!(result["verdict"], "PASS", "a shifted clean board: {result}");
    assert_eq!(result["alignment"]["matches_template"], true, "{result}");

    let grey = synthetic::board(&DefectKind::ALL, (0, 0));
    let (_, result) = inspect(&server, "b", png(&synthetic::grey(&grey.test, 1))).await;
    assert_eq!(result["verdict"], "REJECT", "{result}");
    assert_finds_every_defect(&grey, &result);
    let (_, result) = inspect(&server, "b", png(&synthetic::grey(&clean.test, 2))).await;
    assert_eq!(result["verdict"], "PASS", "a grey clean board: {result}");
}

/// Sends a multipart form with `method` to `url`.
async fn send_form(method: reqwest::Method, url: &str, form: Form) -> reqwest::Response {
    reqwest::Client::new()
        .request(method, url)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_and_multipart_forms() {
    let (_repository, server) = start(&[]);
    let clean = synthetic::board(&[], (0, 0));
    let defective = synthetic::board(&[DefectKind::Short, DefectKind::Open], (0, 0));
    // Template registered through a multipart form.
    let form = Form::new().part(
        "template",
        Part::bytes(png(&clean.template)).file_name("golden.png"),
    );
    let response = send_form(
        reqwest::Method::PUT,
        &format!("{}/v1/templates/m", server.url),
        form,
    )
    .await;
    assert_eq!(response.status(), 201);

    let inspect_url = format!("{}/v1/inspect/m", server.url);
    let image_form = || {
        Form::new().part(
            "image",
            Part::bytes(png(&defective.test)).file_name("t.png"),
        )
    };
    let response = send_form(reqwest::Method::POST, &inspect_url, image_form()).await;
    let result: Value = response.json().await.unwrap();
    assert_eq!(result["verdict"], "REJECT", "{result}");
    // A text field is refused by name, not taken for an image.
    let with_text = image_form().text("board", "m");
    let response = send_form(reqwest::Method::POST, &inspect_url, with_text).await;
    assert_eq!(response.status(), 422);
    let error: Value = response.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("multipart field \"board\" is not a file"),
        "{error}"
    );

    let form = Form::new()
        .part("a", Part::bytes(png(&clean.test)).file_name("clean.png"))
        .part("b", Part::bytes(png(&defective.test)).file_name("bad.png"))
        .part(
            "c",
            Part::bytes(b"not an image".to_vec()).file_name("junk.bin"),
        );
    let response = send_form(
        reqwest::Method::POST,
        &format!("{}/v1/inspect/m/batch", server.url),
        form,
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(
        (results[0]["name"].as_str(), results[0]["verdict"].as_str()),
        (Some("clean.png"), Some("PASS"))
    );
    assert_eq!(results[1]["verdict"], "REJECT");
    assert_eq!(results[2]["status"], 415, "{}", results[2]);
    assert!(
        results[2]["error"]
            .as_str()
            .unwrap()
            .contains("not an image")
    );
    // The batch was answered 200; its failed image is counted all the same.
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("linescan_aoi_images_failed_total{status=\"415\"} 1"),
        "{metrics}"
    );
    // More images than a batch takes: refused, the answer read after the whole form was sent.
    let image = png(&clean.test);
    let form = (0..65).fold(Form::new(), |form, i| {
        form.part(
            format!("i{i}"),
            Part::bytes(image.clone()).file_name(format!("{i}.png")),
        )
    });
    let response = send_form(
        reqwest::Method::POST,
        &format!("{}/v1/inspect/m/batch", server.url),
        form,
    )
    .await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert!(
        common::error_message(&error).contains("at most 64 images per request"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reject_threshold_is_per_board() {
    let (_repository, server) = start(&[]);
    let clean = synthetic::board(&[], (0, 0));
    let defective = synthetic::board(&DefectKind::ALL, (0, 0));
    let (_, strict_info) = put_template(&server, "strict", png(&clean.template), "").await;
    // Without its own threshold a board rejects at the model's operating threshold.
    assert_eq!(strict_info["reject_threshold"], serde_json::Value::Null);
    let model_threshold = strict_info["effective_reject_threshold"].as_f64().unwrap();
    assert!(
        model_threshold > 0.0 && model_threshold < 1.0,
        "{strict_info}"
    );
    let (status, info) = put_template(
        &server,
        "lenient",
        png(&clean.template),
        "?reject_threshold=1",
    )
    .await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["reject_threshold"], 1.0);
    assert_eq!(info["effective_reject_threshold"], 1.0);
    let (_, strict) = inspect(&server, "strict", png(&defective.test)).await;
    let (_, lenient) = inspect(&server, "lenient", png(&defective.test)).await;
    assert_eq!(strict["verdict"], "REJECT");
    // The same defects are reported; only those at confidence 1.0 could reject the lenient board.
    assert_eq!(strict["defects"], lenient["defects"]);
    let certain = lenient["defects"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["confidence"].as_f64() == Some(1.0));
    assert_eq!(lenient["verdict"], if certain { "REJECT" } else { "PASS" });
    let (status, error) =
        put_template(&server, "x", png(&clean.template), "?reject_threshold=2").await;
    assert_eq!(status, 422, "{error}");
    // A misspelt setting is refused rather than silently ignored.
    let (status, error) =
        put_template(&server, "x", png(&clean.template), "?reject_treshold=0.5").await;
    assert_eq!(status, 400, "{error}");
    assert!(
        common::error_message(&error).contains("unknown field `reject_treshold`"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_board_stricter_than_the_model_lists_and_rejects_what_it_would_miss() {
    // A model threshold above every confidence the synthetic defects get (0.97-0.99).
    let (_repository, server) = start_configured(&[("score_threshold", "0.999")], &[]);
    let clean = synthetic::board(&[], (0, 0));
    let defective = synthetic::board(&DefectKind::ALL, (0, 0));
    put_template(&server, "model", png(&clean.template), "").await;
    let (status, info) = put_template(
        &server,
        "strict",
        png(&clean.template),
        "?reject_threshold=0.5",
    )
    .await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["effective_reject_threshold"], 0.5);
    let (_, by_model) = inspect(&server, "model", png(&defective.test)).await;
    assert_eq!(by_model["verdict"], "PASS", "{by_model}");
    assert_eq!(by_model["defects"], json!([]));
    let (_, strict) = inspect(&server, "strict", png(&defective.test)).await;
    assert_eq!(strict["verdict"], "REJECT", "{strict}");
    assert_finds_every_defect(&defective, &strict);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_board_with_candidates_beyond_the_cap_is_rejected_and_says_so() {
    // No confidence reaches the model's threshold (as above), so only the cap can reject.
    let (_repository, server) = start_configured(
        &[("score_threshold", "0.999"), ("max_candidates", "2")],
        &[],
    );
    let clean = synthetic::board(&[], (0, 0));
    let defective = synthetic::board(&DefectKind::ALL, (0, 0));
    put_template(&server, "capped", png(&clean.template), "").await;
    let (status, result) = inspect(&server, "capped", png(&defective.test)).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["verdict"], "REJECT", "{result}");
    assert_eq!(result["defects"], json!([]), "{result}");
    // One candidate per drawn defect: six, of which two were classified.
    assert_eq!(result["unclassified_candidates"], 4, "{result}");
    let (_, clean_result) = inspect(&server, "capped", png(&clean.test)).await;
    assert_eq!(clean_result["verdict"], "PASS", "{clean_result}");
    assert_eq!(clean_result["unclassified_candidates"], 0, "{clean_result}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_path_answers_with_the_right_status() {
    let (_repository, server) = start(&["--max-image-pixels", "500000"]);
    let clean = synthetic::board(&[], (0, 0));
    put_template(&server, "e", png(&clean.template), "").await;
    let big = linescan::aoi::image_io::GrayImage {
        width: 800,
        height: 800,
        pixels: vec![255; 640_000],
    };
    let small = linescan::aoi::image_io::GrayImage {
        width: 320,
        height: 320,
        pixels: vec![255; 102_400],
    };
    let truncated = {
        let bytes = png(&clean.test);
        bytes[..bytes.len() / 3].to_vec()
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("unknown-board", png(&clean.test), 404, "no template"),
        (
            "e",
            b"plain text, not an image".to_vec(),
            415,
            "not an image",
        ),
        ("e", Vec::new(), 422, "empty"),
        ("e", truncated, 422, "corrupt"),
        ("e", png(&small), 422, "320x320"),
        ("e", png(&big), 413, "exceeds the limit"),
        ("bad%20name", png(&clean.test), 422, "invalid"),
    ];
    for (board, body, status, message) in cases {
        let (got, error) = inspect(&server, board, body).await;
        assert_eq!(got, status, "{board} {message}: {error}");
        assert!(
            common::error_message(&error).contains(message),
            "{error} lacks {message:?}"
        );
    }
    // A valid TIFF whose float samples the decoder does not read: unsupported, not corrupt.
    let mut float_tiff = Vec::new();
    tiff::encoder::TiffEncoder::new(std::io::Cursor::new(&mut float_tiff))
        .unwrap()
        .write_image::<tiff::encoder::colortype::Gray32Float>(64, 64, &[0.5; 64 * 64])
        .unwrap();
    let (status, error) = inspect(&server, "e", float_tiff).await;
    assert_eq!(status, 415, "{error}");
    assert!(
        common::error_message(&error).contains("TIFF image in a layout that cannot be read here"),
        "{error}"
    );
    // An empty form is an empty body, as a raw one is.
    for path in ["/v1/inspect/e", "/v1/templates/e5"] {
        let request = reqwest::Client::new();
        let request = if path.starts_with("/v1/inspect") {
            request.post(format!("{}{path}", server.url))
        } else {
            request.put(format!("{}{path}", server.url))
        };
        let response = request
            .header("Content-Type", "multipart/form-data; boundary=x")
            .body(Vec::new())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 422, "{path}");
        let error: Value = response.json().await.unwrap();
        assert!(
            common::error_message(&error).contains("the body is empty"),
            "{error}"
        );
    }
    let (status, error) = put_template(&server, "e2", b"GIF89a".to_vec(), "").await;
    assert_eq!(status, 415, "{error}");
    // A template the alignment could slide off itself is refused.
    let strip = linescan::aoi::image_io::GrayImage {
        width: 1000,
        height: 63,
        pixels: vec![0; 63_000],
    };
    let (status, error) = put_template(&server, "e3", png(&strip), "").await;
    assert_eq!(status, 422, "{error}");
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("1000x63 is too small"), "{message}");
    // So is one of a single colour: a blank board would pass against it.
    let blank = linescan::aoi::image_io::GrayImage {
        width: 640,
        height: 640,
        pixels: vec![255; 640 * 640],
    };
    let (status, error) = put_template(&server, "e4", png(&blank), "").await;
    assert_eq!(status, 422, "{error}");
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("100.000 % one colour"), "{message}");
    assert_eq!(
        common::status_of(&server.url, "/v2/health/ready"),
        Some(200)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_stay_within_the_memory_allowed() {
    let repository = Repository::with_models(&[MODEL]);
    let data = tempfile::tempdir().unwrap();
    let clean = synthetic::board(&[], (0, 0));
    let template = &clean.template;
    // One bit per pixel, rows padded to 64 bits.
    let each = (template.width.div_ceil(64) * 8 * template.height) as u64;
    let start_with = |limit: u64| {
        let limit = limit.to_string();
        let args = [
            "--data-dir",
            data.path().to_str().unwrap(),
            "--max-template-bytes",
            &limit,
        ];
        Server::start(repository.path(), &args)
    };
    {
        // Two fit, a third does not.
        let server = start_with(2 * each + each / 2);
        // "a-b.json" sorts before "a.json": the file names do not give the board order.
        for board in ["a", "a-b"] {
            let (status, body) = put_template(&server, board, png(template), "").await;
            assert_eq!(status, 201, "{body}");
        }
        let (status, body) = put_template(&server, "c", png(template), "").await;
        assert_eq!(status, 507, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("--max-template-bytes") && error.contains("DELETE /v1/templates"),
            "{error}"
        );
        assert!(!data.path().join("templates").join("c.json").exists());
        let missing = common::get_json(&format!("{}/v1/templates/c", server.url)).await;
        assert_eq!(missing.0, 404, "{missing:?}");
        // A replacement counts its board once.
        let (status, body) = put_template(&server, "a-b", png(template), "").await;
        assert_eq!(status, 200, "{body}");
        let metrics = server.metrics_text().await;
        for line in [
            format!(
                "linescan_aoi_template_memory_bytes{{of=\"used\"}} {}",
                2 * each
            ),
            format!(
                "linescan_aoi_template_memory_bytes{{of=\"limit\"}} {}",
                2 * each + each / 2
            ),
        ] {
            assert!(metrics.contains(&line), "{line} not in\n{metrics}");
        }
    }
    // A lower limit at the next start serves what fits, by board name, and lists the rest.
    let server = start_with(each + each / 2);
    let (_, list) = common::get_json(&format!("{}/v1/templates", server.url)).await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["templates"][0]["board"], "a", "{list}");
    assert_eq!(list["not_loaded"][0]["board"], "a-b", "{list}");
    let reason = list["not_loaded"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("--max-template-bytes"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_leave_the_disk_space_kept_free() {
    // Templates are stored as sent, so an upload padded past its pixels takes its full size on
    // disk: registrations stop short of the space kept free, as job uploads do.
    let repository = Repository::with_models(&[MODEL]);
    let server = Server::start(
        repository.path(),
        &["--job-min-free-bytes", &u64::MAX.to_string()],
    );
    let clean = synthetic::board(&[], (0, 0));
    let (status, body) = put_template(&server, "a", png(&clean.template), "").await;
    assert_eq!(status, 507, "{body}");
    let error = common::error_message(&body);
    assert!(
        error.contains("--job-min-free-bytes") && error.contains("DELETE /v1/templates/{board}"),
        "{error}"
    );
    let missing = common::get_json(&format!("{}/v1/templates/a", server.url)).await;
    assert_eq!(missing.0, 404, "{missing:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_template_too_small_to_align_is_not_loaded() {
    let repository = Repository::with_models(&[MODEL]);
    let data = tempfile::tempdir().unwrap();
    let args = ["--data-dir", data.path().to_str().unwrap()];
    let clean = synthetic::board(&[], (0, 0));
    {
        let server = Server::start(repository.path(), &args);
        let (status, _) = put_template(&server, "legacy", png(&clean.template), "").await;
        assert_eq!(status, 201);
    }
    // As a server before the size limit could have stored it.
    let strip = linescan::aoi::image_io::GrayImage {
        width: 200,
        height: 63,
        pixels: vec![0; 200 * 63],
    };
    std::fs::write(
        data.path().join("templates").join("legacy.image"),
        png(&strip),
    )
    .unwrap();
    let server = Server::start(repository.path(), &args);
    let (_, list) = common::get_json(&format!("{}/v1/templates", server.url)).await;
    assert_eq!(list["templates"], json!([]), "{list}");
    let reason = list["not_loaded"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("200x63 is too small"), "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn templates_survive_a_restart() {
    let repository = Repository::with_models(&[MODEL]);
    let data = tempfile::tempdir().unwrap();
    let args = ["--data-dir", data.path().to_str().unwrap()];
    let clean = synthetic::board(&[], (0, 0));
    let defective = synthetic::board(&[DefectKind::Copper], (0, 0));
    {
        let server = Server::start(repository.path(), &args);
        assert_eq!(
            put_template(
                &server,
                "kept",
                png(&clean.template),
                "?reject_threshold=0.6"
            )
            .await
            .0,
            201
        );
        for board in ["cut", "damaged"] {
            assert_eq!(
                put_template(&server, board, png(&clean.template), "")
                    .await
                    .0,
                201
            );
        }
    }
    // A template image damaged while the server was down.
    let damaged = data.path().join("templates").join("damaged.image");
    let bytes = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    // A replacement of "cut" stopped between its image and its record: the new image, 320x240,
    // sits beside the old record (a pattern: a blank template is refused).
    let mut smaller = Vec::new();
    let checks = image::GrayImage::from_fn(320, 240, |x, y| {
        image::Luma([((x / 16 + y / 16) % 2 * 255) as u8])
    });
    image::DynamicImage::ImageLuma8(checks)
        .write_to(
            &mut std::io::Cursor::new(&mut smaller),
            image::ImageFormat::Png,
        )
        .unwrap();
    std::fs::write(data.path().join("templates").join("cut.image"), &smaller).unwrap();
    // Writes cut short by a crash: a staged image and a previous image kept for a rollback.
    let leftovers = ["kept.image.tmp", "kept.image.previous.tmp"]
        .map(|name| data.path().join("templates").join(name));
    for leftover in &leftovers {
        std::fs::write(leftover, &smaller).unwrap();
    }
    let server = Server::start(repository.path(), &args);
    for leftover in &leftovers {
        assert!(!leftover.exists(), "{} was kept", leftover.display());
    }
    let (status, info) = common::get_json(&format!("{}/v1/templates/cut", server.url)).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(
        (&info["width"], &info["height"], &info["bytes"]),
        (&json!(320), &json!(240), &json!(smaller.len())),
        "the record follows the image: {info}"
    );
    let (status, info) = common::get_json(&format!("{}/v1/templates/kept", server.url)).await;
    assert_eq!(status, 200, "{info}");
    assert!(
        (info["reject_threshold"].as_f64().unwrap() - 0.6).abs() < 1e-6,
        "{info}"
    );
    // The list prints the threshold as it was given, like the single template (not widened
    // from f32 to 0.6000000238418579).
    let list = reqwest::get(format!("{}/v1/templates", server.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains("\"reject_threshold\":0.6,"), "{list}");
    // The listing shows the damaged board apart, with its reason.
    let list: Value = serde_json::from_str(&list).unwrap();
    let not_loaded = list["not_loaded"].as_array().unwrap();
    assert_eq!(not_loaded.len(), 1, "{list}");
    assert_eq!(not_loaded[0]["board"], "damaged");
    assert!(
        not_loaded[0]["reason"]
            .as_str()
            .unwrap()
            .contains("corrupt or truncated PNG"),
        "{list}"
    );
    let (_, result) = inspect(&server, "kept", png(&defective.test)).await;
    assert_eq!(result["verdict"], "REJECT", "{result}");
    // The damaged board is not served, and says why rather than "no template".
    let (status, error) = inspect(&server, "damaged", png(&clean.test)).await;
    assert_eq!(status, 404, "{error}");
    let message = error["error"].as_str().unwrap();
    assert!(
        message.contains("stored template could not be loaded at start")
            && message.contains("damaged.image")
            && message.contains("corrupt or truncated PNG"),
        "{message}"
    );
    // Registering it again replaces what was stored (200) and serves it.
    let (status, info) = put_template(&server, "damaged", png(&clean.template), "").await;
    assert_eq!(status, 200, "{info}");
    let (status, result) = inspect(&server, "damaged", png(&clean.test)).await;
    assert_eq!(
        (status, &result["verdict"]),
        (200, &json!("PASS")),
        "{result}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_aoi_load_generator_inspects_and_removes_its_templates() {
    let (_repository, server) = start(&[]);
    let url = server.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        common::run_cli(&[
            "bench",
            "aoi",
            "--url",
            &url,
            "--boards",
            "3",
            "--concurrency",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0",
        ])
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(stdout.contains(" boards/s"), "{stdout}");
    // The stages the server reports come back per stage.
    assert!(stdout.contains("classify"), "{stdout}");
    let (_, list) = common::get_json(&format!("{}/v1/templates", server.url)).await;
    assert_eq!(
        list["templates"],
        Value::Array(vec![]),
        "left behind: {list}"
    );
    // Stopped by SIGTERM mid-run, it still removes its templates, and says it was interrupted.
    let bench = common::command(common::BIN)
        .args(["bench", "aoi", "--url", &server.url, "--boards", "3"])
        .args(["--concurrency", "2", "--duration", "600", "--warmup", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::poll_until(std::time::Duration::from_secs(60), async || {
        let (_, list) = common::get_json(&format!("{}/v1/templates", server.url)).await;
        match list["templates"].as_array() {
            Some(templates) if templates.len() == 3 => Ok(()),
            _ => Err(format!("not the 3 templates registered: {list}")),
        }
    })
    .await;
    common::signal(bench.id(), "TERM");
    let output = tokio::task::spawn_blocking(move || bench.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted (SIGTERM)"), "{stderr}");
    let (_, list) = common::get_json(&format!("{}/v1/templates", server.url)).await;
    assert_eq!(
        list["templates"],
        Value::Array(vec![]),
        "left behind: {list}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_that_cannot_be_stored_leaves_the_stored_one_as_it_was() {
    let repository = Repository::with_models(&[MODEL]);
    let data = tempfile::tempdir().unwrap();
    let args = ["--data-dir", data.path().to_str().unwrap()];
    let image = |width: usize| {
        png(&linescan::aoi::image_io::GrayImage {
            width,
            height: 64,
            pixels: (0..width * 64).map(|p| ((p * 7) % 251) as u8).collect(),
        })
    };
    let folder = data.path().join("templates");
    let width = async |server: &Server| {
        let (status, info) = common::get_json(&format!("{}/v1/templates/kept", server.url)).await;
        assert_eq!(status, 200, "{info}");
        info["width"].as_u64().unwrap()
    };
    {
        let server = Server::start(repository.path(), &args);
        let (status, body) = put_template(&server, "kept", image(96), "").await;
        assert_eq!(status, 201, "{body}");
        // The record cannot be written (a folder holds its temporary name), as on a full disk.
        let blocker = folder.join("kept.json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let (status, body) = put_template(&server, "kept", image(128), "").await;
        assert_eq!(status, 500, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("cannot store template kept"), "{error}");
        assert_eq!(width(&server).await, 96);
        std::fs::remove_dir(&blocker).unwrap();
        // Both files are written, the new image is moved in, and then the record cannot be
        // (a non-empty folder stands in its place): the old image is put back.
        let record = folder.join("kept.json");
        let record_bytes = std::fs::read(&record).unwrap();
        std::fs::remove_file(&record).unwrap();
        std::fs::create_dir_all(record.join("held")).unwrap();
        let (status, body) = put_template(&server, "kept", image(128), "").await;
        assert_eq!(status, 500, "{body}");
        assert_eq!(width(&server).await, 96);
        assert!(
            std::fs::read(folder.join("kept.image")).unwrap() == image(96),
            "the refused image stayed in the folder"
        );
        let served = reqwest::get(format!("{}/v1/templates/kept/image", server.url))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(served == image(96), "the refused image is served");
        std::fs::remove_dir_all(&record).unwrap();
        std::fs::write(&record, record_bytes).unwrap();
    }
    // Neither file was replaced, nor anything left: a restart serves the template kept.
    let mut files: Vec<_> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["kept.image", "kept.json"]);
    let server = Server::start(repository.path(), &args);
    assert_eq!(width(&server).await, 96);
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_template_changes_leave_the_folder_as_served() {
    let repository = Repository::with_models(&[MODEL]);
    let data = tempfile::tempdir().unwrap();
    let args = ["--data-dir", data.path().to_str().unwrap()];
    let served_width = |info: &Value| info["width"].as_u64().unwrap();
    let width_after_races = {
        let server = Server::start(repository.path(), &args);
        for round in 0..4 {
            // Templates of different widths, so the one that won is recognisable.
            let uploads = (0..6).map(|i| {
                let width = 96 + 8 * i;
                let image = linescan::aoi::image_io::GrayImage {
                    width,
                    height: 64,
                    pixels: (0..width * 64)
                        .map(|p| ((p * 7 + round) % 251) as u8)
                        .collect(),
                };
                put_template(&server, "raced", png(&image), "")
            });
            for (status, body) in futures_util::future::join_all(uploads).await {
                assert!(status == 200 || status == 201, "{status} {body}");
            }
        }
        let (status, info) = common::get_json(&format!("{}/v1/templates/raced", server.url)).await;
        assert_eq!(status, 200, "{info}");
        served_width(&info)
    };
    // Nothing half-written is left, and a restart serves the same template.
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let server = Server::start(repository.path(), &args);
    let (status, info) = common::get_json(&format!("{}/v1/templates/raced", server.url)).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(served_width(&info), width_after_races, "{info}");
    let image = reqwest::get(format!("{}/v1/templates/raced/image", server.url))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let decoded = image::load_from_memory(&image).unwrap();
    assert_eq!(decoded.width() as u64, width_after_races);
}

#[test]
fn a_second_server_on_the_same_data_folder_is_refused() {
    let repository = Repository::with_models(&[MODEL]);
    let data = tempfile::tempdir().unwrap();
    let args = ["--data-dir", data.path().to_str().unwrap()];
    let _first = Server::start(repository.path(), &args);
    // It must stop by itself; one that serves would be killed by run_cli and fail the test.
    let output = common::run_cli(&[
        "serve",
        "--port",
        "0",
        "--model-repository",
        repository.path().to_str().unwrap(),
        args[0],
        args[1],
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use by another linescan server"),
        "{stderr}"
    );
}
