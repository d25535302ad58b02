"""Live mode over HTTP and the websocket: sessions, edits, route validation, cleanup, isolation."""

import json
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


def live_prompt(server, idle_timeout=120.0):
    prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_live_drawing.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = server.ckpt_name
    prompt["4"]["inputs"]["idle_timeout"] = idle_timeout
    prompt["4"]["inputs"]["decode"] = "latent2rgb"  # the stream, not the VAE, is under test
    prompt["2"]["inputs"].update(width=SIZE, height=SIZE)  # its 512 px drawing is resized (same aspect ratio)
    return prompt


def start_live(server, ws, idle_timeout=120.0):
    status, body = server.post_json("/prompt", {"prompt": live_prompt(server, idle_timeout), "client_id": ws.client_id})
    assert status == 200, body
    executed = ws.wait_for(lambda t, d: t == "execution_error" or (t == "executed" and "rcca_live" in (d.get("output") or {})),
                           300, "live start")
    assert "output" in executed, f"live start failed: {executed.get('exception_type')}: {executed.get('exception_message')}"
    info = executed["output"]["rcca_live"][0]
    assert info["palette_node"] == "2" and (info["width"], info["height"]) == (SIZE, SIZE)
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
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


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
