"""Live Stream: frames stream to the browser while the user paints on the palette node.

Queueing a graph with a Live Stream node starts (or restarts) the client's session: the node
renders the first frame (its IMAGE output) and hands the stream to a worker thread, which keeps
ticking and pushes every frame to the client over ComfyUI's websocket. The palette widget posts
edits to the pack's routes; a new drawing enters the pipe at the next tick. The worker never
fights the prompt queue for the device: while a prompt is queued or running it leaves
ComfyUI's sampler (so the executor may load and unload models) and says "paused".

Routes (JSON in and out; errors are {"error": message} with a 4xx status):
  POST /rcca/live/{session}/edit   {"regions_state": "<widget state>"}  -> {"seq": n}
                                   {"base_seq": n, "regions_state": "<delta>"}  -> {"seq": n + 1}
  POST /rcca/live/{session}/photo  {"image": "data:image/png;base64,..." | null} -> {"photo_seq": n}
  POST /rcca/live/{session}/stop                                        -> {"stopped": true}
  GET  /rcca/live/{session}                                             -> status
A delta's masks may refer to edit n's (see rcca_core.palette_state); a base_seq that is not the
last accepted edit gets 409 with "full_state_needed": true. Bodies over MAX_BODY get 413.
Websocket events to the session's client: rcca.live.frame {session, frame, seq, photo_seq, fps, image}
and rcca.live.status {session, state, reason, fps, frames, seq}.
ComfyUI's Cancel (POST /interrupt) stops a streaming session too, with the reason CANCELLED.
"""

from __future__ import annotations

import asyncio
import base64
import io as bytes_io
import json
import logging
import threading
import time

import torch
from comfy_api.latest import io

from ..rcca_core.live import SESSION_ID, DeviceGate, LiveRegistry, LiveSession, StaleBase
from ..rcca_core.palette import MAX_REGIONS, Palette, PaletteError
from ..rcca_core.palette_state import MAX_STATE_BYTES, CanvasMismatch, decode_photo, read_state
from ..rcca_core.stream import DEFAULT_LCM_INDICES
from . import types
from .palette import add_regions
from .stream import noise_input, strength_input
from .stream_runtime import CFG_MODES, DECODES, StreamRuntime

REGISTRY = LiveRegistry()
GATE = DeviceGate()
MAX_BODY = MAX_STATE_BYTES + 64 * 1024  # the state plus the JSON around it
# bounds the float32 masks one edit may decode (256 MiB): 16 regions at 2048 x 2048
MAX_EDIT_PIXELS = MAX_REGIONS * 2048 * 2048
CANCELLED = "stopped by Cancel (ComfyUI's interrupt)"
TICKS_PER_RUN = 500  # leave the sampler now and then: re-check the queue and release ComfyUI's run state
TICKS_PER_TURN = 4  # when several clients stream, each runs at least this many ticks per turn
log = logging.getLogger("rcca_palette.live")


