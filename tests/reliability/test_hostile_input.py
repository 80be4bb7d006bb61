"""Hostile input through the public entry points: every parser, the model loader, checkpoints and frames.

Parsers (agent config, layout, scenario, model manifest) get arbitrary text, arbitrary bytes, text mutations of the
shipped files and structural mutations of their data; each must give a valid object or the project's one-line
error (a ShelfSightError naming the file), never another exception. Hypothesis runs derandomized (the same examples
on every run, no example database) so CI is deterministic.

Model tampering: a flipped byte, manifest paths leaving the folder, ONNX external data leaving the folder or not
covered by a manifest sha256, a checkpoint carrying a pickled callable. Frames: anything that is not a BGR uint8 frame
of the pipeline's size is skipped and counted, the next good frame runs.

Already covered elsewhere (not repeated here): an appended byte and the fixed list of bad artifact paths
(tests/runtime/test_manifest_guard.py), a pickled class instance and malformed checkpoints
(tests/export/test_checkpoint_loading.py), a fixed list of bad frames (tests/shelf_agent/test_pipeline.py,
tests/shelf_agent/test_capture.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shelfsight.runtime.errors import ManifestError, ShelfSightError
from shelfsight.runtime.manifest import Manifest, load_manifest, sha256_file
from shelfsight.runtime.model import load_model
from shelfsight.shelf_agent.config import AgentConfig, load_agent_config
from shelfsight.shelf_agent.layout import ShelfLayout, load_layout
from shelfsight.sim.scenario import Scenario, load_scenario

REPO = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO / "runtime" / "models" / "shelfsight-demo-int8"

FAST = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------ parsers

# name -> (loader, type of a good result, shipped example file)
PARSERS: dict[str, tuple[Callable[[Path], Any], type, Path]] = {
    "agent-config": (lambda path: load_agent_config(path, environ={}), AgentConfig, REPO / "deploy/config/agent.yaml"),
    "layout": (load_layout, ShelfLayout, REPO / "deploy/config/layout.yaml"),
    "scenario": (load_scenario, Scenario, REPO / "sim/scenarios/aisle-3-morning.yaml"),
    "manifest": (load_manifest, Manifest, BUNDLED_MODEL / "manifest.json"),
}
PARSER_NAMES = list(PARSERS)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, str | bytes], Path]]:
    folder = tmp_path_factory.mktemp("hostile")

    def write(name: str, content: str | bytes) -> Path:
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    yield write


def parses_or_one_line_error(parser: str, path: Path) -> Any:
    """The property: a good object, or a ShelfSightError of one line naming the file. Anything else fails."""
    load, kind, _ = PARSERS[parser]
    try:
        result = load(path)
    except ShelfSightError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, repr(message)
        assert str(path) in message, f"the error does not name the file: {message!r}"
        return exc
    assert isinstance(result, kind), type(result)
    return result


def test_the_shipped_examples_parse() -> None:
    """The mutation seeds are valid to begin with, so mutations explore near-valid documents."""
    for name, (_, kind, example) in PARSERS.items():
        assert isinstance(parses_or_one_line_error(name, example), kind), name


# YAML/JSON-significant fragments a careless or hostile editor produces.
TOKENS = [": ", ":", "- ", "-", "{", "}", "[", "]", ",", "#", "&a ", "*a", "*undefined",
          "!!python/object/apply:os.system", "!!binary", "!!set", "!!timestamp", "<<: ", "? ", "|", ">", "'", '"',
          "\\", "\t", "\n", "\r\n", "\x00", "\ufeff",
          "~", "null", "true", "NaN", ".nan", ".inf", "-.inf", "1e999", "-1", "0", "0x1F", "0o17", "1_000",
          "2001-13-45", "2001-02-29 25:61:00", "9" * 4400, "[" * 3000, "{a: " * 1500, "%YAML 1.1\n---\n", "...\n",
          "---\n", "\u202e", "é", "😀"]
fragments = st.one_of(st.sampled_from(TOKENS), st.text(max_size=12))


@st.composite
def text_mutation(draw: st.DrawFn, seed: str) -> str:
    """A few edits of the seed text: delete, insert, replace, truncate, duplicate or swap lines."""
    text = seed
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "dup-line", "swap-lines"]))
        at = draw(st.integers(0, max(0, len(text) - 1)))
        if kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        elif kind == "insert":
            text = text[:at] + draw(fragments) + text[at:]
        elif kind == "replace":
            text = text[:at] + draw(fragments) + text[at + draw(st.integers(1, 8)):]
        elif kind == "truncate":
            text = text[:at]
        else:
            lines = text.splitlines(keepends=True) or [""]
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == "dup-line":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
    return text


leaf_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30, max_value=10**60), st.floats(),
    st.text(max_size=20), st.sampled_from(["../../etc/passwd", "/dev/zero", "R0S0", "R99S99", "", " ", "5", "-5"]),
)
any_values = st.recursive(leaf_values, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)), max_leaves=12)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


@st.composite
def structure_mutation(draw: st.DrawFn, seed: Any, as_json: bool) -> str:
    """The seed's data with one node replaced, removed or given an unknown sibling, dumped as YAML or JSON."""
    data = json.loads(json.dumps(seed))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "remove", "add-key"]))
        if not path:
            data = draw(any_values) if action == "replace" else data
            continue
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[path[-1]] = draw(any_values)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(any_values)
    return json.dumps(data) if as_json else yaml.safe_dump(data, allow_unicode=True)


