"""The device side (shelfsight.runtime, shelfsight.shelf_agent) imports and detects with torch and onnx absent.

A fresh interpreter blocks the export-only libraries (``sys.modules[name] = None`` makes ``import name`` raise),
imports every module of both packages, and runs a hand-built ONNX model through ``load_model``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np

BLOCKED = ("torch", "torchvision", "torch_pruning", "onnx", "onnxscript", "tensorrt")

CHILD = textwrap.dedent(
    """
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable: the block did not work")

    import importlib
    import json
    import pkgutil

    import numpy as np

    import shelfsight.runtime
    import shelfsight.shelf_agent

    imported = []
    for package in (shelfsight.runtime, shelfsight.shelf_agent):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
            imported.append(info.name)

    from shelfsight.runtime.model import load_model

    with load_model(sys.argv[1], threads=1) as detector:
        dets = detector.detect(np.zeros((480, 640, 3), np.uint8))
    print(json.dumps({{"imported": imported, "xyxy": dets.xyxy.tolist(), "class_id": dets.class_id.tolist()}}))
    """
).format(blocked=BLOCKED)


def _tiny_onnx() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tiny_onnx", Path(__file__).parent / "runtime" / "tiny_onnx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_side_imports_and_detects_without_torch(tmp_path: Path) -> None:
    manifest_path = _tiny_onnx().write_model_folder(
        tmp_path / "model", np.array([[8, 16, 24, 48]], np.float32), np.array([[0.1, 0.9]], np.float32)
    )
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(manifest_path)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, f"device-side child failed:\n{child.stderr[-3000:]}"
    report = json.loads(child.stdout.strip().splitlines()[-1])
    expected_modules = {
        "shelfsight.runtime.model",
        "shelfsight.runtime.preprocess",
        "shelfsight.runtime.postprocess",
        "shelfsight.runtime.backends.onnxruntime",
        "shelfsight.runtime.backends.tensorrt",
        "shelfsight.shelf_agent.layout",
    }
    assert expected_modules <= set(report["imported"])
    assert report["class_id"] == [1]
    np.testing.assert_allclose(report["xyxy"], [[80, 80, 240, 400]])
