"""The durable outbox: crash survival (a real SIGKILL), seq allocation, cap policy, state dedupe, disk full."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from shelfsight.shelf_agent.outbox import Outbox, OutboxError

ALERT_TOPIC = "shelfsight/s/c/alert"


def test_put_peek_ack_in_id_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        ids = [outbox.put(ALERT_TOPIC, f"a{i}".encode(), "alert") for i in range(5)]
        metrics_id = outbox.put("shelfsight/s/c/metrics", b"m", "metrics")
        batch = outbox.peek_batch(10)
        assert [m.id for m in batch] == [*ids, metrics_id]
        assert [m.payload for m in batch[:5]] == [b"a0", b"a1", b"a2", b"a3", b"a4"]
        assert (batch[0].qos, batch[0].retain, batch[-1].qos, batch[-1].retain) == (1, False, 0, False)
        assert [m.id for m in outbox.peek_batch(2, after_id=ids[1])] == ids[2:4]
        outbox.ack(ids[0])
        outbox.ack_many([ids[2], ids[3], 12345])  # an unknown id is ignored
        assert [m.id for m in outbox.peek_batch(10)] == [ids[1], ids[4], metrics_id]
        assert outbox.depth() == 3
        outbox.mark_attempts([ids[1]])
        assert outbox.peek_batch(1)[0].attempts == 1


def test_a_keyed_put_is_stored_once_even_after_its_ack_and_a_reopen(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        first = outbox.put(ALERT_TOPIC, b"a1", "alert", key="alert-1")
        assert first is not None
        assert outbox.put(ALERT_TOPIC, b"a1", "alert", key="alert-1") is None
        assert [m.id for m in outbox.peek_batch(10)] == [first]
        outbox.ack(first)
    with Outbox(tmp_path / "outbox.db") as outbox:  # a restart after the ack: still remembered
        assert outbox.put(ALERT_TOPIC, b"a1", "alert", key="alert-1") is None
        assert outbox.put(ALERT_TOPIC, b"a2", "alert", key="alert-2") is not None
        assert outbox.put(ALERT_TOPIC, b"unkeyed", "alert") is not None
        assert outbox.put(ALERT_TOPIC, b"unkeyed", "alert") is not None  # no key: no dedupe
        assert [m.payload for m in outbox.peek_batch(10)] == [b"a2", b"unkeyed", b"unkeyed"]


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox, pytest.raises(OutboxError, match="unknown message kind 'video'"):
        outbox.put("t", b"x", "video")


CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from shelfsight.shelf_agent.outbox import Outbox
    outbox = Outbox(sys.argv[1])
    for _ in range(3):
        seq = outbox.next_seq("cam-3")
        outbox.put("shelfsight/s/cam-3/alert", f"alert seq={seq}".encode(), "alert")
    print(seq, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: like a power cut of the process
    """
)


def test_written_messages_and_seq_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        assert outbox.next_seq("cam-3") == 1
        outbox.put(ALERT_TOPIC, b"before", "alert")
    for round_ in range(2):
        done = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(path)], capture_output=True, timeout=60)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        assert int(done.stdout) == 1 + 3 * (round_ + 1)
    with Outbox(path) as outbox:
        payloads = [m.payload for m in outbox.peek_batch(100)]
        assert payloads == [b"before"] + [f"alert seq={s}".encode() for s in range(2, 8)]
        assert outbox.next_seq("cam-3") == 8
        assert outbox.next_seq("cam-4") == 1  # per camera


