// rcca-palette: the drawing canvas widget of the Regional Prompt Palette node: drawing, masks and
// encoding the state. The region list lives in palette_regions.js, live mode in palette_live.js.
//
// The node's `regions_state` STRING widget is the single source of truth that ComfyUI saves and
// queues (see README, "Drawing-widget state format"). This widget edits it: one offscreen canvas
// per region at the full canvas size (its alpha channel is the region's coverage), composited with
// each region's colour for display, and re-encoded into `regions_state` after every stroke.
//
// This module only exports; rcca_palette.js registers it on the node type. (The frontend imports
// every .js file of the pack as an extension, so this file must have no side effects.)
import { app } from "../../scripts/app.js";
import { copyCanvas, el, makeCanvas } from "./palette_dom.js";
import { LiveClient } from "./palette_live.js";
import { renderRegionList } from "./palette_regions.js";

export const STATE_VERSION = 1;
export const MAX_REGIONS = 16; // rcca_core.palette.MAX_REGIONS
// rcca_core.palette.DEFAULT_COLORS, so a region drawn here looks like the same region elsewhere
export const DEFAULT_COLORS = [
  "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#000075",
];
const PNG_DATA_URL = "data:image/png;base64,";
const HEX = /^#[0-9a-fA-F]{6}$/;
const UNDO_DEPTH = 40; // each entry holds one full-size canvas copy
const TEXT_COMMIT_DELAY_MS = 300; // typing re-encodes the state once the user pauses
const RESIZE_DELAY_MS = 250; // dragging the width/height arrows fires a callback per step
const TINT_ALPHA = 0.6; // region colours over the background image (tracing stays visible)
const MIN_WIDGET_HEIGHT = 420;
const BACKGROUND_MAX_HEIGHT = 96;

// ---- PNG masks --------------------------------------------------------------------------------
function dataUrlBytes(url) {
  const bin = atob(url.slice(PNG_DATA_URL.length));
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

/** Mirror of palette_state.decode_mask's rule: coverage is alpha for a PNG with an alpha channel or a
 * tRNS chunk, else the grey value. A decoded <img> cannot tell the two apart (both come back RGBA), so
 * read the colour type from the header. */
function pngHasAlpha(bytes) {
  const u32 = (o) => ((bytes[o] << 24) | (bytes[o + 1] << 16) | (bytes[o + 2] << 8) | bytes[o + 3]) >>> 0;
  const type = (o) => String.fromCharCode(bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]);
  if (bytes.length < 33 || type(12) !== "IHDR") throw new Error("not a PNG");
  const colorType = bytes[25];
  if (colorType === 4 || colorType === 6) return true;
  for (let o = 8; o + 8 <= bytes.length;) {
    const t = type(o + 4);
    if (t === "tRNS") return true;
    if (t === "IDAT" || t === "IEND") return false;
    o += 12 + u32(o);
  }
  return false;
}

async function maskCanvasFromDataUrl(url, width, height) {
  if (typeof url !== "string" || !url.startsWith(PNG_DATA_URL)) throw new Error("mask is not a PNG data URL");
  const bytes = dataUrlBytes(url);
  const alpha = pngHasAlpha(bytes);
  // no premultiplication or colour management: alpha must survive exactly for save/reload to round-trip
  const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }),
                                         { premultiplyAlpha: "none", colorSpaceConversion: "none" });
  const canvas = makeCanvas(width, height);
  const ctx = canvas.getContext("2d");
  if (bitmap.width !== width || bitmap.height !== height) {
    throw new Error(`mask is ${bitmap.width} x ${bitmap.height} but the drawing is ${width} x ${height}`);
  }
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close?.();
  if (!alpha) {
    // a greyscale mask (written by Python or another tool): move the grey value into alpha, with
    // PIL's convert("L") weights so the coverage matches what the node reads
    const img = ctx.getImageData(0, 0, width, height);
    const p = img.data;
    for (let i = 0; i < p.length; i += 4) {
      const grey = (p[i] * 19595 + p[i + 1] * 38470 + p[i + 2] * 7471 + 0x8000) >> 16;
      p[i] = p[i + 1] = p[i + 2] = 255;
      p[i + 3] = grey;
    }
    ctx.putImageData(img, 0, 0);
    return { canvas, dataUrl: null }; // re-encode as an alpha PNG on the next save
  }
  return { canvas, dataUrl: url };
}

