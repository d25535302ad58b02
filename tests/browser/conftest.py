"""Browser tests: Debian Chromium driven by Playwright (sync API) against real ComfyUI frontends
served by a stock ComfyUI server with the tiny random SD1.5 checkpoint.

Every test runs per frontend and per view:
- frontends: "pinned" (the comfyui-frontend-package ComfyUI's requirements install, 1.32.9 for
  ComfyUI 0.3.75) and every frontend scripts/setup_browser.sh installed under .host/frontends/<version>
  (the newest checked, served with --front-end-root). RCCA_FRONTENDS=pinned,1.58.1 chooses: "pinned",
  a version installed there, or the path of a frontend's static folder.
- views: "classic" (the litegraph canvas) and "nodes2" (the Nodes 2.0 Vue view, setting
  Comfy.VueNodes.Enabled). RCCA_VIEWS=classic,nodes2 chooses.
In the nodes2 view only the tests marked `smoke` run (CI time); RCCA_BROWSER_ALL=1 runs every test in
every view.

Fixtures: `browser_server` (session, per frontend: ComfyServer + tiny checkpoint), `browser` (Chromium),
`page` (one fresh frontend tab per test in its view, graph cleared, with `window.rccaTest` helpers),
`view`, `decode` (regions_state -> rcca_core's decoded regions), `live_available`.

The whole folder is skipped, with the reason, when Chromium or Playwright is missing;
`bash scripts/setup_browser.sh` installs both (Playwright never downloads a browser here)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PACK_DIR / "scripts"))  # comfy_server, random_checkpoints (unique names)
if str(PACK_DIR) not in sys.path:
    sys.path.append(str(PACK_DIR))  # rcca_core (pure torch); appended so ComfyUI's own `nodes` etc. win

from comfy_server import DEFAULT_COMFYUI, ComfyServer  # noqa: E402

COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR") or DEFAULT_COMFYUI).resolve()
FRONTENDS_DIR = PACK_DIR / ".host" / "frontends"
VIEWS = ("classic", "nodes2")
VUE_SETTING = "Comfy.VueNodes.Enabled"


def _pinned_version() -> str:
    try:
        from importlib.metadata import version
        return version("comfyui-frontend-package")
    except Exception:
        return "unknown"


def _frontends() -> list[tuple[str, Path | None]]:
    """(label, static folder or None for ComfyUI's own) for each frontend to test."""
    wanted = os.environ.get("RCCA_FRONTENDS")
    names = ([n.strip() for n in wanted.split(",") if n.strip()] if wanted else
             ["pinned"] + sorted((p.name for p in FRONTENDS_DIR.glob("*") if p.is_dir()),
                                 key=lambda v: [int(x) if x.isdigit() else x for x in v.split(".")]))
    out = []
    for name in names:
        if name == "pinned":
            out.append((_pinned_version(), None))
        elif (FRONTENDS_DIR / name / "comfyui_frontend_package" / "static").is_dir():
            out.append((name, FRONTENDS_DIR / name / "comfyui_frontend_package" / "static"))
        else:  # a path: the frontend's static folder (index.html inside)
            out.append((Path(name).resolve().parent.name if Path(name).name == "static" else Path(name).name, Path(name)))
    return out


def _views() -> list[str]:
    wanted = os.environ.get("RCCA_VIEWS")
    views = [v.strip() for v in wanted.split(",") if v.strip()] if wanted else list(VIEWS)
    bad = set(views) - set(VIEWS)
    if bad:
        raise pytest.UsageError(f"RCCA_VIEWS: unknown view(s) {sorted(bad)}; known: {', '.join(VIEWS)}")
    return views


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: also runs in the Nodes 2.0 view (every test runs in the classic view)")
    config.addinivalue_line("markers", "paints: paints with the mouse")


def pytest_generate_tests(metafunc):
    if "page" not in metafunc.fixturenames:
        return
    frontends = _frontends()
    metafunc.parametrize("frontend", frontends, ids=[f"fe{label}" for label, _ in frontends], scope="session",
                         indirect=True)
    views = _views()
    if os.environ.get("RCCA_BROWSER_ALL") != "1" and metafunc.definition.get_closest_marker("smoke") is None:
        views = [v for v in views if v == "classic"]
    if views:
        metafunc.parametrize("view", views, indirect=True)
SUPPORT_NODES = PACK_DIR / "tests" / "support"
TINY_CKPT = "tiny_sd15.safetensors"
CHROMIUM = os.environ.get("RCCA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}

# Installed in every test page as window.rccaTest: graph building and view placement for the tests
HELPERS_JS = r"""
() => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  // app.graph is deprecated for app.rootGraph in newer frontends
  const root = () => app.rootGraph ?? app.graph;
  function* all(graph) {
    for (const n of graph?.nodes ?? []) { yield n; if (n.subgraph) yield* all(n.subgraph); }
  }
  window.rccaTest = {
    sleep,
    root,
    reset() {
      if (app.canvas.graph !== root()) app.canvas.setGraph?.(root());
      root().clear();
      app.canvas.setDirty(true, true);
    },
    /** The (first) palette node, in the root graph or inside a subgraph. */
    palette() {
      return [...all(root())].find((n) => n.comfyClass === "RCCARegionalPromptPalette");
    },
    node(type) {
      return [...all(root())].find((n) => n.comfyClass === type);
    },
    setWidget(node, name, value) {
      const w = node.widgets.find((x) => x.name === name);
      if (!w) throw new Error(`${node.type} has no widget ${name}`);
      w.value = value;
      return w;
    },
    add(type, pos, values = {}) {
      const n = LiteGraph.createNode(type);
      if (!n) throw new Error(`no node type ${type}`);
      n.pos = pos;
      root().add(n);
      for (const [k, v] of Object.entries(values)) this.setWidget(n, k, v);
      return n;
    },
    /** CheckpointLoaderSimple -> Regional Prompt Palette -> RCCA Attention Patch + KSampler -> VAEDecode -> SaveImage */
    buildRegionsGraph(ckpt, size, live) {
      this.reset();
      const ck = this.add("CheckpointLoaderSimple", [-700, 0], { ckpt_name: ckpt });
      const pal = this.add("RCCARegionalPromptPalette", [0, 0], { background: "a sunny meadow", width: size, height: size });
      const neg = this.add("CLIPTextEncode", [-700, 300], { text: "blurry" });
      const lat = this.add("EmptyLatentImage", [-700, 500], { width: size, height: size, batch_size: 1 });
      const patch = this.add("RCCAAttentionPatch", [800, 0]);
      const ks = this.add("KSampler", [800, 300], { seed: 1, steps: 2, cfg: 1.5, sampler_name: "lcm", scheduler: "simple" });
      const dec = this.add("VAEDecode", [1200, 300]);
      const save = this.add("SaveImage", [1500, 300], { filename_prefix: "rcca_browser" });
      ck.connect(1, pal, "clip");
      ck.connect(1, neg, "clip");
      ck.connect(0, patch, "model");
      pal.connect(0, patch, "palette");
      patch.connect(0, ks, "model");
      pal.connect(1, ks, "positive");
      neg.connect(0, ks, "negative");
      lat.connect(0, ks, "latent_image");
      ks.connect(0, dec, "samples");
      ck.connect(2, dec, "vae");
      dec.connect(0, save, "images");
      if (live) {
        const ls = this.add("RCCALiveStream", [800, 700], { seed: 7 });
        ck.connect(0, ls, "model");
        ck.connect(1, ls, "clip");
        pal.connect(1, ls, "positive");
        neg.connect(0, ls, "negative");
        pal.connect(0, ls, "palette");
        ck.connect(2, ls, "vae");
      }
      return pal;
    },
    /** Put the palette node at the top left, zoomed so all of it fits; resolves once its DOM is placed. */
    async show(node) {
      node ??= this.palette();
      const top = 70, left = 300; // clear of the workflow name (top left) and the Run button (top right)
      const h = node.size[1] + LiteGraph.NODE_TITLE_HEIGHT;
      const scale = Math.min(1, (window.innerHeight - top - 20) / h, (window.innerWidth - left - 20) / node.size[0]);
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [left / scale - node.pos[0], (top + LiteGraph.NODE_TITLE_HEIGHT * scale) / scale - node.pos[1]];
      app.canvas.setDirty(true, true);
      for (let i = 0; i < 200; i++) {
        await frame();
        const r = node.rccaCanvas.display.getBoundingClientRect();
        if (r.width > 20 && r.height > 20 && node.rccaCanvas.root.isConnected) {
          await frame();
          const r2 = node.rccaCanvas.display.getBoundingClientRect();
          if (r2.x === r.x && r2.y === r.y && r2.width === r.width) return;
        }
      }
      throw new Error("the palette widget did not appear");
    },
    /** Client (page) coordinates of image pixel (x, y) on the palette's drawing. */
    clientPoint(node, x, y) {
      const c = node.rccaCanvas;
      const r = c.display.getBoundingClientRect();
      return [r.left + (x + 0.5) * r.width / c.width, r.top + (y + 0.5) * r.height / c.height];
    },
    /** clientPoint for several points, once layout and the widget's resize observer have settled. */
    async clientPoints(node, points) {
      await frame();
      await frame();
      return points.map(([x, y]) => this.clientPoint(node, x, y));
    },
    /** The node's bounding box in page coordinates, title included. */
    nodeClientRect(node) {
      const rect = app.canvas.canvas.getBoundingClientRect();
      const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
      const s = app.canvas.ds.scale;
      return { x: rect.left + x, y: rect.top + y, width: node.size[0] * s, height: (node.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * s };
    },
    api: async () => (await import("/scripts/api.js")).api,
  };
}
"""


def _missing() -> str | None:
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not found at {CHROMIUM}: run `bash scripts/setup_browser.sh` (or set RCCA_CHROMIUM)"
    if importlib.util.find_spec("playwright") is None:
        return f"the playwright package is not installed in {sys.executable}: run `bash scripts/setup_browser.sh`"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing()
    if reason is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def frontend(request):
    """(version label, static folder or None for ComfyUI's own frontend)."""
    label, root = request.param
    if root is not None and not (Path(root) / "index.html").is_file():
        pytest.fail(f"frontend {label}: no index.html in {root}: run `bash scripts/setup_browser.sh`", pytrace=False)
    return label, root


@pytest.fixture
def view(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny random SD1.5 checkpoint, shared by every server."""
    ckpts = tmp_path_factory.mktemp("browser_checkpoints")
    r = subprocess.run([sys.executable, str(PACK_DIR / "scripts" / "random_checkpoints.py"), "--preset", "tiny",
                        "--comfyui", str(COMFYUI_DIR), str(ckpts / TINY_CKPT)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"building the tiny checkpoint failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}", pytrace=False)
    return ckpts


@pytest.fixture(scope="session")
def browser_server(tmp_path_factory: pytest.TempPathFactory, frontend, tiny_checkpoints):
    """The host's stock ComfyUI server on a free loopback port serving `frontend`, tiny SD1.5 checkpoint
    `ckpt_name`; `frontend_version` says which frontend."""
    if not (COMFYUI_DIR / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI_DIR}: run `bash scripts/test.sh` (builds .host/) or set COMFYUI_DIR",
                    pytrace=False)
    ckpts = tiny_checkpoints
    workdir = tmp_path_factory.mktemp("browser_server")
    settings = workdir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # open on the canvas (no templates dialog), without the minimap or the canvas info over the drawing
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.Graph.CanvasInfo": False}))
    srv = ComfyServer(checkpoints_dir=ckpts, custom_nodes_dirs=[SUPPORT_NODES], comfyui_dir=COMFYUI_DIR,
                      python=sys.executable, workdir=workdir, front_end_root=frontend[1])
    srv.ckpt_name = TINY_CKPT
    srv.frontend_version = frontend[0]
    srv.newest_frontend = _frontends()[-1][0]  # the screenshots for docs/ show this one
    with srv:
        yield srv


@pytest.fixture(scope="session")
def live_available(browser_server) -> bool:
    return "RCCALiveStream" in browser_server.get_json("/object_info")


@pytest.fixture(scope="module")  # Playwright's sync API keeps an event loop running in this thread
def browser():                    # while it lives; closing it with the module frees asyncio for later tests
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class PageLog:
    """Console errors and uncaught page errors, shown when a test fails."""

    def __init__(self, page) -> None:
        self.lines: list[str] = []
        page.on("console", lambda m: self.lines.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.lines.append(f"pageerror: {e.message}\n{e.stack}"))

    def errors_from_pack(self) -> list[str]:
        """Uncaught errors from this pack's scripts, and ComfyUI's reports of its extension failing
        (console errors merely passing through the pack's frames, like a refused prompt, are expected)."""
        return [line for line in self.lines
                if (line.startswith("pageerror") and "rcca-palette/" in line)
                or (line.startswith("console.error") and "rcca.palette" in line)]


@pytest.fixture
def page(browser, browser_server, view, request):
    """A fresh frontend tab on an empty graph in `view`, `rccaTest` helpers installed."""
    status, _ = browser_server.post_json(f"/settings/{VUE_SETTING}", view == "nodes2")
    assert status == 200, f"setting {VUE_SETTING}: HTTP {status}"
    context = browser.new_context(viewport=VIEWPORT)
    # the "Try Nodes 2.0" banner would push the canvas down and cover part of the drawing
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    log = PageLog(pg)
    pg.rcca_log = log
    pg.rcca_view = view
    pg.rcca_frontend = browser_server.frontend_version
    pg.goto(browser_server.url + "/")
    pg.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types?.RCCARegionalPromptPalette"
                         " && app.extensions?.some((e) => e.name === 'rcca.palette')")
    pg.evaluate(HELPERS_JS)
    pg.evaluate("() => rccaTest.reset()")
    yield pg
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and log.lines:
        print("\n--- browser log ---\n" + "\n".join(log.lines[-60:]))
    context.close()
    errors = log.errors_from_pack()
    assert not errors, "the pack's scripts raised in the page:\n" + "\n".join(errors)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


@pytest.fixture(scope="session")
def decode():
    """regions_state text -> (width, height, [RegionSpec]) through the node's own decoder."""
    from rcca_core.palette_state import decode_state

    return decode_state
