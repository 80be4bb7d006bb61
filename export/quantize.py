"""Static INT8 quantization to a Q/DQ ONNX model, and proof that the convolutions really run in INT8.

Q/DQ is the one format both ONNX Runtime (CPU) and TensorRT (explicit quantization) consume. A Q/DQ model is only
fast if the runtime fuses each DequantizeLinear -> Conv -> QuantizeLinear group into an integer kernel; a badly
placed or missing Q/DQ pair leaves the convolution in float *plus* the conversion cost, which can end up slower than
FP32. So quantizing is not done until :func:`inspect_int8_kernels` has looked at the graph ONNX Runtime actually
executes (``ORT_ENABLE_ALL`` on the CPU provider) and counted the integer convolutions.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shelfsight.calibration.cache import CALIBRATION_METHODS, CalibMethodName
from shelfsight.runtime.errors import ShelfSightError

log = logging.getLogger(__name__)

# Integer convolution kernels ONNX Runtime's CPU provider fuses Q/DQ convolutions into.
INT8_CONV_OPS = frozenset({"QLinearConv", "ConvInteger", "NhwcQLinearConv", "QLinearConvTranspose"})
# Float convolution kernels, including the layout-optimized and activation-fused forms.
FLOAT_CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "NhwcConv", "ConvTranspose"})

MIN_QDQ_OPSET = 13

_QUANT_TYPES = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}


class QuantizationError(ShelfSightError):
    """Quantization failed or produced a model that does not run convolutions in INT8."""


class QuantizeOptions(BaseModel):
    """How to quantize. Defaults are what measured best on an AVX512-VNNI CPU (see the export report)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calib_method: CalibMethodName = "minmax"
    activation_type: Literal["quint8", "qint8"] = "quint8"
    weight_type: Literal["qint8"] = "qint8"
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False
    # Keep the ops after the last convolution (box decode, score sigmoid, output concat) in float: an 8-bit box
    # coordinate is a 1/255-of-the-image step, which moves IoU-critical box edges by pixels.
    float_tail: bool = True
    # The first convolution sees the raw image (3 input channels): as INT8 it is slower than the float NCHWc kernel
    # and it needs the whole input tensor quantized first. Measured on this CPU: the float stem saves ~15% latency.
    float_stem: bool = True
    # Keep the first N convolutions (in graph order) in float, with every node before them and the activation after
    # the last one, so no Q/DQ pair sits between a float conv and its activation. For networks whose early layers
    # carry a wide-range signal that per-tensor 8-bit activations cannot hold: YOLOX-Nano's Focus stem (a conv on
    # 0-255 pixels) and the depthwise conv after it lose most of the model's accuracy in INT8 (see
    # docs/export/yolox-int8.md). 0: off.
    float_leading_convs: int = Field(default=0, ge=0)
    # Give every input and the output of each Concat (and each Split's outputs and input) one shared range, so ORT's
    # QLinearConcat copies bytes instead of requantizing each input.
    share_concat_ranges: bool = True
    # A convolution followed by SiLU (x * sigmoid(x), e.g. YOLOX, YOLOv5/v8) has its *pre-activation* output quantized,
    # and that tensor's long negative tail (down to -100 in YOLOX-Nano), which SiLU squashes to ~0, would take most of
    # the 8-bit range. Clipping its range at -silu_clip (|SiLU(x)| < silu_clip * exp(-silu_clip) below it) is the SiLU
    # counterpart of what ORT does for ReLU, where the activation's range replaces the convolution's. None: off.
    silu_clip: float | None = Field(default=None, gt=0.0)
    # Run each SiLU as one float ``com.microsoft.QuickGelu(alpha=1)`` node between Q/DQ, the kernel ONNX Runtime's
    # own FP32 optimizer fuses it into, instead of QLinearSigmoid (a table lookup) + QLinearMul. Measured on
    # YOLOX-Nano (104 SiLUs): INT8 went from 1.08x FP32 latency to 0.94x. QuickGelu is an ONNX Runtime contrib op,
    # so TensorRT targets leave it off. Models without SiLU (the project's own, ReLU) are unchanged.
    fuse_silu: bool = True
    nodes_to_exclude: tuple[str, ...] = ()
    # Convolutions the caller accepts staying float (on top of any named in ``nodes_to_exclude``).
    allowed_float_convs: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _compatible(self) -> QuantizeOptions:
        if self.calib_method not in CALIBRATION_METHODS:
            raise ValueError(f"calib_method must be one of {sorted(CALIBRATION_METHODS)}")
        if self.symmetric_activations and self.activation_type == "quint8":
            raise ValueError("symmetric_activations needs activation_type 'qint8' (TensorRT's zero point 0)")
        return self

    @classmethod
    def for_tensorrt(cls, **overrides: object) -> QuantizeOptions:
        """TensorRT's explicit quantization accepts only symmetric signed INT8 (zero point 0) everywhere."""
        values: dict[str, object] = {
            "activation_type": "qint8",
            "symmetric_activations": True,
            "reduce_range": False,
            "fuse_silu": False,
        }
        values.update(overrides)
        return cls.model_validate(values)

    def extra_options(self) -> dict[str, object]:
        return {
            "ActivationSymmetric": self.symmetric_activations,
            "WeightSymmetric": True,
        }


