//! Live sensor scoring over real HTTP: `POST /v1/rul/{model}` with windows of synthetic
//! degradation series → RUL, uncertainty, risk, anomaly and health, and every refusal; and a
//! job scoring the same rows as the live windows.

mod common;
mod fleet;

use common::{Repository, Server, metric};
use fleet::{ANOMALY_MODEL, RUL_MODEL, model_channels, small_fleet};
use linescan::jobs::synthetic::Table;
use serde_json::{Value, json};

fn start() -> (Repository, Server) {
    let repository = Repository::with_models(&[RUL_MODEL, ANOMALY_MODEL]);
    let server = Server::start(repository.path(), &[]);
    (repository, server)
}

/// The window of `unit` ending at row `end` (exclusive) of the table: `rows` rows, the given
/// channels in the given order.
fn window(table: &Table, unit: i64, end_cycle: i64, rows: usize, channels: &[String]) -> Value {
    let picked = table.select(channels);
    let positions: Vec<usize> = (0..picked.rows())
        .filter(|r| picked.unit[*r] == unit && picked.cycle[*r] <= end_cycle)
        .collect();
    let take = &positions[positions.len() - rows..];
    let values: Vec<Vec<f64>> = take
        .iter()
        .map(|r| picked.values[r * channels.len()..(r + 1) * channels.len()].to_vec())
        .collect();
    json!({"unit": format!("engine-{unit}"), "channels": channels, "values": values})
}

async fn post(server: &Server, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let request = reqwest::Client::new()
        .post(format!("{}{path}", server.url))
        .header("Content-Type", "application/json")
        .body(body);
    common::status_and_json(request).await
}

async fn score(server: &Server, body: &Value) -> Vec<Value> {
    let (status, answer) = post(server, "/v1/rul/rul_fd001", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], RUL_MODEL);
    assert_eq!(answer["anomaly_model"], ANOMALY_MODEL);
    answer["results"].as_array().unwrap().clone()
}

