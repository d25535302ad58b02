"""What changes between frontends and views: the widget's layout in the classic and the Nodes 2.0 view,
a palette inside a subgraph, a Live start the frontend swallows, and two workflow tabs with the same
node id."""
from __future__ import annotations


import pytest

from test_palette_widget import SIZE, _tiny_jpeg, add_region_in_ui, api_call, build, masks, state_text, stroke

MIN_DRAWING_HEIGHT = 300  # the drawing box, in graph units (the widget asks for 420 px in all, toolbar included)
MAX_BACKGROUND_HEIGHT = 140  # the background prompt's box stays compact


@pytest.mark.smoke
def test_layout_keeps_the_drawing_area(page, browser_server, view, decode):
    """The node at its default size: a compact background box and a large drawing, in either view."""
    build(page, browser_server.ckpt_name)
    if view == "nodes2":  # the Vue node renders its widgets a few frames after the node is added
        page.wait_for_function("""() => { const t = document.querySelector(`[data-node-id="${rccaTest.palette().id}"] textarea`);
            return t && t.getBoundingClientRect().height > 0; }""")
    info = page.evaluate("""() => {
        const n = rccaTest.palette(), scale = app.canvas.ds.scale;
        const w = n.widgets.find((x) => x.name === 'background');
        // classic: the widget's own textarea; Nodes 2.0: the node's Vue textarea (its only one)
        const vue = document.querySelector(`[data-node-id="${n.id}"] textarea`);
        const box = vue ?? w.element ?? w.inputEl;
        return { vue: !!document.querySelector(`[data-node-id="${n.id}"]`),
                 background: box.getBoundingClientRect().height / scale,
                 drawing: n.rccaCanvas.canvasBox.getBoundingClientRect().height / scale,
                 drawingWidth: n.rccaCanvas.canvasBox.getBoundingClientRect().width / scale,
                 nodeHeight: n.size[1] };
    }""")
    assert info["vue"] == (view == "nodes2"), info
    assert 20 <= info["background"] <= MAX_BACKGROUND_HEIGHT, info
    assert info["drawing"] >= MIN_DRAWING_HEIGHT and info["drawingWidth"] >= 500, info
    # and it stays usable: painting still lands where the mouse is (the 1.3x Vue view used to drag the node)
    add_region_in_ui(page, "fox", "a fox")
    stroke(page, [(40, 60), (110, 60)])
    fox = masks(decode, state_text(page))[2]["fox"].mask
    assert float(fox[60, 75]) == 1.0 and float(fox[150:, :].max()) == 0.0


def _into_subgraph(page):
    """Convert the palette node into a subgraph and open it; returns (subgraph node id, palette id)."""
    supported = page.evaluate("() => typeof rccaTest.root().convertToSubgraph === 'function'")
    if not supported:
        pytest.skip(f"frontend {page.rcca_frontend} has no subgraphs")
    return page.evaluate("""async () => {
        const root = rccaTest.root(), pal = rccaTest.palette();
        const { node } = root.convertToSubgraph(new Set([pal]));
        app.canvas.setGraph(node.subgraph);
        const inner = rccaTest.palette();
        await inner.rccaCanvas.ready;
        return [String(node.id), String(inner.id)];
    }""")


def test_palette_inside_a_subgraph(page, browser_server, decode):
    """Draws, serializes, queues (as execution id "<subgraph node>:<palette>") and receives live frames."""
    build(page, browser_server.ckpt_name)
    add_region_in_ui(page, "fox", "a red fox")
    outer, inner = _into_subgraph(page)
    page.evaluate("() => rccaTest.show()")
    stroke(page, [(40, 60), (110, 60)])
    text = state_text(page)
    fox = masks(decode, text)[2]["fox"].mask
    assert float(fox[60, 75]) == 1.0
    info = page.evaluate("""async () => {
        const wf = rccaTest.root().serialize(), p = await app.graphToPrompt();
        const defs = wf.definitions?.subgraphs ?? [];
        const saved = defs.flatMap((d) => d.nodes).find((x) => x.type === 'RCCARegionalPromptPalette');
        return { saved: saved?.widgets_values ?? null, keys: Object.keys(p.output),
                 api: Object.entries(p.output).find(([k, v]) => v.class_type === 'RCCARegionalPromptPalette') };
    }""")
    assert info["saved"] and text in info["saved"]
    assert info["api"][0] == f"{outer}:{inner}" and info["api"][1]["inputs"]["regions_state"] == text
    # live frames reported for the execution id reach the widget inside the subgraph
    session, jpeg = "cd" * 16, _tiny_jpeg()
    api_call(page, f"""(api) => {{
        const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, {{ detail }}));
        send('executed', {{ node: '9', output: {{ rcca_live: [{{ session: '{session}', palette_node: '{outer}:{inner}', width: {SIZE}, height: {SIZE} }}] }} }});
        send('rcca.live.frame', {{ session: '{session}', frame: 2, seq: 1, fps: 3, image: '{jpeg}' }});
    }}""")
    got = page.evaluate("() => { const c = rccaTest.palette().rccaCanvas; return [c.session, c.frameImg.src, c.liveBox.style.display]; }")
    assert got == [session, jpeg, ""]


def test_a_swallowed_live_start_leaves_the_widget_idle(page, browser_server):
    """app.queuePrompt may return without calling the api (newer frontends): Live must not stay "starting"."""
    build(page, browser_server.ckpt_name, live=True)
    add_region_in_ui(page, "fox", "a fox")
    page.evaluate("() => { window.__queue = app.queuePrompt; app.queuePrompt = async () => false; }")
    page.locator(".rcca-pal button.rcca-live-toggle").click()
    page.wait_for_function("() => rccaTest.palette().rccaCanvas.liveState === 'off'", timeout=10_000)
    status = page.locator(".rcca-pal .rcca-status").inner_text()
    assert "live did not start" in status and "did not queue" in status, status
    assert page.locator(".rcca-pal button.rcca-live-toggle").inner_text() == "Live"
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.session") is None


def test_two_workflow_tabs_do_not_share_a_live_display(page, browser_server):
    build(page, browser_server.ckpt_name)
    node_id = page.evaluate("() => String(rccaTest.palette().id)")
    session, jpeg = "ef" * 16, _tiny_jpeg()
    api_call(page, f"""(api) => {{
        const send = (type, detail) => api.dispatchEvent(new CustomEvent(type, {{ detail }}));
        send('executed', {{ node: '9', output: {{ rcca_live: [{{ session: '{session}', palette_node: '{node_id}', width: {SIZE}, height: {SIZE} }}] }} }});
        send('rcca.live.frame', {{ session: '{session}', frame: 1, seq: 0, fps: 1, image: '{jpeg}' }});
    }}""")
    assert page.evaluate("() => rccaTest.palette().rccaCanvas.session") == session
    first = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    # the same workflow opened again in a second tab: the same node id, another node
    page.evaluate("""async () => {
        const wf = rccaTest.root().serialize();
        await app.loadGraphData(wf, true, false, 'second tab');
        await rccaTest.palette().rccaCanvas.ready;
    }""")
    second = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    assert second != first
    assert page.evaluate("() => String(rccaTest.palette().id)") == node_id
    got = page.evaluate("() => { const c = rccaTest.palette().rccaCanvas; return [c.session, c.liveBox.style.display, c.lastFrame]; }")
    assert got == [None, "none", None]