// ---- styles -------------------------------------------------------------------------------------
const STYLE = `
.rcca-pal { display:flex; flex-direction:column; gap:4px; box-sizing:border-box; font:12px sans-serif;
  color:var(--input-text, #ddd); overflow:hidden; }
.rcca-pal button, .rcca-pal input, .rcca-pal label.rcca-btn { font:inherit; color:inherit;
  background:var(--comfy-input-bg, #222); border:1px solid var(--border-color, #555); border-radius:4px; }
.rcca-pal button, .rcca-pal label.rcca-btn { padding:2px 6px; cursor:pointer; white-space:nowrap; }
.rcca-pal button[aria-pressed="true"] { background:#3a6ea5; border-color:#6fa3dc; }
.rcca-pal button:disabled { opacity:.45; cursor:default; }
.rcca-pal .rcca-bar { display:flex; flex-wrap:wrap; align-items:center; gap:4px; }
.rcca-pal .rcca-bar input[type=range] { width:56px; }
.rcca-pal .rcca-regions { display:flex; flex-direction:column; gap:2px; max-height:30%; overflow-y:auto; flex:none; }
.rcca-pal .rcca-region { display:grid; grid-template-columns:22px 70px 1fr 1fr 46px 22px; gap:3px;
  align-items:center; padding:1px 2px; border-radius:4px; border:1px solid transparent; }
.rcca-pal .rcca-region.rcca-active { border-color:#6fa3dc; background:rgba(111,163,220,.12); }
.rcca-pal .rcca-region input { min-width:0; padding:1px 3px; }
.rcca-pal .rcca-region input[type=color] { width:22px; height:20px; padding:0; }
.rcca-pal .rcca-views { flex:1; min-height:0; display:flex; gap:6px; }
.rcca-pal .rcca-box { flex:1; min-width:0; min-height:0; position:relative; display:flex; align-items:center;
  justify-content:center; background:#111; border-radius:4px; overflow:hidden; }
.rcca-pal .rcca-box canvas { position:absolute; touch-action:none; }
.rcca-pal .rcca-box canvas.rcca-display { cursor:crosshair; image-rendering:auto; }
.rcca-pal .rcca-box canvas.rcca-overlay { pointer-events:none; }
.rcca-pal .rcca-live { flex-direction:column; }
.rcca-pal .rcca-live img { max-width:100%; max-height:calc(100% - 18px); object-fit:contain; }
.rcca-pal .rcca-live .rcca-caption { height:16px; opacity:.85; }
.rcca-pal .rcca-footer { display:flex; align-items:center; gap:6px; flex:none; }
.rcca-pal .rcca-status { flex:1; min-width:0; min-height:16px; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.rcca-pal .rcca-status .rcca-error { color:#ff7b72; }
/* Nodes 2.0 (Vue) view, frontends that lay the widgets out as a flex column (1.3x): there every
   expanding widget shares the free height and getMinHeight/getMaxHeight are not read. The drawing
   takes the free height; the other rows, the background prompt's box among them, keep their own. */
.lg-node-widgets:has(.rcca-pal) > .lg-node-widget:not(:has(.rcca-pal)) { flex:none !important; }
.lg-node-widgets:has(.rcca-pal) > .lg-node-widget:has(.rcca-pal) { flex:1 1 auto !important; min-height:${MIN_WIDGET_HEIGHT}px; }
/* in either Vue layout the widget's box is sized by its row; the classic view sizes the element itself */
.lg-node-widgets .rcca-pal { height:100%; }
`;

function ensureStyle() {
  if (document.getElementById("rcca-palette-style")) return;
  document.head.append(el("style", { id: "rcca-palette-style", text: STYLE }));
}

// ---- the widget -------------------------------------------------------------------------------
let regionUid = 0;

export class PaletteCanvas {
  /** Builds the widget on a freshly created palette node; its state comes from `regions_state`. */
  constructor(node) {
    this.node = node;
    this.valueWidget = node.widgets?.find((w) => w.name === "regions_state");
    if (this.valueWidget) {
      // hidden from view, still serialized: widgets_values and the API prompt carry it. The node's
      // layout sizes hidden widgets too; a -4 height cancels the 4 px gap it adds after each one.
      this.valueWidget.hidden = true;
      // the Nodes 2.0 view of 1.3x frontends reads only the option (1.4x and later read both)
      if (this.valueWidget.options) this.valueWidget.options.hidden = true;
      this.valueWidget.computeSize = () => [0, -4];
    }
    // the node shares its free height equally among its DOM widgets: cap the background prompt's
    // text box so the drawing gets the rest
    const background = node.widgets?.find((w) => w.name === "background");
    if (background?.options) background.options.getMaxHeight ??= () => BACKGROUND_MAX_HEIGHT;
    this.width = this.widgetInt("width", 512);
    this.height = this.widgetInt("height", 512);
    this.regions = [];
    this.active = -1;
    this.tool = { size: 24, opacity: 1, eraser: false };
    this.undoStack = [];
    this.redoStack = [];
    this.background = null; // ImageBitmap, display only: never saved (live may send it as the photo)
    this.usePhoto = false; // live: the frames start from the trace image (image-to-image)
    this.stroke = null;
    this.liveClient = new LiveClient(this);
    this.textTimer = null;
    this.resizeTimer = null;
    this.error = "";
    this.loadError = "";
    this.ready = Promise.resolve();
    this.generation = 0; // bumps on every load so a slow, stale load never overwrites a newer one

    ensureStyle();
    this.buildDom();
    this.widget = node.addDOMWidget("rcca_canvas", "rcca_palette_canvas", this.root, {
      serialize: false, // the state lives in regions_state; this widget has no value of its own
      getMinHeight: () => MIN_WIDGET_HEIGHT,
      hideOnZoom: true,
    });
    this.widget.serialize = false;
    this.followSizeWidgets();
    this.loadFromValue();
  }

