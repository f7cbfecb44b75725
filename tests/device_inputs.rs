//! Inputs in CUDA device memory: the classifier's batcher takes the GPU preprocessing's crops in
//! place only when its sessions run on that device, and then gives the detections the CPU
//! path gives (CPU preprocessing and ONNX Runtime on the CPU; crops and sensor windows alike). The two GPU tests need an NVIDIA GPU, NVRTC and
//! ONNX Runtime's CUDA provider (`onnxruntime-gpu`), and say why they skip where one is missing.

mod common;
mod fleet;

use std::sync::Arc;
use std::time::{Duration, Instant};

use linescan::aoi::pipeline::{Crops, DEFECT_MODEL, Inspection, Inspector};
use linescan::aoi::synthetic::{self, DefectKind};
use linescan::engine::registry::LoadOptions;
use linescan::engine::{InferError, ModelRegistry};
use linescan::metrics::Metrics;
use linescan::preprocess::cpu::CpuPreprocessor;
use linescan::preprocess::cuda::CudaPreprocessor;
use linescan::preprocess::{GpuKernels, Preprocess};
use linescan::runtime::ModelRepository;
use linescan::runtime::device::{DeviceBytes, DeviceGather, DeviceMemory, DeviceTensor};
use linescan::runtime::providers::ProviderKind;
use linescan::tensor::DataType;

/// The CUDA backend, or None after saying why it cannot start. deploy/test.sh sets
/// LINESCAN_REQUIRE_CUDA where the machine has an NVIDIA device: then that is a failure.
fn cuda_or_skip() -> Option<CudaPreprocessor> {
    match CudaPreprocessor::new() {
        Ok(cuda) => Some(cuda),
        Err(reason) => {
            assert!(
                std::env::var_os("LINESCAN_REQUIRE_CUDA").is_none(),
                "LINESCAN_REQUIRE_CUDA is set but {reason}"
            );
            eprintln!("skipped (no GPU): {reason}");
            None
        }
    }
}

fn defect_model(providers: ProviderKind) -> Result<(Arc<Metrics>, ModelRegistry), String> {
    bundled_model(DEFECT_MODEL, providers)
}

fn bundled_model(
    name: &str,
    providers: ProviderKind,
) -> Result<(Arc<Metrics>, ModelRegistry), String> {
    let mut repository =
        ModelRepository::scan(&common::models_root()).map_err(|e| e.to_string())?;
    repository.versions.retain(|v| v.config.name == name);
    let metrics = Arc::new(Metrics::new());
    let options = LoadOptions {
        providers: Some(vec![providers]),
        instances: Some(1),
        threads: Some(1),
    };
    let registry =
        ModelRegistry::load(&repository, &options, &metrics).map_err(|e| e.to_string())?;
    Ok((metrics, registry))
}

/// Device memory that is never read: the batcher must refuse it before any session could.
struct Unreadable;

impl DeviceMemory for Unreadable {
    fn device_id(&self) -> i32 {
        0
    }
    fn address(&self) -> u64 {
        0xdead_0000
    }
    fn byte_len(&self) -> usize {
        6 * 64 * 64 * 4
    }
    fn gatherer(&self) -> Result<Box<dyn DeviceGather>, String> {
        Err("never gathered".into())
    }
}

#[tokio::test]
async fn cpu_sessions_refuse_device_inputs_by_name() {
    let (_, registry) = defect_model(ProviderKind::Cpu).expect("load the defect model on the CPU");
    let model = registry.get(DEFECT_MODEL, None).unwrap();
    assert_eq!(model.batcher.device(), None);
    let tensor = DeviceTensor {
        dtype: DataType::Fp32,
        shape: vec![1, 6, 64, 64],
        data: DeviceBytes::new(Arc::new(Unreadable)),
    };
    let refused = model
        .batcher
        .infer_on_device(vec![tensor], 1, Instant::now() + Duration::from_secs(5))
        .await
        .expect_err("a CPU session cannot read device memory");
    let InferError::Invalid(message) = &refused else {
        panic!("expected an invalid-request error, got {refused:?}");
    };
    assert!(
        message.contains("device 0") && message.contains("the CPU"),
        "{message}"
    );
    registry.shutdown();
}

