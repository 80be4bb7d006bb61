"""AgentConfig: YAML file, then SHELFSIGHT__A__B environment, then CLI flags; strict keys; secrets stay secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from shelfsight.runtime.errors import ConfigError
from shelfsight.shelf_agent.cli import _run_parser, overrides_from_args
from shelfsight.shelf_agent.config import AgentConfig, env_overrides, load_agent_config

SECRET = "s3cr3t-Pa55"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment() -> None:
    config = load_agent_config(None, environ={})
    assert config == AgentConfig()
    assert config.layout is None and config.mqtt.port == 1883 and config.fps == 2.0


def test_file_values_are_used(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.yaml", "store_id: s-7\nfps: 1.5\nmqtt: {host: broker.local, port: 8883}\n"
                 "slots: {dwell_s: 4}\n")
    config = load_agent_config(path, environ={})
    assert (config.store_id, config.fps, config.mqtt.host, config.mqtt.port) == ("s-7", 1.5, "broker.local", 8883)
    assert config.slots.dwell_s == 4
    assert config.camera_id == "cam-1"  # keys the file does not set keep their defaults


@pytest.mark.parametrize(
    ("name", "value", "path", "expected"),
    [
        ("SHELFSIGHT__MQTT__PORT", "1999", ("mqtt", "port"), 1999),
        ("SHELFSIGHT__MQTT__HOST", "env-broker", ("mqtt", "host"), "env-broker"),
        ("SHELFSIGHT__FPS", "0.5", ("fps",), 0.5),
        ("SHELFSIGHT__PUBLISH__SNAPSHOTS", "false", ("publish", "snapshots"), False),
        ("SHELFSIGHT__SLOTS__DWELL_S", "3", ("slots", "dwell_s"), 3.0),
        ("SHELFSIGHT__CAMERA__SOURCE", "0", ("camera", "source"), "0"),  # a YAML int, coerced back to the str field
    ],
)
def test_environment_overrides_the_file(tmp_path: Path, name: str, value: str, path: tuple[str, ...],
                                        expected: object) -> None:
    file = write(tmp_path / "agent.yaml", "mqtt: {host: file-broker, port: 1883}\nfps: 2\n")
    config = load_agent_config(file, environ={name: value, "UNRELATED": "x"})
    node: object = config
    for key in path:
        node = getattr(node, key)
    assert node == expected


def test_numeric_looking_password_from_environment_stays_a_string() -> None:
    assert env_overrides({"SHELFSIGHT__MQTT__PASSWORD": "0123", "SHELFSIGHT__MQTT__USERNAME": "007"}) == {
        "mqtt": {"password": "0123", "username": "007"}
    }
    config = load_agent_config(None, environ={"SHELFSIGHT__MQTT__PASSWORD": "0123", "SHELFSIGHT__MQTT__USERNAME": "7"})
    assert config.mqtt.resolve_password() == "0123"  # not 123: a leading zero is part of a password


def test_cli_flags_beat_environment_and_file(tmp_path: Path) -> None:
    file = write(tmp_path / "agent.yaml", "mqtt: {host: file-broker, port: 1883}\nfps: 2\nlayout: file-layout.yaml\n"
                 "slots: {dwell_s: 10}\n")
    args = _run_parser().parse_args(["--broker", "cli-broker:2883", "--fps", "4", "--dwell", "3",
                                     "--layout", "cli-layout.yaml", "--as-fast-as-possible"])
    config = load_agent_config(file, overrides_from_args(args),
                               environ={"SHELFSIGHT__MQTT__PORT": "1999", "SHELFSIGHT__FPS": "7"})
    assert (config.mqtt.host, config.mqtt.port, config.fps) == ("cli-broker", 2883, 4.0)
    assert config.layout == Path("cli-layout.yaml")
    assert config.slots.dwell_s == 3 and config.gaps.dwell_s == 3
    assert config.camera.capture.replay.value == "as_fast_as_possible"


def test_flags_not_given_do_not_overwrite_the_file(tmp_path: Path) -> None:
    file = write(tmp_path / "agent.yaml", "fps: 1.25\nmqtt: {host: file-broker}\nlog_format: json\n")
    args = _run_parser().parse_args(["--camera", "clip.mp4"])
    assert overrides_from_args(args) == {"camera": {"source": "clip.mp4"}}
    config = load_agent_config(file, overrides_from_args(args), environ={})
    assert (config.fps, config.mqtt.host, config.log_format, config.camera.source) == (
        1.25, "file-broker", "json", "clip.mp4")


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("store_id: s1\nmqtt:\n  host: h\n  bogus: 1\n", 4, "mqtt.bogus"),
        ("fps: 2\ncamera:\n  source: x.mp4\n  capture: {replay: sometimes}\n", 4, "camera.capture.replay"),
        ("store_id: s1\nfps: -1\n", 2, "fps"),
        ("publish:\n  metrics_interval: 5\n", 2, "publish.metrics_interval"),
    ],
)
def test_bad_file_names_file_line_and_field(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = write(tmp_path / "agent.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}:"), message
    assert f"'{field}'" in message


def test_bad_environment_value_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_config(None, environ={"SHELFSIGHT__MQTT__PORT": "not-a-port"})
    assert "mqtt.port" in str(info.value) and "environment" in str(info.value)


def test_unknown_environment_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.hots"):
        load_agent_config(None, environ={"SHELFSIGHT__MQTT__HOTS": "typo"})


def test_missing_config_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agent config"):
        load_agent_config(tmp_path / "absent.yaml", environ={})


def test_planogram_free_mode_needs_a_positive_dwell() -> None:
    with pytest.raises(ConfigError, match=r"gaps\.dwell_s"):
        load_agent_config(None, {"gaps": {"dwell_s": 0}}, environ={})
    assert load_agent_config(None, {"gaps": {"dwell_s": 0}, "layout": "l.yaml"}, environ={}).gaps.dwell_s == 0


def test_password_never_in_repr_or_dump(tmp_path: Path) -> None:
    file = write(tmp_path / "agent.yaml", f"mqtt: {{username: agent, password: {SECRET}}}\n")
    config = load_agent_config(file, environ={})
    assert config.mqtt.resolve_password() == SECRET
    for text in (repr(config), str(config), repr(config.mqtt), config.model_dump_json(), str(config.model_dump())):
        assert SECRET not in text


def test_password_env_names_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_agent_config(None, {"mqtt": {"username": "agent", "password_env": "SHELF_TEST_PW"}}, environ={})
    monkeypatch.delenv("SHELF_TEST_PW", raising=False)
    with pytest.raises(ConfigError, match="SHELF_TEST_PW"):
        config.mqtt.resolve_password()
    monkeypatch.setenv("SHELF_TEST_PW", SECRET)
    assert config.mqtt.resolve_password() == SECRET
    assert SECRET not in repr(config)