  widgetInt(name, fallback) {
    const v = Number(this.node.widgets?.find((w) => w.name === name)?.value);
    return Number.isFinite(v) && v >= 8 ? Math.round(v) : fallback;
  }

  // ---- DOM ------------------------------------------------------------------------------------
  buildDom() {
    const btn = (text, title, onclick, cls = "") => el("button", { text, title, class: cls, onclick });
    this.addButton = btn("+ region", "Add a region (name, prompt, colour)", () => this.addRegion(), "rcca-add");
    this.sizeInput = el("input", { type: "range", min: "1", max: "256", value: String(this.tool.size),
                                   class: "rcca-size", title: "Brush size in image pixels" });
    this.sizeInput.addEventListener("input", () => this.setTool({ size: Number(this.sizeInput.value) }));
    this.sizeLabel = el("span", { class: "rcca-size-label" });
    this.opacityInput = el("input", { type: "range", min: "0.05", max: "1", step: "0.05", value: "1",
                                      class: "rcca-opacity", title: "Brush opacity: paints soft coverage" });
    this.opacityInput.addEventListener("input", () => this.setTool({ opacity: Number(this.opacityInput.value) }));
    this.opacityLabel = el("span", { class: "rcca-opacity-label" });
    this.eraserButton = btn("eraser", "Erase instead of paint", () => this.setTool({ eraser: !this.tool.eraser }), "rcca-eraser");
    this.undoButton = btn("undo", "Undo the last paint, fill, clear or region removal", () => this.undo(), "rcca-undo");
    this.redoButton = btn("redo", "Redo", () => this.redo(), "rcca-redo");
    this.clearButton = btn("clear", "Erase the active region's mask", () => this.clear(), "rcca-clear");
    this.fillButton = btn("fill", "Fill the active region's mask at the brush opacity", () => this.fill(), "rcca-fill");
    this.fileInput = el("input", { type: "file", accept: "image/*", style: "display:none", class: "rcca-bg-file" });
    this.fileInput.addEventListener("change", () => this.loadBackground(this.fileInput.files?.[0]));
    const bgLabel = el("label", { class: "rcca-btn", title: "Trace over a local image (display only, never saved)",
                                  text: "image…" }, [this.fileInput]);
    this.bgClearButton = btn("×", "Remove the background image", () => this.setBackground(null), "rcca-bg-clear");
    this.photoButton = btn("photo", "Live: draw over the trace image (the frames start from it, noised by the Live Stream " +
                           "node's strength and encoded with its VAE); press again to draw without it",
                           () => this.togglePhoto(), "rcca-photo");
    this.liveButton = btn("Live", "Live: queue this graph's Live Stream node and stream frames while you paint; press again to stop",
                          () => this.toggleLive(), "rcca-live-toggle");
    const bar = el("div", { class: "rcca-bar" }, [
      this.addButton, this.sizeInput, this.sizeLabel, this.opacityInput, this.opacityLabel, this.eraserButton,
      this.undoButton, this.redoButton, this.clearButton, this.fillButton, bgLabel, this.bgClearButton, this.photoButton,
    ]);
    this.regionList = el("div", { class: "rcca-regions" });

    this.display = el("canvas", { class: "rcca-display" });
    this.overlay = el("canvas", { class: "rcca-overlay" });
    this.canvasBox = el("div", { class: "rcca-box rcca-canvas-box" }, [this.display, this.overlay]);
    this.frameImg = el("img", { class: "rcca-frame", alt: "live frame" });
    this.frameCaption = el("div", { class: "rcca-caption" });
    this.liveBox = el("div", { class: "rcca-box rcca-live", style: "display:none" }, [this.frameImg, this.frameCaption]);
    const views = el("div", { class: "rcca-views" }, [this.canvasBox, this.liveBox]);
    this.status = el("div", { class: "rcca-status" });
    // the Live toggle sits with the line that reports the live state
    const footer = el("div", { class: "rcca-footer" }, [this.liveButton, this.status]);
    this.root = el("div", { class: "rcca-pal" }, [bar, this.regionList, views, footer]);

    this.display.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.display.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.display.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.display.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    this.display.addEventListener("pointerleave", () => this.drawCursor(null));
    // the graph canvas zooms on wheel; over the drawing, the wheel changes the brush size instead
    this.display.addEventListener("wheel", (e) => {
      e.preventDefault();
      e.stopPropagation();
      this.setTool({ size: Math.max(1, Math.min(256, this.tool.size * (e.deltaY < 0 ? 1.15 : 1 / 1.15))) });
    }, { passive: false });
    new ResizeObserver(() => this.fitCanvas()).observe(this.canvasBox);
    // the Vue view mounts the element into its own node DOM, which resizes it
    new ResizeObserver(() => this.fitNodes2Grid()).observe(this.root);
    this.syncToolbar();
  }

