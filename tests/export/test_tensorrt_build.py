"""TensorRT engine building against FakeTensorRT: a stand-in ``tensorrt`` module that records every call.

No GPU and no TensorRT here, so these tests check our side only: which builder calls are made with which flags,
that incompatible options are refused, and that the engine cache key refuses engines from elsewhere. Real
TensorRT has not run this code yet (see the module docstring).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shelfsight.export.tensorrt_build import (
    EngineOptions,
    GpuIdentity,
    TensorRTError,
    build_engine,
    engine_key,
    key_path_for,
    verify_engine,
)

ORIN = GpuIdentity("Orin", "8.7")
RTX = GpuIdentity("NVIDIA GeForce RTX 3060", "8.6")


def _fake_tensorrt(version: str, calls: list[tuple[Any, ...]], parse_ok: bool = True, build_ok: bool = True):
    """FakeTensorRT: the subset of the TensorRT Python API that build_engine uses, recording each call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.__doc__ = "FakeTensorRT (test double; not NVIDIA TensorRT)"

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            calls.append(("Logger", severity))

    class NetworkDefinitionCreationFlag(IntEnum):
        EXPLICIT_BATCH = 0

    class MemoryPoolType(IntEnum):
        WORKSPACE = 0

    class BuilderFlag(IntEnum):
        FP16 = 0
        INT8 = 2

    class Network:
        pass

    class Config:
        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag: BuilderFlag) -> None:
            calls.append(("set_flag", flag))

    class Builder:
        def __init__(self, logger: Logger) -> None:
            calls.append(("Builder",))

        def create_network(self, flags: int) -> Network:
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            calls.append(("build_serialized_network",))
            return b"FAKE-ENGINE" if build_ok else None

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse(self, data: bytes) -> bool:
            calls.append(("parse", len(data)))
            return parse_ok

        def get_error(self, index: int) -> str:
            return "In node 3 (Foo): unsupported operator"

    for cls in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, BuilderFlag, Builder, OnnxParser):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[tuple[Any, ...]]]]:
    calls: list[tuple[Any, ...]] = []
    module = _fake_tensorrt("10.3.0", calls)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    yield module, calls


def _onnx(path: Path, qdq: bool, zero_point: type[np.generic] = np.int8) -> Path:
    weight = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    inits = [weight, numpy_helper.from_array(np.array(0.1, np.float32), "s")]
    if qdq:
        inits.append(numpy_helper.from_array(np.array(0, zero_point), "z"))
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
            helper.make_node("Conv", ["xd", "w"], ["y"]),
        ]
    else:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("options", "qdq", "flags"),
    [
        (EngineOptions(), False, []),
        (EngineOptions(fp16=True, workspace_mb=256), False, ["FP16"]),
        (EngineOptions(int8=True), True, ["INT8"]),
        (EngineOptions(int8=True, fp16=True), True, ["FP16", "INT8"]),
    ],
    ids=["fp32", "fp16", "int8", "int8+fp16"],
)
def test_builder_configuration(
    tmp_path: Path, fake_trt: tuple[Any, list[tuple[Any, ...]]], options: EngineOptions, qdq: bool, flags: list[str]
) -> None:
    _, calls = fake_trt
    model = _onnx(tmp_path / "model.onnx", qdq)
    engine = build_engine(model, options, cache_dir=tmp_path / "engines", gpu=ORIN)
    assert engine.read_bytes() == b"FAKE-ENGINE"
    assert engine.parent == tmp_path / "engines" and engine.name.startswith(options.precision + "-")
    assert [c[1].name for c in calls if c[0] == "set_flag"] == flags
    assert ("set_memory_pool_limit", 0, options.workspace_mb << 20) in calls
    assert ("create_network", 0) in calls  # TensorRT 10: explicit batch is implicit, flag deprecated
    assert ("parse", model.stat().st_size) in calls
    key = json.loads(key_path_for(engine).read_text())
    assert key["gpu_name"] == "Orin" and key["compute_capability"] == "8.7" and key["tensorrt_version"] == "10.3.0"
    assert not list((tmp_path / "engines").glob("*.tmp"))


def test_explicit_batch_flag_before_tensorrt_10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("8.6.1", calls))
    build_engine(_onnx(tmp_path / "m.onnx", False), EngineOptions(), cache_dir=tmp_path, gpu=ORIN)
    assert ("create_network", 1) in calls


