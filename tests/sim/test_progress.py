"""Progress bars are optional: without tqdm the work still runs, just without a bar."""

from __future__ import annotations

import sys

import pytest

from shelfsight.sim.progress import progress


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_yields_every_item_with_or_without_a_bar(enabled: bool, capsys: pytest.CaptureFixture[str]):
    assert list(progress(range(5), 5, "work", enabled)) == [0, 1, 2, 3, 4]
    assert ("work" in capsys.readouterr().err) is enabled


def test_progress_without_tqdm_installed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `from tqdm import tqdm` raise ImportError
    assert list(progress(iter("abc"), 3, "work", True)) == ["a", "b", "c"]
    assert capsys.readouterr().err == ""
