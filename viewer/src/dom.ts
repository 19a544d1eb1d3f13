// Tiny DOM helpers and the two colour scales (no framework: the views are a few hundred elements,
// the token strip the only large one).

type Attrs = Record<string, string | number | boolean | undefined | ((e: Event) => void)>;
type Child = Node | string | null | undefined | false;

export function h<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Attrs = {}, ...children: Child[]): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === "function") el.addEventListener(k.replace(/^on/, ""), v);
    else if (k === "class") el.className = String(v);
    else if (k === "text") el.textContent = String(v);
    else if (k === "style") el.setAttribute("style", String(v));
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

export function clear(el: Element, ...children: Child[]): void {
  el.replaceChildren(...(children.filter((c) => c !== null && c !== undefined && c !== false) as (Node | string)[]));
}

/** 0..1 → white to blue (probabilities, attention weights). */
export function seq(v: number): string {
  const t = Math.max(0, Math.min(1, v));
  const l = 97 - 55 * Math.sqrt(t);
  return `hsl(215 80% ${l.toFixed(1)}%)`;
}

/** Signed value over a scale → red (negative), white, green (positive): attribution. */
export function div(v: number, scale: number): string {
  const t = scale > 0 ? Math.max(-1, Math.min(1, v / scale)) : 0;
  const l = 97 - 50 * Math.sqrt(Math.abs(t));
  return t >= 0 ? `hsl(140 60% ${l.toFixed(1)}%)` : `hsl(0 75% ${l.toFixed(1)}%)`;
}

/** Dark text on light cells, light text on dark ones. */
export function ink(background: string): string {
  const m = /(\d+(?:\.\d+)?)%\)$/.exec(background);
  return m && Number(m[1]) < 60 ? "#fff" : "#111";
}

export interface Cell {
  value: number;
  text?: string;
  title: string;
  data?: Record<string, string | number>;
}

/** A heatmap as a CSS grid of cells: rows × columns, row and column headers, click per cell. */
export function heatmap(opts: {
  rows: string[];
  cols: string[];
  cells: Cell[][];
  colour: (v: number) => string;
  onClick?: (r: number, c: number) => void;
  selected?: [number, number] | null;
  selectedCol?: number | null;
  cls?: string;
}): HTMLElement {
  const grid = h("div", { class: `heatmap ${opts.cls ?? ""}`, style: `grid-template-columns: auto repeat(${opts.cols.length}, minmax(1.6em, 1fr))` });
  grid.append(h("div", { class: "hm-corner" }));
  opts.cols.forEach((c, j) => grid.append(h("div", { class: "hm-col" + (j === opts.selectedCol ? " hm-selcol" : ""), title: c, text: c })));
  opts.cells.forEach((row, i) => {
    grid.append(h("div", { class: "hm-row", text: opts.rows[i] }));
    row.forEach((cell, j) => {
      const bg = opts.colour(cell.value);
      const sel = opts.selected && opts.selected[0] === i && opts.selected[1] === j;
      const el = h("div", {
        class: "hm-cell" + (sel ? " hm-sel" : "") + (j === opts.selectedCol ? " hm-selcol" : ""),
        style: `background:${bg};color:${ink(bg)}`,
        title: cell.title,
        text: cell.text ?? "",
        "data-r": i,
        "data-c": j,
        onclick: opts.onClick ? () => opts.onClick!(i, j) : undefined,
      });
      for (const [k, v] of Object.entries(cell.data ?? {})) el.dataset[k] = String(v);
      grid.append(el);
    });
  });
  return grid;
}

/** A labelled horizontal bar (positive right/green, negative left/red) with its value. */
export function barRow(label: string, value: number, scale: number, text: string, data: Record<string, string> = {}): HTMLElement {
  const w = scale > 0 ? Math.min(1, Math.abs(value) / scale) * 50 : 0;
  const bar = h("div", { class: "bar-track" },
    h("div", { class: value >= 0 ? "bar pos" : "bar neg", style: value >= 0 ? `left:50%;width:${w}%` : `left:${50 - w}%;width:${w}%` }));
  const row = h("div", { class: "bar-row" }, h("span", { class: "bar-label", text: label }), bar, h("span", { class: "val", text }));
  for (const [k, v] of Object.entries(data)) row.dataset[k] = v;
  return row;
}
