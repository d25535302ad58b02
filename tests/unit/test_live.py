"""Live session bookkeeping: latest-wins edits, sequence numbers, idle timeout, registry, device gate."""

import threading
import time

import pytest

from rcca_core.live import SESSION_ID, DeviceGate, LiveRegistry, LiveSession, StaleBase


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_edits_replace_pending_ones_and_number_in_order():
    s = LiveSession("client", clock=Clock())
    assert SESSION_ID.match(s.id)
    assert s.edit("a") == 1 and s.edit("b") == 2
    assert s.take_edit() == (2, "b")  # only the latest state matters: memory stays bounded
    assert s.take_edit() is None
    s.stop("stopped by the user")
    with pytest.raises(RuntimeError, match="stopped"):
        s.edit("c")


def test_a_delta_must_be_based_on_the_last_accepted_edit():
    s = LiveSession("client", clock=Clock())
    with pytest.raises(StaleBase, match="no edit was accepted yet"):
        s.base(0)  # the queued drawing is no base: the first edit is always whole
    assert s.edit("a", kept="masks of 1") == 1
    assert s.base(1) == "masks of 1"
    assert s.edit("b", base_seq=1, kept="masks of 2") == 2
    with pytest.raises(StaleBase, match="base_seq 1 is not the last accepted edit of this session .the last accepted edit is 2"):
        s.base(1)
    # two deltas decoded against edit 2 at once: the second one to arrive is refused, not applied
    assert s.edit("c", base_seq=2, kept="masks of 3") == 3
    with pytest.raises(StaleBase):
        s.edit("d", base_seq=2, kept="masks of 4")
    assert s.take_edit() == (3, "c") and s.base(3) == "masks of 3"


def test_idle_timeout_counts_from_the_last_edit():
    clock = Clock()
    s = LiveSession("client", idle_timeout=5, clock=clock)
    clock.t = 4
    s.edit("a")
    clock.t = 8
    assert not s.idle()
    clock.t = 9.5
    assert s.idle()


def test_fps_over_recent_frames():
    clock = Clock()
    s = LiveSession("client", clock=clock)
    for i in range(11):
        clock.t = i * 0.1
        fps = s.frame_done()
    assert fps == pytest.approx(10.0) and s.frames == 11


def test_registry_keeps_one_session_per_client():
    reg = LiveRegistry()
    a1, a2, b = LiveSession("a"), LiveSession("a"), LiveSession("b")
    reg.start(a1)
    reg.start(b)
    reg.start(a2)
    assert a1.stopped and "replaced" in a1.stop_reason
    assert reg.get(a1.id) is None and reg.get(a2.id) is a2 and reg.get(b.id) is b
    reg.remove(a2)
    assert len(reg) == 1 and reg.of_client("a") == []


def test_gate_waits_for_the_worker_to_leave_and_keeps_workers_out():
    clock = Clock()
    gate = DeviceGate(clock=clock)
    assert gate.try_enter("a")
    done = []

    def prompt_arrives():
        done.append(gate.hold_off(grace=2.0, timeout=5.0))

    t = threading.Thread(target=prompt_arrives)
    t.start()
    deadline = time.monotonic() + 5
    while not gate.asked_to_leave() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.asked_to_leave() and not done  # still waiting: a worker is inside
    gate.leave("a")
    t.join(5)
    assert done == [True] and gate.inside is None
    assert not gate.try_enter("a")  # within the grace period
    clock.t = 2.5
    assert gate.try_enter("a")


def test_one_worker_inside_at_a_time_and_turns_are_signalled():
    gate = DeviceGate(clock=Clock())
    assert gate.try_enter("a")
    assert not gate.try_enter("b") and gate.others_waiting()
    gate.leave("a")
    assert not gate.try_enter("a")  # b waits: a must not take the next turn too
    assert gate.try_enter("b")
    assert not gate.try_enter("a")
    gate.forget("a")
    assert not gate.others_waiting()


def test_photos_replace_pending_ones_and_count_apart_from_edits():
    s = LiveSession("client", clock=Clock())
    assert s.edit("drawing", kept=["mask"]) == 1
    assert s.set_photo("a") == 1 and s.set_photo(None) == 2
    assert s.take_photo() == (2, None) and s.take_photo() is None
    assert s.seq == 1 and s.status()["photo_seq"] == 2  # a delta against edit 1 stays valid
    assert s.base(1) == ["mask"]
    s.stop("stopped by the user")
    with pytest.raises(RuntimeError, match="stopped"):
        s.set_photo("b")
