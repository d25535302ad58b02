"""Live drawing sessions: the bookkeeping around a stream that runs while the user paints.

A session belongs to one client. Edits arrive from the web server's thread and are taken by
the stream's worker thread: only the latest palette state matters, so a new edit replaces a
pending one (memory stays bounded however fast the user draws) and gets the next sequence
number; frames carry the sequence number of the state they were rendered with, which is how
the client sees when an edit reached the screen. A session stops on request, when its client
disconnects, after an idle timeout without edits, or on an error.

The session also keeps what the last accepted edit decoded to (`kept`), so the next edit may be
a delta against it: the client names that edit's sequence number as its base, and an edit based
on anything else is refused (StaleBase) so the client resends the whole drawing.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import deque
from typing import Any, Callable

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


class StaleBase(RuntimeError):
    """A delta edit names a base that is not the session's last accepted edit."""


class LiveSession:
    def __init__(self, client_id: str, idle_timeout: float = 120.0, clock: Callable[[], float] = time.monotonic,
                 info: dict | None = None) -> None:
        self.id = secrets.token_hex(16)
        self.client_id = client_id
        self.idle_timeout = float(idle_timeout)
        self.info = dict(info or {})
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: tuple[int, Any] | None = None
        self._seq = 0
        self._kept: Any = None  # what the last accepted edit decoded to (the base of a delta)
        self._last_activity = clock()
        self._stop_reason: str | None = None
        self._pending_photo: tuple[int, Any] | None = None
        self._photo_seq = 0
        self._frame_times: deque[float] = deque(maxlen=30)
        self.frames = 0
        self.state = "starting"

    # -- edits (web server thread) ----------------------------------------------------------
    def edit(self, payload: Any, base_seq: int | None = None, kept: Any = None) -> int:
        """Queue a new palette state; a pending one is replaced. Returns its sequence number.
        `base_seq`: the edit this one was decoded against (a delta); StaleBase if another edit was
        accepted since, checked under the lock because deltas decode outside it. `kept`: what the
        next delta may refer to."""
        with self._lock:
            if self._stop_reason is not None:
                raise RuntimeError(f"session stopped ({self._stop_reason})")
            if base_seq is not None and (base_seq != self._seq or self._kept is None):
                raise StaleBase(self._stale_message(base_seq))
            self._seq += 1
            self._pending = (self._seq, payload)
            self._kept = kept
            self._last_activity = self._clock()
            return self._seq

    def base(self, base_seq: int) -> Any:
        """What edit `base_seq` decoded to; StaleBase unless it is the last accepted edit."""
        with self._lock:
            if base_seq != self._seq or self._kept is None:
                raise StaleBase(self._stale_message(base_seq))
            return self._kept

    def _stale_message(self, base_seq: int) -> str:
        last = f"the last accepted edit is {self._seq}" if self._kept is not None else "no edit was accepted yet"
        return f"base_seq {base_seq} is not the last accepted edit of this session ({last}); send the full state, without base_seq"

    def set_photo(self, photo: Any) -> int:
        """Queue a new photo to draw over (None: none); a pending one is replaced. Returns its
        number (photo_seq), counted apart from the drawing's edits so deltas keep their base."""
        with self._lock:
            if self._stop_reason is not None:
                raise RuntimeError(f"session stopped ({self._stop_reason})")
            self._photo_seq += 1
            self._pending_photo = (self._photo_seq, photo)
            self._last_activity = self._clock()
            return self._photo_seq

    def take_photo(self) -> tuple[int, Any] | None:
        with self._lock:
            pending, self._pending_photo = self._pending_photo, None
            return pending

    def touch(self) -> None:
        with self._lock:
            self._last_activity = self._clock()

    # -- worker thread ------------------------------------------------------------------
    def take_edit(self) -> tuple[int, Any] | None:
        with self._lock:
            pending, self._pending = self._pending, None
            return pending

    def frame_done(self) -> float:
        """Count a frame; returns frames/s over the last 30 frames."""
        now = self._clock()
        with self._lock:
            self.frames += 1
            self._frame_times.append(now)
            return self._fps()

    def _fps(self) -> float:
        if len(self._frame_times) < 2:
            return 0.0
        span = self._frame_times[-1] - self._frame_times[0]
        return (len(self._frame_times) - 1) / span if span > 0 else 0.0

    @property
    def fps(self) -> float:
        with self._lock:
            return self._fps()

    @property
    def seq(self) -> int:
        return self._seq

    def idle(self) -> bool:
        with self._lock:
            return self._clock() - self._last_activity > self.idle_timeout

    # -- lifecycle ----------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason

    @property
    def stopped(self) -> bool:
        return self._stop_reason is not None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def status(self) -> dict:
        return {"session": self.id, "state": "stopped" if self.stopped else self.state, "reason": self._stop_reason,
                "frames": self.frames, "fps": round(self.fps, 2), "seq": self._seq, "photo_seq": self._photo_seq,
                **self.info}


class LiveRegistry:
    """Sessions by id; one per client: a client starting a new session stops its old one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, LiveSession] = {}

    def start(self, session: LiveSession) -> None:
        with self._lock:
            for old in [s for s in self._sessions.values() if s.client_id == session.client_id]:
                old.stop("replaced by a new session")
                del self._sessions[old.id]
            self._sessions[session.id] = session

    def get(self, session_id: str) -> LiveSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def remove(self, session: LiveSession) -> None:
        with self._lock:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def of_client(self, client_id: str) -> list[LiveSession]:
        with self._lock:
            return [s for s in self._sessions.values() if s.client_id == client_id]


class DeviceGate:
    """Keeps live workers and ComfyUI's prompt executor off the model at the same time.

    ComfyUI's samplers keep per-model run state (the model's current patcher, loaded weights), so
    two samplings of one model must never overlap. One worker at a time is inside (sessions of
    several clients take turns: a worker leaves when `others_waiting`); it leaves between ticks
    when asked. `hold_off` (called when a prompt arrives, before it is queued) asks the worker to
    leave, waits until none is inside, and keeps workers out for a grace period, by which time
    the queue is busy and the workers wait for it anyway.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._inside: str | None = None
        self._last: str | None = None
        self._waiting: set[str] = set()
        self._closed_until = 0.0
        self._clock = clock

    def try_enter(self, who: str) -> bool:
        with self._cond:
            if self._clock() < self._closed_until:
                return False
            if self._inside is not None or (who == self._last and self._waiting - {who}):
                self._waiting.add(who)  # taking turns: whoever just left lets a waiting worker in first
                return False
            self._inside = self._last = who
            self._waiting.discard(who)
            return True

    def leave(self, who: str) -> None:
        with self._cond:
            if self._inside == who:
                self._inside = None
            self._cond.notify_all()

    def forget(self, who: str) -> None:
        """A stopped worker no longer waits for a turn."""
        with self._cond:
            self._waiting.discard(who)

    def asked_to_leave(self) -> bool:
        return self._clock() < self._closed_until

    def others_waiting(self) -> bool:
        with self._cond:
            return bool(self._waiting)

    def hold_off(self, grace: float = 2.0, timeout: float = 30.0) -> bool:
        """Close the gate for `grace` seconds and wait until no worker is inside; False on timeout."""
        with self._cond:
            self._closed_until = max(self._closed_until, self._clock() + grace)
            return self._cond.wait_for(lambda: self._inside is None, timeout)

    @property
    def inside(self) -> str | None:
        with self._cond:
            return self._inside