@dataclass(frozen=True)
class Int8KernelReport:
    """Convolutions in the model vs. the kernels ONNX Runtime actually runs for them."""

    total_convs: int
    int8_convs: int
    float_convs: list[str]
    expected_float_convs: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return len(self.float_convs) <= self.expected_float_convs and self.int8_convs + len(self.float_convs) >= (
            self.total_convs
        )

    def summary(self) -> str:
        return (
            f"{self.int8_convs}/{self.total_convs} convolutions run as INT8 kernels, "
            f"{len(self.float_convs)} float ({self.expected_float_convs} expected)"
        )


def preprocess_for_quantization(fp32_onnx: str | Path, out_path: str | Path) -> Path:
    """ORT's quantization pre-pass: symbolic shape inference + graph optimization (folds, fusions)."""
    out_path = Path(out_path)
    source: str | onnx.ModelProto = str(fp32_onnx)
    model = onnx.load(str(fp32_onnx))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_QDQ_OPSET)
    if opset < MIN_QDQ_OPSET:
        # Per-channel DequantizeLinear needs its 'axis' attribute, which arrived in opset 13 (third-party models such
        # as the public YOLOX exports are often opset 11); quantize_static does not upgrade far enough by itself.
        try:
            source = onnx.version_converter.convert_version(model, MIN_QDQ_OPSET)
        except Exception as exc:
            raise QuantizationError(f"{fp32_onnx}: cannot convert opset {opset} to {MIN_QDQ_OPSET}: {exc}") from exc
    try:
        quant_pre_process(source, str(out_path), skip_symbolic_shape=False)
    except Exception as exc:  # the pre-pass raises bare asserts and onnx errors alike
        raise QuantizationError(f"{fp32_onnx}: quantization pre-processing failed: {exc}") from exc
    return out_path


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def tail_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes after the last convolutions: those from which no Conv can be reached.

    For the ``shelfsight`` head this is the flatten/transposes, the softplus * stride box decode, the anchor
    subtract/add, the score sigmoid and the output concat: cheap elementwise work where 8 bits cost accuracy.
    """
    graph = model.graph
    consumers = _consumers(graph)
    feeds_conv: dict[str, bool] = {}

    def reaches_conv(node: onnx.NodeProto) -> bool:
        key = node.name or node.output[0]
        if key in feeds_conv:
            return feeds_conv[key]
        feeds_conv[key] = False  # graphs are acyclic; this only guards the recursion
        result = node.op_type == "Conv" or any(
            reaches_conv(child) for out in node.output for child in consumers.get(out, [])
        )
        feeds_conv[key] = result
        return result

    return [node.name for node in graph.node if node.op_type != "Conv" and not reaches_conv(node)]


def excluded_nodes(model_path: str | Path, options: QuantizeOptions) -> list[str]:
    model = onnx.load(str(model_path), load_external_data=False)
    names = set(options.nodes_to_exclude)
    known = {node.name for node in model.graph.node}
    unknown = sorted(names - known)
    if unknown:
        raise QuantizationError(f"{model_path}: nodes_to_exclude names unknown node '{unknown[0]}'")
    if options.float_tail:
        names.update(tail_nodes(model))
    if options.float_stem:
        names.update(stem_convs(model))
    if options.float_leading_convs:
        names.update(leading_nodes(model, options.float_leading_convs))
    return sorted(names)


_ACTIVATION_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "Tanh", "Elu"})


def leading_nodes(model: onnx.ModelProto, convs: int) -> list[str]:
    """The first ``convs`` convolutions in graph (topological) order, every node before the last of them, and that
    convolution's activation (``Sigmoid`` + ``Mul`` for SiLU, ``Relu``, ...): a float region at the model's input."""
    nodes = list(model.graph.node)
    positions = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if convs > len(positions):
        raise QuantizationError(f"float_leading_convs={convs}, but the model has only {len(positions)} convolutions")
    last = positions[convs - 1]
    region = {nodes[i].name for i in range(last + 1)}
    frontier = set(nodes[last].output)
    constants = {init.name for init in model.graph.initializer}
    for node in nodes[last + 1 :]:
        data_inputs = {name for name in node.input if name and name not in constants}
        if node.op_type in _ACTIVATION_OPS and data_inputs and data_inputs <= frontier:
            region.add(node.name)
            frontier |= set(node.output)
    return sorted(name for name in region if name)


def stem_convs(model: onnx.ModelProto) -> list[str]:
    """Convolutions that read a graph input directly."""
    inputs = {value.name for value in model.graph.input}
    return [node.name for node in model.graph.node if node.op_type == "Conv" and node.input[0] in inputs]


# Data-movement ops whose quantized output ORT ties to their input's scale: a concat group spans through them.
_SAME_SCALE_OPS = frozenset({"Split", "Slice", "Resize", "MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})


def shared_concat_ranges(model: onnx.ModelProto, calibration_cache: str | Path, skip: set[str]) -> dict[str, Any]:
    """``TensorQuantOverrides`` giving each group of tensors joined by a Concat the union of their ranges.

    Groups extend through data-movement ops (Split, Slice, Resize, MaxPool, ...) because ORT quantizes their outputs
    with their input's scale anyway; only Concat joins otherwise independent tensors.
    """
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = load_tensors_data(calibration_cache).data
    parent: dict[str, str] = {}

    def find(name: str) -> str:
        while parent.setdefault(name, name) != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in model.graph.node:
        if node.name in skip or not (node.op_type == "Concat" or node.op_type in _SAME_SCALE_OPS):
            continue
        data_inputs = node.input if node.op_type == "Concat" else node.input[:1]
        tensors = [t for t in (*data_inputs, *node.output) if t in ranges]
        for tensor in tensors[1:]:
            parent[find(tensor)] = find(tensors[0])
    groups: dict[str, list[str]] = {}
    for tensor in parent:
        groups.setdefault(find(tensor), []).append(tensor)
    overrides: dict[str, Any] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        low = min(float(np.min(ranges[t].range_value[0])) for t in members)
        high = max(float(np.max(ranges[t].range_value[1])) for t in members)
        for tensor in members:
            overrides[tensor] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


def silu_inputs(model: onnx.ModelProto) -> list[str]:
    """Tensors ``x`` consumed only by a SiLU written as ``Mul(x, Sigmoid(x))`` (either input order)."""
    consumers = _consumers(model.graph)
    found = []
    for name, users in consumers.items():
        sigmoids = [n for n in users if n.op_type == "Sigmoid"]
        if len(sigmoids) != 1:
            continue
        gate = sigmoids[0].output[0]
        others = [n for n in users if n is not sigmoids[0]]
        if others and all(n.op_type == "Mul" and sorted(n.input) == sorted([name, gate]) for n in others):
            if all(n.op_type == "Mul" for n in consumers.get(gate, [])):
                found.append(name)
    return found


def fuse_silu(model: onnx.ModelProto) -> int:
    """Rewrite every ``Mul(x, Sigmoid(x))`` into ``com.microsoft.QuickGelu(x, alpha=1)`` in place; returns how many.

    The QuickGelu node takes the Mul's name and output, so calibration ranges and node exclusions keyed on them
    still apply."""
    consumers = _consumers(model.graph)
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for tensor in silu_inputs(model):
        sigmoid = next(n for n in consumers[tensor] if n.op_type == "Sigmoid")
        muls = [n for n in consumers[tensor] if n is not sigmoid]
        if len(muls) != 1 or len(consumers.get(sigmoid.output[0], [])) != 1:
            continue  # a gate shared by several products is not one SiLU
        mul = muls[0]
        dropped.add(id(sigmoid))
        replaced[id(mul)] = onnx.helper.make_node(
            "QuickGelu", [tensor], [mul.output[0]], name=mul.name, domain="com.microsoft", alpha=1.0
        )
    if not replaced:
        return 0
    nodes = [replaced.get(id(node), node) for node in model.graph.node if id(node) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def silu_input_ranges(
    model: onnx.ModelProto, calibration_cache: str | Path, clip: float, skip_tensors: set[str]
) -> dict[str, Any]:
    """``TensorQuantOverrides`` raising each SiLU input's calibrated minimum to at least ``-clip``."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = load_tensors_data(calibration_cache).data
    overrides: dict[str, Any] = {}
    for tensor in silu_inputs(model):
        if tensor in skip_tensors or tensor not in ranges:
            continue
        low = float(np.min(ranges[tensor].range_value[0]))
        high = float(np.max(ranges[tensor].range_value[1]))
        if low < -clip < high:
            overrides[tensor] = [{"rmin": np.float32(-clip), "rmax": np.float32(high)}]
    return overrides


