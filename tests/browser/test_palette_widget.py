"""The palette node's drawing widget in the real ComfyUI frontend: regions added and painted with the
mouse land in `regions_state` in the node's format, survive save/reload and copy exactly, queue to an
image, and stream live frames that follow edits."""
from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

PACK_DIR = Path(__file__).resolve().parents[2]
LIVE_WORKFLOW = PACK_DIR / "example_workflows" / "rcca_live_drawing.json"
DOCS = PACK_DIR / "docs"
SIZE = 256  # the canvas of the graphs built here: small keeps the tiny model fast on a CPU
BRUSH = 20


# ---- helpers --------------------------------------------------------------------------------------
def stroke(page, points, steps=6):
    """Drag the mouse through image-pixel points on the palette's drawing (one stroke)."""
    client = page.evaluate("(points) => rccaTest.clientPoints(rccaTest.palette(), points)", [list(p) for p in points])
    page.mouse.move(*client[0])
    page.mouse.down()
    for c in client[1:]:
        page.mouse.move(*c, steps=steps)
    page.mouse.up()


def state_text(page) -> str:
    return page.evaluate("() => rccaTest.palette().widgets.find((w) => w.name === 'regions_state').value")


def fresh_state_text(page) -> str:
    """The state re-encoded from the widget's canvases (no cached PNGs): what the drawing *is* now."""
    return page.evaluate("""() => { const c = rccaTest.palette().rccaCanvas;
        for (const r of c.regions) r.dataUrl = null; return JSON.stringify(c.state()); }""")


def masks(decode, text):
    width, height, specs = decode(text)
    return width, height, {s.name: s for s in specs}


def add_region_in_ui(page, name, prompt, negative=""):
    """Click "+ region" and type into the new row, as a user would."""
    root = page.locator(".rcca-pal")
    root.locator("button.rcca-add").click()
    row = root.locator(".rcca-region").last
    row.locator("input.rcca-region-name").fill(name)
    row.locator("input.rcca-region-prompt").fill(prompt)
    if negative:
        row.locator("input.rcca-region-negative").fill(negative)
    row.locator("input.rcca-region-prompt").press("Tab")  # "change" commits without waiting for the typing pause


