// The Patching tab: an activation patching sweep that `hexray patch -o` stored beside its two runs, as a
// heatmap (rows: layers, or one per head of each layer for heads-by-pos; columns: positions or heads).
// A cell's colour is its normalised value, 0 = the corrupt run, 1 = the clean run (diverging: green
// towards the clean run, red away from it); hover or click a cell for its raw metric value.

import { clear, div, h, heatmap } from "./dom";
import { q, signed } from "./fmt";
import type { Source } from "./source";
import type { TraceOverview } from "./types";

/** A sweep as the overview lists it (data.patch_summaries). */
export interface PatchSummary {
  index: number;
  sweep: string;
  metric: string;
}

/** One sweep as data.patch_sweep sends it; a report holds {error} instead for a sweep it could not read. */
export interface PatchSweep {
  index: number;
  sweep: string;
  metric: string;
  axes: string[];
  columns: "pos" | "head";
  rows: string[];
  row_keys: [number, number | null][]; // [layer, head | null] of each row
  cols: { clean: string[]; corrupt: string[] }; // the tokens at each position in both runs (or the head names)
  clean: { run: number; prompt: string; value: number | null };
  corrupt: { run: number; prompt: string; value: number | null };
  values: (number | null)[][]; // raw metric value after each patch, rows × cols
  normalized: (number | null)[][]; // (value - corrupt) / (clean - corrupt)
  notes: string[];
  error?: string;
}

/** Whether any open trace holds a sweep (the tab is shown only then). */
export function hasPatch(traces: TraceOverview[]): boolean {
  return traces.some((t) => (t.patch ?? []).length > 0);
}

const fmtRaw = (v: number | null) => (v == null ? "—" : signed(v, 4));
const fmtNorm = (v: number | null) => (v == null ? "—" : signed(v, 2));

/** The tab: a menu of every sweep of every open trace (when there is more than one), then the chosen one. */
export async function renderPatchTab(body: HTMLElement, source: Source, traces: TraceOverview[], current: number): Promise<void> {
  const all = traces.flatMap((t, ti) => (t.patch ?? []).map((s) => ({ t: ti, s })));
  const first = Math.max(0, all.findIndex((x) => x.t === current));
  const out = h("div", { id: "patch-out" });
  const root = h("div", { id: "patch", class: "patch" });
  if (all.length > 1) {
    const sel = h("select", { id: "patch-select", onchange: () => void showSweep(out, source, traces, all[Number(sel.value)]) },
      ...all.map(({ t, s }, i) => h("option", { value: i, selected: i === first, text: `${traces[t].name}: ${s.sweep} · ${s.metric}` })));
    root.append(h("div", { class: "toolbar" }, sel));
  }
  root.append(out);
  clear(body, root);
  if (all.length) await showSweep(out, source, traces, all[first]);
}

let shown = 0; // drops the answer for a sweep picked before the last one

