"""Optional tqdm progress bars: the device install may lack tqdm, so it is imported lazily and never required."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

ItemT = TypeVar("ItemT")


def progress(
    iterable: Iterable[ItemT], total: int, desc: str, enabled: bool = True, unit: str = "it"
) -> Iterator[ItemT]:
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            yield from tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
            return
    yield from iterable
