// rcca-palette frontend extension.
// Tints the pack's nodes, and each Add Region node with its own region colour, so a palette
// graph reads at a glance; puts the drawing canvas (palette_canvas.js) on the Regional Prompt
// Palette node and routes live-mode websocket events to it.
import { app } from "../../scripts/app.js";
import { PaletteCanvas } from "./palette_canvas.js";
import { installLiveRouting } from "./palette_live.js";

const PACK_COLOR = "#2f3d45";
const PACK_BGCOLOR = "#3b4d57";
const HEX = /^#[0-9a-fA-F]{6}$/;
// room for the toolbar, a few region rows and a usable drawing beside the live frame
const PALETTE_MIN_SIZE = [640, 820];

function tintFromRegionColour(node) {
  const widget = node.widgets?.find((w) => w.name === "color");
  const value = widget?.value?.trim?.() ?? "";
  node.color = HEX.test(value) ? value : PACK_COLOR;
  node.setDirtyCanvas?.(true, true);
}

function ensureMinSize(node) {
  const [w, h] = node.size;
  if (w < PALETTE_MIN_SIZE[0] || h < PALETTE_MIN_SIZE[1]) {
    node.setSize([Math.max(w, PALETTE_MIN_SIZE[0]), Math.max(h, PALETTE_MIN_SIZE[1])]);
  }
}

function chain(proto, name, after) {
  const original = proto[name];
  proto[name] = function () {
    const result = original?.apply(this, arguments);
    after.apply(this, arguments);
    return result;
  };
}

app.registerExtension({
  name: "rcca.palette",
  setup() {
    installLiveRouting();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("RCCA")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.color = PACK_COLOR;
      this.bgcolor = PACK_BGCOLOR;
      if (nodeData.name === "RCCAAddRegion") {
        const widget = this.widgets?.find((w) => w.name === "color");
        if (widget) {
          const callback = widget.callback;
          widget.callback = (...args) => {
            const r = callback?.apply(widget, args);
            tintFromRegionColour(this);
            return r;
          };
        }
      }
      if (nodeData.name === "RCCARegionalPromptPalette") {
        this.rccaCanvas = new PaletteCanvas(this);
        ensureMinSize(this);
      }
      return result;
    };
    if (nodeData.name === "RCCAAddRegion") {
      chain(nodeType.prototype, "onConfigure", function () { tintFromRegionColour(this); });
    }
    if (nodeData.name === "RCCARegionalPromptPalette") {
      // widget values are restored before onConfigure: rebuild the drawing from regions_state
      chain(nodeType.prototype, "onConfigure", function () {
        ensureMinSize(this);
        this.rccaCanvas?.onConfigure();
      });
      chain(nodeType.prototype, "onAdded", function () { this.rccaCanvas?.onAdded(); });
    }
  },
});