def quantize_qdq(
    preprocessed_onnx: str | Path,
    out_path: str | Path,
    calibration_cache: str | Path,
    options: QuantizeOptions,
) -> Path:
    """Write the Q/DQ INT8 model from a pre-processed FP32 model and cached calibration ranges."""
    out_path = Path(out_path)
    exclude = excluded_nodes(preprocessed_onnx, options)
    extra = options.extra_options()
    overrides: dict[str, Any] = {}
    model = onnx.load(str(preprocessed_onnx), load_external_data=False)
    if options.share_concat_ranges:
        overrides.update(shared_concat_ranges(model, calibration_cache, set(exclude)))
    if options.silu_clip is not None:
        overrides.update(silu_input_ranges(model, calibration_cache, options.silu_clip, set(overrides)))
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    with tempfile.TemporaryDirectory(prefix="shelfsight-silu-") as tmp:
        source = Path(preprocessed_onnx)
        if options.fuse_silu and silu_inputs(model):
            full = onnx.load(str(preprocessed_onnx))  # with any external weights, since it is saved elsewhere
            if fuse_silu(full):
                source = Path(tmp) / "fused.onnx"
                onnx.save(full, str(source))
        try:
            quantize_static(
                str(source),
                str(out_path),
                calibration_data_reader=None,
                quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=_QUANT_TYPES[options.activation_type],
                weight_type=_QUANT_TYPES[options.weight_type],
                nodes_to_exclude=exclude,
                calibrate_method=CALIBRATION_METHODS[options.calib_method],
                extra_options=extra,
                calibration_cache_path=str(calibration_cache),
            )
        except (ValueError, RuntimeError, KeyError, onnx.checker.ValidationError) as exc:
            raise QuantizationError(f"{preprocessed_onnx}: quantize_static failed: {exc}") from exc
    return out_path


