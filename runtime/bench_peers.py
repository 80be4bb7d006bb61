"""Peers on the same ONNX file and the same frames: OpenCV DNN, and the plain loop a user writes without us.

Both peers share one hand-written pre/post-processing (letterbox with cv2, ``blobFromImage``, numpy decode,
``cv2.dnn.NMSBoxes``); only the inference call differs (``net.forward`` vs ``session.run``). They are deliberately
written the way the user would, per frame, not with ShelfSight's reusable buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from shelfsight.runtime.bench_frames import FixedFrames
from shelfsight.runtime.bench_runs import Variant
from shelfsight.runtime.bench_stats import ResourceMeter, summarize_ns

PEERS = ("opencv-dnn", "plain-ort-loop")
PEER_STAGES = ("preprocess", "infer", "postprocess")

Infer = Callable[[np.ndarray], np.ndarray]


def _one_line(exc: BaseException) -> str:
    # OpenCV puts the useful part (the failing node) on the second line of its message.
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def user_blob(frame: np.ndarray, size: tuple[int, int], swap_rb: bool, scale: float) -> tuple[np.ndarray, float, int,
                                                                                                 int]:
    """Letterbox (centred, grey 114) + blobFromImage -> (blob, ratio, pad_x, pad_y)."""
    width, height = size
    ratio = min(width / frame.shape[1], height / frame.shape[0])
    new_w, new_h = round(frame.shape[1] * ratio), round(frame.shape[0] * ratio)
    resized = cv2.resize(frame, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
    canvas = cv2.copyMakeBorder(resized, pad_y, height - new_h - pad_y, pad_x, width - new_w - pad_x,
                                cv2.BORDER_CONSTANT, value=(114, 114, 114))
    blob = cv2.dnn.blobFromImage(canvas, scalefactor=scale, swapRB=swap_rb)
    return blob, ratio, pad_x, pad_y


def user_decode(output: np.ndarray, ratio: float, pad_x: int, pad_y: int, conf: float, iou: float) -> int:
    """[1, A, 4+nc] -> the number of boxes NMSBoxes keeps (boxes mapped back to the frame, as a user would)."""
    rows = output[0]
    scores = rows[:, 4:].max(axis=1)
    keep = scores >= conf
    boxes = rows[keep, :4].copy()
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad_x) / ratio
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad_y) / ratio
    xywh = np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores[keep].tolist(), conf, iou)
    return len(kept)


def _unsupported(variant: Variant) -> str | None:
    manifest = variant.manifest
    if manifest.output.format != "shelfsight":
        return f"the hand-written decode covers the 'shelfsight' output format, not '{manifest.output.format}'"
    spec = manifest.input
    if any(m != 0 for m in spec.mean) or any(s != 1 for s in spec.std) or spec.resize != "letterbox":
        return "the hand-written preprocessing covers letterbox with pixel scale only (no mean/std)"
    return None


def opencv_dnn_infer(variant: Variant) -> Infer:
    net = cv2.dnn.readNetFromONNX(str(variant.model_file))

    def infer(blob: np.ndarray) -> np.ndarray:
        net.setInput(blob)
        return np.asarray(net.forward())

    return infer


def plain_ort_infer(variant: Variant, threads: int) -> Infer:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(variant.model_file), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def infer(blob: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: blob})[0])

    return infer


def run_peer(
    peer: str, variant: Variant, frames: FixedFrames, capture_ns: list[int], warmup: int, threads: int,
    conf: float, iou: float,
) -> dict[str, Any]:
    """Time one peer on the fixed frames; a model the peer cannot load or run is recorded, not raised."""
    problem = _unsupported(variant)
    if problem:
        return {"status": "not applicable", "reason": problem}
    try:
        infer = opencv_dnn_infer(variant) if peer == "opencv-dnn" else plain_ort_infer(variant, threads)
    except Exception as exc:  # cv2.error / ORT pybind errors: the peer failing is a result worth recording
        return {"status": "failed to load", "reason": _one_line(exc)}
    spec = variant.manifest.input
    size, swap, scale = (spec.width, spec.height), spec.channel_order == "RGB", spec.pixel_scale
    try:
        for image in frames.images[:warmup]:
            infer(user_blob(image, size, swap, scale)[0])
        per_stage: dict[str, list[int]] = {stage: [] for stage in PEER_STAGES}
        counts: list[int] = []
        with ResourceMeter() as meter:
            for image in frames.images:
                t0 = time.perf_counter_ns()
                blob, ratio, pad_x, pad_y = user_blob(image, size, swap, scale)
                t1 = time.perf_counter_ns()
                output = infer(blob)
                t2 = time.perf_counter_ns()
                counts.append(user_decode(output, ratio, pad_x, pad_y, conf, iou))
                t3 = time.perf_counter_ns()
                per_stage["preprocess"].append(t1 - t0)
                per_stage["infer"].append(t2 - t1)
                per_stage["postprocess"].append(t3 - t2)
    except Exception as exc:  # e.g. OpenCV DNN loads a Q/DQ graph but cannot run a layer of it
        return {"status": "failed to run", "reason": _one_line(exc)}
    process = np.sum([np.asarray(v, np.int64) for v in per_stage.values()], axis=0)
    end_to_end = process + np.asarray(capture_ns[: len(process)], np.int64)
    return {
        "status": "ok",
        "frames": len(process),
        "stages": {stage: summarize_ns(values) for stage, values in per_stage.items()},
        "process": summarize_ns(process),
        "end_to_end": summarize_ns(end_to_end),
        "end_to_end_ns": end_to_end.tolist(),
        "throughput_fps": round(len(process) / (end_to_end.sum() / 1e9), 2),
        "resources": {**meter.as_dict(), "cpu_ms_per_frame": round(meter.cpu_s * 1000 / max(len(process), 1), 2)},
        "detections_per_frame": counts,
        "threads": threads if peer == "plain-ort-loop" else cv2.getNumThreads(),
    }