class LiveRunner:
    """Drives one session: encodes prompts, builds palette states, ticks, decodes and sends frames."""

    def __init__(self, session: LiveSession, runtime: StreamRuntime, server, clip, palette: Palette,
                 jpeg_quality: int = 80) -> None:
        self.session = session
        self.runtime = runtime
        self.server = server
        self.clip = clip
        self.palette = palette
        self.chained = [r.spec for r in palette.regions[palette.drawn:]]
        self.jpeg_quality = int(jpeg_quality)
        self._contexts = {palette.background: palette.background_context}
        for r in palette.regions:
            self._contexts[r.spec.prompt] = r.context
            if r.negative_context is not None:
                self._contexts[r.spec.negative] = r.negative_context
        self.seq, self.condition, self.current = 0, runtime.condition(palette), palette
        self.photo_seq = 0
        self._pending_edit: tuple | None = None
        self._pending_photo: tuple | None = None
        self._seq_of_frame: dict[int, tuple[int, int]] = {}
        self._refused = False  # the widget shows a refusal until an edit applies again

    # -- prompts and states -------------------------------------------------------------------
    def _encode(self, text: str) -> torch.Tensor:
        ctx = self._contexts.get(text)
        if ctx is None:
            if len(self._contexts) > 256:  # bounded: keep the palette's own prompts
                self._contexts = {k: v for k, v in list(self._contexts.items())[:1 + 2 * len(self.palette.regions)]}
            ctx = self.clip.encode_from_tokens(self.clip.tokenize(text))
            self._contexts[text] = ctx
        return ctx

    def _needs_encoding(self, specs) -> bool:
        return any(s.prompt not in self._contexts or (s.negative.strip() and s.negative not in self._contexts) for s in specs)

    def _apply(self, edit) -> None:
        seq, specs = edit
        try:
            palette = Palette.build(add_regions(specs, self.chained), self.palette.background, self.palette.width,
                                    self.palette.height, self._encode, drawn=len(specs),
                                    encoder=self.palette.encoder)
            self.seq, self.condition, self.current = seq, self.runtime.condition(palette), palette
        except (PaletteError, ValueError) as e:  # keep streaming the last good state
            self._refused = True
            self._status("running", f"edit {seq} refused: {e}; still showing edit {self.seq}")
            return
        if self._refused:
            self._refused = False
            self._status("running")

    def _apply_photo(self, photo) -> None:
        """A photo from the widget (or None): encoded with the node's VAE, outside the sampler."""
        photo_seq, image = photo
        try:
            if self.runtime.set_image(image):  # other timesteps: the pipe restarts with this photo
                self._seq_of_frame.clear()
                self.condition = self.runtime.condition(self.current)
            self.photo_seq = photo_seq
        except (PaletteError, ValueError) as e:
            self._refused = True
            self._status("running", f"photo {photo_seq} refused: {e}; still showing photo {self.photo_seq}")
            return
        if self._refused:
            self._refused = False
            self._status("running")

    # -- frames -------------------------------------------------------------------------------
    def _emit(self, frame: int, x0: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        image = self.runtime.decode(self.runtime.latent_out(x0.unsqueeze(0)))
        pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        buf = bytes_io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=self.jpeg_quality)
        fps = self.session.frame_done()
        seq, photo_seq = self._seq_of_frame.pop(frame, (0, 0))
        self.server.send_sync("rcca.live.frame", {
            "session": self.session.id, "frame": frame, "seq": seq, "photo_seq": photo_seq, "fps": round(fps, 2),
            "image": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
        }, self.session.client_id)
        return image

    def _status(self, state: str, reason: str | None = None) -> None:
        self.session.state = state
        status = self.session.status()
        if reason:
            status["reason"] = reason
        self.server.send_sync("rcca.live.status", status, self.session.client_id)

    def _tick(self, engine) -> list:
        frame = engine.push(self.condition, self.runtime.source(0))  # one image for every frame (or none)
        self._seq_of_frame[frame] = (self.seq, self.photo_seq)
        return engine.tick()

    def first_frame(self) -> torch.Tensor:
        """Fill the pipe and return the first frame (the node's IMAGE output)."""
        out = []

        def body(engine):
            while not out:
                for frame, x0 in self._tick(engine):
                    out.append(self._emit(frame, x0))

        self.runtime.run(body)
        return out[0]

    # -- worker thread ------------------------------------------------------------------------
    def _stop_reason(self) -> str | None:
        if self.session.stopped:
            return self.session.stop_reason
        if self.session.client_id not in getattr(self.server, "sockets", {}):
            return "client disconnected"
        if self.session.idle():
            return f"idle for {self.session.idle_timeout:.0f} s"
        return None

    def _queue_busy(self) -> bool:
        queue = getattr(self.server, "prompt_queue", None)
        return queue is not None and queue.get_tasks_remaining() > 0

    def _body(self, engine) -> None:
        for turn in range(TICKS_PER_RUN):
            if self._stop_reason() or self._queue_busy() or GATE.asked_to_leave():
                return
            if turn >= TICKS_PER_TURN and GATE.others_waiting():
                return  # another client's session takes its turn
            photo = self.session.take_photo()
            if photo is not None:
                self._pending_photo = photo  # encode outside the sampler: the VAE may need loading
                return
            edit = self.session.take_edit()
            if edit is not None:
                if self._needs_encoding(edit[1]):
                    self._pending_edit = edit  # encode outside the sampler: CLIP may need loading
                    return
                self._apply(edit)
            for frame, x0 in self._tick(engine):
                self._emit(frame, x0)

    def run(self) -> None:
        try:
            while True:
                reason = self._stop_reason()
                if reason:
                    self.session.stop(reason)
                    break
                if self._queue_busy() or GATE.asked_to_leave():
                    if self.session.state != "paused":
                        self._status("paused", "the queue is running")
                    time.sleep(0.2)
                    continue
                if not GATE.try_enter(self.session.id):
                    time.sleep(0.005)  # another client's session has its turn
                    continue
                try:
                    self._resume()
                finally:
                    GATE.leave(self.session.id)
        except Exception as e:  # noqa: BLE001 - report any failure to the client, then end the session
            if _is_interrupt(e):
                self.session.stop(CANCELLED)
            else:
                log.exception("live session %s failed", self.session.id)
                self.session.stop(f"error: {type(e).__name__}: {e}")
        finally:
            GATE.forget(self.session.id)
            REGISTRY.remove(self.session)
            self._status("stopped")

    def _resume(self) -> None:
        if self._pending_edit is not None:
            edit, self._pending_edit = self._pending_edit, None
            with torch.no_grad():
                self._apply(edit)
        if self._pending_photo is not None:
            photo, self._pending_photo = self._pending_photo, None
            with torch.no_grad():
                self._apply_photo(photo)
        if self.session.state != "running":
            self._status("running")
        self.runtime.run(self._body)