def painted_box(mask: torch.Tensor, threshold: float = 0.0):
    ys, xs = torch.nonzero(mask > threshold, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def build(page, ckpt, live=False):
    page.evaluate("([ckpt, size, live]) => { rccaTest.buildRegionsGraph(ckpt, size, live); }", [ckpt, SIZE, live])
    page.evaluate("() => rccaTest.show()")


def paint_two_regions(page):
    """fox: a horizontal stroke in the upper left; car: an L-shaped stroke in the lower right."""
    add_region_in_ui(page, "fox", "a red fox")
    stroke(page, [(40, 60), (110, 60)])
    add_region_in_ui(page, "car", "a blue car", negative="rust")
    stroke(page, [(150, 200), (220, 200), (220, 150)])


def wait_for(page, js, timeout=60_000, arg=None):
    page.wait_for_function(js, arg=arg, timeout=timeout)


def api_call(page, js):
    """Run `js` (an async function of the frontend's api object) in the page."""
    return page.evaluate(f"async () => {{ const api = await rccaTest.api(); return await ({js})(api); }}")


# ---- widget basics --------------------------------------------------------------------------------
@pytest.mark.smoke
def test_state_widget_hidden_but_serialized(page, browser_server):
    build(page, browser_server.ckpt_name)
    info = page.evaluate("""async () => {
        const n = rccaTest.palette(), w = n.widgets.find((x) => x.name === 'regions_state');
        n.rccaCanvas.addRegion({ name: 'a', prompt: 'x' });
        const wf = app.graph.serialize(), p = await app.graphToPrompt();
        // ids are numbers in the saved workflow, strings in memory in newer frontends
        const saved = wf.nodes.find((x) => String(x.id) === String(n.id));
        return { hidden: !n.isWidgetVisible(w), value: w.value, saved: saved.widgets_values,
                 api: p.output[String(n.id)].inputs, canvasWidget: n.widgets.at(-1).name,
                 displayed: n.rccaCanvas.display.getBoundingClientRect().width };
    }""")
    assert info["hidden"]
    assert info["displayed"] > 100
    assert info["canvasWidget"] == "rcca_canvas"
    assert info["value"] in info["saved"], "regions_state must be among widgets_values"
    assert len(info["saved"]) == 4, "the canvas widget itself must not add a value"
    assert info["api"]["regions_state"] == info["value"]
    assert "rcca_canvas" not in info["api"]
    state = json.loads(info["value"])
    assert state["version"] == 1 and state["width"] == SIZE and state["height"] == SIZE
    assert [r["name"] for r in state["regions"]] == ["a"]
    assert set(state["regions"][0]) == {"name", "color", "prompt", "negative", "opacity", "mask"}
    assert state["regions"][0]["mask"].startswith("data:image/png;base64,")


@pytest.mark.smoke
@pytest.mark.paints
def test_paint_two_regions_with_the_mouse(page, browser_server, decode):
    build(page, browser_server.ckpt_name)
    assert state_text(page) == ""
    paint_two_regions(page)
    text = state_text(page)
    width, height, regions = masks(decode, text)
    assert (width, height) == (SIZE, SIZE)
    assert list(regions) == ["fox", "car"]
    fox, car = regions["fox"], regions["car"]
    assert (fox.prompt, car.prompt, car.negative) == ("a red fox", "a blue car", "rust")
    assert fox.color.startswith("#") and fox.color != car.color
    # paint along the strokes, full coverage in their middle
    for x in range(45, 106, 10):
        assert fox.mask[60, x] == 1.0, x
    for x, y in [(160, 200), (200, 200), (220, 190), (220, 160)]:
        assert car.mask[y, x] == 1.0, (x, y)
    # and nothing far from them: the paint stays within the brush radius (plus a pixel of display rounding)
    r = BRUSH // 2 + 3
    x0, y0, x1, y1 = painted_box(fox.mask)
    assert 40 - r <= x0 and x1 <= 110 + r and 60 - r <= y0 and y1 <= 60 + r, (x0, y0, x1, y1)
    x0, y0, x1, y1 = painted_box(car.mask)
    assert 150 - r <= x0 and x1 <= 220 + r and 150 - r <= y0 and y1 <= 200 + r, (x0, y0, x1, y1)
    assert float(fox.mask[200:, :].max()) == 0.0 and float(car.mask[:100, :].max()) == 0.0


def test_soft_brush_eraser_undo_redo_clear_fill(page, browser_server, decode):
    build(page, browser_server.ckpt_name)
    add_region_in_ui(page, "soft", "mist")
    page.evaluate("() => rccaTest.palette().rccaCanvas.setTool({ opacity: 0.5 })")
    stroke(page, [(30, 128), (220, 128)])
    soft = masks(decode, state_text(page))[2]["soft"].mask
    assert abs(float(soft[128, 128]) - 0.5) <= 1 / 255  # alpha = opacity: a soft mask
    # a stroke crossing itself keeps one opacity (it does not build up within the stroke)
    page.evaluate("() => rccaTest.palette().rccaCanvas.setTool({ opacity: 0.5 })")
    stroke(page, [(128, 20), (128, 230), (128, 20)])
    cross = masks(decode, state_text(page))[2]["soft"].mask
    assert abs(float(cross[128, 128]) - 0.75) <= 1 / 255  # second stroke over the first: 0.5 + 0.5 * 0.5
    assert abs(float(cross[60, 128]) - 0.5) <= 1 / 255
    # eraser (full opacity) through the middle
    page.locator(".rcca-pal button.rcca-eraser").click()
    page.evaluate("() => rccaTest.palette().rccaCanvas.setTool({ opacity: 1 })")
    stroke(page, [(100, 128), (156, 128)])
    erased = masks(decode, state_text(page))[2]["soft"].mask
    assert float(erased[128, 128]) == 0.0 and abs(float(erased[128, 40]) - 0.5) <= 1 / 255
    # undo brings the erased paint back exactly; redo erases again
    page.locator(".rcca-pal button.rcca-undo").click()
    assert torch.equal(masks(decode, state_text(page))[2]["soft"].mask, cross)
    page.locator(".rcca-pal button.rcca-redo").click()
    assert torch.equal(masks(decode, state_text(page))[2]["soft"].mask, erased)
    # fill with the eraser off at 100 %: everything covered; clear: nothing (a region with a prompt stays)
    page.locator(".rcca-pal button.rcca-eraser").click()
    page.locator(".rcca-pal button.rcca-fill").click()
    assert float(masks(decode, state_text(page))[2]["soft"].mask.min()) == 1.0
    page.locator(".rcca-pal button.rcca-clear").click()
    assert float(masks(decode, state_text(page))[2]["soft"].mask.max()) == 0.0
    # removing a region is undoable too
    page.locator(".rcca-pal .rcca-region-remove").click()
    assert json.loads(state_text(page))["regions"] == []
    page.locator(".rcca-pal button.rcca-undo").click()
    assert [r["name"] for r in json.loads(state_text(page))["regions"]] == ["soft"]


def test_save_reload_and_copy_round_trip_exactly(page, browser_server, decode):
    build(page, browser_server.ckpt_name)
    paint_two_regions(page)
    page.evaluate("() => rccaTest.palette().rccaCanvas.setTool({ opacity: 0.35 })")
    stroke(page, [(30, 220), (90, 160)])  # a soft stroke on car too
    before = state_text(page)
    _, _, want = masks(decode, before)
    # save and load the workflow: canvases are rebuilt from the PNGs
    page.evaluate("""async () => {
        const wf = app.graph.serialize();
        await app.loadGraphData(wf, true, false);
        await rccaTest.palette().rccaCanvas.ready;
    }""")
    assert state_text(page) == before
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.regions.map((r) => r.name)") == ["fox", "car"]
    rebuilt = fresh_state_text(page)
    _, _, got = masks(decode, rebuilt)
    for name in want:
        assert torch.equal(got[name].mask, want[name].mask), name
    assert float(got["car"].mask.max()) == 1.0 and 0 < float(got["car"].mask[got["car"].mask > 0].min()) < 0.5
    # a copied node (clone + configure, what copy/paste does) draws the same
    page.evaluate("""async () => {
        const n = rccaTest.palette(), copy = n.clone();
        copy.pos = [n.pos[0], n.pos[1] + 2000];
        app.graph.add(copy);
        await copy.rccaCanvas.ready;
        for (const r of copy.rccaCanvas.regions) r.dataUrl = null;
        window.__copied = JSON.stringify(copy.rccaCanvas.state());
    }""")
    _, _, copied = masks(decode, page.evaluate("() => window.__copied"))
    for name in want:
        assert torch.equal(copied[name].mask, want[name].mask), name


def test_background_image_is_display_only(page, browser_server, tmp_path):
    from PIL import Image

    picture = tmp_path / "trace.png"
    Image.new("RGB", (64, 64), (0, 200, 0)).save(picture)
    build(page, browser_server.ckpt_name)
    add_region_in_ui(page, "fox", "a fox")
    stroke(page, [(40, 40), (80, 40)])
    before = state_text(page)
    page.locator(".rcca-pal input.rcca-bg-file").set_input_files(str(picture))
    wait_for(page, "() => rccaTest.palette().rccaCanvas.background !== null")
    pixel = page.evaluate("""() => new Promise((done) => requestAnimationFrame(() => {
        const c = rccaTest.palette().rccaCanvas;
        done(Array.from(c.display.getContext('2d').getImageData(200, 200, 1, 1).data)); }))""")
    assert pixel[:3] == [0, 200, 0], pixel  # shown where nothing is painted
    assert state_text(page) == before  # and never saved
    assert "trace" not in json.dumps(page.evaluate("() => app.graph.serialize()"))
    page.locator(".rcca-pal button.rcca-bg-clear").click()
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.background") is None


def test_comfyui_undo_restores_the_drawing(page, browser_server, decode):
    """Ctrl+Z on the graph rebuilds the node from ComfyUI's history: the widget redraws that state."""
    build(page, browser_server.ckpt_name)
    add_region_in_ui(page, "fox", "a fox")
    stroke(page, [(40, 60), (110, 60)])
    after_first = state_text(page)
    stroke(page, [(40, 200), (110, 200)])
    assert state_text(page) != after_first
    old_node = page.evaluate("() => { window.__old = rccaTest.palette(); return rccaTest.palette().id; }")
    page.keyboard.press("Control+z")
    wait_for(page, "(want) => rccaTest.palette().widgets.find((w) => w.name === 'regions_state').value === want",
             arg=after_first, timeout=10_000)
    page.evaluate("() => rccaTest.palette().rccaCanvas.ready")
    assert page.evaluate("() => rccaTest.palette() !== window.__old && rccaTest.palette().id") == old_node
    fox = masks(decode, fresh_state_text(page))[2]["fox"].mask
    assert float(fox[60, 75]) == 1.0 and float(fox[150:, :].max()) == 0.0


def test_greyscale_masks_from_python_load_exactly(page, browser_server, decode):
    """A state written by rcca_core.palette_state.encode_state (greyscale PNGs) loads with the node's rule."""
    from rcca_core.palette import RegionSpec
    from rcca_core.palette_state import encode_state

    ramp = torch.linspace(0, 1, SIZE).repeat(SIZE, 1)
    ramp = (ramp * 255).round() / 255
    disc = torch.zeros(SIZE, SIZE)
    disc[64:128, 150:220] = 0.6
    disc = (disc * 255).round() / 255
    text = encode_state([RegionSpec("sky", ramp, 0.8, name="sky", color="#42d4f4"),
                         RegionSpec("sun", disc, name="sun", color="#f58231")], SIZE, SIZE)
    build(page, browser_server.ckpt_name)
    page.evaluate("""async (text) => {
        const n = rccaTest.palette();
        n.widgets.find((w) => w.name === 'regions_state').value = text;
        const wf = app.graph.serialize();
        await app.loadGraphData(wf, true, false);
        await rccaTest.palette().rccaCanvas.ready;
    }""", text)
    assert state_text(page) == text
    _, _, got = masks(decode, fresh_state_text(page))
    assert torch.equal(got["sky"].mask, ramp) and torch.equal(got["sun"].mask, disc)
    assert got["sky"].strength == 0.8


def test_canvas_follows_width_and_height(page, browser_server, decode):
    build(page, browser_server.ckpt_name)
    add_region_in_ui(page, "fox", "a fox")
    stroke(page, [(20, 20), (120, 20)])
    page.evaluate("""() => { const n = rccaTest.palette();
        for (const [name, v] of [['width', 384], ['height', 128]]) {
            const w = rccaTest.setWidget(n, name, v); w.callback?.(v);
        } }""")
    wait_for(page, "() => JSON.parse(rccaTest.palette().widgets.find((w) => w.name === 'regions_state').value).width === 384")
    width, height, regions = masks(decode, state_text(page))
    assert (width, height) == (384, 128)
    fox = regions["fox"].mask
    assert fox.shape == (128, 384)
    x0, y0, x1, y1 = painted_box(fox, 0.5)
    # painted at 256 x 256: x 10..130, y 10..30 (stroke +- brush radius); stretched by 1.5 and 0.5
    assert 10 <= x0 <= 20 and 190 <= x1 <= 200 and 3 <= y0 <= 7 and 13 <= y1 <= 17, (x0, y0, x1, y1)
    aspect = page.evaluate("() => { const r = rccaTest.palette().rccaCanvas.display.getBoundingClientRect(); return r.width / r.height; }")
    assert abs(aspect - 3) < 0.05  # displayed scaled to fit, aspect kept


def test_queue_drawn_regions_to_an_image(page, browser_server, decode):
    build(page, browser_server.ckpt_name)
    paint_two_regions(page)
    value = state_text(page)
    known = set(browser_server.get_json("/history"))
    page.evaluate("() => app.queuePrompt(0, 1)")  # (its boolean is false on success in frontend 1.32.9)
    deadline = time.monotonic() + 180
    entry = None
    while time.monotonic() < deadline:
        new = {k: v for k, v in browser_server.get_json("/history").items() if k not in known}
        entry = next(iter(new.values()), None)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            break
        time.sleep(0.3)
    assert entry is not None, "the queued prompt never reached /history\n" + browser_server.log_tail()
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    prompt = entry["prompt"][2]
    palette = next(v for v in prompt.values() if v["class_type"] == "RCCARegionalPromptPalette")
    assert palette["inputs"]["regions_state"] == value  # the API prompt carries the drawing
    files = browser_server.outputs_images(entry)
    assert files and files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_example_live_workflow_loads(page, browser_server, decode):
    if not LIVE_WORKFLOW.is_file():
        pytest.skip(f"{LIVE_WORKFLOW.relative_to(PACK_DIR)} not there yet")
    wf = load_live_workflow(browser_server)
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, false, null, "
                  "{ showMissingNodesDialog: false, showMissingModelsDialog: false }); "
                  "await rccaTest.palette().rccaCanvas.ready; }", wf)
    page.evaluate("() => rccaTest.show()")
    original = next(n for n in wf["nodes"] if n["type"] == "RCCARegionalPromptPalette")
    saved = next(v for v in original["widgets_values"] if isinstance(v, str) and v.startswith("{"))
    assert state_text(page) == saved
    names = page.evaluate("() => rccaTest.palette().rccaCanvas.regions.map((r) => r.name)")
    assert names == [r["name"] for r in json.loads(saved)["regions"]]
    # painting into the workflow's own regions
    page.evaluate("() => rccaTest.palette().rccaCanvas.selectRegion(0)")
    stroke(page, [(60, 100), (200, 100)])
    width, height, regions = masks(decode, state_text(page))
    assert (width, height) == (512, 512)
    first = regions[names[0]].mask
    assert float(first[100, 130]) == 1.0 and float(first[300:, :].max()) == 0.0


