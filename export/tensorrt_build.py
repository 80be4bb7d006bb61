"""Build TensorRT engines from ONNX models, and cache them under a key that says where they are valid.

NOT YET RUN ON REAL HARDWARE. TensorRT cannot be installed in the build and test environment (its wheels come from
NVIDIA's own index), so this module has only been exercised against a fake ``tensorrt`` module that records calls
(``tests/export/test_tensorrt_build.py``). The calls follow the TensorRT 8.6/10.x Python API documentation:
``trt.Builder`` -> ``create_network`` (with ``EXPLICIT_BATCH`` before 10.0, where it became the only mode) ->
``trt.OnnxParser.parse`` -> ``create_builder_config`` with ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``
and ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` -> ``build_serialized_network``.

INT8 here means *explicit* quantization: the scales come from the Q/DQ nodes of the INT8 ONNX model (the symmetric
signed-INT8 variant TensorRT requires, see ``QuantizeOptions.for_tensorrt``); TensorRT's own implicit calibrators
are not used, so there is one calibration for every backend.

A serialized engine only runs with the TensorRT version that built it, on the GPU model it was tuned for. The cache
key is sha256(ONNX file) + TensorRT version + GPU name + compute capability + precision flags; every engine is
written with a ``.json`` sidecar holding that key, and :func:`verify_engine` refuses an engine whose sidecar does
not match the machine and model it is about to run on.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.runtime.manifest import sha256_file

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"
KEY_SUFFIX = ".engine.json"


class TensorRTError(ShelfSightError):
    """TensorRT is missing, cannot parse or build the model, or a cached engine does not fit this machine."""


class EngineOptions(BaseModel):
    """Precision and builder memory for one engine. ``int8`` needs a Q/DQ model (explicit quantization)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fp16: bool = False
    int8: bool = False
    workspace_mb: int = Field(default=1024, ge=16, le=1 << 20)

    # int8 + fp16 is allowed on purpose: layers left in float by the Q/DQ model (the box decode) may then run in
    # FP16. Whether int8 fits the model is checked in check_model_fits_options, where the model is known.

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "8.7"


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    fp16: bool
    int8: bool

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode("utf-8")).hexdigest()

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    def mismatches(self, other: EngineKey) -> list[str]:
        return [name for name, value in asdict(self).items() if asdict(other)[name] != value]


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError:
        raise TensorRTError(
            "TensorRT is not installed: engines can only be built on a machine with an NVIDIA GPU and the "
            "[gpu] extra (pip install 'shelfsight[gpu]'); use the ONNX model with onnxruntime elsewhere"
        ) from None
    return tensorrt


def detect_gpu() -> GpuIdentity:
    """GPU 0's name and compute capability through the CUDA driver API (libcuda), which every NVIDIA driver ships.

    The driver API is used rather than nvidia-smi (absent on Jetson) or the CUDA runtime (its struct layouts change
    between releases): ``cuDeviceGetName`` and ``cuDeviceGetAttribute`` have been stable since CUDA 2.
    """
    names = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
    driver = None
    for name in names:
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if driver is None:
        raise TensorRTError("no NVIDIA driver found (libcuda): TensorRT engines need an NVIDIA GPU")
    device = ctypes.c_int()
    if driver.cuInit(0) != 0 or driver.cuDeviceGet(ctypes.byref(device), 0) != 0:
        raise TensorRTError("the NVIDIA driver found no usable GPU (cuInit/cuDeviceGet failed)")
    raw_name = ctypes.create_string_buffer(256)
    driver.cuDeviceGetName(raw_name, 256, device)
    major, minor = ctypes.c_int(), ctypes.c_int()
    driver.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    driver.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    return GpuIdentity(raw_name.value.decode("utf-8", "replace").strip(), f"{major.value}.{minor.value}")


def engine_key(onnx_path: str | Path, options: EngineOptions, tensorrt_version: str, gpu: GpuIdentity) -> EngineKey:
    return EngineKey(
        onnx_sha256=sha256_file(onnx_path),
        tensorrt_version=tensorrt_version,
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        fp16=options.fp16,
        int8=options.int8,
    )


def engine_paths(cache_dir: str | Path, key: EngineKey) -> tuple[Path, Path]:
    stem = f"{key.precision}-{key.digest[:20]}"
    return Path(cache_dir) / f"{stem}{ENGINE_SUFFIX}", Path(cache_dir) / f"{stem}{KEY_SUFFIX}"