#[tokio::test]
async fn cuda_crops_reach_the_classifier_in_place_with_the_cpu_paths_detections() {
    let Some(cuda) = cuda_or_skip() else {
        return;
    };
    let cuda: Arc<dyn Preprocess> = Arc::new(GpuKernels(cuda));
    let (metrics, on_gpu) = match defect_model(ProviderKind::Cuda) {
        Ok(loaded) => loaded,
        Err(reason) => {
            eprintln!("skipped: ONNX Runtime's CUDA provider did not load: {reason}");
            return;
        }
    };
    let model = on_gpu.get(DEFECT_MODEL, None).unwrap();
    assert_eq!(model.batcher.device(), Some(0));
    let on_device = Inspector::new(&on_gpu, metrics.clone(), u64::MAX, cuda.clone()).unwrap();
    let (_, on_cpu) = defect_model(ProviderKind::Cpu).unwrap();
    // The CPU stages, not CUDA's copied back: this compares CUDA with the CPU end to end.
    let cpu: Arc<dyn Preprocess> = Arc::new(CpuPreprocessor);
    let on_host = Inspector::new(&on_cpu, Arc::new(Metrics::new()), u64::MAX, cpu).unwrap();
    let same = |gpu: &Inspection, host: &Inspection| {
        // Every board has each kind of defect: an empty list would compare nothing.
        assert!(!host.defects.is_empty(), "{host:?}");
        assert_eq!(gpu.defects.len(), host.defects.len());
        for (a, b) in gpu.defects.iter().zip(&host.defects) {
            assert_eq!(a.class_name, b.class_name);
            assert!(
                (a.confidence - b.confidence).abs() <= 0.02,
                "{a:?} vs {b:?}"
            );
            for (x, y) in a.bbox.iter().zip(&b.bbox) {
                assert!((x - y).abs() <= 2, "{a:?} vs {b:?}");
            }
        }
    };

    let boards: Vec<_> = [(0, 0), (2, -1), (-3, 1)]
        .into_iter()
        .map(|shift| synthetic::board(&DefectKind::ALL, shift))
        .collect();
    let mut prepared = Vec::new();
    let mut expected = Vec::new();
    for board in &boards {
        let png = synthetic::encode(&board.test, image::ImageFormat::Png);
        let template = on_device.prepare_template(&board.template);
        for _ in 0..4 {
            let board = on_device.prepare(&png, &template).unwrap();
            assert!(
                matches!(board.crops, Crops::Device(_)),
                "the crops should stay on the GPU: {:?}",
                board.crops
            );
            prepared.push(board);
        }
        let host = on_host.prepare(&png, &template).unwrap();
        expected.push(on_host.finish(host, 0.0).await.unwrap());
    }
    // All twelve boards at once: while the first batch runs, the others queue and are joined
    // on the device into the next ones.
    let finished = futures_util::future::join_all(
        prepared
            .into_iter()
            .map(|board| on_device.finish(board, 0.0)),
    )
    .await;
    for (index, result) in finished.into_iter().enumerate() {
        same(&result.unwrap(), &expected[index / 4]);
    }
    let labels = [DEFECT_MODEL, "1"];
    let requests = metrics.request_success.with_label_values(&labels).get();
    let batches = metrics.execution_count.with_label_values(&labels).get();
    assert!(
        batches < requests,
        "{requests} requests ran in {batches} batches: none were joined"
    );
    on_gpu.shutdown();
    on_cpu.shutdown();
}

#[test]
fn cuda_windows_reach_the_sensor_models_in_place_with_the_cpu_paths_scores() {
    if cuda_or_skip().is_none() {
        return;
    }
    if let Err(reason) = bundled_model("rul_fd001", ProviderKind::Cuda) {
        eprintln!("skipped: ONNX Runtime's CUDA provider did not load: {reason}");
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let archive = fleet::write_generic(files.path(), "fleet.h5", &fleet::fleet_of(40, 7));
    let models = common::models_root();
    let run = |name: &str, flags: &[&str]| {
        let out = files.path().join(name);
        fleet::job_run(&models, &archive, &out, flags);
        fleet::read_result(&out)
    };
    // The device run logs that its windows stay on the GPU.
    let gpu = files.path().join("gpu.h5");
    let logged = common::command(common::BIN)
        .args([
            "job",
            "run",
            archive.to_str().unwrap(),
            "--out",
            gpu.to_str().unwrap(),
        ])
        .args(["--quiet", "--model-repository", models.to_str().unwrap()])
        .args(["--preprocess", "cuda", "--providers", "cuda"])
        .env("LINESCAN_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&logged.stderr);
    assert!(logged.status.success(), "{log}");
    assert!(log.contains("sensor windows stay on the GPU"), "{log}");
    let on_device = fleet::read_result(&gpu);
    let on_host = run("cpu.h5", &["--preprocess", "cpu", "--providers", "cpu"]);
    // Rows and padding are exact; scores differ by GPU arithmetic only.
    assert_eq!(on_device.unit, on_host.unit);
    assert_eq!(on_device.cycle, on_host.cycle);
    assert_eq!(on_device.padded, on_host.padded);
    let close = |a: &[f32], b: &[f32], tolerance: f32| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tolerance)
    };
    // The RUL trees are piecewise constant: the GPU scales in f32, which moves a few windows
    // across a split (wgpu against cpu: 4.7 % of FD001's windows, by at most 2.0 cycles; 1.3 %
    // of a synthetic 1M-row fleet's, by up to 3.8).
    let moved = on_device
        .rul
        .iter()
        .zip(&on_host.rul)
        .filter(|(device, host)| (*device - *host).abs() > 0.05)
        .count();
    assert!(
        moved * 10 <= on_host.rul.len(),
        "{moved} of {} RUL values moved",
        on_host.rul.len()
    );
    assert!(close(&on_device.rul, &on_host.rul, 5.0));
    assert!(close(&on_device.anomaly, &on_host.anomaly, 0.01));
}
