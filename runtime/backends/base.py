"""The backend contract, after Polygraphy's runner: the public methods check and time, subclasses do ``*_impl``.

Heavy libraries (onnxruntime, tensorrt) are imported only inside the concrete backends' ``_activate_impl`` or
constructor, and backend modules themselves are imported only when ``create_backend`` asks for them.
"""

from __future__ import annotations

import importlib
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from shelfsight.runtime.errors import ShelfSightError

# A dimension is an int when fixed; None or a symbolic name when the model accepts any size there.
Dim = int | str | None


class BackendError(ShelfSightError):
    """A backend cannot load a model or was fed something the model does not accept."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[Dim, ...]
    dtype: np.dtype

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(
            not isinstance(want, int) or want < 0 or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        """The shape if every dimension is fixed, else None."""
        if all(isinstance(d, int) and d >= 0 for d in self.shape):
            return tuple(int(d) for d in self.shape)  # type: ignore[arg-type]
        return None


class Backend(ABC):
    """Runs one model file. ``activate()`` loads it, ``infer(feed)`` runs it, ``deactivate()`` frees it."""

    name: ClassVar[str] = "backend"

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        self.is_active = False
        self.last_infer_ns = 0
        self._input_meta: dict[str, TensorMeta] = {}
        self._output_meta: dict[str, TensorMeta] = {}

    # --- what subclasses implement -----------------------------------------------------------------------------
    @abstractmethod
    def _activate_impl(self) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
        """Load the model; return (input meta, output meta) keyed by tensor name, in the model's order."""

    @abstractmethod
    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on an already checked feed; return every output keyed by name, in the model's order."""

    @abstractmethod
    def _deactivate_impl(self) -> None:
        """Release the model and any device memory."""

    # --- the public, checked interface -------------------------------------------------------------------------
    def activate(self) -> Backend:
        if self.is_active:
            raise BackendError(f"{self.name} backend for {self.model_path} is already active")
        self._input_meta, self._output_meta = self._activate_impl()
        self.is_active = True
        return self

    @property
    def input_meta(self) -> dict[str, TensorMeta]:
        self._require_active()
        return self._input_meta

    @property
    def output_meta(self) -> dict[str, TensorMeta]:
        self._require_active()
        return self._output_meta

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check the feed against the model's declared inputs, run it, and record ``last_infer_ns``."""
        self._require_active()
        self._check_feed(feed)
        start = time.perf_counter_ns()
        outputs = self._infer_impl(feed)
        self.last_infer_ns = time.perf_counter_ns() - start
        return outputs

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.deactivate()

    def _require_active(self) -> None:
        if not self.is_active:
            raise BackendError(f"{self.name} backend for {self.model_path} is not active: call activate() first")

    def _check_feed(self, feed: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in self._input_meta if name not in feed]
        unexpected = [name for name in feed if name not in self._input_meta]
        if missing or unexpected:
            raise BackendError(
                f"{self.model_path.name}: feed inputs {sorted(feed)} do not match the model's "
                f"{list(self._input_meta)} (missing {missing}, unexpected {unexpected})"
            )
        for name, meta in self._input_meta.items():
            array = feed[name]
            if not isinstance(array, np.ndarray):
                raise BackendError(f"{self.model_path.name}: input '{name}' must be a numpy array")
            if array.dtype != meta.dtype:
                raise BackendError(
                    f"{self.model_path.name}: input '{name}' has dtype {array.dtype}, the model expects {meta.dtype}"
                )
            if not meta.accepts_shape(array.shape):
                raise BackendError(
                    f"{self.model_path.name}: input '{name}' has shape {tuple(array.shape)}, "
                    f"the model expects {tuple(meta.shape)}"
                )


# --- registry ----------------------------------------------------------------------------------------------------
# Dotted paths, so that asking for one backend never imports the others' modules.
BACKENDS: dict[str, str] = {
    "onnxruntime": "shelfsight.runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "tensorrt": "shelfsight.runtime.backends.tensorrt:TensorRTBackend",
}


def register_backend(name: str, target: str) -> None:
    """Register ``"package.module:ClassName"`` under ``name``."""
    BACKENDS[name] = target


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, _, class_name = BACKENDS[name].partition(":")
    except KeyError:
        raise BackendError(f"unknown backend '{name}' (available: {', '.join(sorted(BACKENDS))})") from None
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


def create_backend(name: str, model_path: str | Path, **opts: Any) -> Backend:
    """Construct (not activate) a backend; an option it does not take is an error, never silently dropped."""
    cls = backend_class(name)
    try:
        inspect.signature(cls).bind(model_path, **opts)
    except TypeError as exc:
        raise BackendError(f"backend '{name}': {exc}") from None
    return cls(model_path, **opts)