def key_path_for(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def read_engine_key(engine_path: str | Path) -> EngineKey:
    sidecar = key_path_for(engine_path)
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        return EngineKey(**data)
    except FileNotFoundError:
        raise TensorRTError(
            f"{engine_path}: no key file {sidecar.name}; refusing an engine of unknown origin"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise TensorRTError(f"{sidecar}: unreadable engine key ({exc})") from None


def verify_engine(engine_path: str | Path, expected: EngineKey) -> Path:
    """Refuse an engine built from another model, by another TensorRT, or for another GPU or precision."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise TensorRTError(f"{engine_path}: engine file not found")
    found = read_engine_key(engine_path)
    wrong = expected.mismatches(found)
    if wrong:
        details = ", ".join(f"{name} {getattr(found, name)!r} != {getattr(expected, name)!r}" for name in wrong)
        raise TensorRTError(f"{engine_path}: cached engine does not match this model/machine ({details}); rebuild it")
    return engine_path


def qdq_zero_point_types(onnx_path: str | Path) -> set[str]:
    """Element types of the QuantizeLinear zero points ({} for a float model)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            found.add(types.get(node.input[2], "UINT8") if len(node.input) > 2 else "UINT8")
    return found


def check_model_fits_options(onnx_path: str | Path, options: EngineOptions) -> None:
    """Incompatible requests are errors, never silently changed."""
    zero_point_types = qdq_zero_point_types(onnx_path)
    has_qdq = bool(zero_point_types)
    if zero_point_types - {"INT8"}:
        raise TensorRTError(
            f"{onnx_path}: Q/DQ with {', '.join(sorted(zero_point_types - {'INT8'}))} zero points is the ONNX Runtime "
            "CPU variant; TensorRT needs symmetric INT8 (build from the int8-tensorrt/ folder)"
        )
    if options.int8 and not has_qdq:
        raise TensorRTError(
            f"{onnx_path}: --int8 needs a Q/DQ model from 'export-model --int8' (explicit quantization); "
            "this model has no QuantizeLinear/DequantizeLinear nodes"
        )
    if has_qdq and not options.int8:
        raise TensorRTError(f"{onnx_path}: this is a Q/DQ INT8 model; build it with --int8")


def _network_flags(trt: Any) -> int:
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        # Before TensorRT 10 an ONNX network must be created in explicit-batch mode; from 10 on it is the only mode
        # and the flag is deprecated.
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def build_serialized_engine(trt: Any, onnx_path: Path, options: EngineOptions) -> bytes:
    """The TensorRT build itself: ONNX file -> serialized engine bytes."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"{onnx_path}: TensorRT cannot parse the model: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.int8:
        config.set_flag(trt.BuilderFlag.INT8)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    return bytes(serialized)


def build_engine(
    onnx_path: str | Path,
    options: EngineOptions,
    cache_dir: str | Path | None = None,
    gpu: GpuIdentity | None = None,
    detect: Callable[[], GpuIdentity] = detect_gpu,
) -> Path:
    """Return a serialized engine for ``onnx_path`` built with ``options``, reusing a cached one when the key fits.

    The engine and its key file are written to ``cache_dir`` (default: an ``engines`` folder next to the model)
    through a temporary name, so an interrupted build never leaves a file that looks like a finished engine.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise TensorRTError(f"{onnx_path}: ONNX model not found")
    trt = import_tensorrt()
    check_model_fits_options(onnx_path, options)
    gpu = gpu or detect()
    key = engine_key(onnx_path, options, str(trt.__version__), gpu)
    cache = Path(cache_dir) if cache_dir is not None else onnx_path.parent / "engines"
    engine_path, key_path = engine_paths(cache, key)
    if engine_path.is_file():
        log.info("TensorRT engine cache hit: %s", engine_path)
        return verify_engine(engine_path, key)
    cache.mkdir(parents=True, exist_ok=True)
    log.info(
        "building TensorRT %s engine for %s on %s (sm %s)",
        options.precision,
        onnx_path,
        gpu.name,
        gpu.compute_capability,
    )
    blob = build_serialized_engine(trt, onnx_path, options)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    tmp.write_bytes(blob)
    key_path.write_text(json.dumps(asdict(key), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, engine_path)
    return engine_path


# --- CLI: export-model build-engine MODEL_DIR ----------------------------------------------------------------------

BUILD_ENGINE_EXAMPLES = """\
examples (on the target device, with TensorRT installed; NOT YET RUN ON REAL HARDWARE):
  export-model build-engine models/shelf-int8 --int8              # uses models/shelf-int8/int8-tensorrt
  export-model build-engine models/shelf-int8 --fp16              # uses models/shelf-int8/fp32
  export-model build-engine models/shelf-320 --fp16 --workspace 2048
"""


def build_engine_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="export-model build-engine",
        description="Build a TensorRT engine from an exported model folder, cached by ONNX sha256, TensorRT "
        "version and GPU (engines are not portable). INT8 uses the Q/DQ scales of the INT8 export.",
        epilog=BUILD_ENGINE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", type=Path, help="folder with manifest.json, or an 'export-model --int8' folder")
    parser.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    parser.add_argument("--int8", action="store_true", help="INT8 from the Q/DQ model (explicit quantization)")
    parser.add_argument("--workspace", type=int, default=1024, metavar="MB", help="builder workspace (default 1024)")
    parser.add_argument("--cache-dir", type=Path, help="engine cache folder (default: MODEL/engines)")
    return parser


def model_for_engine(model_dir: Path, options: EngineOptions) -> Path:
    """The ONNX file to build from: the folder's own model, or the right variant of an ``--int8`` export folder."""
    from shelfsight.runtime.manifest import MANIFEST_FILENAME, load_manifest, resolve_artifact

    candidates = [model_dir / MANIFEST_FILENAME]
    candidates.append(model_dir / ("int8-tensorrt" if options.int8 else "fp32") / MANIFEST_FILENAME)
    manifest_path = next((p for p in candidates if p.is_file()), None)
    if manifest_path is None:
        wanted = "int8-tensorrt/" if options.int8 else "fp32/"
        raise TensorRTError(f"{model_dir}: no manifest.json here or in {wanted}; pass an exported model folder")
    manifest = load_manifest(manifest_path)
    return resolve_artifact(manifest_path, manifest.artifact("model"))  # refuses a tampered model


def run_build_engine(args: Any) -> int:
    options = EngineOptions(fp16=args.fp16, int8=args.int8, workspace_mb=args.workspace)
    onnx_path = model_for_engine(Path(args.model_dir), options)
    engine = build_engine(onnx_path, options, cache_dir=args.cache_dir)
    print(f"engine: {engine} (key: {key_path_for(engine)})")
    return 0
