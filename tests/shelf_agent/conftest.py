"""Rendered scenario videos shared by the shelf_agent test modules, and the `shelf-agent` command line.

Test modules cannot import this file (pytest runs with --import-mode=importlib), so everything is a fixture.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shelfsight.shelf_agent.evaluate import rendered_scenario

# A 2x4 shelf, fully stocked for the first second: R1S2 empties at ~2 s and is restocked at ~14 s; R2S3 empties
# at ~7 s and stays empty to the end.
SMALL_SCENARIO = """\
name: agent-small
seed: 5
duration_s: 20
fps: 10
camera: {width: 640, height: 360, noise: 0.01, jitter_px: 0.5}
shelf: {rows: 2, slots_per_row: 4, facings_per_slot: 2}
events:
  - {t: 1, type: deplete, slot: R1S2, duration_s: 1}
  - {t: 6, type: deplete, slot: R2S3, duration_s: 1}
  - {t: 13, type: restock, slot: R1S2, duration_s: 1}
"""


@pytest.fixture(scope="session")
def scenario_source(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Writes a scenario text to a YAML file named by its hash (the same text -> the same file)."""
    folder = tmp_path_factory.getbasetemp() / "scenario-sources"

    def write(text: str) -> Path:
        source = folder / f"{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
        folder.mkdir(exist_ok=True)
        source.write_text(text, encoding="utf-8")
        return source

    return write


@pytest.fixture(scope="session")
def scenario_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where rendered scenarios live for the session (one folder per scenario name)."""
    return tmp_path_factory.getbasetemp() / "scenarios"


@pytest.fixture(scope="session")
def render_scenario(scenario_source: Callable[[str], Path], scenario_work_dir: Path) -> Callable[[str], Path]:
    """`render_scenario(text) -> folder` with video.mp4/truth.json/layout.yaml, rendered once per session and text
    (rendered_scenario keeps the folder while its stamped source text is unchanged)."""

    def render(text: str) -> Path:
        return rendered_scenario(scenario_source(text), scenario_work_dir)

    return render


@pytest.fixture(scope="session")
def small_scenario_text() -> str:
    return SMALL_SCENARIO


@pytest.fixture(scope="session")
def small_scenario(render_scenario: Callable[[str], Path], small_scenario_text: str) -> Path:
    return render_scenario(small_scenario_text)


@pytest.fixture(scope="session")
def shelf_agent_command() -> list[str]:
    """The installed `shelf-agent` console script, or the module when the venv has no script."""
    script = Path(sys.executable).parent / "shelf-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shelfsight.shelf_agent.cli"]