def load_live_workflow(server) -> dict:
    wf = json.loads(LIVE_WORKFLOW.read_text())
    for n in wf["nodes"]:
        if n["type"] == "CheckpointLoaderSimple":
            n["widgets_values"][0] = server.ckpt_name
    return wf


# ---- live mode ------------------------------------------------------------------------------------
def test_live_events_drive_the_widget(page, browser_server):
    """Routing and display of the live websocket events, fed by hand (no server session needed)."""
    build(page, browser_server.ckpt_name)
    session = "ab" * 16
    node_id = page.evaluate("() => String(rccaTest.palette().id)")
    jpeg = _tiny_jpeg()
    api_call(page, f"""(api) => {{
        const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, {{ detail }}));
        send('rcca.live.frame', {{ session: '{session}', frame: 0, seq: 0, fps: 0, image: '{jpeg}' }});
        send('executed', {{ node: '99', output: {{ rcca_live: [{{ session: '{session}', palette_node: '{node_id}', width: 256, height: 256 }}] }} }});
        send('rcca.live.frame', {{ session: '{session}', frame: 3, seq: 2, fps: 4.5, image: '{jpeg}' }});
    }}""")
    info = page.evaluate("""() => { const c = rccaTest.palette().rccaCanvas;
        return { session: c.session, lastFrame: c.lastFrame, src: c.frameImg.src, shown: c.liveBox.style.display,
                 caption: c.frameCaption.textContent, pressed: c.liveButton.getAttribute('aria-pressed') }; }""")
    assert info["session"] == session and info["lastFrame"] == {"frame": 3, "seq": 2, "photoSeq": 0, "fps": 4.5}
    assert info["src"] == jpeg and info["shown"] == "" and info["pressed"] == "true"
    assert "frame 3" in info["caption"] and "4.5 frames/s" in info["caption"]
    api_call(page, f"""(api) => api.dispatchEvent(new CustomEvent('rcca.live.status', {{ detail:
        {{ session: '{session}', state: 'paused', reason: 'the queue is running', fps: 0, frames: 4, seq: 2 }} }}))""")
    assert "paused: the queue is running" in page.locator(".rcca-pal .rcca-status").inner_text()
    # an edit the worker refused (the stream keeps the last good one) shows until a running status clears it
    for reason, shown in (("edit 3 refused: a reason; still showing edit 2", True), (None, False)):
        api_call(page, f"""(api) => api.dispatchEvent(new CustomEvent('rcca.live.status', {{ detail:
            {{ session: '{session}', state: 'running', reason: {json.dumps(reason)}, fps: 1, frames: 5, seq: 3 }} }}))""")
        assert ("edit 3 refused: a reason" in page.locator(".rcca-pal .rcca-status").inner_text()) == shown
    # an edit to an unknown session is refused by the server: the error shows in the widget
    stroke_needs_region(page)
    wait_for(page, "() => /edit refused|edit failed/.test(document.querySelector('.rcca-pal .rcca-status').textContent)")
    api_call(page, f"""(api) => api.dispatchEvent(new CustomEvent('rcca.live.status', {{ detail:
        {{ session: '{session}', state: 'stopped', reason: 'idle', fps: 0, frames: 4, seq: 2 }} }}))""")
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.session") is None