fn f(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn degrading_units_score_lower_rul_and_health_with_more_anomaly() {
    let (_repository, server) = start();
    let table = small_fleet();
    let channels = model_channels();
    // Unit 14 runs 300 cycles to failure: early (healthy) and late (failing) windows.
    let early = window(&table, 14, 60, 30, &channels);
    let late = window(&table, 14, 298, 30, &channels);
    let results = score(&server, &json!([early, late])).await;
    assert_eq!(results.len(), 2);
    let (healthy, failing) = (&results[0], &results[1]);
    assert_eq!(healthy["unit"], "engine-14");
    assert!(
        f(&healthy["rul"]) > f(&failing["rul"]) + 40.0,
        "{results:?}"
    );
    assert!(f(&failing["rul"]) <= 80.0, "{failing}");
    assert_ne!(failing["risk"], "normal");
    assert_eq!(healthy["risk"], "normal");
    assert!(
        f(&failing["anomaly"]) > f(&healthy["anomaly"]),
        "{results:?}"
    );
    assert_eq!(failing["anomaly_alarm"], true);
    assert!(f(&healthy["health"]) > f(&failing["health"]) + 30.0);
    for result in &results {
        let health = f(&result["health"]);
        assert!((0.0..=100.0).contains(&health));
        assert!(f(&result["rul_std"]) >= 0.0);
        assert!(f(&result["rul_sigma"]) >= f(&result["rul_std"]));
        assert!((0.0..=1.0).contains(&f(&result["anomaly"])));
        assert_eq!(result["padded"], 0);
        assert_eq!(result["rows"], 30);
    }
    // The model and its settings are described.
    let info: Value = reqwest::get(format!("{}/v1/rul/rul_fd001", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["window"], 30);
    assert_eq!(info["padding"], "repeat_first");
    assert_eq!(info["risk"]["critical"], 30.0);
    let list: Value = reqwest::get(format!("{}/v1/rul", server.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["models"][0]["model"], RUL_MODEL);
    // Scoring goes through the batchers (metrics per model).
    let metrics = server.metrics_text().await;
    assert!(
        metric(
            &metrics,
            "linescan_inference_count_total",
            &["model=\"rul_fd001\""]
        ) >= 2.0
    );
    assert!(
        metric(
            &metrics,
            "linescan_inference_count_total",
            &["model=\"anomaly_fd001\""]
        ) >= 2.0
    );
    assert!(
        metric(
            &metrics,
            "linescan_stage_duration_seconds_count",
            &["pipeline=\"sensors\"", "stage=\"prepare\""]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn channels_match_by_name_and_short_units_are_padded_by_policy() {
    let (_repository, server) = start();
    let table = small_fleet();
    let channels = model_channels();
    let mut reversed = channels.clone();
    reversed.reverse();
    let ordered = window(&table, 11, 150, 30, &channels);
    let shuffled = window(&table, 11, 150, 30, &reversed);
    let results = score(&server, &json!({"windows": [ordered, shuffled]})).await;
    assert_eq!(results[0]["rul"], results[1]["rul"]);
    assert_eq!(results[0]["anomaly_raw"], results[1]["anomaly_raw"]);

    // Unit 12 has 12 cycles: the window is padded by repeating its first row, exactly as if
    // those rows had been sent.
    let short = window(&table, 12, 12, 12, &channels);
    let values = short["values"].as_array().unwrap();
    let mut explicit: Vec<Value> = vec![values[0].clone(); 18];
    explicit.extend(values.iter().cloned());
    let explicit = json!({"unit": "explicit", "channels": channels, "values": explicit});
    let results = score(&server, &json!([short, explicit])).await;
    assert_eq!(results[0]["padded"], 18);
    assert_eq!(results[0]["rows"], 12);
    assert_eq!(results[1]["padded"], 0);
    assert_eq!(results[0]["rul"], results[1]["rul"]);
    assert_eq!(results[0]["health"], results[1]["health"]);

    // Thresholds are configurable per request.
    let late = window(&table, 14, 250, 30, &channels);
    let strict = post(
        &server,
        "/v1/rul/rul_fd001?critical=200&warning=300",
        late.to_string(),
    )
    .await;
    assert_eq!(strict.0, 200);
    assert_eq!(strict.1["results"][0]["risk"], "critical");
    let lenient = post(
        &server,
        "/v1/rul/rul_fd001?critical=0&warning=0",
        late.to_string(),
    )
    .await;
    assert_eq!(lenient.1["results"][0]["risk"], "normal");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_its_anomaly_model_health_comes_from_rul_alone() {
    let table = small_fleet();
    let body = json!([
        window(&table, 11, 60, 30, &model_channels()),
        window(&table, 11, 215, 30, &model_channels()),
    ]);
    let (_repository, with_anomaly) = start();
    let paired = score(&with_anomaly, &body).await;
    let repository = Repository::with_models(&[RUL_MODEL]);
    let server = Server::start(repository.path(), &[]);
    let (status, answer) = post(&server, "/v1/rul/rul_fd001", body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["anomaly_model"], Value::Null, "{answer}");
    let alone = answer["results"].as_array().unwrap();
    assert_eq!(alone.len(), 2);
    for (result, with_anomaly) in alone.iter().zip(&paired) {
        assert_eq!(result["rul"], with_anomaly["rul"]);
        assert_eq!(result["anomaly"], Value::Null, "{result}");
        // health = 100 * clamp(rul / rul_cap, 0, 1), rul_cap 125
        let expected = 100.0 * (f(&result["rul"]) / 125.0).clamp(0.0, 1.0);
        assert!((f(&result["health"]) - expected).abs() < 1e-3, "{result}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_windows_are_refused_with_what_is_wrong() {
    let (_repository, server) = start();
    let table = small_fleet();
    let channels = model_channels();
    let good = window(&table, 11, 100, 30, &channels);
    let url = "/v1/rul/rul_fd001";

    let expect = |status: u16, body: &Value, expected: u16, fragments: &[&str]| {
        assert_eq!(status, expected, "{body}");
        let message = body["error"].as_str().unwrap_or_default();
        for fragment in fragments {
            assert!(
                message.contains(fragment),
                "{fragment:?} not in {message:?}"
            );
        }
    };

    let mut missing = good.clone();
    missing["channels"][3] = json!("s_99");
    let (status, body) = post(&server, url, missing.to_string()).await;
    expect(
        status,
        &body,
        422,
        &[
            "engine-11",
            "missing channels: s_7",
            "unknown channels: s_99",
        ],
    );

    let mut duplicated = good.clone();
    duplicated["channels"][0] = json!("s_3");
    let (status, body) = post(&server, url, duplicated.to_string()).await;
    expect(
        status,
        &body,
        422,
        &["duplicated channels: s_3", "missing channels: s_2"],
    );

    // Python's json.dumps writes NaN and Infinity bare; null and "inf" are refused as well.
    let mut text = good.to_string();
    let values = &good["values"];
    let first = values[4][2].to_string();
    text = text.replacen(&format!("[{}", values[4][0]), "[NaN", 1);
    text = text.replacen(&format!(",{first},"), ",Infinity,", 1);
    let (status, body) = post(&server, url, text).await;
    expect(
        status,
        &body,
        422,
        &["non-finite values", "channel s_2: NaN/null at row 4"],
    );
    let mut nulls = good.clone();
    nulls["values"][7][13] = Value::Null;
    nulls["values"][8][5] = json!("-inf");
    let (status, body) = post(&server, url, nulls.to_string()).await;
    expect(
        status,
        &body,
        422,
        &[
            "channel s_9: -Infinity at row 8",
            "channel s_21: NaN/null at row 7",
        ],
    );

    // Finite but too large: beyond the model's f32 input, or large enough to overflow the
    // network, whose output would be NaN.
    let mut huge = good.clone();
    huge["values"][3][0] = json!(1e39);
    let (status, body) = post(&server, url, huge.to_string()).await;
    expect(
        status,
        &body,
        422,
        &["channel s_2: 1e39 (beyond the float32 range) at row 3"],
    );
    let mut overflowing = good.clone();
    overflowing["values"][3][0] = json!(3e38);
    let (status, body) = post(&server, url, overflowing.to_string()).await;
    expect(
        status,
        &body,
        422,
        &[
            "window 0 (unit \"engine-11\"): the model's",
            "far outside the range",
        ],
    );

    let mut long = good.clone();
    long["values"]
        .as_array_mut()
        .unwrap()
        .push(good["values"][0].clone());
    let (status, body) = post(&server, url, long.to_string()).await;
    expect(status, &body, 422, &["has 31 rows", "windows of 30 rows"]);
    let mut empty = good.clone();
    empty["values"] = json!([]);
    let (status, body) = post(&server, url, json!([good, empty]).to_string()).await;
    expect(status, &body, 422, &["window 1", "has 0 rows"]);
    let mut narrow = good.clone();
    narrow["values"][2].as_array_mut().unwrap().pop();
    let (status, body) = post(&server, url, narrow.to_string()).await;
    expect(status, &body, 422, &["row 2 has 13 values for 14 channels"]);

    // Numbers written as strings (CSV-to-JSON converters) score as the numbers; other strings
    // are named with their place.
    let (status, plain) = post(&server, url, good.to_string()).await;
    assert_eq!(status, 200, "{plain}");
    let mut quoted = good.clone();
    for row in quoted["values"].as_array_mut().unwrap() {
        row[1] = json!(row[1].to_string());
    }
    let (status, body) = post(&server, url, quoted.to_string()).await;
    assert_eq!((status, &body), (200, &plain));
    let mut word = good.clone();
    word["values"][6][2] = json!("high");
    let (status, body) = post(&server, url, word.to_string()).await;
    expect(
        status,
        &body,
        422,
        &["\"high\" is not a number at line 1 column"],
    );
    // Beyond the f64 range: not a number the JSON parser can hold.
    let text = good
        .to_string()
        .replacen(&values[4][0].to_string(), "1e999", 1);
    let (status, body) = post(&server, url, text).await;
    expect(status, &body, 400, &["not valid JSON"]);
    // More windows than one request may hold: their count, and where to send them instead.
    let small = json!({"channels": ["s_2"], "values": [[1.0]]});
    let many = json!(vec![small; 10_001]);
    let (status, body) = post(&server, url, many.to_string()).await;
    expect(
        status,
        &body,
        413,
        &["10001 windows in one request; at most 10000"],
    );

    // A unit is a short string or a number, and a window names at most 256 channels: an
    // array there is refused while it is read, not held in memory (a 60 MB one took 2 GB).
    let mut listed = good.clone();
    listed["unit"] = json!(vec![0; 100_000]);
    let (status, body) = post(&server, url, listed.to_string()).await;
    expect(
        status,
        &body,
        422,
        &["expected a boolean, number or string"],
    );
    let mut long_name = good.clone();
    long_name["unit"] = json!("e".repeat(300));
    let (status, body) = post(&server, url, long_name.to_string()).await;
    expect(status, &body, 422, &["a string of 300 bytes (at most 256)"]);
    let mut numbered = good.clone();
    numbered["unit"] = json!(11);
    let (status, body) = post(&server, url, numbered.to_string()).await;
    assert_eq!(
        (status, &body["results"][0]["unit"]),
        (200, &json!(11)),
        "{body}"
    );
    let mut wide = good.clone();
    wide["channels"] = json!(vec!["s_2"; 100_000]);
    let (status, body) = post(&server, url, wide.to_string()).await;
    expect(status, &body, 422, &["more than 256 items (at most 256)"]);

    let (status, body) = post(&server, url, "{\"channels\": [".to_string()).await;
    expect(status, &body, 400, &["not valid JSON"]);
    let (status, body) = post(&server, url, "{\"rows\": 3}".to_string()).await;
    expect(status, &body, 422, &["not a window"]);
    let (status, body) = post(&server, "/v1/rul/rul_nope", good.to_string()).await;
    expect(
        status,
        &body,
        404,
        &["no sensor model rul_nope", "rul_fd001"],
    );
    let (status, body) = post(
        &server,
        "/v1/rul/rul_fd001?critical=90&warning=10",
        good.to_string(),
    )
    .await;
    expect(status, &body, 422, &["critical threshold"]);
    let (status, body) = post(&server, "/v1/rul/rul_fd001?critical=abc", good.to_string()).await;
    expect(status, &body, 400, &["bad query string", "critical"]);
    let response = reqwest::Client::new()
        .post(format!("{}{url}", server.url))
        .header("Content-Type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
}

#[tokio::test(flavor = "multi_thread")]
async fn job_windows_equal_the_live_windows_of_the_same_rows() {
    // A job stacks its windows from rows held across chunks and batches; the live endpoint
    // builds each one from the values posted. The same rows must score the same.
    let (_repository, server) = start();
    // Batches of 16 windows, so that rows are dropped between chunks while windows still
    // need them.
    let small_batches = Repository::with_models(&[RUL_MODEL, ANOMALY_MODEL]);
    small_batches.set(RUL_MODEL, "max_batch_size", "16");
    let files = tempfile::tempdir().unwrap();
    let table = small_fleet();
    let archive = files.path().join("fleet.h5");
    // f64 features: the values the live requests post, not their f32 roundings.
    linescan::jobs::synthetic::write_generic(&archive, &table, false).unwrap();
    let out = files.path().join("result.h5");
    fleet::job_run(
        small_batches.path(),
        &archive,
        &out,
        // Chunks that cut through windows, batches and units.
        &["--chunk-rows", "37", "--preprocess", "cpu"],
    );
    let job = fleet::read_result(&out);
    assert_eq!(
        (job.unit.clone(), job.cycle.clone()),
        (table.unit.clone(), table.cycle.clone())
    );

    // Each unit's first rows (padded), the rows around its first full window, its last row,
    // and the rows at chunk boundaries.
    let channels = model_channels();
    let mut rows = Vec::new();
    let mut bodies = Vec::new();
    let mut position = 0usize;
    for r in 0..table.rows() {
        position = if r > 0 && table.unit[r] == table.unit[r - 1] {
            position + 1
        } else {
            0
        };
        let last_of_unit = r + 1 == table.rows() || table.unit[r + 1] != table.unit[r];
        if [0, 1, 28, 29, 30].contains(&position) || last_of_unit || r % 37 == 0 {
            rows.push(r);
            let held = (position + 1).min(30);
            bodies.push(window(
                &table,
                table.unit[r],
                table.cycle[r],
                held,
                &channels,
            ));
        }
    }
    let results = score(&server, &Value::Array(bodies)).await;
    assert_eq!(results.len(), rows.len());
    for (result, &r) in results.iter().zip(&rows) {
        let live = f(&result["rul"]) as f32;
        assert!(
            (live - job.rul[r]).abs() < 1e-3,
            "row {r} (unit {}, cycle {}): live {live}, job {}",
            table.unit[r],
            table.cycle[r],
            job.rul[r]
        );
        assert_eq!(result["padded"], job.padded[r], "row {r}");
    }
}
