"""Live mode over HTTP and the websocket: sessions, edits, route validation, cleanup, isolation."""

import base64
import http.client
import io
import json
import random
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from comfy_ws import WsClient

PACK = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PACK))  # rcca_core only (pure torch): builds widget states like the browser does
import torch  # noqa: E402
from rcca_core.palette import RegionSpec  # noqa: E402
from rcca_core.palette_state import encode_state  # noqa: E402

SIZE = 128  # the example workflow paints at 512; 128 keeps the tiny model quick on 2 CPU cores


def live_prompt(server, idle_timeout=120.0, size=SIZE, **live_inputs):
    prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_live_drawing.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = server.ckpt_name
    prompt["4"]["inputs"]["idle_timeout"] = idle_timeout
    prompt["4"]["inputs"]["decode"] = "latent2rgb"  # the stream, not the VAE, is under test
    for key, value in live_inputs.items():  # None: leave the input out
        prompt["4"]["inputs"][key] = value
        if value is None:
            del prompt["4"]["inputs"][key]
    prompt["2"]["inputs"].update(width=size, height=size)  # its 512 px drawing is resized (same aspect ratio)
    return prompt


def start_live(server, ws, idle_timeout=120.0, size=SIZE, **live_inputs):
    prompt = live_prompt(server, idle_timeout, size, **live_inputs)
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": ws.client_id})
    assert status == 200, body
    executed = ws.wait_for(lambda t, d: t == "execution_error" or (t == "executed" and "rcca_live" in (d.get("output") or {})),
                           300, "live start")
    assert "output" in executed, f"live start failed: {executed.get('exception_type')}: {executed.get('exception_message')}"
    info = executed["output"]["rcca_live"][0]
    assert info["palette_node"] == "2" and (info["width"], info["height"]) == (size, size)
    return info["session"]