def optimized_graph(onnx_path: str | Path, optimized_path: str | Path) -> onnx.ModelProto:
    """The graph ONNX Runtime's CPU provider executes, after every optimization level it applies by default."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized_path)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # the "hardware specific optimizations" warning is exactly what we want here
    try:
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types without a common public base
        raise QuantizationError(f"{onnx_path}: ONNX Runtime cannot load the model: {exc}") from exc
    return onnx.load(str(optimized_path))


def inspect_int8_kernels(onnx_path: str | Path, expected_float_convs: int = 0) -> Int8KernelReport:
    """Count the convolutions of ``onnx_path`` and which kernel each one runs as in the ORT-optimized CPU graph."""
    source = onnx.load(str(onnx_path), load_external_data=False)
    total = sum(node.op_type in FLOAT_CONV_OPS | INT8_CONV_OPS for node in source.graph.node)
    with tempfile.TemporaryDirectory(prefix="shelfsight-ortopt-") as tmp:
        optimized = optimized_graph(onnx_path, Path(tmp) / "optimized.onnx")
    int8 = [node for node in optimized.graph.node if node.op_type in INT8_CONV_OPS]
    floating = [node.name or node.output[0] for node in optimized.graph.node if node.op_type in FLOAT_CONV_OPS]
    counts = Counter(f"{node.domain or 'ai.onnx'}:{node.op_type}" for node in optimized.graph.node)
    return Int8KernelReport(
        total_convs=total,
        int8_convs=len(int8),
        float_convs=floating,
        expected_float_convs=expected_float_convs,
        op_counts=dict(sorted(counts.items())),
    )


def expected_float_convs(preprocessed_onnx: str | Path, options: QuantizeOptions) -> int:
    model = onnx.load(str(preprocessed_onnx), load_external_data=False)
    excluded = set(excluded_nodes(preprocessed_onnx, options))
    return options.allowed_float_convs + sum(
        node.op_type in FLOAT_CONV_OPS and node.name in excluded for node in model.graph.node
    )


def verify_int8_kernels(report: Int8KernelReport, model_path: str | Path) -> Int8KernelReport:
    if not report.ok:
        names = ", ".join(report.float_convs[:3]) + (" ..." if len(report.float_convs) > 3 else "")
        raise QuantizationError(
            f"{model_path}: {report.summary()}; float convolutions left in the optimized graph: {names}"
        )
    return report
