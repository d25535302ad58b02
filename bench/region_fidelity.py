#!/usr/bin/env python3
"""Region fidelity on a model that knows what its prompts mean: does a painted prompt land where
it is painted, does the background stay background, does a 50 % brush blend, is a small object kept?

The model is the micro model of scripts/train_micro_model.py (trained here on a synthetic
"concept world": every concept is a colour + texture pattern a classifier reads per latent
pixel). The evaluation never imports rcca_core: methods run through ComfyUI nodes only, and
the result is read from the sampled latent by the concept world's own classifier.

Methods, side by side on the same layouts, seeds and samplers:
  rcca_soft / rcca_hard  RCCA Attention Patch + core KSampler
  core_masks             ComfyUI's ConditioningSetMask (default area, strength = opacity) per region,
                         ConditioningCombine with the unmasked background, as users wire it
  core_masks_tuned       the same with the background masked by 1 - the regions' union and every
                         mask set to "mask bounds": the best core graph found by hand
  stream_rcca / stream_semantic_draw   Stream Batch LCM Sampler (4 LCM steps; lcm only)
  oracle                 every pixel from its own prompt sampled alone (upper bound)
  background             the background prompt alone (lower bound)

Metrics per layout (mean over seeds): region accuracy (pixels of a region showing its concept),
background accuracy, leakage (pixels outside every region of a concept showing it), boundary
accuracy (pixels within one latent cell of a mask edge showing the concept painted there),
soft fraction (for a region under 100 % opacity: share of its pixels showing its concept), and
time per image as a ratio to plain sampling with the background prompt.

  python bench/region_fidelity.py [--seeds 8] [--layouts a,b] [--methods a,b] [--png docs/region_fidelity.png]
Prints one JSON object, then a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LATENT = 32          # latent cells per side
CANVAS = LATENT * 8  # pixels
SAMPLERS = {"euler": ("euler", "normal", 20), "lcm": ("lcm", "sgm_uniform", 4)}
STREAM_TIMESTEPS = "0, 12, 24, 36"
SEMANTIC_DRAW_DEFAULTS = {"bootstrap_steps": 1, "mask_std": 8.0, "mask_strength": 1.0, "mask_type": "continuous",
                          "cover_alpha": 0.3}


# -- layouts ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    concept: str
    cells: torch.Tensor      # (LATENT, LATENT) 0/1 where the user painted, in latent cells
    opacity: float = 1.0

    def canvas_mask(self) -> torch.Tensor:
        """(CANVAS, CANVAS) brush mask in pixels, as a user would paint it."""
        return self.cells.repeat_interleave(8, 0).repeat_interleave(8, 1).float()


@dataclass(frozen=True)
class Layout:
    name: str
    background: str
    regions: tuple[Region, ...]


def box(y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    m = torch.zeros(LATENT, LATENT)
    m[y0:y1, x0:x1] = 1
    return m


def disc(cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(LATENT) + 0.5, torch.arange(LATENT) + 0.5, indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float()


class World:
    """The concept world of scripts/train_micro_model.py, as this benchmark reads it."""

    def __init__(self, module) -> None:
        self.m = module
        self.CONCEPTS = [c.name for c in module.CONCEPTS]
        self.OBJECTS, self.BACKGROUNDS = module.OBJECTS, module.BACKGROUNDS

    def prompt(self, concept: str) -> str:
        return f"a {concept}"

    def classify(self, latent: torch.Tensor) -> torch.Tensor:
        return self.m.classify(latent)

    def prototypes(self) -> torch.Tensor:
        """(concepts, 4) latent-space colours, rows in CONCEPTS order."""
        return self.m.prototypes("latent")

    def display_colors(self) -> list[tuple[int, int, int]]:
        """A colour per concept for the class maps: its latent2rgb preview colour, brightened."""
        rgb = self.m.prototypes("latent") @ torch.tensor(LATENT2RGB) * self.m.LATENT_SCALE
        rgb = (rgb - rgb.min(0).values) / (rgb.max(0).values - rgb.min(0).values + 1e-6)
        return [tuple(int(v) for v in (40 + 215 * c).round()) for c in rgb]

    def classifier_accuracy(self, samples: int = 64) -> float:
        """Per-pixel accuracy of classify() on clean rendered training layouts (textures included)."""
        g = torch.Generator().manual_seed(0)
        accs = []
        for i in range(samples):
            layout = self.m.random_layout(g, LATENT, LATENT, ("single", "scene", "pair")[i % 3])
            accs.append(self.m.accuracy(self.m.render(layout, generator=g), layout))
        return round(statistics.mean(accs), 4)


# SD1.5 latent -> RGB preview factors (ComfyUI's latent_formats.SD15.latent_rgb_factors)
LATENT2RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]


def layouts(world) -> dict[str, Layout]:
    o, b = world.OBJECTS, world.BACKGROUNDS
    L, H = LATENT, LATENT // 2
    items = [
        Layout("two halves", b[0], (Region(o[0], box(4, 2, 28, H - 1)), Region(o[1], box(4, H + 1, 28, L - 2)))),
        Layout("three regions", b[1], (Region(o[2], box(3, 2, 14, 14)), Region(o[3], box(3, 18, 14, 30)),
                                       Region(o[4], box(18, 8, 29, 24)))),
        Layout("four quadrants", b[2], (Region(o[0], box(0, 0, H, H)), Region(o[5], box(0, H, H, L)),
                                        Region(o[6], box(H, 0, L, H)), Region(o[7], box(H, H, L, L)))),
        Layout("two blobs of one prompt", b[0], (Region(o[1], disc(9, 9, 4) + disc(23, 23, 4)),)),
        Layout("two blobs of two prompts", b[1], (Region(o[2], disc(9, 22, 4)), Region(o[3], disc(22, 9, 4)))),
        Layout("2 x 2 cell region", b[2], (Region(o[4], box(15, 15, 17, 17)),)),
        Layout("overlapping regions", b[0], (Region(o[5], box(6, 4, 22, 20)), Region(o[6], box(12, 12, 28, 28)))),
    ] + [Layout(f"soft region {int(a * 100)} %", b[1], (Region(o[7], box(6, 6, 26, 26), a),)) for a in (0.25, 0.5, 0.75)]
    return {l.name: l for l in items}


# -- methods ---------------------------------------------------------------------------------

class Runner:
    """Runs each method through ComfyUI nodes on one model. `host` is anything with ComfyUI's
    `nodes` module as `.nodes` (the benchmark's Host, the tests' ComfyHost)."""

    def __init__(self, host, model, clip, world) -> None:
        self.host, self.model, self.clip, self.world = host, model, clip, world
        self._cond: dict[str, Any] = {}

    def node(self, node_id: str):
        return self.host.nodes.NODE_CLASS_MAPPINGS[node_id]

    def encode(self, text: str):
        if text not in self._cond:
            self._cond[text] = self.host.nodes.CLIPTextEncode().encode(self.clip, text)[0]
        return self._cond[text]

    def prompt(self, concept: str) -> str:
        return self.world.prompt(concept)

    def ksample(self, model, positive, seed: int, cfg: float, sampler: str, batch: int = 1):
        """(batch, 4, LATENT, LATENT): ComfyUI draws one noise per batch entry from the seed, so a
        batch is `batch` independent samples for the price of one sampler call."""
        name, scheduler, steps = SAMPLERS[sampler]
        latent = self.host.nodes.EmptyLatentImage().generate(CANVAS, CANVAS, batch)[0]
        return self.host.nodes.KSampler().sample(model, seed, steps, cfg, name, scheduler, positive,
                                                 self.encode(""), latent)[0]["samples"]

    def palette(self, layout: Layout):
        regions = None
        for r in layout.regions:
            regions = self.node("RCCAAddRegion").execute(r.canvas_mask()[None], self.prompt(r.concept),
                                                              r.opacity, regions=regions).result[0]
        return self.node("RCCARegionalPromptPalette").execute(
            self.clip, self.prompt(layout.background), CANVAS, CANVAS, regions).result[:2]

    def run(self, method: str, layout: Layout, seed: int, cfg: float, sampler: str, batch: int = 1,
            **patch_options) -> torch.Tensor:
        """(batch, 4, LATENT, LATENT) samples of `layout` by `method`. patch_options override the
        RCCA Attention Patch's inputs (blocks, self_attention_until, ...) for the rcca_* methods."""
        if method.startswith("rcca_"):  # rcca_soft, rcca_hard
            palette, background = self.palette(layout)
            options = {"blocks": "all", "self_attention_until": 0.0, **patch_options}
            blocks = options.pop("blocks")
            patched = self.node("RCCAAttentionPatch").execute(
                self.model, palette, method.split("_")[1], 0.0, 1.0, blocks, **options).result[0]
            return self.ksample(patched, background, seed, cfg, sampler, batch)
        if method in ("core_masks", "core_masks_tuned"):
            # core_masks: as users usually wire it (background unmasked, default area); core_masks_tuned:
            # the best hand-built core graph found, background masked by 1 - the regions' union and
            # every mask with "mask bounds"
            nodes = self.host.nodes
            area = "mask bounds" if method == "core_masks_tuned" else "default"
            positive = self.encode(self.prompt(layout.background))
            if method == "core_masks_tuned":
                union = torch.zeros(CANVAS, CANVAS)
                for r in layout.regions:
                    union = torch.maximum(union, r.canvas_mask() * r.opacity)
                positive = nodes.ConditioningSetMask().append(positive, (1 - union)[None], area, 1.0)[0]
            for r in layout.regions:
                masked = nodes.ConditioningSetMask().append(self.encode(self.prompt(r.concept)), r.canvas_mask()[None],
                                                            area, r.opacity)[0]
                positive = nodes.ConditioningCombine().combine(positive, masked)[0]
            return self.ksample(self.model, positive, seed, cfg, sampler, batch)
        if method.startswith("stream_"):  # one frame per sample (per-frame noise: seed + frame)
            palette, background = self.palette(layout)
            latent = self.host.nodes.EmptyLatentImage().generate(CANVAS, CANVAS, batch)[0]
            extra = {}
            if "semantic_draw" in patch_options:  # SemanticDraw Options inputs, by name
                extra["semantic_draw"] = self.node("RCCASemanticDrawOptions").execute(
                    **{**SEMANTIC_DRAW_DEFAULTS, **patch_options["semantic_draw"]}).result[0]
            return self.node("RCCAStreamBatchLCMSampler").execute(
                model=self.model, positive=background, negative=self.encode(""), latent_image=latent,
                timesteps=STREAM_TIMESTEPS, schedule_steps=50, seed=seed, region_mode=method.removeprefix("stream_"),
                cfg_mode="none" if cfg <= 1 else "full", cfg=cfg, compile="eager", decode="latent2rgb",
                palette=palette, **extra).result[0]["samples"]
        if method == "background":
            return self.ksample(self.model, self.encode(self.prompt(layout.background)), seed, cfg, sampler, batch)
        if method == "oracle":
            out = self.ksample(self.model, self.encode(self.prompt(layout.background)), seed, cfg, sampler, batch)
            for r in layout.regions:  # later regions on top, as the palette stacks them
                alone = self.ksample(self.model, self.encode(self.prompt(r.concept)), seed, cfg, sampler, batch)
                out = torch.where(r.cells.bool(), alone, out)
            return out
        raise SystemExit(f"unknown method {method!r}")