  /** Scale the display to fit its box, keeping the drawing's aspect ratio (the masks stay full size). */
  fitCanvas() {
    const bw = this.canvasBox.clientWidth, bh = this.canvasBox.clientHeight;
    if (!bw || !bh) return;
    const s = Math.min(bw / this.width, bh / this.height);
    const w = Math.max(1, Math.floor(this.width * s)), h = Math.max(1, Math.floor(this.height * s));
    for (const c of [this.display, this.overlay]) {
      c.style.width = `${w}px`;
      c.style.height = `${h}px`;
    }
  }

  /** Nodes 2.0 (Vue) view, frontends that lay the widgets out as a grid (1.4x and later): each
   * expanding widget's row is "auto" and shares the free height, so the background prompt's box grows
   * and the drawing shrinks, and getMinHeight/getMaxHeight are not read. Give the drawing's row the
   * free height (at least MIN_WIDGET_HEIGHT) and every other row its content's; the frontend rewrites
   * the rows when the node's widgets change, so watch for that. No-op in the classic view. */
  fitNodes2Grid() {
    const grid = this.root.closest(".lg-node-widgets");
    if (!grid || getComputedStyle(grid).display !== "grid") return;
    const rows = [...grid.querySelectorAll(":scope > * > [data-widget-name]")];
    if (!rows.some((r) => r.contains(this.root))) return;
    const tracks = rows.map((r) => (r.contains(this.root) ? `minmax(${MIN_WIDGET_HEIGHT}px, 1fr)` : "min-content")).join(" ");
    const style = grid.style;
    if (style.getPropertyValue("grid-template-rows") !== tracks || style.getPropertyPriority("grid-template-rows") !== "important") {
      style.setProperty("grid-template-rows", tracks, "important");
    }
    if (this.watchedGrid !== grid) {
      this.watchedGrid = grid;
      new MutationObserver(() => this.fitNodes2Grid()).observe(grid, { attributes: true, attributeFilter: ["style"], childList: true, subtree: false });
    }
  }

  syncToolbar() {
    this.sizeInput.value = String(Math.round(this.tool.size));
    this.sizeLabel.textContent = `${Math.round(this.tool.size)} px`;
    this.opacityInput.value = String(this.tool.opacity);
    this.opacityLabel.textContent = `${Math.round(this.tool.opacity * 100)} %`;
    this.eraserButton.setAttribute("aria-pressed", String(this.tool.eraser));
    this.undoButton.disabled = !this.undoStack.length;
    this.redoButton.disabled = !this.redoStack.length;
    const hasActive = this.active >= 0;
    this.clearButton.disabled = this.fillButton.disabled = !hasActive;
    this.addButton.disabled = this.regions.length >= MAX_REGIONS;
    this.bgClearButton.disabled = !this.background;
    this.photoButton.setAttribute("aria-pressed", String(this.usePhoto));
  }

  renderRegionList() {
    renderRegionList(this);
  }

  // ---- regions ----------------------------------------------------------------------------------
  newRegion({ name, color, prompt = "", negative = "", opacity = 1, canvas = null, dataUrl = null } = {}) {
    const index = this.regions.length;
    const r = {
      uid: ++regionUid,
      name: name ?? `region ${index + 1}`,
      color: HEX.test(color ?? "") ? color : this.freeColor(),
      prompt, negative, opacity,
      canvas: canvas ?? makeCanvas(this.width, this.height),
      tint: makeCanvas(this.width, this.height),
      dataUrl, // cached PNG of `canvas`; null when the canvas changed since
      // live deltas: where this region was in an accepted edit, {session, seq, index} (a delta may refer
      // to it only while that edit is the session's last), and what changed since it was sent: null
      // nothing, a box {x0, y0, x1, y1}, or "all"
      base: null,
      dirty: null,
    };
    this.retint(r);
    return r;
  }

  freeColor() {
    const used = new Set(this.regions.map((r) => r.color.toLowerCase()));
    return DEFAULT_COLORS.find((c) => !used.has(c)) ?? DEFAULT_COLORS[this.regions.length % DEFAULT_COLORS.length];
  }

  /** Add a region (the "+ region" button); returns its index. */
  addRegion(fields = {}) {
    if (this.regions.length >= MAX_REGIONS) {
      this.setError(`at most ${MAX_REGIONS} regions`);
      return -1;
    }
    this.followSize(false);
    const r = this.newRegion(fields);
    this.regions.push(r);
    this.pushUndo({ kind: "add", region: r, index: this.regions.length - 1 });
    this.active = this.regions.length - 1;
    this.renderRegionList();
    this.scheduleRender();
    this.commit();
    return this.active;
  }

  removeRegion(index) {
    const r = this.regions[index];
    if (!r) return;
    this.regions.splice(index, 1);
    this.pushUndo({ kind: "remove", region: r, index });
    this.active = Math.min(this.active, this.regions.length - 1);
    this.renderRegionList();
    this.scheduleRender();
    this.commit();
  }

  selectRegion(index) {
    this.active = index >= 0 && index < this.regions.length ? index : -1;
    this.renderRegionList();
  }