def drawing(left_paint: bool):
    mask = torch.zeros(SIZE, SIZE)
    if left_paint:
        mask[:, : SIZE // 2] = 1
    else:
        mask[:, SIZE // 2:] = 1
    return encode_state([RegionSpec("a red fox sitting in the grass", mask, name="fox", color="#e6194b"),
                         RegionSpec("a blue vintage car", torch.zeros(SIZE, SIZE), name="car", color="#4363d8")], SIZE, SIZE)


def post(server, path, raw: bytes, content_type="application/json"):
    req = urllib.request.Request(server.url + path, data=raw, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def post_body(server, path, raw: bytes, chunked=False):
    """POST raw bytes with a Content-Length, or chunked (as a browser's stream or a proxy may send)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        headers = {"Content-Type": "application/json"}
        if chunked:
            conn.request("POST", path, body=(raw[i:i + 2**16] for i in range(0, len(raw), 2**16)),
                         headers={**headers, "Transfer-Encoding": "chunked"}, encode_chunked=True)
        else:
            conn.request("POST", path, body=raw, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def frames_of(ws, session):
    return [d for d in ws.of_type("rcca.live.frame") if d["session"] == session]


def stop(server, session):
    return post(server, f"/rcca/live/{session}/stop", b"")


def test_live_session_streams_frames_and_an_edit_shows_in_a_later_frame(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    try:
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["frame"] >= 4, 120, "5 frames")
        first = frames_of(ws, session)
        assert all(f["seq"] == 0 and f["image"].startswith("data:image/jpeg;base64,") for f in first)
        status, body = post(comfy_server, f"/rcca/live/{session}/edit", json.dumps({"regions_state": drawing(True)}).encode())
        assert (status, body) == (200, {"seq": 1})
        edited = ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["seq"] == 1, 120, "edited frame")
        assert edited["frame"] > first[-1]["frame"]
        assert edited["image"] != first[-1]["image"]
        status, body = comfy_server.get_json(f"/rcca/live/{session}"), None
        assert status["state"] == "running" and status["seq"] == 1 and status["frames"] >= 5
        # noise 'fixed' (the live default): a drawing that does not change gives the same picture, byte for byte,
        # once the pipe is full (frames 0..S-2 left warm-up ticks of fewer rows, which may round differently)
        assert len({f["image"] for f in first if f["frame"] >= 3}) == 1
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["seq"] == 1
                    and d["frame"] >= edited["frame"] + 1, 120, "a second edited frame")
        after = [f for f in frames_of(ws, session) if f["seq"] == 1]
        assert len(after) >= 2 and len({f["image"] for f in after}) == 1
    finally:
        stop(comfy_server, session)
        ws.close()


def test_live_with_per_frame_noise_changes_every_frame(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws, noise="per_frame")
    try:
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["frame"] >= 5, 120, "6 frames")
        steady = [f["image"] for f in frames_of(ws, session) if f["frame"] >= 3]
        assert len(steady) >= 3 and len(set(steady)) == len(steady)
    finally:
        stop(comfy_server, session)
        ws.close()


def photo_prompt(server, image_size=SIZE):
    """The live workflow drawing over a photo: an image (EmptyImage, orange) and an inpaint mask (SolidMask)."""
    prompt = live_prompt(server)
    prompt["6"] = {"class_type": "EmptyImage", "inputs": {"width": image_size, "height": image_size, "batch_size": 1,
                                                          "color": 0xE08020}}
    prompt["7"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": image_size, "height": image_size}}
    prompt["4"]["inputs"].update(image=["6", 0], mask=["7", 0], strength=0.6)
    return prompt


def test_live_draws_over_a_photo_and_refuses_a_photo_of_another_size(comfy_server):
    ws = WsClient(comfy_server.url)
    status, body = comfy_server.post_json("/prompt", {"prompt": photo_prompt(comfy_server), "client_id": ws.client_id})
    assert status == 200, body
    executed = ws.wait_for(lambda t, d: t == "execution_error" or (t == "executed" and "rcca_live" in (d.get("output") or {})),
                           300, "live start over a photo")
    assert "output" in executed, executed.get("exception_message")
    session = executed["output"]["rcca_live"][0]["session"]
    try:
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["frame"] >= 3, 120, "4 frames")
        status, body = post(comfy_server, f"/rcca/live/{session}/edit", json.dumps({"regions_state": drawing(True)}).encode())
        assert status == 200
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["seq"] == 1, 120, "edited frame")
    finally:
        stop(comfy_server, session)
    status, body = comfy_server.post_json("/prompt", {"prompt": photo_prompt(comfy_server, SIZE // 2), "client_id": ws.client_id})
    assert status == 200, body
    error = ws.wait_for(lambda t, d: t == "execution_error", 300, "refused photo")
    assert "Live Stream: the image is 64 x 64 px but the frames are 128 x 128 px" in error["exception_message"]
    ws.close()


def photo_png(size=SIZE, fmt="PNG") -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(4)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def test_the_widget_photo_route_draws_over_a_photo_and_clearing_it_restores_the_stream(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    frame_of = lambda cond, what: ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and cond(d),
                                                120, what)
    photo = lambda body: post(comfy_server, f"/rcca/live/{session}/photo", json.dumps(body).encode())
    try:
        before = frame_of(lambda d: d["frame"] >= 4, "5 frames")
        for body, status, message in [
            ({"image": photo_png(SIZE // 2)}, 400, "photo is 64 x 64 px but the canvas is 128 x 128 px"),
            ({"image": photo_png(fmt="JPEG")}, 400, "photo must be a 'data:image/png;base64,...' string"),
            ({"image": 3}, 400, 'photo body must be {"image"'),
            ({"image": None, "strength": 1}, 400, 'photo body must be {"image"'),
        ]:
            got = photo(body)
            assert got[0] == status and message in got[1]["error"], got
        assert photo({"image": photo_png()}) == (200, {"photo_seq": 1})
        first = frame_of(lambda d: d["photo_seq"] == 1, "a frame over the photo")
        assert first["frame"] > before["frame"] and first["seq"] == 0
        steady = frame_of(lambda d: d["photo_seq"] == 1 and d["frame"] >= first["frame"] + 3, "steady over the photo")
        assert steady["image"] != before["image"]
        assert comfy_server.get_json(f"/rcca/live/{session}")["photo_seq"] == 1
        # without the photo again: same drawing, same fixed noise, the full timestep list: the same picture as before
        assert photo({"image": None}) == (200, {"photo_seq": 2})
        cleared = frame_of(lambda d: d["photo_seq"] == 2, "a frame without the photo")
        again = frame_of(lambda d: d["photo_seq"] == 2 and d["frame"] >= cleared["frame"] + 3, "steady without the photo")
        assert again["image"] == before["image"]
    finally:
        stop(comfy_server, session)
        ws.close()
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws, vae=None)
    try:
        got = photo({"image": photo_png()})
        assert got[0] == 409 and "connect a VAE to the Live Stream node" in got[1]["error"], got
    finally:
        stop(comfy_server, session)
        ws.close()


def test_routes_validate_payloads_and_the_server_keeps_serving(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    try:
        edit = f"/rcca/live/{session}/edit"
        cases = [
            ("/rcca/live/not-a-session/edit", b"{}", 400, "malformed session id"),
            ("/rcca/live/" + "0" * 32 + "/edit", b"{}", 404, "no live session"),
            (edit, b"{not json", 400, "must be JSON"),
            (edit, json.dumps({"regions_state": 5}).encode(), 400, "'regions_state' is a string"),
            (edit, json.dumps([1, 2]).encode(), 400, "'regions_state' is a string"),
            (edit, json.dumps({"regions_state": json.dumps({"version": 1, "width": SIZE, "height": SIZE, "regions": [
                {"prompt": "x", "mask": "data:image/png;base64,AAAA"}]})}).encode(), 400, "cannot be decoded"),
            (edit, json.dumps({"regions_state": "{"}).encode(), 400, "not valid JSON"),
            (edit, json.dumps({"regions_state": encode_state([RegionSpec("x", torch.ones(64, 96))], 96, 64)}).encode(),
             409, f"the drawing is 96 x 64 but this live session renders {SIZE} x {SIZE}"),
            (edit, b"x" * (33 * 2**20), 413, "larger than"),
        ]
        for path, raw, want_status, message in cases:
            status, body = post(comfy_server, path, raw)
            assert status == want_status and message in body.get("error", ""), (path, status, body)
        assert comfy_server.get("/object_info")[0] == 200
        n = len(frames_of(ws, session))
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["frame"] >= n + 2, 120, "frames after bad edits")
    finally:
        stop(comfy_server, session)
        ws.close()


def wait_gone(server, session, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _ = server.get(f"/rcca/live/{session}")
        if status == 404:
            return True
        time.sleep(0.2)
    return False


def test_session_is_cleaned_up_after_disconnect(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session, 120, "a frame")
    ws.close()
    assert wait_gone(comfy_server, session)


def test_session_is_cleaned_up_after_idle_timeout(comfy_server):
    ws = WsClient(comfy_server.url)
    try:
        session = start_live(comfy_server, ws, idle_timeout=2.0)
        stopped = ws.wait_for(lambda t, d: t == "rcca.live.status" and d["session"] == session and d["state"] == "stopped",
                              60, "idle stop")
        assert "idle" in stopped["reason"]
        assert wait_gone(comfy_server, session, 10)
    finally:
        ws.close()


def test_two_sessions_do_not_see_each_other(comfy_server):
    a, b = WsClient(comfy_server.url), WsClient(comfy_server.url)
    try:
        sa = start_live(comfy_server, a)
        sb = start_live(comfy_server, b)
        assert sa != sb
        assert post(comfy_server, f"/rcca/live/{sa}/edit", json.dumps({"regions_state": drawing(False)}).encode())[0] == 200
        a.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == sa and d["seq"] == 1, 120, "A's edit")
        b.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == sb and d["frame"] >= 2, 120, "B's frames")
        assert comfy_server.get_json(f"/rcca/live/{sb}")["seq"] == 0
        assert {d["session"] for d in b.of_type("rcca.live.frame")} == {sb}
        assert {d["session"] for d in a.of_type("rcca.live.frame")} == {sa}
    finally:
        for s in (sa, sb):
            stop(comfy_server, s)
        a.close()
        b.close()


def test_live_pauses_while_the_queue_runs(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    try:
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session, 120, "a frame")
        prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_regions_lcm.json").read_text())
        prompt["1"]["inputs"]["ckpt_name"] = comfy_server.ckpt_name
        prompt["13"]["inputs"]["steps"] = 2
        entry = comfy_server.run(prompt, timeout=300)
        assert entry["status"]["status_str"] == "success"
        paused = ws.wait_for(lambda t, d: t == "rcca.live.status" and d["session"] == session and d["state"] == "paused", 5, "pause")
        assert "queue" in paused["reason"]
        ws.wait_for(lambda t, d: t == "rcca.live.status" and d["session"] == session and d["state"] == "running"
                    and d["frames"] > 0, 60, "resume")
    finally:
        stop(comfy_server, session)
        ws.close()


def padded_edit(size: int) -> bytes:
    """An edit body of exactly `size` bytes: a real drawing, padded with JSON whitespace."""
    state = drawing(True)
    raw = json.dumps({"regions_state": state}).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_edit_bodies_up_to_32_mib_are_accepted_and_larger_ones_get_413(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    edit = f"/rcca/live/{session}/edit"
    try:
        seq = 0
        for mib in (1, 5, 20):
            raw = padded_edit(mib * 2**20)
            for chunked in (False, True):
                seq += 1
                assert post_body(comfy_server, edit, raw, chunked) == (200, {"seq": seq}), (mib, chunked)
        raw = padded_edit(40 * 2**20)
        for chunked in (False, True):
            status, body = post_body(comfy_server, edit, raw, chunked)
            assert status == 413 and "larger than 32 MiB" in body["error"], (chunked, status, body)
        assert comfy_server.get_json(f"/rcca/live/{session}")["seq"] == seq
        # the 20 MiB drawing reached the stream
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["seq"] == seq, 120, "edited frame")
    finally:
        stop(comfy_server, session)
        ws.close()


def detailed_mask_png(seed: int, size: int) -> str:
    """A region painted with ~300 soft, thin strokes, saved like a browser canvas: white RGB, coverage in alpha."""
    from PIL import Image, ImageDraw

    rng, scale = random.Random(seed), 2  # strokes drawn at 2x and downsampled: antialiased edges
    big = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(big)
    for _ in range(300):
        x, y, points = rng.uniform(0, size), rng.uniform(0, size), []
        for _ in range(rng.randint(5, 30)):
            x, y = min(max(x + rng.uniform(-25, 25), 0), size), min(max(y + rng.uniform(-25, 25), 0), size)
            points.append((x * scale, y * scale))
        draw.line(points, fill=rng.randint(60, 255), width=int(rng.uniform(2, 10) * scale), joint="curve")
    alpha = big.resize((size, size), Image.LANCZOS)
    white = Image.new("L", (size, size), 255)
    rgba = Image.merge("RGBA", (white, white, white, alpha))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def regions_of(masks):
    return [{"name": f"r{i}", "color": "#e6194b", "prompt": f"object {i}", "negative": "", "opacity": 1.0, "mask": m}
            for i, m in enumerate(masks)]


def stroke_patch(x0, y0, x1, y1, width=12):
    """What the widget sends for a short stroke: the stroke's bounding box, RGBA, coverage in alpha."""
    from PIL import Image, ImageDraw

    w, h = abs(x1 - x0) + width, abs(y1 - y0) + width
    alpha = Image.new("L", (w, h), 0)
    ImageDraw.Draw(alpha).line([(width // 2, width // 2), (w - width // 2, h - width // 2)], fill=255, width=width)
    white = Image.new("L", (w, h), 255)
    buf = io.BytesIO()
    Image.merge("RGBA", (white, white, white, alpha)).save(buf, format="PNG")
    return {"x": min(x0, x1), "y": min(y0, y1), "png": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}


def test_a_realistic_drawing_is_accepted_and_strokes_then_cost_kilobytes(comfy_server):
    """512 x 512, 6 regions of detailed strokes: the whole state once, then deltas against the last accepted edit."""
    size = 512
    masks = [detailed_mask_png(i, size) for i in range(6)]
    full_state = json.dumps({"version": 1, "width": size, "height": size, "regions": regions_of(masks)})
    full = json.dumps({"regions_state": full_state}).encode()
    assert len(full) > 2 * 10**6  # what a browser sends for this drawing
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws, size=size)
    edit = f"/rcca/live/{session}/edit"
    try:
        assert post_body(comfy_server, edit, full) == (200, {"seq": 1})
        assert post_body(comfy_server, edit, full, chunked=True) == (200, {"seq": 2})
        # a stroke on region 3; the other regions unchanged
        refs = [{"base": i} for i in range(6)]
        refs[3] = {"base": 3, "patch": stroke_patch(200, 180, 260, 200)}
        delta = json.dumps({"base_seq": 2, "regions_state": json.dumps(
            {"version": 1, "width": size, "height": size, "regions": regions_of(refs)})}).encode()
        print(f"\nwire: full state {len(full):,} bytes, one-stroke delta {len(delta):,} bytes")
        assert len(delta) < 8 * 1024, len(delta)
        assert post_body(comfy_server, edit, delta) == (200, {"seq": 3})
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["seq"] == 3, 240, "delta frame")
        # a delta on a base that is not the last accepted edit: the widget falls back to the full state
        status, body = post_body(comfy_server, edit, delta)
        assert status == 409 and body.get("full_state_needed") is True and "the last accepted edit is 3" in body["error"], body
        no_base = json.dumps({"regions_state": json.loads(delta)["regions_state"]}).encode()
        status, body = post_body(comfy_server, edit, no_base)
        assert status == 400 and "names that edit in 'base_seq'" in body["error"], body
        status, body = post_body(comfy_server, edit, json.dumps({"base_seq": "3", "regions_state": ""}).encode())
        assert status == 400 and "'base_seq' must be the whole number" in body["error"], body
        assert comfy_server.get_json(f"/rcca/live/{session}")["seq"] == 3
    finally:
        stop(comfy_server, session)
        ws.close()


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_growth_mib(server, post) -> tuple[float, object]:
    """Peak RSS of the server process while `post()` runs, above its RSS just before (Linux)."""
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = vm_kib(pid, "VmRSS")
    result = post()
    return (vm_kib(pid, "VmHWM") - before) / 1024, result


def test_declared_sizes_are_refused_before_anything_large_is_allocated(comfy_server):
    from PIL import Image

    def blank_png(side):
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    big = blank_png(8192)  # a few KiB of PNG, 256 MiB as float32 coverage
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    edit = f"/rcca/live/{session}/edit"
    try:
        cases = [  # (body, status, message)
            ({"version": 1, "width": 8192, "height": 8192, "regions": regions_of([big] * 3)}, 409,
             f"the drawing is 8192 x 8192 but this live session renders {SIZE} x {SIZE}"),
            ({"version": 1, "width": SIZE, "height": SIZE, "regions": regions_of([big])}, 400,
             f"mask is 8192 x 8192 but the drawing is {SIZE} x {SIZE}"),
        ]
        for state, want_status, message in cases:
            raw = json.dumps({"regions_state": json.dumps(state)}).encode()
            growth, (status, body) = peak_growth_mib(comfy_server, lambda: post_body(comfy_server, edit, raw))
            print(f"\n{len(raw) / 1024:.0f} KiB edit declaring 8192 x 8192: {status}, peak RSS growth {growth:.1f} MiB")
            assert status == want_status and message in body["error"], body
            assert growth < 48, f"the server's peak RSS grew by {growth:.0f} MiB while refusing it"
    finally:
        stop(comfy_server, session)
        ws.close()


def test_an_edit_without_regions_is_refused_and_the_last_drawing_keeps_streaming(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    edit = f"/rcca/live/{session}/edit"
    try:
        assert post(comfy_server, edit, json.dumps({"regions_state": drawing(True)}).encode()) == (200, {"seq": 1})
        for state in ("", json.dumps({"version": 1, "width": SIZE, "height": SIZE, "regions": []})):
            status, body = post(comfy_server, edit, json.dumps({"regions_state": state}).encode())
            assert status == 400 and "no region to render" in body["error"], body
        assert comfy_server.get_json(f"/rcca/live/{session}")["seq"] == 1
        n = len(frames_of(ws, session))
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["frame"] >= n + 2 and d["seq"] == 1,
                    120, "frames of edit 1 after the refusals")
    finally:
        stop(comfy_server, session)
        ws.close()


def test_cancel_stops_a_live_session_and_says_so(comfy_server):
    ws = WsClient(comfy_server.url)
    session = start_live(comfy_server, ws)
    try:
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session, 120, "a frame")
        assert post(comfy_server, "/interrupt", b"")[0] == 200  # ComfyUI's Cancel with no prompt running
        stopped = ws.wait_for(lambda t, d: t == "rcca.live.status" and d["session"] == session and d["state"] == "stopped",
                              60, "stop on Cancel")
        assert stopped["reason"] == "stopped by Cancel (ComfyUI's interrupt)", stopped
        assert wait_gone(comfy_server, session, 10)
    finally:
        stop(comfy_server, session)
        ws.close()