class LiveStream(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCCALiveStream",
            display_name="Live Stream",
            category=types.CATEGORY,
            description="Starts a live session for this browser: frames stream to the palette widget while you paint. "
                        "Outputs the first frame. The session stops on request, when the browser leaves, or after "
                        "idle_timeout seconds without edits; it pauses while the prompt queue runs.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="An LCM model (or a model with an LCM-LoRA); RCCA-patched or not."),
                io.Clip.Input("clip", tooltip="Encodes prompts typed while live."),
                io.Conditioning.Input("positive", tooltip="The background prompt (the palette's background output)."),
                io.Conditioning.Input("negative"),
                types.Palette.Input("palette", tooltip="From the Regional Prompt Palette whose canvas you paint on."),
                io.String.Input("timesteps", default=", ".join(map(str, DEFAULT_LCM_INDICES))),
                io.Int.Input("schedule_steps", default=50, min=1, max=1000),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Combo.Input("region_mode", options=["rcca", "semantic_draw"], default="rcca"),
                io.Combo.Input("cfg_mode", options=list(CFG_MODES), default="none"),
                io.Float.Input("cfg", default=1.5, min=0.0, max=30.0, step=0.1),
                io.Combo.Input("decode", options=list(DECODES), default="auto"),
                io.Float.Input("idle_timeout", default=120.0, min=1.0, max=3600.0, step=1.0,
                               tooltip="Seconds without an edit before the session stops."),
                io.Int.Input("jpeg_quality", default=80, min=10, max=100),
                noise_input("fixed"),
                strength_input(),
                io.Vae.Input("vae", optional=True, tooltip="Decodes frames and encodes the image; a TAESD VAE keeps the stream fast."),
                io.Image.Input("image", optional=True,
                               tooltip="Draw over a photo: every frame starts from this image (encoded with the vae), noised "
                                       "to the first timestep strength keeps. One image of the canvas's size."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Inpaint: 1 = repaint, 0 = keep the image's pixels (as KSampler's noise mask)."),
            ],
            outputs=[io.Image.Output(display_name="first_frame")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()  # every queueing starts a new session

    @classmethod
    def execute(cls, model, clip, positive, negative, palette, timesteps, schedule_steps, seed, region_mode, cfg_mode,
                cfg, decode, idle_timeout, jpeg_quality, noise="fixed", strength=0.6, vae=None, image=None,
                mask=None) -> io.NodeOutput:
        server = _server()
        if server is None or not getattr(server, "client_id", None):
            raise PaletteError("Live Stream streams frames to a browser: queue it from the ComfyUI frontend "
                               "(or give a client_id when queueing over the API)")
        hidden = getattr(cls, "hidden", None)
        unique_id = str(getattr(hidden, "unique_id", None))
        prompt = getattr(hidden, "prompt", None) or {}
        source = prompt.get(unique_id, {}).get("inputs", {}).get("palette")
        palette_node = str(source[0]) if isinstance(source, list) and source else None
        latent_shape = (model.model.latent_format.latent_channels, palette.height // 8, palette.width // 8)
        runtime = StreamRuntime(model, positive, negative, latent_shape, timesteps, schedule_steps, seed, region_mode,
                                cfg_mode, cfg, "eager", decode, [palette], vae, node="Live Stream", noise=noise, image=image,
                                strength=strength, mask=mask)
        session = LiveSession(server.client_id, idle_timeout, info={
            "node": unique_id, "palette_node": palette_node, "width": palette.width, "height": palette.height,
            "chained_regions": len(palette.regions) - palette.drawn, "vae": vae is not None})
        runner = LiveRunner(session, runtime, server, clip, palette, jpeg_quality)
        REGISTRY.start(session)
        try:
            first = runner.first_frame()
        except BaseException:  # no worker will ever remove it: edits would be accepted and go nowhere
            session.stop("the first frame failed")
            REGISTRY.remove(session)
            raise
        threading.Thread(target=runner.run, name=f"rcca-live-{session.id[:8]}", daemon=True).start()
        ui = {"rcca_live": [{"session": session.id, "palette_node": palette_node, "width": palette.width,
                             "height": palette.height}]}
        return io.NodeOutput(first, ui=ui)


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def _is_interrupt(e: BaseException) -> bool:
    try:
        from comfy.model_management import InterruptProcessingException
    except ImportError:
        return False
    return isinstance(e, InterruptProcessingException)


def _error(status: int, message: str, **extra):
    from aiohttp import web

    return web.json_response({"error": message, **extra}, status=status)


class _Refused(Exception):
    def __init__(self, status: int, message: str, **extra) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


async def _read_body(request, limit: int) -> bytearray | None:
    """The body, or None when it is over `limit` bytes. aiohttp's read(n) returns whatever has
    arrived (not n bytes), and request.read() obeys the server-wide client_max_size instead."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return body


def _decode_edit(session: LiveSession, body: bytearray) -> int:
    """Validate and decode one edit body, queue it; returns its seq. Runs off the event loop."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Refused(400, 'edit body must be JSON: {"regions_state": "..."} or {"base_seq": n, "regions_state": "..."} '
                            f"({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("regions_state"), str):
        raise _Refused(400, "edit body must be an object whose 'regions_state' is a string (the palette widget's state)")
    base_seq = payload.get("base_seq")
    if base_seq is not None and (not isinstance(base_seq, int) or isinstance(base_seq, bool)):
        raise _Refused(400, f"'base_seq' must be the whole number an earlier edit answered (its seq), got {base_seq!r}; "
                            "leave it out to send the full state")
    canvas = (session.info.get("width"), session.info.get("height"))
    try:
        base = session.base(base_seq) if base_seq is not None else None
        state = read_state(payload["regions_state"], canvas=canvas, base=base, max_pixels=MAX_EDIT_PIXELS)
        if not state.specs and not session.info.get("chained_regions"):
            raise _Refused(400, "the drawing has no region to render (every region was removed, or none has a prompt); "
                                "the stream keeps showing the last drawing: add a region with a prompt")
        return session.edit(state.specs, base_seq=base_seq, kept=state.masks)
    except StaleBase as e:
        raise _Refused(409, str(e), full_state_needed=True) from None
    except CanvasMismatch as e:
        raise _Refused(409, str(e)) from None
    except PaletteError as e:
        raise _Refused(400, str(e)) from None
    except RuntimeError as e:  # the session stopped meanwhile
        raise _Refused(409, str(e)) from None


def _session_or_error(request):
    sid = request.match_info.get("session", "")
    if not SESSION_ID.match(sid):
        return None, _error(400, "malformed session id: expected 32 lowercase hex characters")
    session = REGISTRY.get(sid)
    if session is None:
        return None, _error(404, f"no live session {sid}: it stopped or never started; queue the Live Stream node again")
    return session, None


async def _post_decoded(request, decode, too_large: str, answer: str):
    """A POST on a session: read the body (413 beyond MAX_BODY), decode and queue it off the event
    loop with decode(session, body) -> seq, answer {answer: seq}; refusals become their status."""
    from aiohttp import web

    session, error = _session_or_error(request)
    if error:
        return error
    body = await _read_body(request, MAX_BODY)
    if body is None:
        return _error(413, too_large)
    try:
        seq = await asyncio.get_running_loop().run_in_executor(None, decode, session, body)
    except _Refused as e:
        return _error(e.status, str(e), **e.extra)
    return web.json_response({answer: seq})


async def edit_route(request):
    return await _post_decoded(
        request, _decode_edit,
        f"edit body is larger than {MAX_STATE_BYTES // 2**20} MiB (+{(MAX_BODY - MAX_STATE_BYTES) // 1024} KiB "
        "of JSON around the state); send a delta against the last accepted edit (base_seq), "
        "fewer regions or a smaller canvas", "seq")


def _decode_photo(session: LiveSession, body: bytearray) -> int:
    """Validate and decode one photo body, queue it; returns its photo_seq. Runs off the event loop."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Refused(400, f'photo body must be JSON: {{"image": "data:image/png;base64,..."}} or {{"image": null}} ({e})') from None
    if not isinstance(payload, dict) or set(payload) != {"image"} or not (payload["image"] is None or isinstance(payload["image"], str)):
        raise _Refused(400, 'photo body must be {"image": "data:image/png;base64,..."} (a PNG of the canvas size) '
                            'or {"image": null} (draw without a photo again)')
    if not session.info.get("vae"):
        raise _Refused(409, "drawing over a photo encodes it with the Live Stream node's VAE, and none is connected; "
                            "connect a VAE to the Live Stream node and press Live again")
    width, height = session.info.get("width"), session.info.get("height")
    try:
        image = None if payload["image"] is None else decode_photo(payload["image"], width, height)
        return session.set_photo(image)
    except PaletteError as e:
        raise _Refused(400, str(e)) from None
    except RuntimeError as e:  # the session stopped meanwhile
        raise _Refused(409, str(e)) from None


async def photo_route(request):
    return await _post_decoded(request, _decode_photo,
                               f"photo body is larger than {MAX_STATE_BYTES // 2**20} MiB; send a smaller PNG", "photo_seq")


async def stop_route(request):
    from aiohttp import web

    session, error = _session_or_error(request)
    if error:
        return error
    session.stop("stopped by the user")
    return web.json_response({"stopped": True})


async def status_route(request):
    from aiohttp import web

    session, error = _session_or_error(request)
    if error:
        return error
    return web.json_response(session.status())


def _hold_off_live_workers(json_data):
    """A prompt is about to be queued: live workers step off the model before the executor starts.
    Blocks the server's loop for at most one tick of a running stream."""
    if len(REGISTRY):
        GATE.hold_off()
    return json_data


def register_routes() -> None:
    """Add the routes and the prompt hook to ComfyUI's server when there is one (not in-process tests)."""
    server = _server()
    if server is None:
        return
    server.add_on_prompt_handler(_hold_off_live_workers)
    server.routes.post("/rcca/live/{session}/edit")(edit_route)
    server.routes.post("/rcca/live/{session}/photo")(photo_route)
    server.routes.post("/rcca/live/{session}/stop")(stop_route)
    server.routes.get("/rcca/live/{session}")(status_route)