  /** Edit a region's fields from code (tests, other extensions), as typing in its row would. */
  updateRegion(index, fields) {
    const r = this.regions[index];
    if (!r) return;
    for (const k of ["name", "prompt", "negative"]) if (typeof fields[k] === "string") r[k] = fields[k];
    if (typeof fields.opacity === "number") r.opacity = Math.min(1, Math.max(0, fields.opacity));
    if (HEX.test(fields.color ?? "")) { r.color = fields.color; this.retint(r); }
    this.renderRegionList();
    this.scheduleRender();
    this.commit();
  }

  setTool(tool) {
    if (tool.size != null) this.tool.size = Math.max(1, Math.min(256, Number(tool.size)));
    if (tool.opacity != null) this.tool.opacity = Math.max(0.01, Math.min(1, Number(tool.opacity)));
    if (tool.eraser != null) this.tool.eraser = !!tool.eraser;
    this.syncToolbar();
  }

  // ---- painting -----------------------------------------------------------------------------
  toImage(e) {
    const rect = this.display.getBoundingClientRect();
    return [(e.clientX - rect.left) * this.width / rect.width, (e.clientY - rect.top) * this.height / rect.height];
  }

  onPointerDown(e) {
    if (e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    this.followSize();
    if (this.active < 0) {
      if (this.regions.length) this.selectRegion(0);
      else this.addRegion();
    }
    const r = this.regions[this.active];
    if (!r) return;
    // preventDefault keeps the focus where it was; leave a region's text box, so the graph's
    // own shortcuts (Ctrl+Z undoes the stroke through ComfyUI's history) work after painting
    if (this.root.contains(document.activeElement)) document.activeElement.blur();
    this.display.setPointerCapture?.(e.pointerId);
    // The stroke is drawn opaque on its own layer and laid over a copy of the mask taken now, with
    // the brush opacity: a stroke crossing itself stays at one opacity instead of building up.
    const strokeLayer = makeCanvas(this.width, this.height);
    const ctx = strokeLayer.getContext("2d");
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = this.tool.size;
    this.stroke = { region: r, before: copyCanvas(r.canvas), layer: strokeLayer, ctx, last: this.toImage(e),
                    opacity: this.tool.opacity, eraser: this.tool.eraser, box: null };
    const [x, y] = this.stroke.last;
    this.growStrokeBox(x, y);
    ctx.beginPath();
    ctx.arc(x, y, this.tool.size / 2, 0, Math.PI * 2);
    ctx.fill();
    this.applyStroke();
  }

  onPointerMove(e) {
    const p = this.toImage(e);
    this.drawCursor(p);
    if (!this.stroke) return;
    e.preventDefault();
    // the Nodes 2.0 view of 1.3x frontends starts dragging the node on a move with the button held
    e.stopPropagation();
    const { ctx, last } = this.stroke;
    ctx.beginPath();
    ctx.moveTo(last[0], last[1]);
    ctx.lineTo(p[0], p[1]);
    ctx.stroke();
    this.growStrokeBox(p[0], p[1]);
    this.stroke.last = p;
    this.applyStroke();
    this.liveClient.sendEdit(false);
  }

  onPointerUp(e) {
    if (!this.stroke) return;
    e.preventDefault();
    e.stopPropagation();
    this.display.releasePointerCapture?.(e.pointerId);
    const { region, before } = this.stroke;
    this.stroke = null;
    this.pushUndo({ kind: "paint", region, canvas: before });
    this.commit();
  }

  /** The stroke's bounding box so far, with a margin for the brush's antialiased edge. */
  growStrokeBox(x, y) {
    const m = this.tool.size / 2 + 2;
    const b = this.stroke.box;
    this.stroke.box = b ? { x0: Math.min(b.x0, x - m), y0: Math.min(b.y0, y - m), x1: Math.max(b.x1, x + m), y1: Math.max(b.y1, y + m) }
      : { x0: x - m, y0: y - m, x1: x + m, y1: y + m };
  }

  /** Mask = the copy taken at stroke start, then the stroke layer at the brush opacity. */
  applyStroke() {
    const { region, before, layer, opacity, eraser, box } = this.stroke;
    const ctx = region.canvas.getContext("2d");
    ctx.save();
    ctx.globalCompositeOperation = "copy";
    ctx.drawImage(before, 0, 0);
    ctx.globalCompositeOperation = eraser ? "destination-out" : "source-over";
    ctx.globalAlpha = opacity;
    ctx.drawImage(layer, 0, 0);
    ctx.restore();
    this.touched(region, box); // the mask outside the box is still the copy taken at stroke start
  }

  clear() {
    const r = this.regions[this.active];
    if (!r) return;
    this.pushUndo({ kind: "paint", region: r, canvas: copyCanvas(r.canvas) });
    r.canvas.getContext("2d").clearRect(0, 0, this.width, this.height);
    this.touched(r);
    this.commit();
  }

  fill() {
    const r = this.regions[this.active];
    if (!r) return;
    this.pushUndo({ kind: "paint", region: r, canvas: copyCanvas(r.canvas) });
    const ctx = r.canvas.getContext("2d");
    ctx.save();
    ctx.globalCompositeOperation = this.tool.eraser ? "destination-out" : "source-over";
    ctx.globalAlpha = this.tool.opacity;
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, this.width, this.height);
    ctx.restore();
    this.touched(r);
    this.commit();
  }