SEEDS = {name: example.read_text(encoding="utf-8") for name, (_, _, example) in PARSERS.items()}
SEED_DATA = {name: (json.loads(text) if name == "manifest" else yaml.safe_load(text)) for name, text in SEEDS.items()}


@pytest.mark.parametrize("parser", PARSER_NAMES)
@FAST
@given(text=st.text(max_size=400))
def test_arbitrary_text_parses_or_fails_in_one_line(scratch: Any, parser: str, text: str) -> None:
    parses_or_one_line_error(parser, scratch(f"{parser}-text", text))


@pytest.mark.parametrize("parser", PARSER_NAMES)
@settings(FAST, max_examples=40)
@given(content=st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_fail_in_one_line(scratch: Any, parser: str, content: bytes) -> None:
    parses_or_one_line_error(parser, scratch(f"{parser}-bytes", content))


@pytest.mark.parametrize("parser", PARSER_NAMES)
@FAST
@given(data=st.data())
def test_mutated_shipped_files_parse_or_fail_in_one_line(scratch: Any, parser: str, data: st.DataObject) -> None:
    text = data.draw(text_mutation(SEEDS[parser]))
    parses_or_one_line_error(parser, scratch(f"{parser}-mutated", text))


@pytest.mark.parametrize("parser", PARSER_NAMES)
@FAST
@given(data=st.data())
def test_structurally_mutated_documents_parse_or_fail_in_one_line(
    scratch: Any, parser: str, data: st.DataObject
) -> None:
    text = data.draw(structure_mutation(SEED_DATA[parser], as_json=parser == "manifest"))
    parses_or_one_line_error(parser, scratch(f"{parser}-structure", text))


@pytest.mark.parametrize("parser", PARSER_NAMES)
@pytest.mark.parametrize(
    ("case", "text"),
    [
        # Found by this file: PyYAML and json recurse (RecursionError) and PyYAML's int/date constructors raise
        # ValueError; runtime/yamlio.py and runtime/manifest.py now turn them into the one-line error.
        ("deep-lists", "[" * 5000 + "]" * 5000),
        ("deep-maps", "{a: " * 3000 + "1" + "}" * 3000),
        ("integer-of-5000-digits", '{"name": ' + "9" * 5000 + "}"),
        ("impossible-date", "store_id: 2001-13-45\nname: 2001-02-30 10:00:00\n"),
        ("python-tag", "store_id: !!python/object/apply:os.system ['touch /tmp/shelfsight-pwned']\n"),
        ("alias-fan-out", "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
                          "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nslots: [*c, *c, *c, *c, *c, *c, *c, *c]\n"),
        ("undefined-alias", "store_id: *nothing\n"),
        ("nul-byte", "store_id: a\x00b\n"),
    ],
)
def test_known_hostile_documents(scratch: Any, parser: str, case: str, text: str) -> None:
    outcome = parses_or_one_line_error(parser, scratch(f"{parser}-{case}", text))
    assert isinstance(outcome, ShelfSightError), f"{case} was accepted by the {parser} parser"


# ------------------------------------------------------------------------------------------------ model tampering

def copy_bundled_model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(BUNDLED_MODEL, folder)
    return folder / "manifest.json"


def refused(manifest_path: Path, *needles: str) -> str:
    with pytest.raises(ManifestError) as caught:
        load_model(manifest_path).close()
    message = str(caught.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_flipped_byte_anywhere_in_the_bundled_model_is_refused_naming_the_file(tmp_path: Path, where: float) -> None:
    manifest_path = copy_bundled_model(tmp_path)
    model = manifest_path.parent / "model.onnx"
    data = bytearray(model.read_bytes())
    data[min(int(len(data) * where), len(data) - 1)] ^= 0x01
    model.write_bytes(bytes(data))
    refused(manifest_path, str(model), "sha256 mismatch", "refusing to load")


SEGMENTS = ["..", ".", "", "sub", "model.onnx", "/", "\\", "~", "%2e%2e", "outside.onnx", "link"]


@settings(FAST, max_examples=100)
@given(parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5), absolute=st.booleans())
def test_no_artifact_path_reaches_a_file_outside_the_model_folder(
    tmp_path_factory: pytest.TempPathFactory, parts: list[str], absolute: bool
) -> None:
    """Whatever the manifest's model path, what loads is a file inside the folder (a good copy sits outside,
    reachable by '..', an absolute path, or a symlinked sub-folder: each must be refused)."""
    root = tmp_path_factory.mktemp("paths")
    folder = root / "model"
    shutil.copytree(BUNDLED_MODEL, folder)
    shutil.copy(folder / "model.onnx", root / "outside.onnx")
    shutil.copy(folder / "model.onnx", root / "model.onnx")
    (folder / "link").symlink_to(root, target_is_directory=True)
    path = ("/" if absolute else "") + "/".join(parts)
    if absolute:
        path = str(root) + "/" + "/".join(parts)
    manifest_path = folder / "manifest.json"
    document = json.loads(manifest_path.read_text())
    document["artifacts"][0]["path"] = path
    manifest_path.write_text(json.dumps(document))
    try:
        detector = load_model(manifest_path)
    except ShelfSightError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    detector.close()
    assert (folder / path).resolve().is_relative_to(folder.resolve()), f"loaded {path!r} from outside the folder"


# --- ONNX external data: the sha256 of model.onnx says nothing about the files it points to


def external_data_model(folder: Path, location: str = "weights.bin", listed: bool = False) -> Path:
    """The tiny detector (tests/runtime/tiny_onnx.py) with its box tensor saved as external data in
    ``folder/weights.bin``, the location inside model.onnx rewritten to ``location`` and the manifest's model sha256
    updated, so that only a check of the external data can refuse it."""
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import uses_external_data
    from tiny_onnx import write_model_folder

    boxes = np.tile(np.array([[8, 8, 24, 24]], np.float32), (64, 1))
    manifest_path = write_model_folder(folder, boxes, np.full((64, 1), 0.9, np.float32))
    model_path = folder / "model.onnx"
    onnx.save(onnx.load(str(model_path)), str(model_path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=512)
    model = onnx.load(str(model_path), load_external_data=False)
    rewritten = 0
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
                    rewritten += 1
    assert rewritten == 1  # the box tensor only: small shape tensors stay inside the file
    onnx.save(model, str(model_path))
    document = json.loads(manifest_path.read_text())
    document["artifacts"][0]["sha256"] = sha256_file(model_path)
    if listed:
        document["artifacts"].append({"path": "weights.bin", "sha256": sha256_file(folder / "weights.bin"),
                                      "role": "other"})
    manifest_path.write_text(json.dumps(document))
    return manifest_path


@pytest.mark.parametrize(
    "location",
    ["../../etc/passwd", "/etc/passwd", "../weights.bin", "sub/../../weights.bin", "..\\weights.bin"],
)
def test_external_data_leaving_the_model_folder_is_refused(tmp_path: Path, location: str) -> None:
    """Found by this file: only ONNX Runtime's own check stood between the manifest and '../../etc/passwd' (present
    in 1.32, absent from older releases the package allows); the loader now refuses it itself."""
    folder = tmp_path / "a" / "b"
    manifest_path = external_data_model(folder, location)
    shutil.copy(folder / "weights.bin", tmp_path / "a" / "weights.bin")  # a loadable copy outside the folder
    refused(manifest_path, str(folder / "model.onnx"), f"'{location}'", "outside the model folder", "tensor 'boxes'")


def test_external_data_not_listed_in_the_manifest_is_refused(tmp_path: Path) -> None:
    """Found by this file: a weights file beside model.onnx was loaded unverified, so changing the weights did not
    trip the sha256 check at all."""
    manifest_path = external_data_model(tmp_path / "m")
    refused(manifest_path, "'weights.bin'", "does not list with a sha256")


def test_listed_external_data_is_verified_and_a_tampered_copy_refused(tmp_path: Path) -> None:
    manifest_path = external_data_model(tmp_path / "m", listed=True)
    with load_model(manifest_path) as detector:  # listed and intact: loads and runs
        detections = detector.detect(np.zeros((64, 64, 3), np.uint8))
    assert detections.xyxy.tolist() == [[8.0, 8.0, 24.0, 24.0]]
    weights = tmp_path / "m" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF  # the box of anchor 0 moves by a hair: exactly the silent change the hash is there for
    weights.write_bytes(bytes(data))
    refused(manifest_path, str(weights), "sha256 mismatch")


def test_listed_external_data_symlinked_outside_is_refused(tmp_path: Path) -> None:
    manifest_path = external_data_model(tmp_path / "m", listed=True)
    weights = tmp_path / "m" / "weights.bin"
    weights.rename(tmp_path / "elsewhere.bin")
    weights.symlink_to(tmp_path / "elsewhere.bin")
    refused(manifest_path, "outside")


def test_external_data_scan_agrees_with_onnx(tmp_path: Path) -> None:
    """The loader's own protobuf walk (no onnx package on devices) finds what onnx finds, and nothing in the
    bundled single-file models."""
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from shelfsight.runtime.onnx_external import external_data_locations

    manifest_path = external_data_model(tmp_path / "m")
    model = onnx.load(str(manifest_path.parent / "model.onnx"), load_external_data=False)
    expected = [(t.name, {e.key: e.value for e in t.external_data}["location"])
                for t in _get_all_tensors(model) if uses_external_data(t)]
    assert external_data_locations(manifest_path.parent / "model.onnx") == expected
    for bundled in (REPO / "runtime" / "models").glob("*/model.onnx"):
        assert external_data_locations(bundled) == []


def test_a_truncated_model_with_a_matching_hash_is_refused_in_one_line(tmp_path: Path) -> None:
    manifest_path = copy_bundled_model(tmp_path)
    model = manifest_path.parent / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])
    document = json.loads(manifest_path.read_text())
    document["artifacts"][0]["sha256"] = sha256_file(model)
    manifest_path.write_text(json.dumps(document))
    with pytest.raises(ShelfSightError) as caught:
        load_model(manifest_path).close()
    assert "\n" not in str(caught.value) and "model.onnx" in str(caught.value)


