"""shelf-bench in quick mode on the real bundled model, a real rendered scenario, real ORT and real OpenCV DNN.

One benchmark run (module fixture) is shared by the checks; no assertion is about speed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import cv2
import pytest

from shelfsight.runtime.bench import main, write_outputs
from shelfsight.runtime.bench_report import SCHEMA, STAGE_ORDER
from shelfsight.runtime.bench_runs import find_variants
from shelfsight.runtime.manifest import artifact_for, load_manifest, write_manifest

BUNDLED = Path(__file__).resolve().parents[2] / "runtime" / "models" / "shelfsight-demo"
TINY_SCENARIO = """\
name: bench-tiny
seed: 3
duration_s: 3
fps: 10
camera: {width: 640, height: 360, noise: 0.02, jitter_px: 0.5}
shelf: {rows: 2, slots_per_row: 4, facings_per_slot: 3}
events:
  - {t: 0.5, type: deplete, slot: R1S2, duration_s: 1.5}
"""
FRAMES = 20


def _model_dir(root: Path) -> Path:
    """fp32/ (the bundled model) and int8-dynamic/ (ORT dynamic quantization, which OpenCV DNN cannot load)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = root / "models" / "fp32"
    fp32.mkdir(parents=True)
    for name in ("model.onnx", "manifest.json"):
        shutil.copy(BUNDLED / name, fp32 / name)
    manifest = load_manifest(fp32 / "manifest.json")
    write_manifest(manifest.model_copy(update={"artifacts": [manifest.artifact("model")]}), fp32)
    int8 = root / "models" / "int8-dynamic"
    int8.mkdir()
    quantize_dynamic(str(fp32 / "model.onnx"), str(int8 / "model.onnx"), weight_type=QuantType.QUInt8)
    write_manifest(manifest.model_copy(update={"name": "demo-int8-dynamic", "precision": "int8",
                                               "artifacts": [artifact_for(int8, "model.onnx")]}), int8)
    return root / "models"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("bench")
    models = _model_dir(root)
    scenario = root / "tiny.yaml"
    scenario.write_text(TINY_SCENARIO)
    out = root / "out"
    code = main([str(models), "--scenario", str(scenario), "--quick", "--frames", str(FRAMES),
                 "--backends", "ort-cpu-1t", "ort-cpu-2t", "ort-cuda", "tensorrt",
                 "--cameras", "1", "2", "--camera-seconds", "1", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text()), models


def _ok_runs(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [run for run in result["runs"] if run["status"] == "ok"]


def test_variants_are_found_with_their_precision(bench: tuple[Path, dict[str, Any], Path]) -> None:
    _, result, models = bench
    assert [(v["name"], v["precision"]) for v in result["variants"]] == [("fp32", "fp32"), ("int8-dynamic", "int8")]
    assert [v.name for v in find_variants(models / "fp32")] == ["fp32"]  # a single model folder is one variant


def test_every_stage_is_timed_for_every_frame(bench: tuple[Path, dict[str, Any], Path]) -> None:
    _, result, _ = bench
    runs = _ok_runs(result)
    assert {(r["variant"], r["backend"]) for r in runs} == {
        (v, b) for v in ("fp32", "int8-dynamic") for b in ("ort-cpu-1t", "ort-cpu-2t")}
    for run in runs:
        assert set(STAGE_ORDER) <= set(run["stages"])
        for stage in ("capture_decode", "preprocess", "infer", "postprocess", "slot_update", "event_outbox"):
            summary = run["stages"][stage]
            assert summary["n"] == FRAMES
            assert summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
        for stage in ("capture_decode", "preprocess", "infer", "postprocess"):
            assert run["stages"][stage]["max_ms"] > 0, stage
        e2e = run["end_to_end"]
        assert len(run["end_to_end_ns"]) == FRAMES and e2e["n"] == FRAMES
        # end to end is capture + the pipeline call, so it is never below the sum of the stage means
        assert e2e["mean_ms"] >= sum(run["stages"][s]["mean_ms"] for s in STAGE_ORDER) * 0.999
        assert 0 < run["pipeline_efficiency"] < 1
        assert run["throughput_fps"] > 0 and run["model_mb"] > 0
        assert run["resources"]["cpu_s"] > 0 and run["resources"]["peak_rss_mb"] > 0
        assert len(run["detections_per_frame"]) == FRAMES and sum(run["detections_per_frame"]) > 0


def test_absent_accelerators_are_reported_not_faked(bench: tuple[Path, dict[str, Any], Path]) -> None:
    _, result, _ = bench
    absent = [r for r in result["runs"] if r["backend"] in ("ort-cuda", "tensorrt")]
    assert len(absent) == 4
    for run in absent:
        assert run["status"] == "not available" and run["reason"]
        assert "stages" not in run and "end_to_end" not in run


def test_peers_ran_on_the_same_frames_and_agree_on_detections(bench: tuple[Path, dict[str, Any], Path]) -> None:
    _, result, _ = bench
    fp32 = next(r for r in _ok_runs(result) if r["variant"] == "fp32" and r["backend"] == "ort-cpu-2t")
    for name in ("opencv-dnn", "plain-ort-loop"):
        peer = fp32["peers"][name]
        assert peer["status"] == "ok", peer
        assert peer["frames"] == FRAMES and len(peer["detections_per_frame"]) == FRAMES
        for ours, theirs in zip(fp32["detections_per_frame"], peer["detections_per_frame"], strict=True):
            assert abs(ours - theirs) <= max(2, 0.1 * ours), (name, ours, theirs)
        assert fp32["ratio_to_peers"][name] > 0
    # ORT's dynamic-quantization ops are not in OpenCV DNN: the failure is recorded with OpenCV's reason
    int8 = next(r for r in _ok_runs(result) if r["variant"] == "int8-dynamic" and r["backend"] == "ort-cpu-2t")
    assert int8["peers"]["opencv-dnn"]["status"] in ("failed to load", "failed to run")
    assert "DynamicQuantizeLinear" in int8["peers"]["opencv-dnn"]["reason"]
    assert int8["peers"]["plain-ort-loop"]["status"] == "ok"
    assert "opencv-dnn" not in int8["ratio_to_peers"]


def test_camera_scaling_ran_both_modes(bench: tuple[Path, dict[str, Any], Path]) -> None:
    _, result, _ = bench
    scaling = result["scaling"]
    assert [(r["cameras"], r["mode"]) for r in scaling["runs"]] == [
        (1, "per_camera"), (1, "batched"), (2, "per_camera"), (2, "batched")]
    for run in scaling["runs"]:
        assert run["fps_per_camera_min"] <= run["fps_per_camera_mean"] <= 5.0 * 1.2
        assert run["frame_age_p99_ms"] is None or run["frame_age_p99_ms"] >= run["frame_age_p50_ms"]
    assert scaling["model_batch"] == 1


def test_json_environment_and_targets(bench: tuple[Path, dict[str, Any], Path]) -> None:
    _, result, _ = bench
    assert result["schema"] == SCHEMA and result["frames"] == FRAMES and result["frame_size"] == [640, 360]
    env = result["environment"]
    for key in ("cpu_model", "cpu_flags", "avx512_vnni", "logical_cores", "libraries", "git_commit"):
        assert key in env
    assert isinstance(env["avx512_vnni"], bool) and "onnxruntime" in env["libraries"]
    figures = [t["figure"] for t in result["targets"]]
    assert any("efficiency" in f for f in figures) and any("cameras" in f for f in figures)
    for target in result["targets"]:
        assert isinstance(target["met"], bool)
        assert target["met"] or target["blame"] or target["value"] is None


def test_markdown_and_plots_are_written_and_readable(bench: tuple[Path, dict[str, Any], Path]) -> None:
    out, result, _ = bench
    text = (out / "bench.md").read_text()
    for heading in ("## End to end per backend", "## Per stage", "## Peers", "## Cameras", "## Targets"):
        assert heading in text
    assert result["plots"] == ["stages.png", "latency_cdf.png", "camera_scaling.png"]
    for name in result["plots"]:
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100


def test_outputs_without_matplotlib(bench: tuple[Path, dict[str, Any], Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, result, _ = bench
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "shelfsight.runtime.bench_plots", raising=False)
    written = write_outputs(dict(result), tmp_path, plots=True)
    assert [p.name for p in written] == ["bench.json", "bench.md"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["plots"].startswith("skipped") and not list(tmp_path.glob("*.png"))


def test_compare_prints_ratios_against_an_old_run(bench: tuple[Path, dict[str, Any], Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, _, models = bench
    code = main([str(models / "fp32"), "--source", str(out / "source" / "video.mp4"), "--frames", "5",
                 "--warmup", "1", "--backends", "ort-cpu-2t", "--no-peers", "--no-scaling", "--no-plots",
                 "--out", str(tmp_path), "--compare", str(out / "bench.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ratios new / old" in printed and "fp32 | ort-cpu-2t" in printed
    rows = json.loads((tmp_path / "bench.json").read_text())["compare"]["ratios"]
    assert [(r["variant"], r["backend"]) for r in rows] == [("fp32", "ort-cpu-2t")]
    assert rows[0]["end_to_end_p50_ms"] > 0 and rows[0]["infer"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "model folder not found"),
        (["{models}", "--source", "{missing}"], "video file not found"),
        (["{models}", "--source", "{video}", "--frames", "999"], "lower --frames"),
        (["{models}", "--compare", "{models}/fp32/manifest.json"], "not a shelf-bench result"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(bench: tuple[Path, dict[str, Any], Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    out, _, models = bench
    values = {"missing": str(tmp_path / "nope"), "models": str(models), "video": str(out / "source" / "video.mp4")}
    code = main([a.format(**values) for a in args] + ["--out", str(tmp_path / "o"), "--no-scaling", "--no-peers",
                                                     "--backends", "ort-cpu-1t", "--no-plots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert message in err[-1] and err[-1].startswith("shelf-bench: ")