  /** The region's mask changed (within `box`, or anywhere). */
  touched(region, box = null) {
    region.dataUrl = null;
    const d = region.dirty;
    region.dirty = !box || d === "all" ? "all"
      : d ? { x0: Math.min(d.x0, box.x0), y0: Math.min(d.y0, box.y0), x1: Math.max(d.x1, box.x1), y1: Math.max(d.y1, box.y1) }
        : { ...box };
    this.retint(region);
    this.scheduleRender();
  }

  // ---- undo / redo ----------------------------------------------------------------------------
  pushUndo(entry) {
    this.undoStack.push(entry);
    if (this.undoStack.length > UNDO_DEPTH) this.undoStack.shift();
    this.redoStack.length = 0;
    this.syncToolbar();
  }

  /** Each entry is its own inverse once applied: apply() returns the entry that reverts it. */
  applyHistory(entry) {
    const { kind, region } = entry;
    if (kind === "paint") {
      const current = copyCanvas(region.canvas);
      const ctx = region.canvas.getContext("2d");
      ctx.save();
      ctx.globalCompositeOperation = "copy";
      ctx.drawImage(entry.canvas, 0, 0);
      ctx.restore();
      this.touched(region);
      return { kind, region, canvas: current };
    }
    if (kind === "add") { // undoing an add removes the region
      const i = this.regions.indexOf(region);
      if (i >= 0) this.regions.splice(i, 1);
      return { kind: "remove", region, index: i };
    }
    // kind === "remove": undoing a removal puts the region back where it was
    this.regions.splice(Math.min(entry.index, this.regions.length), 0, region);
    return { kind: "add", region, index: entry.index };
  }

  undo() { this.stepHistory(this.undoStack, this.redoStack); }
  redo() { this.stepHistory(this.redoStack, this.undoStack); }

  stepHistory(from, to) {
    const entry = from.pop();
    if (!entry) return;
    to.push(this.applyHistory(entry));
    const i = this.regions.indexOf(entry.region);
    this.active = i >= 0 ? i : Math.min(this.active, this.regions.length - 1);
    this.renderRegionList();
    this.scheduleRender();
    this.commit();
  }

  // ---- display ------------------------------------------------------------------------------
  retint(region) {
    const ctx = region.tint.getContext("2d");
    ctx.save();
    ctx.globalCompositeOperation = "copy";
    ctx.drawImage(region.canvas, 0, 0);
    ctx.globalCompositeOperation = "source-in";
    ctx.fillStyle = region.color;
    ctx.fillRect(0, 0, region.tint.width, region.tint.height);
    ctx.restore();
  }

  scheduleRender() {
    if (this.renderPending) return;
    this.renderPending = true;
    requestAnimationFrame(() => { this.renderPending = false; this.render(); });
  }

  render() {
    if (this.display.width !== this.width || this.display.height !== this.height) {
      this.display.width = this.overlay.width = this.width;
      this.display.height = this.overlay.height = this.height;
      this.fitCanvas();
    }
    const ctx = this.display.getContext("2d");
    ctx.save();
    ctx.fillStyle = "#202020";
    ctx.fillRect(0, 0, this.width, this.height);
    if (this.background) ctx.drawImage(this.background, 0, 0, this.width, this.height);
    ctx.globalAlpha = TINT_ALPHA;
    for (const r of this.regions) ctx.drawImage(r.tint, 0, 0);
    ctx.restore();
  }

  drawCursor(p) {
    const ctx = this.overlay.getContext("2d");
    ctx.clearRect(0, 0, this.overlay.width, this.overlay.height);
    if (!p) return;
    const scale = this.width / Math.max(1, this.display.getBoundingClientRect().width);
    ctx.lineWidth = Math.max(1, scale);
    ctx.strokeStyle = this.tool.eraser ? "#ff7b72" : "#fff";
    ctx.beginPath();
    ctx.arc(p[0], p[1], this.tool.size / 2, 0, Math.PI * 2);
    ctx.stroke();
  }

  async loadBackground(file) {
    if (!file) return;
    try {
      this.setBackground(await createImageBitmap(file));
    } catch (e) {
      this.setError(`cannot read ${file.name} as an image`);
    }
    this.fileInput.value = ""; // picking the same file again fires "change" again
  }

  setBackground(bitmap) {
    this.background?.close?.();
    this.background = bitmap;
    this.syncToolbar();
    this.scheduleRender();
    if (this.usePhoto) this.sendPhoto();
  }

  togglePhoto() {
    this.usePhoto = !this.usePhoto;
    this.syncToolbar();
    this.sendPhoto();
  }

  setError(message) {
    this.error = message;
    this.renderStatus();
  }

