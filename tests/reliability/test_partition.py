"""Network partitions between the agent and its broker, made by a TCP proxy thread (tcp_proxy.py):

(a) ``down``: the proxy closes both sides and refuses to forward, then resumes;
(b) ``blackhole``: the connection stays open but no byte passes (no FIN, no RST): only the MQTT keepalive notices.

Measured: how long the agent takes to notice the dead connection, relative to ``mqtt.keepalive_s`` (the issue's
target is <= 1.5x keepalive; recorded, and only a generous 4x is asserted), how long until it is connected again
after the link returns, and the delivery delay of the alerts raised meanwhile. Loss (0) is asserted. The subscriber
talks to the broker directly, so it sees exactly what crossed the partition.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

ROOT = "shelfsight/demo-store/cam-1"
KEEPALIVE_S = 5  # the smallest keepalive the config accepts


def ids(alerts: list[dict[str, Any]]) -> set[str]:
    return {a["alert_id"] for a in alerts}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["down", "blackhole"])
def test_partition_is_detected_within_the_keepalive_bound_and_loses_nothing(
        mode: str, small_scenario: Path, tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any, tcp_proxy: Any,
        agent_config: Any, agent_thread: Any, agent_files: Any, alerts_tools: Any, waiter: Any,
        reliability: Any) -> None:
    cycles = reliability.cycles(short=1)
    broker = mosquitto_broker()
    proxy = tcp_proxy(broker.host, broker.port)
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/alert")
    journal = tmp_path / "journal.sqlite"
    config = agent_config(tmp_path, small_scenario, proxy.host, proxy.port, mqtt={"keepalive_s": KEEPALIVE_S})
    running = agent_thread(config)

    def delivered() -> set[str]:
        return ids(alerts_tools.delivered(sub))

    detect_s: list[float] = []
    reconnect_s: list[float] = []
    delivery_s: list[float] = []
    try:
        waiter(lambda: running.agent.publisher is not None and running.agent.publisher.connected, 60,
               "the first connection through the proxy")
        publisher = running.agent.publisher
        for _cycle in range(cycles):
            before = len(agent_files.journal_ids(journal))
            waiter(lambda n=before + 1: len(agent_files.journal_ids(journal)) >= n, 90, "alerts through the proxy")
            raised = set(agent_files.journal_ids(journal))
            waiter(lambda target=raised: target <= delivered(), 60, "delivery through the proxy before the cut")
            assert publisher.connected
            cut = proxy.set_mode(mode)
            waiter(lambda: not publisher.connected, KEEPALIVE_S * 6, f"the agent to notice the {mode} partition",
                   poll=0.01)
            detect_s.append(round(time.monotonic() - cut, 3))
            at_cut = len(agent_files.journal_ids(journal))
            waiter(lambda n=at_cut + 2: len(agent_files.journal_ids(journal)) >= n, 90, "alerts during the partition")
            backlog = set(agent_files.journal_ids(journal))
            healed = proxy.set_mode("forward")
            reconnect_s.append(round(waiter(lambda: publisher.connected, 60, "a reconnect after the partition"), 3))
            waiter(lambda target=backlog: target <= delivered(), 60, "the backlog after the partition")
            delivery_s.append(round(time.monotonic() - healed, 3))
        raised = set(agent_files.journal_ids(journal))
        waiter(lambda: raised <= delivered(), 60, "delivery to catch up before the stop")
    finally:
        running.stop()

    journaled = agent_files.journal_ids(journal)
    raw = alerts_tools.delivered(sub)
    unique = alerts_tools.first_seen(raw)
    lost = sorted(set(journaled) - ids(unique))
    figures = {
        "mode": mode, "cycles": cycles, "keepalive_s": KEEPALIVE_S, "detect_s": detect_s,
        "max_detect_s": max(detect_s), "max_detect_over_keepalive": round(max(detect_s) / KEEPALIVE_S, 3),
        "target_detect_over_keepalive": 1.5, "reconnect_after_heal_s": reconnect_s,
        "delivery_delay_after_heal_s": delivery_s, "max_delivery_delay_s": max(delivery_s),
        "alerts_raised": len(journaled), "lost": len(lost), "raw_duplicates": len(raw) - len(unique),
        "duplicates_after_dedupe": alerts_tools.duplicates_after_dedupe(unique),
        "outbox_depth_after_stop": agent_files.read_outbox(tmp_path / "outbox.sqlite").depth,
    }
    reliability.report(f"partition_{mode}", figures)

    assert not lost, f"journaled but never delivered: {lost}"
    assert figures["duplicates_after_dedupe"] == 0
    assert [a["alert_id"] for a in unique] == journaled
    assert max(detect_s) <= 4 * KEEPALIVE_S, figures  # generous: the recorded figure is the one to read
    assert figures["outbox_depth_after_stop"] == 0