# -- metrics ---------------------------------------------------------------------------------

def _edge(cells: torch.Tensor) -> torch.Tensor:
    """Cells within one cell of the mask's border (inside or outside)."""
    m = cells[None, None]
    grown = torch.nn.functional.max_pool2d(m, 3, 1, 1)[0, 0]
    shrunk = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[0, 0]
    return (grown - shrunk) > 0


def blend(latent: torch.Tensor, cells: torch.Tensor, concept: str, background: str, world) -> float:
    """Where the latent sits between two concepts over a region, 0 (background's colour) .. 1
    (the concept's): the mean colour projected on the line between their prototypes. Reads a
    half-and-half mix as 0.5, which a nearest-prototype class map cannot show."""
    protos = world.prototypes()
    index = {c: i for i, c in enumerate(world.CONCEPTS)}
    a, b = protos[index[background]], protos[index[concept]]
    mean = latent.float()[:, cells.bool()].mean(dim=1)
    return float(torch.dot(mean - a, b - a) / torch.dot(b - a, b - a))


def score(latent: torch.Tensor, layout: Layout, world) -> dict[str, float | None]:
    """Per-layout metrics of one sampled (4, LATENT, LATENT) latent."""
    ids = world.classify(latent)
    index = {c: i for i, c in enumerate(world.CONCEPTS)}
    painted = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    truth = torch.full((LATENT, LATENT), index[layout.background])
    full = [r for r in layout.regions if r.opacity >= 1.0]
    for r in full:
        truth = torch.where(r.cells.bool(), torch.tensor(index[r.concept]), truth)
    region_acc, leak = [], []
    for r in full:
        inside = r.cells.bool()
        # what the top region covers decides the truth, so an overlapped region is judged where it shows
        shows = inside & (truth == index[r.concept])
        region_acc.append(float((ids[shows] == index[r.concept]).float().mean()))
        same = torch.zeros_like(inside)
        for other in full:
            if other.concept == r.concept:
                same |= other.cells.bool()
        leak.append(float((ids[~same] == index[r.concept]).float().mean()))
    for r in layout.regions:
        painted |= r.cells.bool()
    background = ~painted
    edge = torch.zeros_like(painted)
    for r in full:
        edge |= _edge(r.cells)
    soft = [r for r in layout.regions if r.opacity < 1.0]
    return {
        "region_acc": statistics.mean(region_acc) if region_acc else None,
        "background_acc": float((ids[background] == index[layout.background]).float().mean()) if background.any() else None,
        "leakage": statistics.mean(leak) if leak else None,
        "boundary_acc": float((ids[edge] == truth[edge]).float().mean()) if edge.any() else None,
        "soft_fraction": float((ids[soft[0].cells.bool()] == index[soft[0].concept]).float().mean()) if soft else None,
        "soft_blend": blend(latent, soft[0].cells, soft[0].concept, layout.background, world) if soft else None,
    }