  // ---- state <-> regions_state ----------------------------------------------------------------
  /** The state as an object, in exactly the format of rcca_core/palette_state.py. `maskRef(region)`
   * may give a live delta's reference instead of a region's PNG (null: the PNG). */
  state(maskRef = () => null) {
    return {
      version: STATE_VERSION,
      width: this.width,
      height: this.height,
      regions: this.regions.map((r) => ({
        name: r.name, color: r.color, prompt: r.prompt, negative: r.negative, opacity: r.opacity,
        mask: maskRef(r) ?? (r.dataUrl ??= r.canvas.toDataURL("image/png")),
      })),
    };
  }

  /** The current `regions_state` widget value. */
  value() {
    return this.valueWidget?.value ?? "";
  }

  /** Re-encode the regions into regions_state and tell a live session. */
  commit() {
    clearTimeout(this.textTimer);
    this.textTimer = null;
    if (!this.valueWidget) return;
    this.followSize(false); // width/height may have been set without a callback (code, a pasted value)
    const text = JSON.stringify(this.state());
    if (text !== this.valueWidget.value) {
      this.valueWidget.value = text;
      this.node.setDirtyCanvas?.(true, true);
      // ComfyUI tracks unsaved changes and graph undo by comparing snapshots after input events;
      // a stroke ends in a pointerup it does see, typing may not: ask for a check ourselves
      // (captureCanvasState in newer frontends, where checkState is deprecated)
      const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
      if (tracker?.captureCanvasState) tracker.captureCanvasState();
      else tracker?.checkState?.();
    }
    this.renderStatus();
    this.liveClient.sendEdit(true);
  }

  commitSoon() {
    clearTimeout(this.textTimer);
    this.textTimer = setTimeout(() => this.commit(), TEXT_COMMIT_DELAY_MS);
  }

  /** Rebuild regions and canvases from the regions_state value (node created, loaded or pasted). */
  loadFromValue() {
    const generation = ++this.generation;
    const text = this.value();
    this.undoStack.length = this.redoStack.length = 0;
    this.loadError = "";
    let state = null;
    if (text && text.trim()) {
      try {
        state = JSON.parse(text);
        if (state?.version !== STATE_VERSION || !Array.isArray(state.regions)) throw new Error(`not a version ${STATE_VERSION} state`);
      } catch (e) {
        this.loadError = `regions_state cannot be read (${e.message}); it is kept as it is until you paint`;
        state = null;
      }
    }
    if (!state) {
      this.regions = [];
      this.active = -1;
      this.width = this.widgetInt("width", 512);
      this.height = this.widgetInt("height", 512);
      this.renderRegionList();
      this.scheduleRender();
      this.renderStatus();
      this.ready = Promise.resolve();
      return this.ready;
    }
    const width = Number(state.width), height = Number(state.height);
    this.ready = (async () => {
      const regions = [];
      this.width = width;
      this.height = height;
      for (const [i, s] of state.regions.entries()) {
        try {
          const { canvas, dataUrl } = await maskCanvasFromDataUrl(s.mask, width, height);
          regions.push(this.newRegion({ name: s.name, color: s.color, prompt: s.prompt ?? "", negative: s.negative ?? "",
                                        opacity: typeof s.opacity === "number" ? s.opacity : 1, canvas, dataUrl }));
        } catch (e) {
          this.loadError = `region ${i} (${s?.name ?? ""}): ${e.message}`;
          regions.push(this.newRegion({ name: s?.name, color: s?.color, prompt: s?.prompt ?? "", negative: s?.negative ?? "" }));
        }
      }
      if (generation !== this.generation) return;
      this.regions = regions;
      this.active = regions.length ? 0 : -1;
      this.renderRegionList();
      this.scheduleRender();
      this.renderStatus();
      // the drawing follows the node's size widgets; a state saved at another size is resampled
      this.followSize();
    })();
    return this.ready;
  }

  // ---- canvas size ----------------------------------------------------------------------------
  followSizeWidgets() {
    for (const name of ["width", "height"]) {
      const w = this.node.widgets?.find((x) => x.name === name);
      if (!w) continue;
      const callback = w.callback;
      w.callback = (...args) => {
        const r = callback?.apply(w, args);
        clearTimeout(this.resizeTimer);
        this.resizeTimer = setTimeout(() => this.followSize(), RESIZE_DELAY_MS);
        return r;
      };
    }
  }

  /** Match the drawing to the node's width/height widgets. */
  followSize(commit = true) {
    this.resize(this.widgetInt("width", this.width), this.widgetInt("height", this.height), commit);
  }

  /** Resample every mask to width x height (stretching: a region keeps its place relative to the image). */
  resize(width, height, commit = true) {
    if (width === this.width && height === this.height) return;
    for (const r of this.regions) {
      const c = makeCanvas(width, height);
      const ctx = c.getContext("2d");
      ctx.imageSmoothingQuality = "high";
      ctx.drawImage(r.canvas, 0, 0, width, height);
      r.canvas = c;
      r.tint = makeCanvas(width, height);
      this.touched(r);
    }
    this.width = width;
    this.height = height;
    this.undoStack.length = this.redoStack.length = 0; // the saved copies have the old size
    this.syncToolbar();
    this.render();
    if (commit) this.commit();
  }