def stroke_needs_region(page):
    add_region_in_ui(page, "fox", "a fox")
    stroke(page, [(40, 40), (80, 40)])


def test_live_needs_a_live_stream_node(page, browser_server):
    build(page, browser_server.ckpt_name)
    page.locator(".rcca-pal button.rcca-live-toggle").click()
    assert "Live Stream node" in page.locator(".rcca-pal .rcca-status").inner_text()
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.session") is None


def test_live_start_refused_shows_why(page, browser_server, live_available):
    if not live_available:
        pytest.skip("RCCALiveStream not available yet")
    build(page, browser_server.ckpt_name, live=True)
    add_region_in_ui(page, "fox", "a fox")
    live_button, status = page.locator(".rcca-pal button.rcca-live-toggle"), page.locator(".rcca-pal .rcca-status")
    refused = "() => document.querySelector('.rcca-pal .rcca-status').textContent.includes('live did not start')"
    # the Live Stream branch is invalid, the rest of the graph runs: the server lists it in node_errors
    page.evaluate("() => rccaTest.node('RCCALiveStream').disconnectInput('model')")
    live_button.click()
    wait_for(page, refused)
    assert "RCCALiveStream" in status.inner_text() and "model" in status.inner_text(), status.inner_text()
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.liveState") == "off"
    # the whole prompt refused (400): the server's message
    page.keyboard.press("Escape")  # ComfyUI's own error dialog
    page.evaluate("() => rccaTest.palette().disconnectInput('clip')")
    page.evaluate("() => { rccaTest.palette().rccaCanvas.live.error = ''; }")
    live_button.click()
    wait_for(page, refused)
    assert "Prompt outputs failed validation" in status.inner_text() or "clip" in status.inner_text(), status.inner_text()
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.session") is None


