from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from shelfsight.export import onnx_export
from shelfsight.export.model import Detector
from shelfsight.export.onnx_export import ExportError, ExportOptions, export_onnx
from shelfsight.export.torch_detector import TorchDetector
from shelfsight.export.train import TrainResult
from shelfsight.runtime.compare import compare_detections
from shelfsight.runtime.manifest import load_manifest, sha256_file
from shelfsight.runtime.model import load_model


@pytest.fixture(scope="module")
def exported(trained_run: TrainResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert trained_run.best is not None
    out = tmp_path_factory.mktemp("model")
    return export_onnx(
        trained_run.best, out, ExportOptions(name="tiny-shelf", parity_conf=0.01, include_checkpoint=True)
    )


def test_export_writes_one_self_contained_onnx_file_and_a_manifest(exported: Path, trained_run: TrainResult) -> None:
    folder = exported.parent
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx", "source.pt"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    assert graph.opset_import[0].version == 17
    ops = {node.op_type for node in graph.graph.node}
    assert "BatchNormalization" not in ops and {"Conv", "Relu", "Sigmoid"} <= ops
    manifest = load_manifest(exported)
    assert manifest.name == "tiny-shelf" and manifest.classes == ["product", "gap"]
    assert manifest.input.shape == [1, 3, 128, 128] and manifest.output.format == "shelfsight"
    assert manifest.precision == "fp32"
    assert trained_run.best is not None
    assert manifest.provenance.source_checkpoint_sha256 == sha256_file(trained_run.best)
    assert {a.role: a.sha256 for a in manifest.artifacts}["checkpoint"] == sha256_file(folder / "source.pt")
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.provenance.tool_versions)
    assert manifest.metrics.map50 is not None  # the checkpoint's validation figures, same input size


def _threshold_in_widest_gap(scores: np.ndarray) -> float:
    """A threshold no score sits near: the middle of the widest gap between the top 3% and the top 8%."""
    ranked = np.sort(scores)[::-1]
    low, high = max(1, int(0.03 * len(ranked))), max(2, int(0.08 * len(ranked)))
    k = low + int(np.argmax(ranked[low - 1 : high - 1] - ranked[low:high]))
    return float(ranked[k - 1] + ranked[k]) / 2


def test_runtime_detections_match_the_torch_reference(exported: Path, trained_run: TrainResult) -> None:
    """End to end: manifest -> runtime preprocess -> ORT -> runtime NMS, against the eager PyTorch model.

    Textured square frames (no flat areas, no letterbox padding), a per-frame threshold in the widest score gap
    around the top 5% of anchors, and NMS at IoU 1.0: a barely trained model predicts many near-identical boxes
    whose overlaps sit at the NMS threshold, where 1e-6 of float noise decides. NMS is the same cv2 call on both
    sides anyway.
    """
    assert trained_run.best is not None
    reference = TorchDetector.from_checkpoint(trained_run.best)
    rng = np.random.default_rng(0)
    frames = [
        cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (0, 0), 2) for size in (128, 256, 256)
    ]
    matched = 0
    with load_model(exported, threads=2) as runtime:
        for frame in frames:
            batch, _ = reference.preprocess([frame])
            expected = reference.infer(batch)
            raw = runtime.backend.infer({"images": batch})["detections"]
            assert float(np.abs(raw - expected).max()) < 1e-3
            threshold = _threshold_in_widest_gap(expected[0, :, 4:].max(1))
            reference.conf_threshold = runtime.conf_threshold = threshold
            reference.iou_threshold = runtime.iou_threshold = 1.0
            result = compare_detections(reference.detect(frame), runtime.detect(frame), iou_min=0.99, score_atol=1e-3)
            assert result.ok, result.summary()
            matched += result.matched
    assert matched > 0


def test_export_at_another_input_size(trained_run: TrainResult, tmp_path: Path) -> None:
    assert trained_run.best is not None
    manifest = load_manifest(export_onnx(trained_run.best, tmp_path, ExportOptions(imgsz=160, parity_frames=2)))
    assert manifest.input.shape == [1, 3, 160, 160]
    assert manifest.metrics.map50 is None  # validated at 128, so the figures do not describe this model
    with load_model(tmp_path) as runtime:
        assert runtime.detect(np.zeros((90, 160, 3), np.uint8)) is not None


def test_parity_failure_writes_no_manifest(
    trained_run: TrainResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corrupt one weight of the model that gets exported: ORT then disagrees with the reference."""
    assert trained_run.best is not None
    (tmp_path / "manifest.json").write_text("{}")  # left by an earlier export: must not vouch for the new file
    original = onnx_export.write_onnx

    def corrupted(model: Detector, imgsz: int, path: Path, opset: int) -> Path:
        broken = model.fused()
        with torch.no_grad():
            broken.head.cls_branches[0][-1].bias.add_(3.0)
        return original(broken, imgsz, path, opset)

    monkeypatch.setattr(onnx_export, "write_onnx", corrupted)
    with pytest.raises(ExportError, match="ONNX Runtime output differs from PyTorch") as info:
        export_onnx(trained_run.best, tmp_path, ExportOptions(parity_frames=2))
    assert "\n" not in str(info.value)
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "manifest.json").exists()


def test_manifest_is_valid_json_with_relative_artifact_paths(exported: Path) -> None:
    document = json.loads(exported.read_text())
    assert all(not Path(a["path"]).is_absolute() for a in document["artifacts"])
