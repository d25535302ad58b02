"""A ComfyUI websocket client (tests, benchmarks): collects every JSON message in a background thread."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import aiohttp


class WsClient:
    def __init__(self, base_url: str, client_id: str | None = None) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        self.url = base_url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._closed = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("websocket did not connect")

    async def _main(self) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(self.url, max_msg_size=64 * 2**20) as ws:
                self._ready.set()
                reader = asyncio.ensure_future(self._read(ws))
                await self._closed.wait()
                reader.cancel()

    async def _read(self, ws) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                message = msg.json()
                if isinstance(message.get("data"), dict):
                    message["data"]["_received"] = time.monotonic()  # latency as a browser would see it
                with self._lock:
                    self.messages.append(message)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._closed.set)
        self._thread.join(10)

    def of_type(self, kind: str) -> list[dict]:
        with self._lock:
            return [m["data"] for m in self.messages if m.get("type") == kind]

    def wait_for(self, predicate, timeout: float = 120.0, what: str = "message"):
        """The first data of a message for which predicate(type, data) is true."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self._lock:
                batch = self.messages[seen:]
            for m in batch:
                if predicate(m.get("type"), m.get("data")):
                    return m["data"]
            seen += len(batch)
            time.sleep(0.05)
        kinds = sorted({m.get("type") for m in self.messages})
        raise TimeoutError(f"no {what} within {timeout:.0f}s; message types seen: {kinds}")
