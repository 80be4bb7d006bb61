"""A model is loaded only if its manifest is valid, its files stay in the folder and their sha256 matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_onnx import write_model_folder

from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.manifest import load_manifest, resolve_artifact
from shelfsight.runtime.model import load_model

BOXES = np.array([[8, 8, 24, 24]], np.float32)
SCORES = np.array([[0.9]], np.float32)


def _rewrite(manifest_path: Path, **artifact_changes: str) -> None:
    document = json.loads(manifest_path.read_text())
    document["artifacts"][0].update(artifact_changes)
    manifest_path.write_text(json.dumps(document))


def test_a_modified_model_file_is_refused(tmp_path: Path) -> None:
    manifest_path = write_model_folder(tmp_path, BOXES, SCORES)
    load_model(manifest_path).close()  # the untouched folder loads
    with open(tmp_path / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="sha256 mismatch") as caught:
        load_model(manifest_path)
    assert "model.onnx" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("bad_path", ["../model.onnx", "sub/../../model.onnx", "/etc/passwd", "..\\model.onnx"])
def test_artifact_paths_leaving_the_folder_are_refused(tmp_path: Path, bad_path: str) -> None:
    folder = tmp_path / "m"
    manifest_path = write_model_folder(folder, BOXES, SCORES)
    (tmp_path / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    _rewrite(manifest_path, path=bad_path)
    with pytest.raises(ManifestError, match=r"artifacts\.0\.path"):
        load_model(manifest_path)


def test_a_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    manifest_path = write_model_folder(folder, BOXES, SCORES)
    outside = tmp_path / "outside.onnx"
    (folder / "model.onnx").rename(outside)
    (folder / "model.onnx").symlink_to(outside)
    manifest = load_manifest(manifest_path)
    with pytest.raises(ManifestError, match="outside"):
        resolve_artifact(manifest_path, manifest.artifact())


def test_a_missing_artifact_is_named(tmp_path: Path) -> None:
    manifest_path = write_model_folder(tmp_path, BOXES, SCORES)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"model\.onnx: artifact listed in the manifest is missing"):
        load_model(manifest_path)