def test_seq_is_strictly_increasing_across_threads(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        got: list[int] = []
        lock = threading.Lock()

        def allocate() -> None:
            for _ in range(25):
                seq = outbox.next_seq("cam")
                with lock:
                    got.append(seq)

        threads = [threading.Thread(target=allocate) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(got) == list(range(1, 101))


def test_cap_drops_oldest_non_alerts_first_then_alerts(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_messages=4) as outbox:
        put = {
            name: outbox.put(f"shelfsight/s/c/{kind}", name.encode(), kind)
            for name, kind in [("A1", "alert"), ("M1", "metrics"), ("S1", "snapshot"), ("A2", "alert")]
        }
        put["A3"] = outbox.put(ALERT_TOPIC, b"A3", "alert")  # over by one: the oldest non-alert (M1) goes
        assert [m.payload for m in outbox.peek_batch(10)] == [b"A1", b"S1", b"A2", b"A3"]
        put["M2"] = outbox.put("shelfsight/s/c/metrics", b"M2", "metrics")  # S1 is older than M2
        assert [m.payload for m in outbox.peek_batch(10)] == [b"A1", b"A2", b"A3", b"M2"]
        outbox.put(ALERT_TOPIC, b"A4", "alert")  # M2 goes; only alerts left
        outbox.put("shelfsight/s/c/metrics", b"M3", "metrics")  # the newcomer itself is the oldest non-alert
        assert [m.payload for m in outbox.peek_batch(10)] == [b"A1", b"A2", b"A3", b"A4"]
        assert (outbox.dropped_count, outbox.dropped_alerts) == (4, 0)
        outbox.put(ALERT_TOPIC, b"A5", "alert")  # nothing but alerts: the oldest alert is dropped, and counted
        assert [m.payload for m in outbox.peek_batch(10)] == [b"A2", b"A3", b"A4", b"A5"]
        assert (outbox.dropped_count, outbox.dropped_alerts) == (5, 1)
    with Outbox(path, max_messages=4) as reopened:  # counters are persisted
        assert reopened.stats() == {"depth": 4, "bytes": 8, "dropped": 5, "dropped_alerts": 1}


def test_byte_cap_drops_big_snapshots_before_alerts(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=1000) as outbox:
        outbox.put(ALERT_TOPIC, b"a" * 100, "alert")
        outbox.put("shelfsight/s/c/snapshot/1", b"j" * 600, "snapshot")
        outbox.put("shelfsight/s/c/snapshot/2", b"k" * 250, "snapshot")
        outbox.put(ALERT_TOPIC, b"b" * 100, "alert")  # 1050 bytes: the 600-byte snapshot goes
        assert [len(m.payload) for m in outbox.peek_batch(10)] == [100, 250, 100]
        assert outbox.stats() == {"depth": 3, "bytes": 450, "dropped": 1, "dropped_alerts": 0}


def test_retained_state_keeps_only_the_newest_pending_message(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.put("shelfsight/s/c/state", b"state-1", "state")
        outbox.put(ALERT_TOPIC, b"alert", "alert")
        outbox.put("shelfsight/s/other/state", b"other-camera", "state")
        outbox.put("shelfsight/s/c/state", b"state-2", "state")
        batch = outbox.peek_batch(10)
        assert [m.payload for m in batch] == [b"alert", b"other-camera", b"state-2"]
        assert batch[-1].retain is True
        assert outbox.dropped_count == 0  # superseded is not lost


def test_disk_full_is_a_one_line_error_and_the_outbox_keeps_working(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_file_bytes=64 * 1024) as outbox:
        ids = []
        with pytest.raises(OutboxError) as info:
            for _ in range(100):
                ids.append(outbox.put(ALERT_TOPIC, b"x" * 4000, "alert"))
        message = str(info.value)
        assert "\n" not in message and "outbox put (alert) failed" in message and "full" in message
        depth = outbox.depth()
        assert depth == len(ids) == len(outbox.peek_batch(1000))  # the failed put left nothing behind
        outbox.ack_many(ids[:5])
        outbox.put(ALERT_TOPIC, b"y" * 4000, "alert")  # freed pages are reused
        assert outbox.depth() == depth - 4


def test_unopenable_path_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutboxError, match="cannot open outbox"):
        Outbox(blocker / "outbox.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(OutboxError, match="cannot open outbox"):
        Outbox(garbage)
