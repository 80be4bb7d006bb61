"""Alert scoring (DESIGN section 4): raised alerts against a scenario's expected alerts.

A raised alert matches an expected alert of the same type and slot when it is raised no earlier than the expected
``t`` and no later than ``t + dwell + slack`` (slack = 2 s). Everything else raised is a false alert; an expected
alert without a match is a miss. Pure functions, used by ``shelf-agent eval`` and by the tests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SCORING_SLACK_S = 2.0


@dataclass(frozen=True)
class ScoredAlert:
    """The part of an alert that scoring looks at: type, slot and a time (expected ``t`` or raised time)."""

    type: str
    slot: str
    t: float


@dataclass(frozen=True)
class AlertMatch:
    expected: ScoredAlert
    raised: ScoredAlert

    @property
    def delay_s(self) -> float:
        return self.raised.t - self.expected.t


@dataclass(frozen=True)
class AlertScore:
    precision: float  # matches / raised (1.0 when nothing was raised)
    recall: float  # matches / expected (1.0 when nothing was expected)
    median_delay: float | None  # seconds, over matches; None without matches
    p95_delay: float | None
    matches: tuple[AlertMatch, ...]
    false_alerts: tuple[ScoredAlert, ...]
    misses: tuple[ScoredAlert, ...]

    def summary(self) -> str:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}s"

        return (
            f"precision {self.precision:.3f} recall {self.recall:.3f} delay median {seconds(self.median_delay)} "
            f"p95 {seconds(self.p95_delay)} ({len(self.matches)} matched, {len(self.false_alerts)} false, "
            f"{len(self.misses)} missed)"
        )


def as_scored(alert: Any) -> ScoredAlert:
    """Accept a ``ScoredAlert``, a truth.json entry ``{type, slot, t}``, an MQTT alert payload
    ``{type, slot_id, raised_time}`` or a ``SlotTransition`` (event / slot_id / raised_time)."""
    if isinstance(alert, ScoredAlert):
        return alert
    if isinstance(alert, Mapping):
        slot = alert["slot"] if "slot" in alert else alert["slot_id"]
        t = alert["t"] if "t" in alert else alert["raised_time"]
        return ScoredAlert(str(alert["type"]), str(slot), float(t))
    event = getattr(alert, "event", None)
    if event is None:
        raise ValueError(f"not an alert: {alert!r}")
    return ScoredAlert(str(event), str(alert.slot_id), float(alert.raised_time))


def score_alerts(
    raised: Iterable[Any],
    expected: Iterable[Any],
    dwell_s: float,
    *,
    slack_s: float = SCORING_SLACK_S,
    scored_types: Collection[str] | None = None,
) -> AlertScore:
    """Match raised to expected alerts per (type, slot) within [t, t + dwell_s + slack_s].

    ``scored_types`` restricts both sides to those types (e.g. the truth does not model ``low_stock``);
    None scores every raised alert, as DESIGN section 4 says.
    """
    raised_alerts = [as_scored(a) for a in raised]
    expected_alerts = [as_scored(a) for a in expected]
    if scored_types is not None:
        raised_alerts = [a for a in raised_alerts if a.type in scored_types]
        expected_alerts = [a for a in expected_alerts if a.type in scored_types]
    window = dwell_s + slack_s

    by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index in sorted(range(len(raised_alerts)), key=lambda i: raised_alerts[i].t):
        alert = raised_alerts[index]
        by_key[(alert.type, alert.slot)].append(index)

    matches: list[AlertMatch] = []
    used: set[int] = set()
    misses: list[ScoredAlert] = []
    # All windows have the same length, so taking expected alerts in time order and giving each the earliest
    # unused raised alert inside its window yields the largest possible number of matches.
    for exp in sorted(expected_alerts, key=lambda a: a.t):
        candidates = by_key.get((exp.type, exp.slot), [])
        hit = next((i for i in candidates if i not in used and exp.t <= raised_alerts[i].t <= exp.t + window), None)
        if hit is None:
            misses.append(exp)
        else:
            used.add(hit)
            matches.append(AlertMatch(exp, raised_alerts[hit]))
    false_alerts = [r for i, r in enumerate(raised_alerts) if i not in used]

    delays = np.array([m.delay_s for m in matches])
    return AlertScore(
        precision=len(matches) / len(raised_alerts) if raised_alerts else 1.0,
        recall=len(matches) / len(expected_alerts) if expected_alerts else 1.0,
        median_delay=float(np.median(delays)) if len(delays) else None,
        p95_delay=float(np.percentile(delays, 95)) if len(delays) else None,
        matches=tuple(matches),
        false_alerts=tuple(sorted(false_alerts, key=lambda a: a.t)),
        misses=tuple(misses),
    )
