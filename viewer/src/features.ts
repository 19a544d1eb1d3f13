// The features panel (a dictionary given with --dict): the selected token's strongest features, each clickable
// to colour the token strip by that feature's activation. Kept apart from the strip's own code: the app only asks
// for the panel and for a feature's values per token.

import { h } from "./dom";
import { q } from "./fmt";
import type { FeatureMeaning, RunFeatures } from "./types";

export const FEATURES_SHOWN = 10;

export interface FeatureRef { layer: number; feature: number }

export function featureLabel(f: FeatureRef): string { return `L${f.layer}F${f.feature}`; }

/** The features active at `pos` over every layer, strongest first (as `hexray features --position` ranks them). */
export function featuresAt(rf: RunFeatures, pos: number): { layer: number; feature: number; value: number }[] {
  const out: { layer: number; feature: number; value: number }[] = [];
  for (const l of rf.layers) {
    for (let k = l.indptr[pos]; k < l.indptr[pos + 1]; k++) out.push({ layer: l.layer, feature: l.indices[k], value: l.values[k] });
  }
  return out.sort((a, b) => b.value - a.value || a.layer - b.layer || a.feature - b.feature);
}

/** One feature's activation at every position (0 where inactive). */
export function featureValues(rf: RunFeatures, f: FeatureRef): number[] {
  const l = rf.layers.find((x) => x.layer === f.layer);
  if (!l) return [];
  const out = new Array<number>(l.indptr.length - 1).fill(0);
  for (let p = 0; p + 1 < l.indptr.length; p++) {
    for (let k = l.indptr[p]; k < l.indptr[p + 1]; k++) if (l.indices[k] === f.feature) out[p] = l.values[k];
  }
  return out;
}

/** 0..1 → white to orange: a feature's activation over its maximum in the run. */
export function featureColour(v: number, max: number): string {
  const t = max > 0 ? Math.max(0, Math.min(1, v / max)) : 0;
  return t > 0 ? `hsl(30 95% ${(97 - 47 * Math.sqrt(t)).toFixed(1)}%)` : "";
}

export function featuresPanel(rf: RunFeatures | null, pos: number, selected: FeatureRef | null,
                              onSelect: (f: FeatureRef | null) => void): HTMLElement {
  const sec = h("section", { id: "p-features", class: "panel" }, h("h3", { text: "Features" }));
  if (!rf) return sec.appendChild(h("div", { class: "dim", text: "not in this report for this run" })), sec;
  if (rf.error) return sec.appendChild(h("div", { class: "dim", id: "features-error", text: rf.error })), sec;
  const active = featuresAt(rf, pos);
  sec.append(h("div", { class: "sub", text: `${rf.dict} (${rf.kind}): ${active.length} active at this token; click one to colour the strip` }));
  const scale = Math.max(1e-9, ...active.map((a) => a.value));
  for (const a of active.slice(0, FEATURES_SHOWN)) {
    const label = featureLabel(a);
    const info = rf.info[label];
    const on = selected !== null && selected.layer === a.layer && selected.feature === a.feature;
    const row = h("div", { class: "feat-row" + (on ? " on" : ""), "data-label": label, "data-value": a.value.toFixed(3),
      onclick: () => onSelect(on ? null : a) },
      h("span", { class: "feat-label", text: label }),
      h("span", { class: "feat-bar", style: `width:${(60 * a.value / scale).toFixed(1)}px` }),
      h("span", { class: "val", text: a.value.toFixed(3) }),
      info ? h("span", { class: "dim", text: ` → ${info.top.slice(0, 3).map(q).join(" ")}` }) : null,
      info?.explanation ? h("span", { class: "feat-expl", text: ` ${info.explanation}` }) : null);
    sec.append(row);
  }
  return sec;
}

/** A clicked feature over the dataset given to `hexray view --dataset`: density, histogram, top contexts. */
export function meaningPanel(m: FeatureMeaning): HTMLElement {
  const sec = h("section", { id: "p-meaning", class: "panel wide" },
    h("h3", { text: `${m.label} over ${m.dataset}` + (m.explanation ? `: ${m.explanation}` : "") }),
    h("div", { class: "sub", id: "meaning-summary",
      text: `density ${(100 * m.density).toFixed(3)}% (${m.n_active} of ${m.n_tokens} tokens in ${m.n_runs} runs) · max ${m.max.toFixed(3)} · mean when active ${m.mean_active.toFixed(3)}` +
        (m.top_logits?.length ? ` · promotes ${m.top_logits.slice(0, 5).map(([, t]) => q(t)).join(" ")}` : "") }));
  const peak = Math.max(1, ...m.histogram.counts);
  const hist = h("div", { class: "feat-hist" });
  m.histogram.counts.forEach((c, i) => {
    if (c) hist.append(h("span", { class: "feat-hbar", title: `[${m.histogram.edges[i].toPrecision(3)}, ${m.histogram.edges[i + 1].toPrecision(3)}): ${c}`,
      style: `height:${(2 + 38 * c / peak).toFixed(1)}px` }));
  });
  sec.append(hist);
  for (const c of m.top_contexts) {
    const at = c.position - c.start;
    const line = h("div", { class: "feat-ctx", "data-id": String(c.id), "data-position": c.position },
      h("span", { class: "val", text: c.activation.toFixed(3) + " " }));
    c.tokens.forEach((t, i) => line.append(h("span", { class: i === at ? "feat-peak" : "",
      style: `background:${featureColour(c.activations[i], m.max)}`, text: t.replace(/\n/g, "↵") })));
    sec.append(line);
  }
  return sec;
}
