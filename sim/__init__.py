"""shelfsight.sim: synthetic shelf photos and scenario videos with ground truth (demo, training data, tests).

Heavy modules (OpenCV rendering) are imported by the submodules that need them; this one only locates the
scenario files shipped with the package.
"""

from __future__ import annotations

from pathlib import Path

from shelfsight.runtime.errors import ConfigError

__all__ = ["bundled_scenario", "bundled_scenario_names", "scenarios_dir"]


def scenarios_dir() -> Path:
    """Folder of the scenario YAML files shipped with the package (package data sim/scenarios/*.yaml)."""
    return Path(__file__).resolve().parent / "scenarios"


def bundled_scenario_names() -> list[str]:
    return sorted(path.stem for path in scenarios_dir().glob("*.yaml"))


def bundled_scenario(name: str) -> Path:
    """Path of a shipped scenario by name ("demo" or "demo.yaml")."""
    path = scenarios_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not path.is_file():
        known = ", ".join(bundled_scenario_names()) or "none"
        raise ConfigError(f"no bundled scenario '{name}' (known: {known})")
    return path
