"""Scenario playback: frames, truth.json and layout.yaml from a Scenario, all driven by one Timeline."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shelfsight.runtime.errors import ShelfSightError
from shelfsight.shelf_agent.layout import FrameSize, ShelfLayout, SlotSpec, save_layout
from shelfsight.sim.painter import Sprite, shopper_sprite
from shelfsight.sim.progress import progress
from shelfsight.sim.renderer import CLASS_NAMES, NoiseBank, SceneRenderer
from shelfsight.sim.scenario import Scenario
from shelfsight.sim.scene import grid_scene
from shelfsight.sim.timeline import Timeline, build_timeline

TRUTH_SCHEMA = "shelfsight.truth/1"
DEFAULT_STORE_ID = "demo-store"
DEFAULT_CAMERA_ID = "cam-1"
SHOPPER_SWAY_PX = 3
SHOPPER_SWAY_PERIOD_S = 2.4


@dataclass(frozen=True)
class ScenarioFrame:
    index: int
    t: float
    image: np.ndarray  # reused buffer: copy it to keep it past the next frame
    classes: np.ndarray  # int64 class ids (0 product, 1 gap)
    boxes: np.ndarray  # float32 xyxy, frame pixels, visible objects only


@dataclass(frozen=True)
class RenderResult:
    out_dir: Path
    video: Path | None
    frames_dir: Path | None
    truth: Path
    layout: Path
    frame_count: int
    seconds: float


def _shake(rng: np.random.Generator, count: int, fps: float, amplitude: float) -> np.ndarray:
    """(count, 2) camera offsets in pixels: a slow sway plus a faster tremor, within +-amplitude."""
    if amplitude <= 0:
        return np.zeros((count, 2))
    t = np.arange(count)[:, None] / fps
    slow = np.sin(2 * np.pi * rng.uniform(0.15, 0.5, 2) * t + rng.uniform(0, 2 * np.pi, 2))
    fast = np.sin(2 * np.pi * rng.uniform(1.5, 3.0, 2) * t + rng.uniform(0, 2 * np.pi, 2))
    tremor = rng.normal(0, 0.15, (count, 2))
    return np.clip(amplitude * (0.6 * slow + 0.3 * fast + tremor), -amplitude, amplitude)


class ScenarioPlayer:
    """Renders a scenario frame by frame. All randomness is drawn up front from the scenario seed."""

    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        self.timeline: Timeline = build_timeline(scenario)
        camera, shelf = scenario.camera, scenario.shelf
        self.frame_size = (camera.width, camera.height)
        self.scene = grid_scene(
            self.frame_size, shelf.rows, shelf.slots_per_row, shelf.facings_per_slot, scenario.seed, camera.noise
        )
        self.renderer = SceneRenderer(self.scene)
        self.slot_index = {slot.slot_id: i for i, slot in enumerate(self.scene.slots)}
        rng = np.random.default_rng([scenario.seed, 3])
        count = scenario.frame_count
        self._shift = _shake(rng, count, scenario.fps, camera.jitter_px)
        sigma = camera.noise * 255.0
        self._noise = NoiseBank(self.frame_size, sigma, rng) if sigma > 0 else None
        self._noise_picks = np.stack(
            [rng.integers(0, 4, count), rng.integers(0, 32, count), rng.integers(0, 32, count)], axis=1
        )
        self._shoppers = [self._shopper(slots, rng) for slots in (occ.slots for occ in self.timeline.occlusions)]
        self._sway_phase = rng.uniform(0, 2 * np.pi, len(self._shoppers))

    def _shopper(self, slots: tuple[str, ...], rng: np.random.Generator) -> Sprite:
        quads = self.renderer.slot_quads[[self.slot_index[s] for s in slots]].reshape(-1, 2)
        target = (*quads.min(axis=0).tolist(), *quads.max(axis=0).tolist())
        blur = self.scene.look.blur_sigma
        return shopper_sprite((target[0], target[1], target[2], target[3]), self.frame_size, rng, SHOPPER_SWAY_PX, blur)

    def frames(self) -> Iterator[ScenarioFrame]:
        timeline, renderer = self.timeline, self.renderer
        next_change = 0
        for index in range(self.scenario.frame_count):
            t = index / self.scenario.fps
            changes, next_change = timeline.changes_until(next_change, t)
            for change in changes:
                renderer.set_facings(self.slot_index[change.slot], change.facings)
            shoppers = [
                dataclasses.replace(
                    self._shoppers[k],
                    x=self._shoppers[k].x
                    + round(SHOPPER_SWAY_PX * math.sin(2 * math.pi * t / SHOPPER_SWAY_PERIOD_S + self._sway_phase[k])),
                )
                for k in timeline.active_occlusions(t)
            ]
            noise = None
            if self._noise is not None:
                tile, dx, dy = (int(v) for v in self._noise_picks[index])
                noise = self._noise.tile(tile, dx, dy)
            dx, dy = self._shift[index]
            image, classes, boxes = renderer.compose(
                shoppers, timeline.lighting_factor(t), noise, (float(dx), float(dy))
            )
            yield ScenarioFrame(index, t, image, classes, boxes)

    def layout(self, store_id: str = DEFAULT_STORE_ID, camera_id: str = DEFAULT_CAMERA_ID) -> ShelfLayout:
        width, height = self.frame_size
        slots = [
            SlotSpec(
                id=slot.slot_id,
                polygon=[(round(float(x), 1), round(float(y), 1)) for x, y in quad],
                sku=slot.design.name,
                min_facings=slot.facings,
            )
            for slot, quad in zip(self.scene.slots, self.renderer.slot_quads, strict=True)
        ]
        return ShelfLayout(
            store_id=store_id, camera_id=camera_id, frame_size=FrameSize(width=width, height=height), slots=slots
        )


def box_rows(classes: np.ndarray, boxes: np.ndarray) -> list[list[float]]:
    """[[class_id, x1, y1, x2, y2], ...] with int class ids and 1-decimal coordinates, without a per-box loop."""
    rows = np.empty((len(boxes), 5), dtype=object)
    rows[:, 0] = classes.astype(np.int64).astype(object)
    rows[:, 1:] = np.round(boxes.astype(np.float64), 1).astype(object)
    return rows.tolist()


def truth_document(scenario: Scenario, timeline: Timeline, frames: list[dict[str, object]]) -> dict[str, object]:
    return {
        "schema": TRUTH_SCHEMA,
        "name": scenario.name,
        "fps": int(scenario.fps) if scenario.fps.is_integer() else scenario.fps,
        "frame_size": {"width": scenario.camera.width, "height": scenario.camera.height},
        "classes": list(CLASS_NAMES),
        "frames": frames,
        "slots": timeline.slot_history(),
        "occlusions": [
            {"slots": list(occ.slots), "t_start": round(occ.t_start, 3), "t_end": round(occ.t_end, 3)}
            for occ in timeline.occlusions
        ],
        "expected_alerts": [{"type": a.type, "slot": a.slot, "t": a.t} for a in timeline.alerts],
    }


def write_truth(document: dict[str, object], path: Path) -> Path:
    """JSON with one compact line per frame, per slot, per occlusion and per alert: readable and diffable."""

    def compact(value: object) -> str:
        return json.dumps(value, separators=(",", ":"))

    lines = []
    for key, value in document.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            inner = ",\n".join(f"  {compact(item)}" for item in value)
            lines.append(f" {json.dumps(key)}: [\n{inner}\n ]")
        elif isinstance(value, dict) and value and all(isinstance(v, (list, dict)) for v in value.values()):
            inner = ",\n".join(f"  {json.dumps(k)}: {compact(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {compact(value)}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    return path


class _FrameSink:
    """Either an mp4v video OpenCV can decode, or lossless PNG frames (frames/000000.png ...)."""

    def __init__(self, out_dir: Path, png_frames: bool, fps: float, frame_size: tuple[int, int]):
        self.video: Path | None = None
        self.frames_dir: Path | None = None
        self._writer: cv2.VideoWriter | None = None
        if png_frames:
            self.frames_dir = out_dir / "frames"
            self.frames_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.frames_dir.glob("*.png"):
                stale.unlink()
        else:
            self.video = out_dir / "video.mp4"
            self._writer = cv2.VideoWriter(str(self.video), cv2.VideoWriter.fourcc(*"mp4v"), fps, frame_size)
            if not self._writer.isOpened():
                raise ShelfSightError(
                    f"{self.video}: OpenCV cannot open an mp4v video writer (FFMPEG backend missing?)"
                )

    def write(self, index: int, image: np.ndarray) -> None:
        if self._writer is not None:
            self._writer.write(image)
        else:
            assert self.frames_dir is not None
            path = self.frames_dir / f"{index:06d}.png"
            if not cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                raise ShelfSightError(f"{path}: cannot write PNG frame")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


def render_scenario(
    scenario: Scenario,
    out_dir: str | Path,
    png_frames: bool = False,
    show_progress: bool = False,
    store_id: str = DEFAULT_STORE_ID,
    camera_id: str = DEFAULT_CAMERA_ID,
) -> RenderResult:
    """Write video.mp4 (or frames/*.png), truth.json and layout.yaml for one scenario into out_dir."""
    started = time.perf_counter()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShelfSightError(f"{out}: cannot create output folder: {exc.strerror or exc}") from None
    player = ScenarioPlayer(scenario)
    sink = _FrameSink(out, png_frames, scenario.fps, player.frame_size)
    truth_frames: list[dict[str, object]] = []
    try:
        for frame in progress(player.frames(), scenario.frame_count, f"render {scenario.name}", show_progress, "frame"):
            sink.write(frame.index, frame.image)
            truth_frames.append(
                {"i": frame.index, "t": round(frame.t, 3), "boxes": box_rows(frame.classes, frame.boxes)}
            )
    finally:
        sink.close()
    truth = write_truth(truth_document(scenario, player.timeline, truth_frames), out / "truth.json")
    layout = save_layout(player.layout(store_id, camera_id), out / "layout.yaml")
    return RenderResult(
        out_dir=out,
        video=sink.video,
        frames_dir=sink.frames_dir,
        truth=truth,
        layout=layout,
        frame_count=len(truth_frames),
        seconds=time.perf_counter() - started,
    )
