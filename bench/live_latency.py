"""Live mode: edit-to-frame latency and sustained frames/s, measured through the real server.

Starts an unmodified ComfyUI server (tiny random SD1.5 on CPU by default; `--preset full` on a
GPU), queues example_workflows/api/rcca_live_drawing.json over HTTP with a websocket client,
then measures, on the frames the server pushes:
  * sustained frames/s with no edits;
  * edit-to-frame latency: time from POST /rcca/live/<session>/edit to the first frame rendered
    with that edit (frames carry the edit's sequence number), in ms and in ticks (1 tick =
    1 / sustained fps); the target is <= S ticks + one decode (S = number of timesteps);
  * edits arriving at 30 per second for a few seconds: frames/s meanwhile and the longest gap
    between two frames (a stall shows as a long gap).
Prints one JSON object. Usage:
  .host/venv/bin/python bench/live_latency.py [--preset tiny|stock|full] [--seconds 6] [--edits 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK / "scripts"))
sys.path.insert(0, str(PACK))  # rcca_core (pure torch) builds widget states as the browser does

import torch  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402
from comfy_ws import WsClient  # noqa: E402
from rcca_core.palette import RegionSpec  # noqa: E402
from rcca_core.palette_state import encode_state  # noqa: E402

SIZE = 512  # replaced by --size


def drawing(step: int) -> str:
    """A stroke that grows with `step`: each edit changes the fox's mask."""
    mask = torch.zeros(SIZE, SIZE)
    mask[:, : 32 + (step * 8) % (SIZE - 32)] = 1
    return encode_state([RegionSpec("a red fox sitting in the grass", mask, name="fox", color="#e6194b"),
                         RegionSpec("a blue vintage car", torch.zeros(SIZE, SIZE), name="car", color="#4363d8")], SIZE, SIZE)


def post_edit(url: str, session: str, state: str) -> int:
    req = urllib.request.Request(f"{url}/rcca/live/{session}/edit", data=json.dumps({"regions_state": state}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["seq"]


def frames_since(ws: WsClient, session: str, t0: float) -> list[dict]:
    return [f for f in ws.of_type("rcca.live.frame") if f["session"] == session and f["_received"] >= t0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("tiny", "stock", "full"), default="tiny")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of the sustained and the 30 edits/s windows")
    ap.add_argument("--edits", type=int, default=8, help="spaced edits for the latency figure")
    ap.add_argument("--decode", choices=("auto", "vae", "latent2rgb"), default="auto",
                    help="auto: the checkpoint's VAE (a TAESD here, the fast path)")
    ap.add_argument("--size", type=int, default=None, help="canvas px (default 512 on a GPU, 128 on a CPU)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    global SIZE
    SIZE = a.size or (512 if torch.cuda.is_available() else 128)

    work = Path(tempfile.mkdtemp(prefix="rcca_live_bench_"))
    ckpt = work / f"{a.preset}.safetensors"
    subprocess.run([sys.executable, str(PACK / "scripts" / "random_checkpoints.py"), "--preset", a.preset, str(ckpt)],
                   check=True, capture_output=True)
    support = [PACK / "tests" / "support"] if a.preset == "tiny" else []
    prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_live_drawing.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = ckpt.name
    prompt["4"]["inputs"]["idle_timeout"] = 600.0
    prompt["4"]["inputs"]["decode"] = a.decode
    prompt["2"]["inputs"].update(width=SIZE, height=SIZE)  # the example's drawing is resized to it
    depth = len(prompt["4"]["inputs"]["timesteps"].split(","))

    with ComfyServer(checkpoints_dir=work, custom_nodes_dirs=support, workdir=work / "server") as server:
        ws = WsClient(server.url)  # stamps each message's arrival time in data["_received"]
        status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": ws.client_id})
        assert status == 200, body
        started = ws.wait_for(lambda t, d: t == "executed" and "rcca_live" in (d.get("output") or {}), 600, "live start")
        session = started["output"]["rcca_live"][0]["session"]
        ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["frame"] >= 2 * depth, 600, "warm frames")

        t0 = time.monotonic()
        time.sleep(a.seconds)
        quiet = frames_since(ws, session, t0)
        fps = (len(quiet) - 1) / (quiet[-1]["_received"] - quiet[0]["_received"]) if len(quiet) > 1 else 0.0

        latencies = []
        for i in range(a.edits):
            sent = time.monotonic()
            seq = post_edit(server.url, session, drawing(i))
            frame = ws.wait_for(lambda t, d: t == "rcca.live.frame" and d["session"] == session and d["seq"] >= seq, 600, "edited frame")
            latencies.append(frame["_received"] - sent)
            time.sleep(0.2)

        stop_flag = threading.Event()

        def edit_at_30_per_second():
            i = 1000
            while not stop_flag.is_set():
                post_edit(server.url, session, drawing(i))
                i += 1
                time.sleep(1 / 30)

        t1 = time.monotonic()
        editor = threading.Thread(target=edit_at_30_per_second, daemon=True)
        editor.start()
        time.sleep(a.seconds)
        stop_flag.set()
        editor.join(30)
        busy = frames_since(ws, session, t1)
        busy_fps = (len(busy) - 1) / (busy[-1]["_received"] - busy[0]["_received"]) if len(busy) > 1 else 0.0
        gaps = [b["_received"] - a_["_received"] for a_, b in zip(busy, busy[1:])]
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/rcca/live/{session}/stop", data=b"", method="POST"), timeout=30)
        statuses = [(d.get("state"), d.get("reason")) for d in ws.of_type("rcca.live.status") if d.get("session") == session]
        ws.close()

    tick_ms = 1000.0 / fps if fps else float("nan")
    median_ms = statistics.median(latencies) * 1000
    result = {
        "benchmark": "live_latency",
        "environment": {"device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__},
        "preset": a.preset, "size": [SIZE, SIZE], "timesteps": prompt["4"]["inputs"]["timesteps"], "steps_S": depth,
        "decode": prompt["4"]["inputs"]["decode"],
        "sustained": {"fps": round(fps, 2), "ms_per_frame": round(tick_ms, 1), "frames": len(quiet)},
        "edit_to_frame": {"median_ms": round(median_ms, 1), "max_ms": round(max(latencies) * 1000, 1),
                          "median_ticks": round(median_ms / tick_ms, 2), "edits": len(latencies),
                          "target_ticks": f"<= S + one decode = {depth} ticks + decode"},
        "edits_at_30_per_s": {"fps": round(busy_fps, 2), "fps_ratio_vs_quiet": round(busy_fps / fps, 3) if fps else None,
                              "longest_gap_ms": round(max(gaps) * 1000, 1) if gaps else None, "frames": len(busy)},
        "status_events": statuses[:20],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