async function showSweep(out: HTMLElement, source: Source, traces: TraceOverview[], pick: { t: number; s: PatchSummary }): Promise<void> {
  const my = ++shown;
  delete document.body.dataset.patch;
  clear(out, h("div", { class: "dim", text: "loading…" }));
  let sweep: PatchSweep | null;
  try {
    sweep = await source.patch(pick.t, pick.s.index);
  } catch (err) {
    sweep = { error: String(err).replace(/^Error: /, "") } as PatchSweep;
  }
  if (my !== shown || !out.isConnected) return;
  if (!sweep || sweep.error) {
    clear(out, h("div", { id: "patch-error", class: "dim", text: sweep ? `${traces[pick.t].name}: this sweep cannot be shown: ${sweep.error}`
      : "not embedded in this report" }));
    document.body.dataset.patch = "error";
    return;
  }
  const sw = sweep;
  const finite = sw.normalized.flat().filter((v): v is number => v != null);
  const scale = Math.max(1, ...finite.map(Math.abs)); // 1 = the clean run is full colour unless a patch overshoots
  const byPos = sw.columns === "pos";
  // Tokens quoted as the CLI quotes them (a space token is `" "`, not a blank header); clean/corrupt where they differ.
  const cols = byPos ? sw.cols.clean.map((c, j) => (c === sw.cols.corrupt[j] ? q(c) : `${q(c)}/${q(sw.cols.corrupt[j])}`)) : sw.cols.clean;
  const where = (i: number, j: number) => {
    // the row's name (L3, L3H2, L3KV1: a key estimate's key/value head), and the column's head or position
    const at = byPos ? `position ${j} ${q(sw.cols.clean[j])}` + (sw.cols.clean[j] !== sw.cols.corrupt[j] ? ` (corrupt ${q(sw.cols.corrupt[j])})` : "") : "";
    return [byPos ? sw.rows[i] : sw.rows[i] + sw.cols.clean[j], at].filter(Boolean).join(" · ");
  };
  const info = h("div", { id: "patch-cell", class: "patch-cell dim", text: "click a cell for its values" });
  const show = (i: number, j: number) => {
    clear(info,
      h("div", { class: "patch-where", text: where(i, j) }),
      h("div", {}, "raw metric ", h("b", { id: "patch-raw", text: fmtRaw(sw.values[i][j]) }),
        " · normalised ", h("b", { id: "patch-norm", text: fmtNorm(sw.normalized[i][j]) })),
      h("div", { text: `clean ${fmtRaw(sw.clean.value)} · corrupt ${fmtRaw(sw.corrupt.value)}` }),
      h("div", { text: `sweep ${sw.sweep} · metric ${sw.metric}` }));
    info.classList.remove("dim");
    grid.querySelectorAll(".hm-sel").forEach((e) => e.classList.remove("hm-sel"));
    grid.querySelector(`.hm-cell[data-r="${i}"][data-c="${j}"]`)?.classList.add("hm-sel");
  };
  const grid = heatmap({
    cls: "patch-grid", rows: sw.rows, cols,
    colour: (v) => (Number.isFinite(v) ? div(v, scale) : "#e5e7eb"),
    cells: sw.values.map((row, i) => row.map((raw, j) => {
      const norm = sw.normalized[i][j];
      return {
        value: norm ?? NaN, text: fmtNorm(norm),
        title: `${where(i, j)}\nraw ${fmtRaw(raw)} · normalised ${fmtNorm(norm)}\nclean ${fmtRaw(sw.clean.value)} · corrupt ${fmtRaw(sw.corrupt.value)}\n${sw.sweep}: ${sw.metric}`,
        data: { raw: raw == null ? "" : String(raw), norm: norm == null ? "" : String(norm), layer: sw.row_keys[i][0],
          ...(byPos ? { pos: j } : { head: j }), ...(sw.row_keys[i][1] != null ? { head: sw.row_keys[i][1]! } : {}) },
      };
    })),
    onClick: show,
  });
  grid.querySelectorAll(".hm-col").forEach((el, j) => { if (byPos && sw.cols.clean[j] !== sw.cols.corrupt[j]) el.classList.add("patch-diffcol"); });
  const run = (side: "clean" | "corrupt") => `${side} ${q(sw[side].prompt)} = ${fmtRaw(sw[side].value)}`;
  clear(out,
    h("div", { id: "patch-head", class: "sub", text: `${traces[pick.t].name}: ${sw.sweep} sweep (${sw.rows.length} rows × ${cols.length} ${byPos ? "positions" : "heads"}); metric ${sw.metric}` }),
    h("div", { class: "sub", text: `${run("clean")} · ${run("corrupt")}` }),
    h("div", { class: "legend", text: `cell: the normalised metric after patching ${patched(sw)} from the clean run into the corrupt one ` +
      `(0 = corrupt, 1 = clean); green towards the clean run, red away from it (full colour at ±${scale.toFixed(2)})` +
      (byPos ? "; bold columns: the tokens the prompts differ in" : "") }),
    ...sw.notes.map((n) => h("div", { class: "patch-note", text: n })),
    h("section", { class: "panel wide patch-panel" }, grid), info);
  document.body.dataset.patch = `${pick.t}.${pick.s.index}`;
}

/** What one cell patched, in words. */
function patched(sw: PatchSweep): string {
  if (sw.axes.length === 3) return "that head's output at that position";
  if (sw.columns === "head") return sw.sweep.startsWith("pattern") ? "that head's attention pattern" : "that head's output at every position";
  return `that layer's ${sw.sweep.split(" ")[0]} at that position`;
}
