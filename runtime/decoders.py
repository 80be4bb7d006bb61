"""Third-party YOLO-family heads: decoders for ``yolov8``, ``yolov5`` and ``yolox``, and the shape rule of each format.

Every decoder returns, per image, ``(xyxy in network-input pixels, per-class scores in [0, 1])`` exactly like the
``shelfsight`` decoder in ``postprocess``; thresholds, NMS and the letterbox inverse are shared downstream.
``check_output_layout`` is the same knowledge seen from the other side: it refuses a format whose declared layout
does not fit a model's output shape, and is what ``describe`` (and any loader) uses before a frame is ever run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from shelfsight.runtime.errors import ManifestError
from shelfsight.runtime.postprocess import Candidates, register_decoder

# YOLOX (and the P5 YOLOv5/YOLOv8 models) predict at these strides; the anchor order is stride-major, then row-major.
YOLOX_STRIDES = (8, 16, 32)

# A dimension as ONNX Runtime reports it: an int when fixed, a name or None when dynamic.
Dim = int | str | None


def _single_output(outputs: Sequence[np.ndarray], fmt: str) -> np.ndarray:
    if len(outputs) != 1:
        raise ValueError(f"'{fmt}' output format expects 1 output tensor, got {len(outputs)}")
    raw = np.asarray(outputs[0])
    if raw.ndim != 3:
        raise ValueError(f"'{fmt}' output must be a 3-D tensor, got shape {raw.shape}")
    return raw.astype(np.float32, copy=False)


def cxcywh_to_xyxy(cxcywh: np.ndarray) -> np.ndarray:
    """(..., 4) centre/size boxes -> fresh (..., 4) float32 corner boxes."""
    xyxy = np.empty(cxcywh.shape, np.float32)
    half = cxcywh[..., 2:4] * np.float32(0.5)
    np.subtract(cxcywh[..., 0:2], half, out=xyxy[..., 0:2])
    np.add(cxcywh[..., 0:2], half, out=xyxy[..., 2:4])
    return xyxy


@register_decoder("yolov8")
def decode_yolov8(outputs: Sequence[np.ndarray], input_hw: tuple[int, int] | None = None) -> list[Candidates]:
    """ONE tensor [N, 4+nc, A] (Ultralytics YOLOv8/YOLO11): cx,cy,w,h in input pixels, class scores already sigmoid."""
    raw = _single_output(outputs, "yolov8")
    if raw.shape[1] < 5:
        raise ValueError(f"'yolov8' output must be [N, 4+nc, A] with nc >= 1, got shape {raw.shape}")
    # Anchors-last is the export's layout; one transposed copy makes every later per-anchor read contiguous.
    per_anchor = np.ascontiguousarray(raw.transpose(0, 2, 1))
    return [(cxcywh_to_xyxy(image[:, :4]), image[:, 4:]) for image in per_anchor]


@register_decoder("yolov5")
def decode_yolov5(outputs: Sequence[np.ndarray], input_hw: tuple[int, int] | None = None) -> list[Candidates]:
    """ONE tensor [N, A, 5+nc] (YOLOv5/YOLOv7 style): cx,cy,w,h in input pixels, objectness, class scores.

    The confidence of a class is objectness x class score, as in the reference implementation.
    """
    raw = _single_output(outputs, "yolov5")
    if raw.shape[2] < 6:
        raise ValueError(f"'yolov5' output must be [N, A, 5+nc] with nc >= 1, got shape {raw.shape}")
    return [(cxcywh_to_xyxy(image[:, :4]), image[:, 5:] * image[:, 4:5]) for image in raw]


def grid_cells(input_hw: tuple[int, int], strides: Sequence[int] = YOLOX_STRIDES) -> int:
    """Number of grid cells over all strides; a stride-2 conv maps n pixels to ceil(n/2), hence the ceil."""
    height, width = input_hw
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)


@lru_cache(maxsize=8)
def yolox_grid(input_hw: tuple[int, int], strides: tuple[int, ...] = YOLOX_STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """(A, 2) float32 cell offsets (x, y) and (A, 1) float32 strides for one input size, computed once and cached.

    Read-only, because every decoder call of every Detector with this input size shares them.
    """
    height, width = input_hw
    offsets, expanded = [], []
    for stride in strides:
        ys, xs = np.meshgrid(
            np.arange(math.ceil(height / stride), dtype=np.float32),
            np.arange(math.ceil(width / stride), dtype=np.float32),
            indexing="ij",
        )
        offsets.append(np.stack((xs.ravel(), ys.ravel()), axis=1))
        expanded.append(np.full((xs.size, 1), stride, np.float32))
    grid, stride_column = np.concatenate(offsets), np.concatenate(expanded)
    grid.flags.writeable = False
    stride_column.flags.writeable = False
    return grid, stride_column


@register_decoder("yolox")
def decode_yolox(outputs: Sequence[np.ndarray], input_hw: tuple[int, int] | None = None) -> list[Candidates]:
    """ONE raw grid-head tensor [N, A, 5+nc] at strides 8/16/32 (YOLOX, exported without decode in the graph).

    xy = (t_xy + cell) * stride, wh = exp(t_wh) * stride; objectness and class scores are already sigmoid in the
    usual exports, and a class's confidence is objectness x class score.
    """
    raw = _single_output(outputs, "yolox")
    if raw.shape[2] < 6:
        raise ValueError(f"'yolox' output must be [N, A, 5+nc] with nc >= 1, got shape {raw.shape}")
    if input_hw is None:
        raise ValueError("'yolox' decoding needs the network input size (H, W) to rebuild its grid")
    grid, strides = yolox_grid((int(input_hw[0]), int(input_hw[1])))
    if raw.shape[1] != len(grid):
        raise ValueError(
            f"'yolox' output has {raw.shape[1]} anchors but a {input_hw[0]}x{input_hw[1]} input at strides "
            f"{'/'.join(map(str, YOLOX_STRIDES))} gives {len(grid)}"
        )
    candidates: list[Candidates] = []
    cxcywh = np.empty((len(grid), 4), np.float32)
    for image in raw:
        np.add(image[:, 0:2], grid, out=cxcywh[:, 0:2])
        np.multiply(cxcywh[:, 0:2], strides, out=cxcywh[:, 0:2])
        # A wild raw value would overflow to inf; such a box has no meaning and must not poison NMS.
        np.exp(np.minimum(image[:, 2:4], 20.0), out=cxcywh[:, 2:4])
        np.multiply(cxcywh[:, 2:4], strides, out=cxcywh[:, 2:4])
        candidates.append((cxcywh_to_xyxy(cxcywh), image[:, 5:] * image[:, 4:5]))
    return candidates


# --- the shape each format promises ------------------------------------------------------------------------------
def _text(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"


def _fixed(dim: Dim) -> int | None:
    return dim if isinstance(dim, int) and dim >= 0 else None


def _fits(layout: tuple[str, int | None, int | None], dims: Sequence[int | None]) -> bool:
    _, want_1, want_2 = layout
    return len(dims) == 3 and all(
        want is None or got is None or got == want for want, got in ((want_1, dims[1]), (want_2, dims[2]))
    )


def check_output_layout(
    fmt: str, output_shapes: Sequence[Sequence[Dim]], input_hw: tuple[int, int], num_classes: int, where: str = ""
) -> None:
    """Raise a one-line ManifestError when ``fmt`` cannot describe outputs of these shapes.

    Dynamic dimensions (None or a name) are accepted; every fixed one must fit. ``where`` prefixes the message.
    yolov5 and yolox share a shape; only the anchor count (one per grid cell for yolox) tells them apart.
    """
    prefix = f"{where}: " if where else ""
    if len(output_shapes) != 1:
        raise ManifestError(f"{prefix}format '{fmt}' reads exactly 1 output tensor, the model has {len(output_shapes)}")
    shape = list(output_shapes[0])
    dims = [_fixed(d) for d in shape]
    nc = num_classes
    cells = grid_cells(input_hw)
    layouts: dict[str, tuple[str, int | None, int | None]] = {
        "shelfsight": ("[N, A, 4+nc]", None, 4 + nc),
        "yolov8": ("[N, 4+nc, A]", 4 + nc, None),
        "yolov5": ("[N, A, 5+nc]", None, 5 + nc),
        "yolox": (f"[N, A={cells} grid cells at {input_hw[0]}x{input_hw[1]}, 5+nc]", cells, 5 + nc),
    }
    if fmt not in layouts:
        raise ManifestError(f"{prefix}unknown output format '{fmt}' (known: {', '.join(layouts)})")
    if _fits(layouts[fmt], dims):
        return
    detail = f"output shape {_text(shape)} does not fit format '{fmt}' {layouts[fmt][0]} with nc={nc}"
    others = [name for name, layout in layouts.items() if name != fmt and _fits(layout, dims)]
    if others:
        detail += f"; with nc={nc} it fits format {' or '.join(repr(o) for o in others)}"
    elif len(dims) == 3:
        detail += f"; no format fits {nc} classes: check the class list"
    raise ManifestError(prefix + detail)
