// The graph tab: an attribution graph (Neuronpedia's JSON, as hexray_view/graph.py hands it over) laid out by
// layer (rows: embeddings at the bottom, logits at the top) × position (columns, labelled with the tokens).
// Edges go on one canvas, batched by sign and width (a few stroke calls for 10k edges: no DOM per edge); nodes and
// the few QK arcs are SVG, so a click or a hover is an ordinary DOM event. A click fills the side panel with the
// node's figures, its feature's top logits and contexts (hexray graph writes them), its strongest edges, and its
// QK split where it has one; hovering a QK arc (an attention score that was traced) shows that split.

import { barRow, clear, h } from "./dom";
import { q } from "./fmt";

export interface QkResults {
  pair_wise_contributors: [string, string, number][];
  top_q_marginal_contributors: [string, number][];
  top_k_marginal_contributors: [string, number][];
}

export interface GraphNode {
  id: string; kind: "feature" | "error" | "token" | "logit" | "other"; type: string; row: number; layer: string; pos: number;
  feature: number | null; label: string; clerp: string; activation: number | null; influence: number | null;
  prob: number | null; target: boolean; fkey?: string; qk?: QkResults;
}

export interface GraphContext { tokens: string[]; activation: number; position: number; start: number; id: string; activations: number[] | null }

export interface FeatureExtra {
  top_logits: [number, string, number][]; bottom_logits: [number, string, number][]; top_contexts: GraphContext[];
  density?: number; dataset?: string;
}

export interface QkTrace {
  layer: number; head: number; query: number; key: number; score: number | null; recorded_score: number | null;
  bias: number | null; pair_sum: number | null; direct_effect_on_logit: number | null; results: QkResults;
}

export interface GraphView {
  name: string; slug: string; scan: string; prompt: string; tokens: string[]; description: string;
  nodes: GraphNode[]; src: number[]; tgt: number[]; w: number[];
  features: Record<string, FeatureExtra>; qk: QkTrace[]; qk_names: Record<string, string>;
}

const DX = 13; // node pitch inside a cell
const DY = 13;
const PER_LINE = 6; // nodes side by side in a cell before it wraps
const PAD_X = 14;
const PAD_Y = 40; // room between layers for the edges' curves
const LEFT = 54; // row labels
const TOP = 30; // token labels
const BUCKETS = 8; // edge widths (per sign): one stroke call each
const EDGES_SHOWN = 12;
const MAX_DRAWN = 50_000; // edges drawn in the overview, strongest first (a clicked node draws all of its own) // strongest incoming / outgoing edges listed in the panel
let svgNs: string | null = null; // the SVG namespace, as the HTML parser gives it (no URL in the shipped script)

function svgNamespace(): string {
  if (!svgNs) {
    const div = document.createElement("div");
    div.innerHTML = "<svg></svg>";
    svgNs = div.firstElementChild!.namespaceURI!;
  }
  return svgNs;
}