# --- checkpoints: weights_only loading must refuse code


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "shelfsight.checkpoint/1", "state_dict": {}, "hook": _RunsACommand(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_a_checkpoint_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    from shelfsight.export.model import read_checkpoint

    path, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(ShelfSightError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "pickled Python objects" in message, message
    assert not marker.exists(), "torch.load executed the pickled os.system call"


def test_export_model_cli_refuses_it_in_one_line(tmp_path: Path) -> None:
    path, marker = _malicious_checkpoint(tmp_path)
    result = subprocess.run([sys.executable, "-m", "shelfsight.export.cli", str(path), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickled Python objects" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not marker.exists() and not (tmp_path / "o" / "model.onnx").exists()


# ------------------------------------------------------------------------------------------------ frames

FRAME_SIZE = (640, 360)


@pytest.fixture(scope="module")
def pipeline_parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    from shelfsight.shelf_agent.agent import build_pipeline, open_detector
    from shelfsight.shelf_agent.journal import Journal
    from shelfsight.shelf_agent.outbox import Outbox

    config = AgentConfig(slots={"dwell_s": 2.0}, gaps={"dwell_s": 2.0})  # type: ignore[arg-type]
    detector = open_detector(config)
    layout = ShelfLayout.model_validate({
        "store_id": "s", "camera_id": "c", "frame_size": {"width": FRAME_SIZE[0], "height": FRAME_SIZE[1]},
        "slots": [{"id": "R1S1", "polygon": [[10, 10], [300, 10], [300, 170], [10, 170]]},
                  {"id": "R2S1", "polygon": [[10, 180], [300, 180], [300, 350], [10, 350]]}]})
    folder = tmp_path_factory.mktemp("frames")
    outboxes = []

    def make(with_layout: bool) -> Any:
        name = "layout" if with_layout else "gaps"
        outbox = Outbox(folder / f"{name}-outbox.sqlite")
        outboxes.append(outbox)
        return build_pipeline(config, detector, layout if with_layout else None, FRAME_SIZE, outbox,
                              Journal(folder / f"{name}-journal.sqlite"), 0.0)

    yield make(True), make(False)
    for outbox in outboxes:
        outbox.close()
    detector.close()


GOOD_FRAME = np.zeros((FRAME_SIZE[1], FRAME_SIZE[0], 3), np.uint8)
HOSTILE_FRAMES = {
    "none": None,
    "huge-8000x8000": np.zeros((8000, 8000, 3), np.uint8),
    "zero-size": np.zeros((0, 0, 3), np.uint8),
    "no-channels": np.zeros((360, 640, 0), np.uint8),
    "batch-of-one": GOOD_FRAME[None],
    "int16": GOOD_FRAME.astype(np.int16),
    "bool": GOOD_FRAME.astype(bool),
    "float64-nan": np.full((360, 640, 3), np.nan),
    "float32-inf": np.full((360, 640, 3), np.inf, np.float32),
    "object": GOOD_FRAME.astype(object),
    "strings": np.full((2, 2, 3), "x"),
    "nested-list": GOOD_FRAME[:2, :2].tolist(),
    "bytes": bytes(360 * 640 * 3),
    "scalar": np.uint8(7),
}


def _process_and_check(pipeline: Any, frame: Any, t: float) -> None:
    bad, good = pipeline.bad_frames, pipeline.frames
    result = pipeline.process(frame, t)
    assert (pipeline.bad_frames, pipeline.frames) == (bad + 1, good), "a hostile frame was not skipped and counted"
    assert len(result.detections) == 0 and result.alerts == [] and result.transitions == []


@pytest.mark.parametrize("name", list(HOSTILE_FRAMES))
def test_hostile_frames_are_skipped_counted_and_the_next_frame_runs(pipeline_parts: Any, name: str) -> None:
    for pipeline in pipeline_parts:
        t = float(pipeline.frames + pipeline.bad_frames)
        _process_and_check(pipeline, HOSTILE_FRAMES[name], t)
        frames = pipeline.frames
        pipeline.process(GOOD_FRAME, t + 0.5)
        assert pipeline.frames == frames + 1


frame_dtypes = st.sampled_from([np.uint8, np.int8, np.uint16, np.int32, np.float16, np.float32, np.float64, bool])


@settings(FAST, max_examples=60)
@given(shape=st.lists(st.integers(0, 12), min_size=0, max_size=5), dtype=frame_dtypes, right_size=st.booleans())
def test_any_array_is_either_a_frame_or_skipped(pipeline_parts: Any, shape: list[int], dtype: Any,
                                                right_size: bool) -> None:
    """Random shapes and dtypes (optionally with the right height/width): a crash-free skip unless it is a real
    BGR uint8 frame of the pipeline's size."""
    if right_size and len(shape) >= 2:
        shape = [FRAME_SIZE[1], FRAME_SIZE[0], *shape[2:]]
    frame = np.zeros(shape, dtype)
    is_frame = dtype is np.uint8 and frame.shape == GOOD_FRAME.shape
    pipeline = pipeline_parts[0]
    t = float(pipeline.frames + pipeline.bad_frames)
    if is_frame:
        frames = pipeline.frames
        pipeline.process(frame, t)
        assert pipeline.frames == frames + 1
    else:
        _process_and_check(pipeline, frame, t)


def test_unusual_memory_layouts_of_a_good_frame_are_processed(pipeline_parts: Any) -> None:
    readonly = GOOD_FRAME.copy()
    readonly.setflags(write=False)
    layouts = {"strided": np.zeros((360, 1280, 3), np.uint8)[:, ::2], "fortran": np.asfortranarray(GOOD_FRAME),
               "read-only": readonly}
    pipeline = pipeline_parts[0]
    for index, frame in enumerate(layouts.values()):
        frames, bad = pipeline.frames, pipeline.bad_frames
        pipeline.process(frame, 1000.0 + index)
        assert (pipeline.frames, pipeline.bad_frames) == (frames + 1, bad)
