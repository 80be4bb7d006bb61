"""Fault-injection fixtures (MQTT side): the in-process agent on a thread, the `shelf-agent` process, a TCP proxy,
read-only views of the agent's SQLite files, the short/long switch and the JSON figures report.

Short form by default (CI); ``SHELFSIGHT_RELIABILITY_LONG=1`` selects the long form with
``SHELFSIGHT_RELIABILITY_CYCLES`` cycles (default 10). ``SHELFSIGHT_RELIABILITY_REPORT=DIR`` writes one JSON of
measured figures per test into DIR; without it nothing is written. Nothing here asserts on speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from agent_state import journal_ids, query, wait_until

from shelfsight.shelf_agent.config import AgentConfig, deep_merge, load_agent_config

ROOT = "shelfsight/demo-store/cam-1"


# ------------------------------------------------------------------------------------------------ short / long

@dataclass(frozen=True)
class Reliability:
    long: bool
    cycles_long: int
    report_dir: Path | None

    def cycles(self, short: int) -> int:
        return self.cycles_long if self.long else short

    def report(self, name: str, figures: dict[str, Any]) -> None:
        """Write ``{name}.json`` into the report folder (only when SHELFSIGHT_RELIABILITY_REPORT is set)."""
        figures = {"form": "long" if self.long else "short", **figures}
        print(f"\nreliability figures {name}: {json.dumps(figures, sort_keys=True)}")
        if self.report_dir is None:
            return
        self.report_dir.mkdir(parents=True, exist_ok=True)
        (self.report_dir / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def reliability() -> Reliability:
    report = os.environ.get("SHELFSIGHT_RELIABILITY_REPORT")
    return Reliability(
        long=os.environ.get("SHELFSIGHT_RELIABILITY_LONG", "") not in ("", "0"),
        cycles_long=max(1, int(os.environ.get("SHELFSIGHT_RELIABILITY_CYCLES", "10"))),
        report_dir=Path(report) if report else None,
    )


# ------------------------------------------------------------------------------------------------ agent

def make_agent_config(tmp_path: Path, scenario: Path, host: str, port: int, *, loop: bool = True,
                      **extra: Any) -> AgentConfig:
    """The small scenario, replayed as fast as possible (looping: a stream of alerts), short dwell and intervals."""
    data: dict[str, Any] = {
        "camera": {"source": str(scenario / "video.mp4"),
                   "capture": {"replay": "as_fast_as_possible", "loop": loop}},
        "layout": str(scenario / "layout.yaml"),
        "fps": 5,
        "slots": {"dwell_s": 2},
        "gaps": {"dwell_s": 2},
        "mqtt": {"host": host, "port": port, "reconnect_min_s": 1, "reconnect_max_s": 1,
                 "client_id": f"agent-{tmp_path.name}"},
        "outbox": {"path": str(tmp_path / "outbox.sqlite")},
        "journal": str(tmp_path / "journal.sqlite"),
        "publish": {"metrics_interval_s": 0.5, "state_interval_s": 1.0},
    }
    return load_agent_config(None, deep_merge(data, extra), environ={})


@pytest.fixture
def agent_config() -> Callable[..., AgentConfig]:
    """``agent_config(tmp_path, scenario, host, port, loop=True, **overrides) -> AgentConfig``."""
    return make_agent_config


# ------------------------------------------------------------------------------------------------ SQLite, read-only

@dataclass(frozen=True)
class OutboxView:
    rows: list[tuple[int, str, str, bytes]]  # id, kind, topic, payload
    counters: dict[str, int]

    @property
    def depth(self) -> int:
        return len(self.rows)

    def alert_ids(self) -> set[str]:
        return {json.loads(p)["alert_id"] for _, kind, _, p in self.rows if kind == "alert"}


def read_outbox(path: Path) -> OutboxView:
    """Rows and counters of an outbox in ONE read transaction (a consistent snapshot while the agent writes)."""
    if not path.exists():
        return OutboxView([], {})
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        conn.execute("BEGIN")
        rows = [(int(r[0]), r[1], r[2], bytes(r[3]))
                for r in conn.execute("SELECT id, kind, topic, payload FROM messages ORDER BY id")]
        counters = {name: int(value) for name, value in conn.execute("SELECT name, value FROM counters")}
        conn.execute("COMMIT")
        return OutboxView(rows, counters)
    except sqlite3.OperationalError:
        return OutboxView([], {})
    finally:
        conn.close()


def journal_alerts(path: Path, queued_only: bool = False) -> list[dict[str, Any]]:
    where = "WHERE queued = 1" if queued_only else ""
    return [json.loads(row[0]) for row in query(path, f"SELECT payload FROM alerts {where} ORDER BY seq")]


@pytest.fixture
def agent_files() -> Any:
    """Namespace of the read-only helpers: ``query``, ``read_outbox``, ``journal_alerts``, ``journal_ids``."""

    return SimpleNamespace(query=query, read_outbox=read_outbox, journal_alerts=journal_alerts,
                           journal_ids=journal_ids)


# ------------------------------------------------------------------------------------------------ waiting, alerts

@pytest.fixture
def waiter() -> Callable[..., float]:
    """``waiter(predicate, timeout, what) -> seconds``."""
    return wait_until


def delivered_alerts(subscriber: Any) -> list[dict[str, Any]]:
    return [m.json() for m in subscriber.on(f"{ROOT}/alert")]


def first_seen(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """De-duplicated by alert_id, keeping the first arrival, as a subscriber must."""
    seen: dict[str, dict[str, Any]] = {}
    for alert in alerts:
        seen.setdefault(alert["alert_id"], alert)
    return list(seen.values())


def duplicates_after_dedupe(unique: list[dict[str, Any]]) -> int:
    """Alerts that survive de-duplication by alert_id but still repeat one already delivered: the same seq, or the
    same (type, slot, event_time). The agent's promise is that a redelivered alert carries the same alert_id."""
    seqs: set[int] = set()
    events: set[tuple[str, str, str]] = set()
    repeats = 0
    for alert in unique:
        event = (alert["type"], alert["slot_id"], alert["event_time"])
        if alert["seq"] in seqs or event in events:
            repeats += 1
        seqs.add(alert["seq"])
        events.add(event)
    return repeats


def restated_stockouts(unique: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stock-outs raised for a slot whose previous stock-out was never followed by a restock."""
    empty: set[str] = set()
    bad = []
    for alert in unique:
        if alert["type"] == "stockout":
            if alert["slot_id"] in empty:
                bad.append(alert)
            empty.add(alert["slot_id"])
        elif alert["type"] == "restocked":
            empty.discard(alert["slot_id"])
    return bad


@pytest.fixture
def alerts_tools() -> Any:
    return SimpleNamespace(delivered=delivered_alerts, first_seen=first_seen,
                           duplicates_after_dedupe=duplicates_after_dedupe, restated_stockouts=restated_stockouts,
                           root=ROOT)


# ------------------------------------------------------------------------------------------------ TCP proxy

def _load_tcp_proxy() -> Any:
    spec = importlib.util.spec_from_file_location("shelfsight_reliability_tcp_proxy",
                                                  Path(__file__).with_name("tcp_proxy.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], Any]]:
    """``tcp_proxy(upstream_host, upstream_port) -> TcpProxy`` (forwarding); closed at teardown."""
    module = _load_tcp_proxy()
    proxies: list[Any] = []

    def make(host: str, port: int) -> Any:
        proxy = module.TcpProxy(host, port)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