def mean_of(rows: list[dict]) -> dict[str, float | None]:
    keys = rows[0].keys()
    out = {}
    for k in keys:
        values = [r[k] for r in rows if r[k] is not None]
        out[k] = round(statistics.mean(values), 3) if values else None
    return out


# -- the class-map picture ---------------------------------------------------------------------

def class_map_png(path: Path, rows: list[tuple[str, list[torch.Tensor]]], columns: list[str], world) -> None:
    """A grid of concept-id maps (one colour per concept), 4 x upscaled, with row and column labels."""
    from PIL import Image, ImageDraw

    colors = torch.tensor(world.display_colors(), dtype=torch.uint8)
    scale, pad, label_w, label_h = 4, 6, 150, 18
    cell = LATENT * scale
    img = Image.new("RGB", (label_w + len(columns) * (cell + pad), label_h + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(columns):
        draw.text((label_w + j * (cell + pad), 2), name, fill="black")
    for i, (name, maps) in enumerate(rows):
        y = label_h + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill="black")
        for j, ids in enumerate(maps):
            rgb = colors[ids.long()].numpy()
            tile = Image.fromarray(rgb, "RGB").resize((cell, cell), Image.NEAREST)
            img.paste(tile, (label_w + j * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def painted_ids(layout: Layout, world) -> torch.Tensor:
    index = {c: i for i, c in enumerate(world.CONCEPTS)}
    ids = torch.full((LATENT, LATENT), index[layout.background])
    for r in layout.regions:
        if r.opacity >= 0.5:
            ids = torch.where(r.cells.bool(), torch.tensor(index[r.concept]), ids)
    return ids


# -- main --------------------------------------------------------------------------------------

def load_micro_model(host, comfyui_dir: Path, ckpt: str | None = None):
    """(model, clip, World) of the micro model; trains it first (minutes) when it is missing or stale."""
    import subprocess

    import random_checkpoints
    import train_micro_model

    path = Path(ckpt) if ckpt else train_micro_model.DEFAULT_OUT
    # the script reuses a fresh checkpoint and trains otherwise, in its own process (its threads, its seed)
    r = subprocess.run([sys.executable, str(common.PACK_DIR / "scripts" / "train_micro_model.py"), str(path),
                        "--comfyui", str(comfyui_dir), "--no-verify"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"training the micro model failed:\n{r.stderr[-3000:]}")
    random_checkpoints.register_tiny_sd15()
    import folder_paths
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    model, clip = host.nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:2]
    return model, clip, World(train_micro_model)


METHODS = ("rcca_soft", "rcca_hard", "core_masks", "core_masks_tuned", "stream_rcca", "stream_semantic_draw", "oracle", "background")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=8, help="samples per layout, method, sampler and cfg")
    ap.add_argument("--chunks", type=int, default=2, help="sampler calls the seeds are split into (timing spread)")
    ap.add_argument("--layouts", default="", help="comma list of layout names (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samplers", default="euler,lcm")
    ap.add_argument("--cfgs", default="1,5")
    ap.add_argument("--ckpt", default=None, help="micro model checkpoint (default: train or reuse the host's)")
    ap.add_argument("--png", default=None, help="write the class-map grid here")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    host = common.setup_comfy("cpu")
    model, clip, world = load_micro_model(host, host.comfyui_dir, a.ckpt)
    runner = Runner(host, model, clip, world)
    all_layouts = layouts(world)
    chosen = [all_layouts[n.strip()] for n in a.layouts.split(",") if n.strip()] or list(all_layouts.values())
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    results: list[dict] = []
    grid: dict[str, dict[str, torch.Tensor]] = {}
    chunk = max(1, a.seeds // a.chunks)
    for sampler in [s.strip() for s in a.samplers.split(",")]:
        for cfg in [float(c) for c in a.cfgs.split(",")]:
            for layout in chosen:
                per_method: dict[str, list] = {m: [] for m in methods}
                times: dict[str, list] = {m: [] for m in methods}
                for first in range(0, a.seeds, chunk):
                    # one sampler call per method and chunk (a batch of `chunk` noises drawn from seed
                    # `first`), methods interleaved so that drift on shared cores spreads evenly
                    for m in methods:
                        if m.startswith("stream_") and sampler != "lcm":
                            continue
                        t0 = time.perf_counter()
                        latents = runner.run(m, layout, first, cfg, sampler, batch=min(chunk, a.seeds - first))
                        times[m].append(time.perf_counter() - t0)
                        per_method[m] += [score(x, layout, world) for x in latents]
                        if first == 0 and sampler == "lcm" and cfg == 1.0:
                            grid.setdefault(layout.name, {})[m] = world.classify(latents[0])
                for m in methods:
                    if not per_method[m]:
                        continue
                    row = {"sampler": sampler, "cfg": cfg, "layout": layout.name, "method": m, **mean_of(per_method[m])}
                    if times.get("background") and m != "background":
                        ratios = [t / p for t, p in zip(times[m], times["background"])]
                        row["time_ratio"] = round(statistics.median(ratios), 2)
                        row["time_ratio_spread"] = [round(min(ratios), 2), round(max(ratios), 2)]
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    report = {"bench": "region_fidelity", "seeds": a.seeds, "latent": LATENT, "environment": common.environment(host),
              "classifier_accuracy": world.classifier_accuracy(), "results": results}
    print(json.dumps(report))
    print(markdown(results))
    if a.png:
        columns = ["painted"] + [m for m in ("rcca_soft", "core_masks", "stream_semantic_draw") if m in methods]
        rows = [(name, [painted_ids(all_layouts[name], world)] + [maps[c] for c in columns[1:] if c in maps])
                for name, maps in grid.items()]
        class_map_png(Path(a.png), rows, columns, world)
    host.close()
    return 0


def markdown(results: list[dict]) -> str:
    """Mean over layouts per (sampler, cfg, method): one line each."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["sampler"], r["cfg"], r["method"]), []).append(r)
    lines = ["| sampler | cfg | method | region acc | background acc | leakage | boundary acc | "
             "soft fraction 25/50/75 % | soft blend 25/50/75 % | time ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (sampler, cfg, method), rows in groups.items():
        mean = mean_of([{k: r.get(k) for k in ("region_acc", "background_acc", "leakage", "boundary_acc", "time_ratio")}
                        for r in rows])
        soft = {r["layout"]: r["soft_fraction"] for r in rows if r["soft_fraction"] is not None}
        soft_text = " / ".join(f"{soft[k]:.2f}" for k in sorted(soft)) or "-"
        blends = {r["layout"]: r["soft_blend"] for r in rows if r["soft_blend"] is not None}
        blend_text = " / ".join(f"{blends[k]:.2f}" for k in sorted(blends)) or "-"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {sampler} | {cfg:g} | {method} | {fmt(mean['region_acc'])} | {fmt(mean['background_acc'])} | "
                     f"{fmt(mean['leakage'])} | {fmt(mean['boundary_acc'])} | {soft_text} | {blend_text} | {fmt(mean.get('time_ratio'))} |")
    return "\n".join(lines) + "\n\n" + per_layout(results)


def per_layout(results: list[dict]) -> str:
    """Per (sampler, cfg): one row per layout, one column per method; region accuracy, or the soft
    blend for a soft region, with the background accuracy after a slash where there is a background."""
    out = []
    configs = list(dict.fromkeys((r["sampler"], r["cfg"]) for r in results))
    for sampler, cfg in configs:
        rows = [r for r in results if (r["sampler"], r["cfg"]) == (sampler, cfg)]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        out.append(f"{sampler}, cfg {cfg:g}: region accuracy / background accuracy (soft layouts: blend)\n")
        out.append("| layout | " + " | ".join(methods) + " |")
        out.append("|---|" + "---|" * len(methods))
        for layout in dict.fromkeys(r["layout"] for r in rows):
            cells = []
            for m in methods:
                r = next((x for x in rows if x["layout"] == layout and x["method"] == m), None)
                if r is None:
                    cells.append("-")
                elif r["soft_blend"] is not None:
                    cells.append(f"{r['soft_blend']:.2f}")
                else:
                    main = "-" if r["region_acc"] is None else f"{r['region_acc']:.2f}"
                    cells.append(main if r["background_acc"] is None else f"{main} / {r['background_acc']:.2f}")
            out.append(f"| {layout} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