def start_live(page, server, min_frames=3, timeout=240):
    page.locator(".rcca-pal button.rcca-live-toggle").click()
    wait_for(page, "() => rccaTest.palette().rccaCanvas.session", timeout=timeout * 1000)
    wait_for(page, f"() => rccaTest.palette().rccaCanvas.live.frames >= {min_frames}", timeout=timeout * 1000)


def test_live_frames_follow_edits(page, browser_server, live_available, decode):
    if not live_available:
        pytest.skip("RCCALiveStream not available yet")
    build(page, browser_server.ckpt_name, live=True)
    add_region_in_ui(page, "fox", "a red fox")
    record_edits(page)
    t0 = time.monotonic()
    start_live(page, browser_server)
    started = time.monotonic() - t0
    first = page.evaluate("() => rccaTest.palette().rccaCanvas.lastFrame")
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.frameImg.src").startswith("data:image/jpeg;base64,")
    # an edit during live: the server acknowledges it with a sequence number, and a later frame carries it
    stroke(page, [(40, 60), (200, 60), (200, 200)])
    wait_for(page, "() => rccaTest.palette().rccaCanvas.lastEditSeq > 0", timeout=30_000)
    seq = page.evaluate("() => rccaTest.palette().rccaCanvas.lastEditSeq")
    wait_for(page, f"() => rccaTest.palette().rccaCanvas.lastFrame.seq >= {seq}", timeout=120_000)
    last = page.evaluate("() => rccaTest.palette().rccaCanvas.lastFrame")
    assert last["frame"] > first["frame"] and last["seq"] >= seq > first["seq"]
    status = page.locator(".rcca-pal .rcca-status").inner_text()
    assert "live: running" in status or "live: paused" in status, status
    assert "error" not in status.lower() and "refused" not in status, status
    check_later_edits_are_deltas(page)
    check_a_stale_base_makes_the_widget_resend_the_whole_drawing(page, browser_server)
    # removing every region: the server refuses the edit, the widget says why, the last drawing keeps streaming
    page.evaluate("() => { const c = rccaTest.palette().rccaCanvas; c.removeRegion(1); c.removeRegion(0); }")
    wait_for(page, "() => document.querySelector('.rcca-pal .rcca-status').textContent.includes('no region to render')")
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.session") is not None
    # stop: the server confirms through a status event
    page.locator(".rcca-pal button.rcca-live-toggle").click()
    wait_for(page, "() => rccaTest.palette().rccaCanvas.session === null && rccaTest.palette().rccaCanvas.liveState === 'stopped'")
    print(f"live: first frames after {started:.1f}s, {last['fps']} frames/s")


