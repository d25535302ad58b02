// rcca-palette: the region list of the palette widget: one row per region (colour, name, prompt,
// negative, strength, remove) that edits the canvas's regions. Exports only.
import { el } from "./palette_dom.js";

/** Rebuild the rows of `canvas.regionList` from `canvas.regions`, the active one highlighted. */
export function renderRegionList(canvas) {
  canvas.regionList.replaceChildren(...canvas.regions.map((r, i) => {
    const row = el("div", { class: "rcca-region" + (i === canvas.active ? " rcca-active" : ""), "data-index": String(i) });
    const color = el("input", { type: "color", value: r.color, class: "rcca-region-color", title: "Region colour" });
    color.addEventListener("input", () => { r.color = color.value; canvas.retint(r); canvas.scheduleRender(); });
    color.addEventListener("change", () => canvas.commit());
    const text = (cls, key, placeholder) => {
      const input = el("input", { type: "text", class: cls, placeholder, title: placeholder });
      input.value = r[key];
      input.addEventListener("input", () => { r[key] = input.value; canvas.commitSoon(); });
      input.addEventListener("change", () => canvas.commit());
      return input;
    };
    const strength = el("input", { type: "number", min: "0", max: "1", step: "0.05", class: "rcca-region-opacity",
                                   title: "Region strength: coverage = strength x painted mask" });
    strength.value = String(r.opacity);
    strength.addEventListener("change", () => {
      const v = Number(strength.value);
      r.opacity = Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : 1;
      strength.value = String(r.opacity);
      canvas.commit();
    });
    const remove = el("button", { text: "×", class: "rcca-region-remove", title: "Remove this region (undo brings it back)" });
    remove.addEventListener("click", (e) => { e.stopPropagation(); canvas.removeRegion(i); });
    row.append(color, text("rcca-region-name", "name", "name"), text("rcca-region-prompt", "prompt", "prompt"),
               text("rcca-region-negative", "negative", "negative (optional)"), strength, remove);
    row.addEventListener("pointerdown", () => { if (canvas.active !== i) canvas.selectRegion(i); });
    return row;
  }));
  canvas.syncToolbar();
}
