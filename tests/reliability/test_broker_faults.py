"""MQTT fault injection against the assembled agent: the broker SIGKILLed/SIGTERMed under a stream of alerts, the
agent SIGKILLed again and again during an outage, a full outbox, an exception thrown inside a paho callback.

Real mosquitto, real subscribers, the bundled model on the small scenario video looping as fast as possible (every
loop the shelf is full again, so alerts keep coming). Short form by default; SHELFSIGHT_RELIABILITY_LONG=1 and
SHELFSIGHT_RELIABILITY_CYCLES=N for the long form; SHELFSIGHT_RELIABILITY_REPORT=DIR writes the figures (see
conftest.py). Loss and duplicates are asserted; delays are recorded only.

What "lost" means here is the agent's promise (DESIGN section 7): everything it journaled reaches the subscriber.
A broker SIGKILL can also lose messages the broker already PUBACKed but had not forwarded yet; that is the broker's
loss, so before every kill the test waits until the subscriber has caught up with the journal.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

ROOT = "shelfsight/demo-store/cam-1"
LOOP_ENV = {"SHELFSIGHT__CAMERA__CAPTURE__LOOP": "true"}


def ids(alerts: list[dict[str, Any]]) -> set[str]:
    return {a["alert_id"] for a in alerts}


# ------------------------------------------------------------------------------------------------ 1. broker kills

@pytest.mark.timeout(900)
def test_broker_killed_and_terminated_repeatedly_under_a_stream_of_alerts(
        small_scenario: Path, tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any, agent_config: Any,
        agent_thread: Any, agent_files: Any, alerts_tools: Any, waiter: Any, reliability: Any) -> None:
    cycles = reliability.cycles(short=4)
    broker = mosquitto_broker(persistence=True)
    # A persistent session (clean_start False + session expiry) on a persistent broker: queued messages survive.
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/alert", client_id="backoffice", persistent=True)
    # mosquitto writes its sessions to disk only every autosave_interval (and at a clean stop): a SIGKILL before the
    # first save forgets the subscription, and alerts the agent gets acknowledged ("no matching subscribers") while
    # the subscriber reconnects are gone on the broker's side. A clean restart puts the session on disk first.
    broker.stop()
    broker.start()
    waiter(sub.client.is_connected, 30, "the subscriber to reconnect")
    journal = tmp_path / "journal.sqlite"

    def delivered_ids() -> set[str]:
        return ids(alerts_tools.delivered(sub))

    def caught_up(target: set[str]) -> bool:
        return target <= delivered_ids()

    running = agent_thread(agent_config(tmp_path, small_scenario, broker.host, broker.port))
    delays: list[float] = []
    raised_during_outages: list[int] = []
    faults: list[str] = []
    try:
        for cycle in range(cycles):
            before = len(agent_files.journal_ids(journal))
            waiter(lambda n=before + 1: len(agent_files.journal_ids(journal)) >= n, 90, "alerts while the broker is up")
            # Caught up before the fault: what the broker PUBACKed but still queues would die with a SIGKILL.
            raised = set(agent_files.journal_ids(journal))
            waiter(lambda target=raised: caught_up(target), 60, "the subscriber to catch up before the fault")
            fault = "SIGKILL" if cycle % 2 == 0 else "SIGTERM"
            broker.kill() if fault == "SIGKILL" else broker.stop()
            faults.append(fault)
            at_fault = len(agent_files.journal_ids(journal))
            waiter(lambda n=at_fault + 2: len(agent_files.journal_ids(journal)) >= n, 90, "alerts during the outage")
            backlog = set(agent_files.journal_ids(journal))
            raised_during_outages.append(len(backlog) - at_fault)
            broker.start()
            back = time.monotonic()
            # Delivery delay after the broker returns: until the subscriber has all that was raised before.
            assert sub.wait_for(lambda _ms, target=backlog: caught_up(target), 120), (
                f"cycle {cycle}: the outage backlog never arrived: {backlog - delivered_ids()}")
            delays.append(round(time.monotonic() - back, 3))
        # Caught up before the stop: a stopped agent keeps what is still in its outbox (not a loss, not this test).
        raised = set(agent_files.journal_ids(journal))
        sub.wait_for(lambda _ms: caught_up(raised), 120)
    finally:
        summary = running.stop()

    journaled = agent_files.journal_ids(journal)
    sub.wait_for(lambda _ms: caught_up(set(journaled)), 30)
    raw = alerts_tools.delivered(sub)
    unique = alerts_tools.first_seen(raw)
    lost = sorted(set(journaled) - ids(unique))
    phantom = sorted(ids(unique) - set(journaled))
    outbox_depth = agent_files.read_outbox(tmp_path / "outbox.sqlite").depth
    figures = {
        "cycles": cycles, "faults": faults, "alerts_raised": len(journaled), "alerts_delivered_raw": len(raw),
        "lost": len(lost), "raw_duplicates": len(raw) - len(unique),
        "duplicates_after_dedupe": alerts_tools.duplicates_after_dedupe(unique) + len(phantom),
        "alerts_raised_per_outage": raised_during_outages, "delivery_delays_s": delays,
        "max_delivery_delay_s": max(delays) if delays else None, "outbox_depth_after_stop": outbox_depth,
    }
    reliability.report("broker_faults", figures)

    assert [a["alert_id"] for a in summary.alerts] == journaled
    assert not lost, f"journaled but never delivered: {lost}"
    assert figures["duplicates_after_dedupe"] == 0, unique
    assert [a["alert_id"] for a in unique] == journaled  # every one, in the order raised
    assert all(b["seq"] > a["seq"] for a, b in pairwise(unique))
    assert outbox_depth == 0


# ------------------------------------------------------------------------------------------------ 2. agent kills

def run_args(scenario: Path, folder: Path, broker: Any) -> list[str]:
    return ["--camera", str(scenario / "video.mp4"), "--layout", str(scenario / "layout.yaml"),
            "--as-fast-as-possible", "--fps", "5", "--dwell", "2", "--broker", f"{broker.host}:{broker.port}",
            "--outbox", str(folder / "outbox.sqlite"), "--journal", str(folder / "journal.sqlite")]


@pytest.mark.timeout(900)
def test_agent_sigkilled_repeatedly_during_an_outage_loses_nothing_and_raises_nothing_twice(
        small_scenario: Path, tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any, agent_process: Any,
        agent_files: Any, alerts_tools: Any, waiter: Any, reliability: Any) -> None:
    kills = reliability.cycles(short=3)
    rng = random.Random(20240611)
    broker = mosquitto_broker()
    broker.stop()  # the whole run of kills happens during the outage
    outbox, journal = tmp_path / "outbox.sqlite", tmp_path / "journal.sqlite"
    args = run_args(small_scenario, tmp_path, broker)

    stored_before_kill: dict[str, bytes] = {}  # alert_id or snapshot topic -> payload in the outbox after a kill
    stored_alert_ids: set[str] = set()
    kill_delays: list[float] = []
    for index in range(kills):
        before = len(agent_files.journal_ids(journal))
        agent = agent_process(tmp_path, args, env=LOOP_ENV, name=f"killed-{index}")
        waiter(lambda n=before, p=agent.proc: len(agent_files.journal_ids(journal)) > n or p.poll() is not None, 120,
               "a new alert from this run")
        assert agent.proc.poll() is None, f"agent ended before the kill:\n{agent.log()[-2000:]}"
        delay = rng.uniform(0.0, 1.5)  # somewhere in the stream, not always right after an alert
        kill_delays.append(round(delay, 3))
        time.sleep(delay)
        agent.proc.send_signal(signal.SIGKILL)
        assert agent.wait(10) == -signal.SIGKILL
        view = agent_files.read_outbox(outbox)
        for _, kind, topic, payload in view.rows:
            if kind == "alert":
                stored_before_kill[json.loads(payload)["alert_id"]] = payload
            elif kind == "snapshot":
                stored_before_kill[topic] = payload
        stored_alert_ids |= view.alert_ids()

    journaled_at_restart = agent_files.journal_alerts(journal)
    broker.start()
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/#")
    final = agent_process(tmp_path, args, env=LOOP_ENV, name="final")
    try:
        waiter(lambda: ids(journaled_at_restart) <= ids(alerts_tools.delivered(sub)), 120,
               "the replay of everything stored during the outage")
        # The final run raises new alerts too (seq continues across the kills); the video loops, so the test
        # catches up with the journal before the stop.
        waiter(lambda: len(agent_files.journal_ids(journal)) >= len(journaled_at_restart) + 2, 120,
               "new alerts from the final run")
        target = set(agent_files.journal_ids(journal))
        waiter(lambda: target <= ids(alerts_tools.delivered(sub)), 60, "the final run's alerts")
    finally:
        final.proc.send_signal(signal.SIGTERM)
        assert final.wait(60) == 0, final.log()[-3000:]

    journaled = agent_files.journal_alerts(journal)
    raw = alerts_tools.delivered(sub)
    unique = alerts_tools.first_seen(raw)
    delivered_rows = {m.topic: m.payload for m in sub.messages if m.topic != f"{ROOT}/alert"}
    delivered_rows.update((m.json()["alert_id"], m.payload) for m in sub.on(f"{ROOT}/alert"))
    lost_rows = sorted(key for key, payload in stored_before_kill.items() if delivered_rows.get(key) != payload)
    lost_alerts = sorted(ids(journaled) - ids(unique))
    restated = alerts_tools.restated_stockouts(unique)
    seqs = [a["seq"] for a in unique]
    figures = {
        "agent_kills": kills, "kill_delays_after_alert_s": kill_delays,
        "alerts_journaled_before_restart": len(journaled_at_restart), "alert_rows_in_outbox_at_kills":
        len(stored_alert_ids), "outbox_rows_checked": len(stored_before_kill), "outbox_rows_lost": len(lost_rows),
        "alerts_raised": len(journaled), "lost": len(lost_alerts), "raw_duplicates": len(raw) - len(unique),
        "duplicates_after_dedupe": alerts_tools.duplicates_after_dedupe(unique),
        "stockouts_reraised": len(restated), "seq_strictly_increasing": all(b > a for a, b in pairwise(seqs)),
    }
    reliability.report("agent_kills", figures)

    assert stored_alert_ids, "no alert was in the outbox at any kill: the test did not exercise the replay"
    assert not lost_rows, f"outbox rows stored before a kill never delivered: {lost_rows}"
    assert not lost_alerts, f"journaled but never delivered: {lost_alerts}"
    assert figures["seq_strictly_increasing"], [(a["seq"], a["type"], a["slot_id"]) for a in unique]
    assert figures["duplicates_after_dedupe"] == 0
    assert not restated, [(a["seq"], a["type"], a["slot_id"]) for a in restated]
    assert [a["alert_id"] for a in unique] == [a["alert_id"] for a in journaled]
    assert agent_files.read_outbox(outbox).depth == 0


# ------------------------------------------------------------------------------------------------ 4. outbox full

@pytest.mark.timeout(300)
def test_outbox_full_drops_oldest_non_alerts_first_and_reports_it_in_metrics(
        small_scenario: Path, tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any, agent_config: Any,
        agent_thread: Any, agent_files: Any, alerts_tools: Any, waiter: Any, reliability: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shelfsight.shelf_agent.outbox")
    cap = 40
    broker = mosquitto_broker(persistence=True)
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/#", client_id="backoffice", persistent=True)
    broker.stop()  # down from the start: the outbox only fills
    outbox, journal = tmp_path / "outbox.sqlite", tmp_path / "journal.sqlite"
    config = agent_config(tmp_path, small_scenario, broker.host, broker.port,
                          outbox={"max_messages": cap}, publish={"metrics_interval_s": 0.05})
    running = agent_thread(config)
    snapshots = []
    try:
        waiter(lambda: agent_files.read_outbox(outbox).counters.get("dropped", 0) > 0
               and len(agent_files.journal_ids(journal)) >= 3, 120, "a full outbox holding alerts")
        for _ in range(reliability.cycles(short=3)):
            queued = ids(agent_files.journal_alerts(journal, queued_only=True))  # read first: these were put before
            view = agent_files.read_outbox(outbox)
            snapshots.append(view)
            assert view.depth == cap, f"outbox holds {view.depth} rows, cap is {cap}"
            assert queued <= view.alert_ids(), f"alerts missing from a full outbox: {queued - view.alert_ids()}"
            time.sleep(0.5)
        journaled_during_outage = agent_files.journal_ids(journal)
        assert len(journaled_during_outage) < cap  # so the policy never needs to touch an alert
        broker.start()
        waiter(lambda: set(journaled_during_outage) <= ids(alerts_tools.delivered(sub)), 60,
               "the alerts kept in the full outbox")
        # Once drained nothing is dropped any more: a metrics message built afterwards reports the final count.
        waiter(lambda: agent_files.read_outbox(outbox).depth < cap // 2, 60, "the outbox to drain")
        final_dropped = agent_files.read_outbox(outbox).counters["dropped"]
        waiter(lambda: any(m.json()["outbox"]["dropped"] == final_dropped for m in sub.on(f"{ROOT}/metrics")), 60,
               "a metrics message reporting the final dropped count")
        raised = set(agent_files.journal_ids(journal))
        waiter(lambda: raised <= ids(alerts_tools.delivered(sub)), 60, "delivery to catch up before the stop")
    finally:
        running.stop()

    # Oldest first: between two snapshots, the non-alert rows that disappeared (no acks while the broker is down)
    # are older than every non-alert row that stayed. State rows are left out: a newer state supersedes the pending
    # one by design (not a drop).
    order_violations = 0
    for first, second in pairwise(snapshots):
        kept = {row[0] for row in second.rows}
        gone = [row[0] for row in first.rows if row[0] not in kept and row[1] != "state"]
        stayed = [row[0] for row in first.rows if row[0] in kept and row[1] not in ("alert", "state")]
        assert not [row for row in first.rows if row[0] not in kept and row[1] == "alert"], "an alert was dropped"
        if gone and stayed and max(gone) > min(stayed):
            order_violations += 1
        assert second.counters["dropped"] - first.counters["dropped"] >= len(gone)
    metrics = [m.json() for m in sub.on(f"{ROOT}/metrics")]
    reported = [m["outbox"]["dropped"] for m in metrics]
    end = agent_files.read_outbox(outbox)
    unique = alerts_tools.first_seen(alerts_tools.delivered(sub))
    figures = {
        "cap_messages": cap, "snapshots": len(snapshots), "depth_in_snapshots": [s.depth for s in snapshots],
        "dropped": end.counters.get("dropped", 0), "dropped_alerts": end.counters.get("dropped_alerts", 0),
        "max_dropped_reported_in_metrics": max(reported) if reported else None,
        "alerts_raised": len(agent_files.journal_ids(journal)), "lost": len(set(agent_files.journal_ids(journal))
                                                                            - ids(unique)),
        "oldest_first_violations": order_violations,
        "drop_log_records": sum("outbox full" in r.getMessage() for r in caplog.records),
    }
    reliability.report("outbox_full", figures)

    assert order_violations == 0
    assert figures["dropped"] > 0 and figures["dropped_alerts"] == 0
    assert max(reported) == figures["dropped"], "metrics do not report the outbox's dropped count"
    assert all(b >= a for a, b in pairwise(reported)), "the dropped count in metrics went backwards"
    assert all(m["outbox"]["dropped_alerts"] == 0 for m in metrics)
    assert figures["lost"] == 0
    assert figures["drop_log_records"] > 0, "drops were not logged"
    assert end.depth == 0


# ------------------------------------------------------------------------------------------------ 5. callback errors

@pytest.mark.timeout(300)
def test_exception_in_a_paho_callback_keeps_the_loop_running_and_loses_nothing(
        small_scenario: Path, tmp_path: Path, mosquitto_broker: Any, mqtt_subscriber: Any, agent_config: Any,
        agent_thread: Any, agent_files: Any, alerts_tools: Any, waiter: Any, reliability: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="shelfsight.shelf_agent.mqtt_client.paho")
    cycles = reliability.cycles(short=1)
    broker = mosquitto_broker(persistence=True)
    sub = mqtt_subscriber(broker.host, broker.port, f"{ROOT}/#", client_id="backoffice", persistent=True)
    journal = tmp_path / "journal.sqlite"
    running = agent_thread(agent_config(tmp_path, small_scenario, broker.host, broker.port))
    waiter(lambda: running.agent.publisher is not None and running.agent.publisher.connected, 60, "a connection")
    publisher = running.agent.publisher
    client = publisher.client
    injected: dict[str, int] = {}

    def raising_once(name: str, original: Any, before: bool) -> Any:
        """The callback raises once (before the agent's own code ran, or after it), then behaves."""
        def callback(*args: Any) -> None:
            if injected.get(name, 0) < armed[name]:
                injected[name] = injected.get(name, 0) + 1
                if not before:
                    original(*args)
                raise RuntimeError(f"injected failure in {name}")
            original(*args)
        return callback

    armed = {"on_publish": 0, "on_connect": 0, "on_disconnect": 0}
    client.on_publish = raising_once("on_publish", publisher._on_publish, before=True)  # the PUBACK is not seen
    client.on_connect = raising_once("on_connect", publisher._on_connect, before=False)
    client.on_disconnect = raising_once("on_disconnect", publisher._on_disconnect, before=False)
    onlines = []
    try:
        for cycle in range(cycles):
            for name in armed:
                armed[name] += 1
            before = len(agent_files.journal_ids(journal))
            waiter(lambda: injected.get("on_publish", 0) == armed["on_publish"], 60, "the injected on_publish failure")
            waiter(lambda n=before + 2: len(agent_files.journal_ids(journal)) >= n, 60, "alerts after the failure")
            raised = set(agent_files.journal_ids(journal))
            waiter(lambda target=raised: target <= ids(alerts_tools.delivered(sub)), 60, "delivery after the failure")
            # A reconnect (on_disconnect and on_connect raise too) re-sends the row whose PUBACK the agent never saw.
            online_before = sum(m.json()["state"] == "online" for m in sub.on(f"{ROOT}/status"))
            broker.stop()
            waiter(lambda: not publisher.connected, 30, "the agent to notice the broker stop")
            broker.start()
            waiter(lambda n=online_before: sum(m.json()["state"] == "online" for m in sub.on(f"{ROOT}/status")) > n, 60,
                   "the agent to reconnect and publish online again")
            onlines.append(cycle)
            assert client._thread is not None and client._thread.is_alive(), "paho's network thread died"
        raised = set(agent_files.journal_ids(journal))
        waiter(lambda: raised <= ids(alerts_tools.delivered(sub)), 60, "delivery to catch up before the stop")
        waiter(lambda: publisher.flush(1.0), 30, "the outbox to drain (the un-acked row is re-sent on reconnect)")
    finally:
        running.stop()

    journaled = agent_files.journal_ids(journal)
    unique = alerts_tools.first_seen(alerts_tools.delivered(sub))
    caught = [r.getMessage() for r in caplog.records if "Caught exception" in r.getMessage()]
    figures = {
        "cycles": cycles, "injected": injected, "reconnects": len(onlines), "alerts_raised": len(journaled),
        "lost": len(set(journaled) - ids(unique)), "paho_logged_exceptions": len(caught),
        "outbox_depth_after_stop": agent_files.read_outbox(tmp_path / "outbox.sqlite").depth,
    }
    reliability.report("callback_exceptions", figures)
    assert injected == armed, (injected, armed)
    assert figures["lost"] == 0
    assert figures["outbox_depth_after_stop"] == 0
    assert [a["alert_id"] for a in unique] == journaled
    assert json.dumps(figures)  # figures stay JSON-serialisable