def test_live_draws_over_the_trace_image(page, browser_server, live_available, tmp_path):
    """The "photo" toggle sends the trace image (at the canvas size) as the photo the frames start from."""
    if not live_available:
        pytest.skip("RCCALiveStream not available yet")
    from PIL import Image

    picture = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (30, 90, 200)).save(picture)  # another size: the widget sends it as it shows it
    build(page, browser_server.ckpt_name, live=True)
    add_region_in_ui(page, "fox", "a red fox")
    page.locator(".rcca-pal input.rcca-bg-file").set_input_files(str(picture))
    wait_for(page, "() => rccaTest.palette().rccaCanvas.background !== null")
    photo = page.locator(".rcca-pal button.rcca-photo")
    photo.click()
    assert photo.get_attribute("aria-pressed") == "true"
    start_live(page, browser_server)
    wait_for(page, "() => rccaTest.palette().rccaCanvas.live.photoSeq === 1", timeout=60_000)
    wait_for(page, "() => rccaTest.palette().rccaCanvas.lastFrame.photoSeq === 1", timeout=120_000)
    assert "photo 1" in page.locator(".rcca-pal .rcca-caption").inner_text()
    status = page.locator(".rcca-pal .rcca-status").inner_text()
    assert "refused" not in status and "error" not in status.lower(), status
    photo.click()  # off: the frames are text-to-image again
    wait_for(page, "() => rccaTest.palette().rccaCanvas.lastFrame.photoSeq === 2", timeout=120_000)
    assert "trace" not in json.dumps(page.evaluate("() => app.graph.serialize()"))
    page.locator(".rcca-pal button.rcca-live-toggle").click()
    wait_for(page, "() => rccaTest.palette().rccaCanvas.session === null")


