"""The benchmark's environment record, its Markdown tables, the issue's target figures, and ``--compare``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from shelfsight.runtime.errors import ShelfSightError

SCHEMA = "shelfsight.bench/1"
CPU_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
                         "neon", "asimd", "asimddp")
LIBRARIES = ("numpy", "opencv-python-headless", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "matplotlib",
             "shelfsight")
STAGE_ORDER = ("capture_decode", "preprocess", "infer", "postprocess", "slot_update", "event_outbox", "python_glue")


def _cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, sorted(flag for flag in CPU_FLAGS_OF_INTEREST if flag in flags)


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    import cv2

    model, flags = _cpu_info()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["opencv (cv2)"] = cv2.__version__
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": versions,
        "git_commit": _git_commit(Path(__file__).resolve().parent.parent),
    }


def _ms(summary: dict[str, Any] | None, key: str = "p50_ms") -> float | None:
    return None if not summary or key not in summary else float(summary[key])


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def mean_end_to_end(run: dict[str, Any]) -> float | None:
    return _ms(run.get("end_to_end"), "mean_ms") if run.get("status") == "ok" else None


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's four figures, each with its measured value, met or not, and the stage to blame when missed."""
    runs = [r for r in result["runs"] if r.get("status") == "ok"]
    best = "ort-cpu-2t"

    def pick(precision: str) -> dict[str, Any] | None:
        for run in runs:
            if run["precision"] == precision and run["backend"] == best and not run.get("pruned"):
                return run
        return None

    def blame(run: dict[str, Any] | None, exclude: tuple[str, ...] = ()) -> str | None:
        if run is None:
            return None
        stages = {k: v.get("mean_ms", 0.0) for k, v in run["stages"].items() if k not in exclude}
        worst = sorted(stages, key=lambda k: -stages[k])[:2]
        return ", ".join(f"{k} {stages[k]:.1f} ms" for k in worst) + " (means)" if worst else None

    targets: list[dict[str, Any]] = []
    int8, fp32 = pick("int8"), pick("fp32")
    efficiency = int8["pipeline_efficiency"] if int8 else None
    targets.append({"figure": "pipeline efficiency (inference / end to end), INT8, ort-cpu-2t", "goal": ">= 0.85",
                    "value": efficiency, "met": efficiency is not None and efficiency >= 0.85,
                    "blame": blame(int8, ("infer",)) if efficiency is not None and efficiency < 0.85 else None})
    for run in (int8, fp32):
        if run is None:
            continue
        peer = run.get("peers", {}).get("opencv-dnn", {})
        ratio = run.get("ratio_to_peers", {}).get("opencv-dnn")
        targets.append({"figure": f"ours / OpenCV DNN end to end ({run['variant']}, {run['precision']})",
                        "goal": "<= 0.5", "value": ratio, "met": ratio is not None and ratio <= 0.5,
                        "blame": (f"capture_decode {run['stages']['capture_decode']['mean_ms']:.1f} ms is shared by "
                                  f"both; detection only (pre+infer+post) the ratio is "
                                  f"{run.get('ratio_to_peers_detect_only', {}).get('opencv-dnn')}; ours also runs "
                                  f"slot_update {run['stages']['slot_update']['mean_ms']:.1f} ms"
                                  if ratio is not None and ratio > 0.5 else
                                  (peer.get("reason") if ratio is None else None))})
    ratio = (mean_end_to_end(int8) or 0) / (mean_end_to_end(fp32) or 1) if int8 and fp32 else None
    targets.append({"figure": "INT8 / FP32 end to end (ort-cpu-2t)", "goal": "<= 0.5",
                    "value": None if ratio is None else round(ratio, 3), "met": ratio is not None and ratio <= 0.5,
                    "blame": blame(int8) if ratio is not None and ratio > 0.5 else
                    (None if ratio is not None else "no INT8 variant in MODEL_DIR")})
    scaling = result.get("scaling") or {}
    sustained = scaling.get("cameras_at_5fps")
    targets.append({"figure": "cameras at 5 fps each (one process)", "goal": ">= 8", "value": sustained,
                    "met": sustained is not None and sustained >= 8,
                    "blame": scaling.get("blame") if sustained is not None and sustained < 8 else None})
    return targets


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# shelf-bench — {result['source']}", "",
             f"{result['frames']} fixed frames {result['frame_size'][0]}x{result['frame_size'][1]}, "
             f"warm-up {result['warmup']} excluded. CPU: {env['cpu_model']} ({env['usable_cores']} usable cores, "
             f"AVX512-VNNI: {'yes' if env['avx512_vnni'] else 'no'}), load average at start "
             f"{env['load_average_at_start']}. Commit {env['git_commit']}.", "",
             "## End to end per backend (ms per frame; end to end = capture/decode + the agent's pipeline)", "",
             "| variant | precision | backend | p50 | p90 | p99 | max | frames/s | efficiency | CPU cores busy | "
             "CPU ms/frame | peak RSS MB | model MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        if run.get("status") != "ok":
            lines.append(f"| {run['variant']} | {run['precision']} | {run['backend']} | {run['status']}: "
                         f"{run.get('reason', '')} ||||||||||")
            continue
        e2e, res = run["end_to_end"], run["resources"]
        lines.append(f"| {run['variant']} | {run['precision']} | {run['backend']} | {_fmt(_ms(e2e))} | "
                     f"{_fmt(_ms(e2e, 'p90_ms'))} | {_fmt(_ms(e2e, 'p99_ms'))} | {_fmt(_ms(e2e, 'max_ms'))} | "
                     f"{run['throughput_fps']} | {run['pipeline_efficiency']} | {res['cpu_cores_busy']} | "
                     f"{res.get('cpu_ms_per_frame')} | {res['peak_rss_mb']} | {run['model_mb']} |")
    lines += ["", "## Per stage (p50 / p99 ms)", "",
              "| variant | backend | " + " | ".join(STAGE_ORDER) + " |", "|---|---|" + "---|" * len(STAGE_ORDER)]
    for run in result["runs"]:
        if run.get("status") == "ok":
            cells = [f"{_fmt(_ms(run['stages'].get(s)))} / {_fmt(_ms(run['stages'].get(s), 'p99_ms'))}"
                     for s in STAGE_ORDER]
            lines.append(f"| {run['variant']} | {run['backend']} | " + " | ".join(cells) + " |")
    lines += ["", "## Peers on the same frames and ONNX file (mean ms; ours = ort-cpu-2t)", "",
              "| variant | peer | status | pre | infer | post | end to end | ours / peer end to end | "
              "ours / peer detection only | CPU ms/frame | detections (peer vs ours) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for name, peer in run.get("peers", {}).items():
            if peer.get("status") != "ok":
                lines.append(f"| {run['variant']} | {name} | {peer['status']}: {peer.get('reason', '')} ||||||||")
                continue
            st = peer["stages"]
            lines.append(f"| {run['variant']} | {name} | ok | {_fmt(_ms(st['preprocess'], 'mean_ms'))} | "
                         f"{_fmt(_ms(st['infer'], 'mean_ms'))} | {_fmt(_ms(st['postprocess'], 'mean_ms'))} | "
                         f"{_fmt(_ms(peer['end_to_end'], 'mean_ms'))} | {_fmt(run['ratio_to_peers'].get(name), 3)} | "
                         f"{_fmt(run.get('ratio_to_peers_detect_only', {}).get(name), 3)} | "
                         f"{peer['resources'].get('cpu_ms_per_frame')} | "
                         f"{sum(peer['detections_per_frame'])} vs {sum(run['detections_per_frame'])} |")
    scaling = result.get("scaling")
    if scaling and scaling.get("runs"):
        lines += ["", f"## Cameras in one process ({scaling['variant']}, {scaling['backend']}, cap "
                  f"{scaling['fps_cap']} fps per camera, {scaling['duration_s_per_run']} s per run; {scaling['note']})",
                  "", "| cameras | mode | frames/s per camera (min / mean) | frame age p50 / p99 ms | dropped |",
                  "|---|---|---|---|---|"]
        for run in scaling["runs"]:
            lines.append(f"| {run['cameras']} | {run['mode']} | {run['fps_per_camera_min']} / "
                         f"{run['fps_per_camera_mean']} | {run['frame_age_p50_ms']} / {run['frame_age_p99_ms']} | "
                         f"{run['frames_dropped_by_capture']} |")
    lines += ["", "## Targets (issue 6)", "", "| figure | goal | measured | met | where the time goes |",
              "|---|---|---|---|---|"]
    for target in result.get("targets", []):
        lines.append(f"| {target['figure']} | {target['goal']} | {target['value']} | "
                     f"{'yes' if target['met'] else 'no'} | {target['blame'] or ''} |")
    return "\n".join(lines) + "\n"


def load_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ShelfSightError(f"{path}: cannot read benchmark JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ShelfSightError(f"{path}: not a shelf-bench result (schema {SCHEMA!r} expected)")
    return data


def compare(new: dict[str, Any], old: dict[str, Any]) -> list[dict[str, Any]]:
    """new / old for each (variant, backend) both ran: p50, p99 and mean end to end, and each stage's p50."""
    def keyed(result: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["variant"], r["backend"]): r for r in result.get("runs", []) if r.get("status") == "ok"}

    rows = []
    old_runs = keyed(old)
    for key, run in keyed(new).items():
        before = old_runs.get(key)
        if before is None:
            continue
        row: dict[str, Any] = {"variant": key[0], "backend": key[1]}
        for field in ("p50_ms", "p99_ms", "mean_ms"):
            was, now = _ms(before["end_to_end"], field), _ms(run["end_to_end"], field)
            row[f"end_to_end_{field}"] = round(now / was, 3) if was and now is not None else None
        for stage in STAGE_ORDER:
            was, now = _ms(before["stages"].get(stage)), _ms(run["stages"].get(stage))
            row[stage] = round(now / was, 3) if was and now is not None else None
        rows.append(row)
    return rows


def compare_text(rows: list[dict[str, Any]], old_path: Path) -> str:
    if not rows:
        return f"compare: no (variant, backend) pair ran in both this run and {old_path}\n"
    head = ["variant", "backend", "e2e p50", "e2e p99", *STAGE_ORDER]
    lines = [f"ratios new / old ({old_path}); < 1 is faster", " | ".join(head)]
    for row in rows:
        values = [row["end_to_end_p50_ms"], row["end_to_end_p99_ms"], *(row[s] for s in STAGE_ORDER)]
        lines.append(" | ".join([row["variant"], row["backend"], *(_fmt(v, 3) for v in values)]))
    return "\n".join(lines) + "\n"