def test_cache_hit_does_not_rebuild_and_key_change_does(
    tmp_path: Path, fake_trt: tuple[Any, list[tuple[Any, ...]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, calls = fake_trt
    model = _onnx(tmp_path / "model.onnx", False)
    first = build_engine(model, EngineOptions(fp16=True), gpu=ORIN)
    again = build_engine(model, EngineOptions(fp16=True), gpu=ORIN)
    assert first == again and first.parent == tmp_path / "engines"
    assert sum(c[0] == "build_serialized_network" for c in calls) == 1
    other_gpu = build_engine(model, EngineOptions(fp16=True), gpu=RTX)
    fp32 = build_engine(model, EngineOptions(), gpu=ORIN)
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.4.0")
    newer_trt = build_engine(model, EngineOptions(fp16=True), gpu=ORIN)
    assert len({first, other_gpu, fp32, newer_trt}) == 4
    assert sum(c[0] == "build_serialized_network" for c in calls) == 4


@pytest.mark.parametrize(
    ("change", "field"),
    [("gpu", "gpu_name"), ("capability", "compute_capability"), ("trt", "tensorrt_version"), ("model", "onnx_sha256")],
)
def test_engine_from_elsewhere_is_refused(
    tmp_path: Path, fake_trt: tuple[Any, list[tuple[Any, ...]]], change: str, field: str
) -> None:
    model = _onnx(tmp_path / "model.onnx", False)
    engine = build_engine(model, EngineOptions(), gpu=RTX)
    here, trt_version = RTX, "10.3.0"
    if change == "gpu":
        here = GpuIdentity("Orin", "8.6")
    elif change == "capability":
        here = GpuIdentity(RTX.name, "8.9")
    elif change == "trt":
        trt_version = "10.0.1"
    else:
        model = _onnx(tmp_path / "other.onnx", True)
    expected = engine_key(model, EngineOptions(), trt_version, here)
    with pytest.raises(TensorRTError, match=f"does not match this model/machine \\({field}"):
        verify_engine(engine, expected)
    assert verify_engine(engine, engine_key(tmp_path / "model.onnx", EngineOptions(), "10.3.0", RTX)) == engine


def test_engine_without_key_file_is_refused(tmp_path: Path, fake_trt: tuple[Any, list[tuple[Any, ...]]]) -> None:
    model = _onnx(tmp_path / "model.onnx", False)
    engine = build_engine(model, EngineOptions(), gpu=ORIN)
    key_path_for(engine).unlink()
    with pytest.raises(TensorRTError, match="refusing an engine of unknown origin"):
        verify_engine(engine, engine_key(model, EngineOptions(), "10.3.0", ORIN))


@pytest.mark.parametrize(
    ("options", "qdq", "message"),
    [
        (EngineOptions(int8=True), False, "--int8 needs a Q/DQ model"),
        (EngineOptions(fp16=True), True, "build it with --int8"),
        (EngineOptions(), True, "build it with --int8"),
    ],
)
def test_incompatible_options_are_errors(
    tmp_path: Path, fake_trt: tuple[Any, list[tuple[Any, ...]]], options: EngineOptions, qdq: bool, message: str
) -> None:
    _, calls = fake_trt
    with pytest.raises(TensorRTError, match=message):
        build_engine(_onnx(tmp_path / "m.onnx", qdq), options, gpu=ORIN)
    assert not any(c[0] == "Builder" for c in calls)


def test_cpu_int8_variant_is_refused_for_tensorrt(tmp_path: Path, fake_trt: tuple[Any, list[tuple[Any, ...]]]) -> None:
    model = _onnx(tmp_path / "cpu-int8.onnx", True, np.uint8)
    with pytest.raises(TensorRTError, match="UINT8 zero points is the ONNX Runtime CPU variant"):
        build_engine(model, EngineOptions(int8=True), gpu=ORIN)


@pytest.mark.parametrize(("parse_ok", "message"), [(False, "cannot parse the model: In node 3"), (True, "failed to")])
def test_parse_and_build_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parse_ok: bool, message: str
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0", [], parse_ok=parse_ok, build_ok=False))
    with pytest.raises(TensorRTError, match=message):
        build_engine(_onnx(tmp_path / "m.onnx", False), EngineOptions(), cache_dir=tmp_path / "e", gpu=ORIN)
    assert not list((tmp_path / "e").glob("*.engine"))


def test_missing_tensorrt_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTError, match="TensorRT is not installed") as info:
        build_engine(_onnx(tmp_path / "m.onnx", False), EngineOptions(), gpu=ORIN)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [{"workspace_mb": 0}, {"fp32": True}])
def test_engine_options_are_strict(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EngineOptions(**bad)