def record_edits(page):
    page.evaluate("""async () => {
        const api = await rccaTest.api(), fetchApi = api.fetchApi.bind(api);
        window.rccaEdits = [];
        api.fetchApi = async (url, options) => {
            const res = await fetchApi(url, options);
            if (url.endsWith('/edit')) window.rccaEdits.push({ body: options.body, status: res.status });
            return res;
        };
    }""")


def check_later_edits_are_deltas(page):
    """After the session's first edit the widget sends deltas; replayed through the server's decoder
    they rebuild exactly the drawing the widget saved. Needs record_edits from before the first edit."""
    from rcca_core.palette_state import read_state

    add_region_in_ui(page, "car", "a blue car")  # a new region: sent as a PNG, the fox as a reference
    stroke(page, [(150, 150), (190, 170)])
    page.evaluate("() => rccaTest.palette().rccaCanvas.selectRegion(0)")
    stroke(page, [(60, 200), (90, 210)])  # the fox again: only the stroke's box travels
    wait_for(page, """() => { const c = rccaTest.palette().rccaCanvas;
        return !c.liveSend.inflight && (c.lastEditSeq === window.rccaEdits.length || window.rccaEdits.some((e) => e.status !== 200)); }""",
             timeout=30_000)
    edits = page.evaluate("() => window.rccaEdits")
    assert all(e["status"] == 200 for e in edits), [e["status"] for e in edits]
    bodies = [json.loads(e["body"]) for e in edits]
    assert "base_seq" not in bodies[0] and all("base_seq" in b for b in bodies[1:]), \
        "the session's first edit is whole, every later one a delta"
    # the fox's second stroke travels as a patch over the fox, the car as a reference; under load a
    # later edit (the car's prompt, committed after a typing pause) may follow it with no patch at all
    states = [json.loads(b["regions_state"]) for b in bodies]
    stroke_edit = max(i for i, st in enumerate(states) if len(st["regions"]) == 2 and "patch" in st["regions"][0]["mask"])
    fox_stroke = states[stroke_edit]
    assert fox_stroke["regions"][1]["mask"] == {"base": 1} and set(fox_stroke["regions"][0]["mask"]) == {"base", "patch"}
    assert len(edits[stroke_edit]["body"]) < 4096, len(edits[stroke_edit]["body"])
    base = None
    for b in bodies:
        base = read_state(b["regions_state"], base=base.masks if base else None)
    saved = read_state(state_text(page))
    assert [r.prompt for r in base.specs] == [r.prompt for r in saved.specs] == ["a red fox", "a blue car"]
    for got, want in zip(base.masks, saved.masks):
        assert torch.equal(got, want)


