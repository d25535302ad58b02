// rcca-palette frontend extension.
// Tints the pack's nodes, and each Add Region node with its own region colour, so a palette
// graph reads at a glance. (The drawing canvas widget on the palette node comes with live mode.)
import { app } from "../../scripts/app.js";

const PACK_COLOR = "#2f3d45";
const PACK_BGCOLOR = "#3b4d57";
const HEX = /^#[0-9a-fA-F]{6}$/;

function tintFromRegionColour(node) {
  const widget = node.widgets?.find((w) => w.name === "color");
  const value = widget?.value?.trim?.() ?? "";
  node.color = HEX.test(value) ? value : PACK_COLOR;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "rcca.palette",
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
      return result;
    };
    if (nodeData.name === "RCCAAddRegion") {
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        tintFromRegionColour(this);
        return result;
      };
    }
  },
});
