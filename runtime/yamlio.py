"""Load YAML into pydantic models with errors that name the file, line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shelfsight.runtime.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def _node_at(root: yaml.Node | None, loc: tuple[Any, ...]) -> yaml.Node | None:
    """Walk the composed YAML node tree along a pydantic error location; stop at the deepest match."""
    node = root
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == str(key)), None)
            if child is None:
                return node
            node = child
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node
    return node


def _field_name(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for key in loc:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        else:
            parts.append(("." if parts else "") + str(key))
    return "".join(parts) or "<document>"


def parse_yaml_text(text: str, model: type[ModelT], source: str) -> ModelT:
    data, root = compose_yaml(text, source)
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise config_error_at(source, root, tuple(first["loc"]), f"{first['msg']}{more}") from None


def read_text_file(path: Path, what: str = "") -> str:
    """A UTF-8 text file, or a one-line ConfigError ("file: cannot read scenario: ...") naming what it should be."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read{' ' + what if what else ''}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def load_yaml_model(path: str | Path, model: type[ModelT]) -> ModelT:
    path = Path(path)
    return parse_yaml_text(read_text_file(path), model, str(path))


def dump_yaml_model(obj: BaseModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(obj.model_dump(mode="json", exclude_none=True), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def compose_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML text into (plain data, node tree) so callers can run their own checks and still name lines."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:  # PyYAML composes recursively: "[[[[..." thousands deep
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    except ValueError as exc:  # PyYAML's constructors: an impossible date, an integer of more than 4300 digits
        raise ConfigError(f"{source}: invalid YAML value: {(str(exc) or type(exc).__name__).splitlines()[0]}") from None
    return data, root


def config_error_at(source: str, root: yaml.Node | None, loc: tuple[Any, ...], msg: str) -> ConfigError:
    """A ConfigError worded like the schema errors ("file:line: field 'a[2].b': msg") for a check done in code."""
    node = _node_at(root, loc)
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    return ConfigError(f"{source}{line}: field '{_field_name(loc)}': {msg}")