def check_a_stale_base_makes_the_widget_resend_the_whole_drawing(page, server):
    """Another client's edit moves the session on: the widget's next delta gets 409 and it resends the whole drawing."""
    import urllib.request

    session = page.evaluate("() => rccaTest.palette().rccaCanvas.session")
    req = urllib.request.Request(f"{server.url}/rcca/live/{session}/edit", method="POST",
                                 data=json.dumps({"regions_state": state_text(page)}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
    page.evaluate("() => { window.rccaEdits = []; }")
    stroke(page, [(100, 100), (120, 110)])
    wait_for(page, "() => !rccaTest.palette().rccaCanvas.liveSend.inflight && window.rccaEdits.at(-1)?.status === 200",
             timeout=30_000)
    edits = page.evaluate("() => window.rccaEdits")
    assert [e["status"] for e in edits[:2]] == [409, 200] and all(e["status"] == 200 for e in edits[1:]), edits
    assert "base_seq" in json.loads(edits[0]["body"]) and "base_seq" not in json.loads(edits[1]["body"])
    assert "refused" not in page.locator(".rcca-pal .rcca-status").inner_text()


@pytest.mark.smoke
@pytest.mark.paints
def test_screenshot_for_docs(page, browser_server, live_available, view):
    """docs/palette_widget_<view>.png (and docs/palette_widget.png, the classic one, which the README
    shows): two painted regions and a live frame, on the newest frontend tested.
    Only with RCCA_SCREENSHOT=1, so CI never rewrites the committed pictures."""
    if os.environ.get("RCCA_SCREENSHOT") != "1":
        pytest.skip("set RCCA_SCREENSHOT=1 to regenerate docs/palette_widget_*.png")
    if browser_server.frontend_version != browser_server.newest_frontend:
        pytest.skip("the pictures show the newest frontend tested")
    build(page, browser_server.ckpt_name, live=live_available)
    page.evaluate("() => { rccaTest.setWidget(rccaTest.palette(), 'background', 'a sunny meadow, detailed photograph'); }")
    page.evaluate("() => rccaTest.palette().rccaCanvas.setTool({ size: 28 })")
    add_region_in_ui(page, "fox", "a red fox sitting in the grass")
    stroke(page, [(40, 150), (70, 120), (110, 130), (120, 180), (80, 200), (45, 185), (40, 150)])
    stroke(page, [(60, 160), (100, 160)])
    add_region_in_ui(page, "car", "a blue vintage car", negative="rust")
    page.evaluate("() => rccaTest.palette().rccaCanvas.setTool({ size: 36, opacity: 0.7 })")
    stroke(page, [(150, 190), (230, 190)])
    stroke(page, [(160, 165), (220, 165)])
    if live_available:
        start_live(page, browser_server, min_frames=2)  # left running: closing the page ends the session
    page.mouse.move(1300, 600)  # on the empty graph: no brush cursor, no tooltip in the picture
    page.wait_for_timeout(300)
    rect = page.evaluate("() => rccaTest.nodeClientRect(rccaTest.palette())")
    DOCS.mkdir(parents=True, exist_ok=True)
    pad = 8
    clip = {"x": max(0, rect["x"] - pad), "y": max(0, rect["y"] - pad),
            "width": rect["width"] + 2 * pad, "height": rect["height"] + 2 * pad}
    for name in [f"palette_widget_{view}.png"] + (["palette_widget.png"] if view == "classic" else []):
        page.screenshot(path=str(DOCS / name), clip=clip)
        assert (DOCS / name).stat().st_size > 10_000


def _tiny_jpeg() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