  /** The part of a region's mask inside `box` (clipped to the canvas), as a live delta's patch. */
  maskPatch(r, box) {
    const x0 = Math.max(0, Math.floor(box.x0)), y0 = Math.max(0, Math.floor(box.y0));
    const x1 = Math.min(this.width, Math.ceil(box.x1)), y1 = Math.min(this.height, Math.ceil(box.y1));
    if (x1 <= x0 || y1 <= y0) return null; // painted outside the canvas: nothing changed
    const c = makeCanvas(x1 - x0, y1 - y0);
    c.getContext("2d").drawImage(r.canvas, x0, y0, x1 - x0, y1 - y0, 0, 0, x1 - x0, y1 - y0);
    return { x: x0, y: y0, png: c.toDataURL("image/png") };
  }

  // ---- live mode (palette_live.js) ---------------------------------------------------------
  get live() { return this.liveClient.record; }
  get liveSend() { return this.liveClient.send; }
  get session() { return this.live.session; }
  get liveState() { return this.live.state; }
  get lastFrame() { return this.live.lastFrame; }
  get lastEditSeq() { return this.live.lastEditSeq; }

  toggleLive() { this.liveClient.toggle(); }
  startLive() { return this.liveClient.start(); }
  stopLive() { return this.liveClient.stop(); }

  /** Live: send the trace image (drawn at the canvas size, as it is shown) as the photo the frames
   * start from, or null to draw without one (README, "Live drawing"). */
  sendPhoto() {
    let image = null;
    if (this.usePhoto && this.background) {
      const c = makeCanvas(this.width, this.height);
      c.getContext("2d").drawImage(this.background, 0, 0, this.width, this.height);
      image = c.toDataURL("image/png");
    }
    this.liveClient.sendPhoto(image);
  }

  renderLive() {
    const rec = this.live;
    const showFrames = !!(rec.session || rec.frameImage);
    this.liveBox.style.display = showFrames ? "" : "none";
    if (rec.frameImage && this.frameImg.getAttribute("src") !== rec.frameImage) this.frameImg.src = rec.frameImage;
    const f = rec.lastFrame;
    this.frameCaption.textContent = f ? `frame ${f.frame} · ${Number(f.fps ?? 0).toFixed(1)} frames/s · edit ${f.seq}` +
      (f.photoSeq ? ` · photo ${f.photoSeq}` : "") : "waiting for the first frame…";
    const on = !!rec.session || rec.state === "starting";
    this.liveButton.setAttribute("aria-pressed", String(on));
    this.liveButton.textContent = rec.state === "starting" ? "Live… (stop)" : on ? "Stop live" : "Live";
    this.renderStatus();
    requestAnimationFrame(() => this.fitCanvas()); // the live pane takes half the width
  }

  renderStatus() {
    const rec = this.live;
    const parts = [];
    if (rec.state === "starting") parts.push("live: starting (queued)…");
    else if (rec.session && rec.state === "paused") parts.push("live: paused: the queue is running");
    else if (rec.session) parts.push(`live: ${rec.state} · ${Number(rec.fps ?? 0).toFixed(1)} frames/s`);
    else if (rec.state === "stopped") parts.push(`live: stopped${rec.reason ? ` (${rec.reason})` : ""}`);
    const unprompted = this.regions.filter((r) => !r.prompt.trim() && this.hasPaint(r));
    const notes = [];
    if (unprompted.length) notes.push(`${unprompted.map((r) => r.name).join(", ")}: painted but no prompt`);
    if (!parts.length) parts.push(`${this.regions.length} region${this.regions.length === 1 ? "" : "s"} · ${this.width} x ${this.height}`);
    // a running session's reason is an edit the worker refused (it keeps showing the last good one)
    const refused = rec.session && rec.state === "running" ? rec.reason : "";
    const errors = [rec.error, refused, this.error, this.loadError, ...notes].filter(Boolean);
    this.status.replaceChildren(el("span", { text: parts.join(" · ") }),
                                ...errors.map((t) => el("span", { class: "rcca-error", text: ` · ${t}` })));
    this.status.title = this.status.textContent;
  }

  /** Whether a region has any paint; reads its tiny downscale, not the full mask. */
  hasPaint(region) {
    const probe = (this.probe ??= makeCanvas(32, 32));
    const ctx = probe.getContext("2d", { willReadFrequently: true });
    ctx.clearRect(0, 0, 32, 32);
    ctx.drawImage(region.canvas, 0, 0, 32, 32);
    const p = ctx.getImageData(0, 0, 32, 32).data;
    for (let i = 3; i < p.length; i += 4) if (p[i]) return true;
    return false;
  }

  // ---- node lifecycle -------------------------------------------------------------------------
  /** Called after ComfyUI restored the node's widget values (workflow load, paste, graph undo). */
  onConfigure() {
    this.root.dataset.rccaNode = String(this.node.id);
    this.loadFromValue();
    this.renderLive();
  }

  onAdded() {
    this.root.dataset.rccaNode = String(this.node.id);
    this.renderLive();
  }
}