function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>): SVGElementTagNameMap[K] {
  const el = document.createElementNS(svgNamespace(), tag) as SVGElementTagNameMap[K];
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

/** Edges grouped by target and by source (counting sort: O(E)), for a node's edges in the panel. */
function csr(n: number, key: number[]): { start: Int32Array; order: Int32Array } {
  const start = new Int32Array(n + 1);
  for (const k of key) start[k + 1]++;
  for (let i = 0; i < n; i++) start[i + 1] += start[i];
  const fill = start.slice(0, n);
  const order = new Int32Array(key.length);
  key.forEach((k, e) => { order[fill[k]++] = e; });
  return { start, order };
}

function num(v: number | null | undefined, digits = 4): string {
  return v == null ? "—" : Number(v.toPrecision(digits)).toString();
}

function rowName(g: GraphView, row: number, top: number): string {
  if (row === 0) return "Emb";
  const n = g.nodes.find((x) => x.row === row);
  if (n?.kind === "logit" || row === top && g.nodes.some((x) => x.row === row && x.kind === "logit")) return "Logit";
  return `L${row - 1}`;
}

/** One graph drawn into `host`, with its panel. */
class GraphTab {
  private x: Float32Array;
  private y: Float32Array;
  private width = 0;
  private height = 0;
  private incoming: { start: Int32Array; order: Int32Array };
  private outgoing: { start: Int32Array; order: Int32Array };
  private names = new Map<string, string>();
  private selected = -1;
  private maxAbs = 0;
  private base = h("canvas", { class: "g-edges" });
  private hi = h("canvas", { class: "g-edges g-hi" });
  private svgEl = svg("svg", { class: "g-svg" });
  private panel = h("aside", { id: "graph-panel", class: "graph-panel panel" });
  private qkBox = h("div", { id: "graph-qk", class: "graph-qk panel", hidden: true });
  private hover = h("span", { id: "graph-hover", class: "dim" });
  private nodeEls: SVGElement[] = [];

  constructor(private g: GraphView) {
    const n = g.nodes.length;
    this.x = new Float32Array(n);
    this.y = new Float32Array(n);
    this.incoming = csr(n, g.tgt);
    this.outgoing = csr(n, g.src);
    for (const w of g.w) this.maxAbs = Math.max(this.maxAbs, Math.abs(w));
    g.nodes.forEach((nd) => { if (!this.names.has(nd.id)) this.names.set(nd.id, nd.label); });
    for (const [k, v] of Object.entries(g.qk_names)) if (!this.names.has(k)) this.names.set(k, v);
  }

  /** Rows (present layers, bottom up) × columns (present positions); a cell holding several nodes wraps them
   * PER_LINE to a line, and its column and row grow to fit. */
  private layout(): { rows: number[]; rowY: Map<number, number>; cols: number[]; colX: Map<number, number>; colW: Map<number, number> } {
    const g = this.g;
    const cells = new Map<string, number[]>();
    g.nodes.forEach((nd, i) => {
      const key = `${nd.row}:${nd.pos}`;
      const c = cells.get(key);
      if (c) c.push(i); else cells.set(key, [i]);
    });
    const rows = [...new Set(g.nodes.map((nd) => nd.row))].sort((a, b) => a - b);
    const cols = [...new Set(g.nodes.map((nd) => nd.pos))].sort((a, b) => a - b);
    const perLine = new Map<number, number>();
    for (const [key, idx] of cells) {
      const pos = Number(key.split(":")[1]);
      perLine.set(pos, Math.max(perLine.get(pos) ?? 1, Math.min(PER_LINE, idx.length)));
    }
    const lines = new Map<number, number>();
    for (const [key, idx] of cells) {
      const [row, pos] = key.split(":").map(Number);
      lines.set(row, Math.max(lines.get(row) ?? 1, Math.ceil(idx.length / perLine.get(pos)!)));
    }
    const colX = new Map<number, number>();
    const colW = new Map<number, number>();
    let x = LEFT;
    for (const c of cols) { const w = perLine.get(c)! * DX + PAD_X; colX.set(c, x); colW.set(c, w); x += w; }
    const rowY = new Map<number, number>(); // the row's top; row 0 (embeddings) lowest on the page
    let y = TOP;
    for (const r of [...rows].reverse()) { rowY.set(r, y); y += lines.get(r)! * DY + PAD_Y; }
    this.width = x + 10;
    this.height = y + 4;
    for (const [key, idx] of cells) {
      const [row, pos] = key.split(":").map(Number);
      // most influential first (circuit-tracer's influence is cumulative: smaller is stronger)
      idx.sort((a, b) => (g.nodes[a].influence ?? 1) - (g.nodes[b].influence ?? 1) || a - b);
      const k = perLine.get(pos)!;
      const used = Math.min(k, idx.length);
      const x0 = colX.get(pos)! + (colW.get(pos)! - used * DX) / 2 + DX / 2;
      idx.forEach((i, j) => {
        this.x[i] = x0 + (j % k) * DX;
        this.y[i] = rowY.get(row)! + PAD_Y / 2 + Math.floor(j / k) * DY + DY / 2;
      });
    }
    return { rows, rowY, cols, colX, colW };
  }

  mount(host: HTMLElement): void {
    const g = this.g;
    const { rows, rowY, cols, colX, colW } = this.layout();
    const s = this.svgEl;
    s.setAttribute("width", String(this.width));
    s.setAttribute("height", String(this.height));
    const top = rows[rows.length - 1];
    for (const r of rows) {
      const t = svg("text", { x: 4, y: rowY.get(r)! + PAD_Y / 2 + DY / 2 + 4, class: "g-row" });
      t.textContent = rowName(g, r, top);
      s.append(t, svg("line", { x1: LEFT, x2: this.width, y1: rowY.get(r)! + 2, y2: rowY.get(r)! + 2, class: "g-grid" }));
    }
    for (const c of cols) {
      const t = svg("text", { x: colX.get(c)! + colW.get(c)! / 2, y: 12, class: "g-col", "text-anchor": "middle" });
      const tok = g.tokens[c];
      t.textContent = tok === undefined ? `@${c}` : q(tok).slice(1, -1).slice(0, Math.max(1, Math.floor(colW.get(c)! / 6.5)));
      if (tok !== undefined) t.append(svg("title", {}));
      if (tok !== undefined) t.lastChild!.textContent = q(tok);
      const u = svg("text", { x: colX.get(c)! + colW.get(c)! / 2, y: 24, class: "g-col dim", "text-anchor": "middle" });
      u.textContent = String(c);
      s.append(t, u);
    }
    // QK arcs: a traced attention score, key → query, above the head's layer row
    g.qk.forEach((r, j) => {
      const row = r.layer + 1;
      if (!rowY.has(row) || !colX.has(r.key) || !colX.has(r.query)) return;
      const yb = rowY.get(row)! + 4;
      const xk = colX.get(r.key)! + colW.get(r.key)! / 2;
      const xq = colX.get(r.query)! + colW.get(r.query)! / 2;
      // higher for a farther key, so that arcs into one query nest instead of covering each other; a query
      // attending to itself gets a small loop
      const d = xk === xq ? `M${xk - 1},${yb} C${xk - 12},${yb - 22} ${xk + 12},${yb - 22} ${xk + 1},${yb}`
        : `M${xk},${yb} Q${(xk + xq) / 2},${yb - 16 - Math.abs(xq - xk) / 5} ${xq},${yb}`;
      const arc = svg("path", { d, class: "qk-arc", "data-q": j });
      const hit = svg("path", { d, class: "qk-hit", "data-q": j });
      hit.addEventListener("mouseenter", (e) => this.showQk(j, e as MouseEvent));
      hit.addEventListener("mouseleave", () => { this.qkBox.hidden = true; delete document.body.dataset.qk; });
      s.append(arc, hit);
    });
    const frag = document.createDocumentFragment();
    this.nodeEls = g.nodes.map((nd, i) => {
      const x = this.x[i], y = this.y[i];
      const el = nd.kind === "feature" || nd.kind === "other"
        ? svg("circle", { cx: x, cy: y, r: 4.5 })
        : nd.kind === "logit" ? svg("path", { d: `M${x},${y - 6}L${x + 6},${y}L${x},${y + 6}L${x - 6},${y}Z` })
          : svg("rect", { x: x - 4.5, y: y - 4.5, width: 9, height: 9 });
      el.setAttribute("class", `gnode k-${nd.kind}` + (nd.qk ? " has-qk" : "") + (nd.target ? " target" : ""));
      el.setAttribute("data-i", String(i));
      el.setAttribute("data-id", nd.id);
      frag.append(el);
      return el;
    });
    s.append(frag);
    s.addEventListener("click", (e) => {
      const i = (e.target as Element).getAttribute?.("data-i");
      if (i !== null && i !== undefined) this.select(Number(i));
    });
    s.addEventListener("mouseover", (e) => {
      const i = (e.target as Element).getAttribute?.("data-i");
      if (i != null) {
        const nd = g.nodes[Number(i)];
        this.hover.textContent = `${nd.label}` + (nd.activation != null ? ` · activation ${num(nd.activation)}` : "") +
          (nd.clerp ? ` · ${nd.clerp}` : "");
        if (nd.qk) this.showQk(-1 - Number(i), e as MouseEvent);
      }
    });
    s.addEventListener("mouseout", (e) => {
      const i = (e.target as Element).getAttribute?.("data-i");
      if (i != null && g.nodes[Number(i)].qk) { this.qkBox.hidden = true; delete document.body.dataset.qk; }
    });
    const stage = h("div", { class: "g-stage", style: `width:${this.width}px;height:${this.height}px` }, this.base, this.hi, s);
    const scroller = h("div", { id: "graph", class: "g-scroll" }, stage, this.qkBox);
    const nFeat = g.nodes.filter((n) => n.kind === "feature").length;
    clear(host,
      h("div", { class: "toolbar" },
        h("span", { id: "graph-summary", text: `${g.name}: ${g.nodes.length} nodes (${nFeat} features), ${g.w.length} edges` +
          (g.w.length > MAX_DRAWN ? ` (the strongest ${MAX_DRAWN} drawn; a clicked node shows all its own)` : "") +
          (g.scan ? ` · ${g.scan}` : "") }),
        h("span", { class: "legend", text: "edges: width ∝ |weight|, green +, red −; ● feature ■ error/token ◆ logit; dashed: a traced attention score (hover)" }),
        this.hover),
      h("div", { class: "graph-wrap" }, scroller, this.panel));
    this.panel.append(h("div", { class: "dim", text: "click a node" }));
    this.drawEdges();
  }

  private canvas(c: HTMLCanvasElement): CanvasRenderingContext2D {
    // a canvas over 16k pixels a side is refused by browsers: fewer pixels per CSS pixel on a huge graph
    const dpr = Math.max(0.25, Math.min(window.devicePixelRatio || 1, 2, 16000 / this.width, 16000 / this.height));
    c.width = Math.ceil(this.width * dpr);
    c.height = Math.ceil(this.height * dpr);
    c.style.width = `${this.width}px`;
    c.style.height = `${this.height}px`;
    const ctx = c.getContext("2d")!;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return ctx;
  }

  private bucket(w: number): number {
    return this.maxAbs > 0 ? Math.min(BUCKETS - 1, Math.floor(Math.sqrt(Math.abs(w) / this.maxAbs) * BUCKETS)) : 0;
  }

  /** Draw edges `es` (all when null): one path per (sign, width bucket), weakest first so strong edges lie on top. */
  private strokeEdges(ctx: CanvasRenderingContext2D, es: Iterable<number>, alpha: number, extra = 0): void {
    const g = this.g;
    const groups: number[][] = Array.from({ length: 2 * BUCKETS }, () => []);
    for (const e of es) groups[(g.w[e] >= 0 ? 0 : BUCKETS) + this.bucket(g.w[e])].push(e);
    groups.forEach((list, k) => {
      if (!list.length) return;
      const b = k % BUCKETS;
      ctx.beginPath();
      for (const e of list) {
        const s = g.src[e], t = g.tgt[e];
        const x0 = this.x[s], y0 = this.y[s], x1 = this.x[t], y1 = this.y[t];
        ctx.moveTo(x0, y0);
        // straight: a software-rasterised canvas fills Bézier curves 3-4x slower (bench/README.md); an edge within
        // one row arcs above it so that it does not run through the nodes between
        if (y0 === y1) ctx.quadraticCurveTo((x0 + x1) / 2, y0 - 10 - Math.abs(x1 - x0) / 8, x1, y1);
        else ctx.lineTo(x1, y1);
      }
      ctx.lineWidth = 0.4 + 0.55 * (b + 1) + extra;
      const a = Math.min(1, alpha * (0.35 + 0.65 * (b + 1) / BUCKETS));
      ctx.strokeStyle = k < BUCKETS ? `rgba(34,163,90,${a})` : `rgba(229,72,77,${a})`;
      ctx.stroke();
    });
  }

  private drawEdges(): void {
    const ctx = this.canvas(this.base);
    this.strokeEdges(ctx, this.drawn(), 0.8);
    this.canvas(this.hi);
  }

  /** The edges the overview draws: all of them, or the MAX_DRAWN of largest |weight|. */
  private drawn(): Iterable<number> {
    const w = this.g.w;
    if (w.length <= MAX_DRAWN) return w.keys();
    const order = Int32Array.from(w.keys()).sort((a, b) => Math.abs(w[b]) - Math.abs(w[a]));
    return order.subarray(0, MAX_DRAWN);
  }

  private edgesOf(i: number): { inc: number[]; out: number[] } {
    const pick = (c: { start: Int32Array; order: Int32Array }) =>
      Array.from(c.order.subarray(c.start[i], c.start[i + 1])).sort((a, b) => Math.abs(this.g.w[b]) - Math.abs(this.g.w[a]));
    return { inc: pick(this.incoming), out: pick(this.outgoing) };
  }

  select(i: number): void {
    const g = this.g;
    const nd = g.nodes[i];
    if (this.selected >= 0) this.nodeEls[this.selected].classList.remove("sel");
    this.selected = i;
    this.nodeEls[i].classList.add("sel");
    const { inc, out } = this.edgesOf(i);
    const ctx = this.hi.getContext("2d")!;
    ctx.save();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.hi.width, this.hi.height);
    ctx.restore();
    this.strokeEdges(ctx, [...inc, ...out], 1, 0.6);
    this.base.classList.add("dim");
    this.fillPanel(i, inc, out);
    document.body.dataset.node = nd.id;
  }

  private fillPanel(i: number, inc: number[], out: number[]): void {
    const g = this.g;
    const nd = g.nodes[i];
    const tok = g.tokens[nd.pos];
    const rows: [string, string, string][] = [
      ["type", nd.type, "gp-type"],
      ["layer", nd.layer, "gp-layer"],
      ["position", `${nd.pos}` + (tok !== undefined ? ` ${q(tok)}` : ""), "gp-pos"],
    ];
    const table = h("table", { class: "gp-facts" }, ...rows.map(([k, v, id]) => h("tr", {}, h("th", { text: k }), h("td", { id, text: v }))));
    const fact = (k: string, v: number | null, id: string) => {
      if (v == null) return;
      const td = h("td", { id, text: num(v, 6) });
      td.dataset.value = String(v);
      table.append(h("tr", {}, h("th", { text: k }), td));
    };
    fact("activation", nd.activation, "gp-activation");
    fact("influence", nd.influence, "gp-influence");
    fact("probability", nd.prob, "gp-prob");
    const parts: (HTMLElement | null)[] = [h("h3", { id: "gp-label", text: nd.label }), table];
    if (nd.clerp) parts.push(h("div", { class: "sub", id: "gp-clerp", text: nd.clerp }));
    const extra = nd.fkey ? g.features[nd.fkey] : undefined;
    if (extra) {
      const logits = (id: string, title: string, list: [number, string, number][]) => {
        if (!list.length) return null;
        return h("div", { id }, h("h4", { text: title }),
          h("div", { class: "g-logits" }, ...list.map(([tid, text, v]) =>
            h("span", { class: "glogit", "data-token": tid, "data-value": String(v), title: `#${tid}: ${v}` },
              h("span", { class: "tok-cell", text: q(text) }), h("span", { class: "val", text: ` ${v >= 0 ? "+" : ""}${v.toFixed(3)}` })))));
      };
      parts.push(logits("gp-logits", "promotes (decoder · W_U)", extra.top_logits));
      parts.push(logits("gp-bottom", "suppresses", extra.bottom_logits));
      if (extra.top_contexts.length) {
        const sec = h("div", { id: "gp-contexts" }, h("h4", { text: `top contexts` + (extra.dataset ? ` over ${extra.dataset}` : "") +
          (extra.density != null ? ` (density ${(100 * extra.density).toFixed(3)}%)` : "") }));
        for (const c of extra.top_contexts) {
          const at = c.position - c.start;
          const line = h("div", { class: "gctx feat-ctx", "data-id": c.id, "data-activation": String(c.activation) },
            h("span", { class: "val", text: c.activation.toFixed(3) + " " }));
          c.tokens.forEach((t, j) => line.append(h("span", { class: j === at ? "feat-peak" : "", text: t.replace(/\n/g, "↵") })));
          sec.append(line);
        }
        parts.push(sec);
      }
    } else if (nd.kind === "feature") {
      parts.push(h("div", { class: "dim", text: "no top logits in this graph's file (hexray graph writes them)" }));
    }
    const edgeList = (id: string, title: string, es: number[], other: (e: number) => number) => {
      const shown = es.slice(0, EDGES_SHOWN);
      const scale = shown.length ? Math.abs(g.w[shown[0]]) : 0;
      const sec = h("div", { id }, h("h4", { text: `${title} (${es.length})` }));
      for (const e of shown) {
        const j = other(e);
        const row = barRow(g.nodes[j].label, g.w[e], scale, num(g.w[e], 3), { i: String(j), weight: String(g.w[e]) });
        row.classList.add("gedge");
        row.addEventListener("click", () => this.select(j));
        sec.append(row);
      }
      return sec;
    };
    parts.push(edgeList("gp-in", "incoming", inc, (e) => g.src[e]));
    parts.push(edgeList("gp-out", "outgoing", out, (e) => g.tgt[e]));
    if (nd.qk) parts.push(this.qkSplit(nd.qk, `QK split (${nd.label})`, null, "gp-qk"));
    clear(this.panel, ...parts);
  }

  private label(id: string): string { return this.names.get(id) ?? id; }

  /** A traced attention score: what the query side and the key side each bring, and their strongest pairs. */
  private qkSplit(res: QkResults, title: string, t: QkTrace | null, id: string): HTMLElement {
    const sec = h("div", { id, class: "qk-split" }, h("h4", { text: title }));
    if (t) {
      sec.append(h("div", { class: "sub qk-score", text: `score ${num(t.score)}` + (t.recorded_score != null ? ` (recorded ${num(t.recorded_score)})` : "") +
        (t.pair_sum != null ? ` = pairs ${num(t.pair_sum)}` : "") + (t.bias != null ? ` + bias terms ${num(t.bias)}` : "") }));
    }
    const side = (title2: string, cls: string, list: [string, number][]) => {
      const scale = Math.max(0, ...list.map(([, v]) => Math.abs(v)));
      return h("div", { class: cls }, h("h4", { text: title2 }),
        ...list.map(([n, v]) => barRow(this.label(n), v, scale, num(v, 3), { id: n })));
    };
    const pairScale = Math.max(0, ...res.pair_wise_contributors.map(([, , v]) => Math.abs(v)));
    sec.append(
      h("div", { class: "qk-pairs" }, h("h4", { text: "query side × key side" }),
        ...res.pair_wise_contributors.map(([a, b, v]) => {
          const row = barRow(`${this.label(a)} × ${this.label(b)}`, v, pairScale, num(v, 3), { q: a, k: b });
          row.classList.add("qk-pair");
          return row;
        })),
      side("query side", "qk-q", res.top_q_marginal_contributors),
      side("key side", "qk-k", res.top_k_marginal_contributors));
    return sec;
  }

  private showQk(j: number, e: MouseEvent): void {
    let sec: HTMLElement;
    if (j >= 0) {
      const t = this.g.qk[j];
      sec = this.qkSplit(t.results, `L${t.layer}H${t.head}: query @${t.query} ← key @${t.key}`, t, "qk-hover");
    } else {
      const nd = this.g.nodes[-1 - j];
      sec = this.qkSplit(nd.qk!, `QK split (${nd.label})`, null, "qk-hover");
    }
    clear(this.qkBox, sec);
    const scroller = this.qkBox.parentElement!;
    const box = scroller.getBoundingClientRect();
    const x = Math.min(e.clientX - box.left + 12, scroller.clientWidth - 370); // kept inside the visible area
    this.qkBox.style.left = `${Math.max(0, x + scroller.scrollLeft)}px`;
    this.qkBox.style.top = `${Math.max(0, e.clientY - box.top + scroller.scrollTop + 12)}px`;
    this.qkBox.hidden = false;
    document.body.dataset.qk = String(j);
  }
}

