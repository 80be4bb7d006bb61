"""Shelf layout (DESIGN section 5): immutable slot geometry, kept apart from slot state and publishing."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shelfsight.runtime.yamlio import dump_yaml_model, load_yaml_model

SLOT_ID_PATTERN = re.compile(r"^R(\d+)S(\d+)$")


class FrameSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class SlotSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)
    polygon: list[tuple[float, float]] = Field(min_length=3, description="image pixels, frame_size coordinates")
    sku: str | None = None
    min_facings: int = Field(1, ge=0)


class ShelfLayout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    camera_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    frame_size: FrameSize
    slots: list[SlotSpec] = Field(min_length=1)

    @field_validator("slots")
    @classmethod
    def _unique_ids(cls, slots: list[SlotSpec]) -> list[SlotSpec]:
        seen: set[str] = set()
        for slot in slots:
            if slot.id in seen:
                raise ValueError(f"duplicate slot id '{slot.id}'")
            seen.add(slot.id)
        return slots

    @model_validator(mode="after")
    def _polygons_inside_frame(self) -> ShelfLayout:
        w, h = self.frame_size.width, self.frame_size.height
        for slot in self.slots:
            for x, y in slot.polygon:
                if not (-1 <= x <= w + 1 and -1 <= y <= h + 1):
                    raise ValueError(f"slot '{slot.id}' has point ({x}, {y}) outside the {w}x{h} frame")
        return self

    def slot(self, slot_id: str) -> SlotSpec:
        for slot in self.slots:
            if slot.id == slot_id:
                return slot
        raise KeyError(slot_id)


def load_layout(path: str | Path) -> ShelfLayout:
    return load_yaml_model(path, ShelfLayout)


def save_layout(layout: ShelfLayout, path: str | Path) -> Path:
    return dump_yaml_model(layout, path)