/** The graph tab's body: a graph picker when there are several, the graph and its panel. */
export function mountGraph(host: HTMLElement, graphs: GraphView[], which = 0): void {
  const body = h("div", { class: "graph-body" });
  const pick = graphs.length > 1 ? h("select", { id: "graph-select", onchange: (e) => {
    const k = Number((e.target as HTMLSelectElement).value);
    new GraphTab(graphs[k]).mount(body);
  } }, ...graphs.map((g, i) => h("option", { value: i, text: g.name, selected: i === which }))) : null;
  clear(host, pick, body);
  new GraphTab(graphs[which]).mount(body);
}

/** A page of graphs only (hexray view graph.json, hexray report graph.json): the header and the graph tab. */
export function graphPage(root: HTMLElement, graphs: GraphView[]): void {
  const g = graphs[0];
  const body = h("div", { id: "tab-body" });
  clear(root,
    h("header", { class: "top" },
      h("span", { class: "brand", text: "HexRay" }),
      h("span", { class: "meta", text: `${g.name}` + (g.scan ? ` · ${g.scan}` : "") + ` · ${g.tokens.length} tokens` +
        (g.description ? ` · ${g.description}` : "") }),
      h("nav", { class: "tabs" }, h("button", { class: "tab on", "data-tab": "graph", text: "Graph" }))),
    body);
  mountGraph(body, graphs);
}
