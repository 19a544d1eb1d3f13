// The viewer: a token strip and, for the selected token, its panels; chain-of-thought and diff tabs.

import { barRow, clear, div, h, heatmap, seq } from "./dom";
import { pct, q, sci, signed, visible } from "./fmt";
import type { Source } from "./source";
import { hasPatch, renderPatchTab } from "./patch";
import { type FeatureRef, featureColour, featureLabel, featuresPanel, featureValues, meaningPanel } from "./features";
import { type GraphView, mountGraph } from "./graph";
import type { AttnRows, Colours, Detail, LensGrid, RunFeatures, Side, TraceOverview } from "./types";

const LENS_BEFORE = 12;
const LENS_AFTER = 12;
const LENS_PAGE = 32;
const BLOCK_MIN = 200; // tokens in a block of the strip before a line break may end it
const BLOCK_MAX = 600; // ... and without one

export class App {
  private traces: TraceOverview[] = [];
  private t = 0;
  private run = 0;
  private pos = 0;
  private head: [number, number] | null = null; // selected attention head (layer, head)
  private colourBy = "probability";
  private colours: Colours | null = null;
  private tab: "tokens" | "cot" | "diff" | "patch" | "graph" = "tokens";
  private graphs: GraphView[] = []; // attribution graphs given beside the traces (graph.ts)
  private seq = 0; // drops answers to an older selection
  private tokens: HTMLSpanElement[] = [];
  private laidOut: HTMLElement[] = []; // strip blocks held laid out while the selection is in them (scrollToToken)
  private overlay: [number, number][] | null = null; // the selected head's heavy keys, underlined on the strip
  private sourcePositions = new Set<number>();
  private painted: number[] = []; // tokens the overlay last touched
  private stripValues: (number | null)[] | null = null; // the component colouring shown, if any
  private runFeatures: RunFeatures | null = null; // with --dict: the run's features (features.ts)
  private feature: FeatureRef | null = null; // the feature the strip is coloured by, if any
  private featureVals: number[] | null = null;

  private root: HTMLElement;
  private strip = h("div", { id: "strip", class: "strip", tabindex: 0 });
  private status = h("div", { id: "status", class: "status" });
  private panels = h("div", { id: "panels", class: "panels" });
  private tabBody = h("div", { id: "tab-body" });

  constructor(root: HTMLElement, private source: Source) {
    this.root = root;
  }

  async start(): Promise<void> {
    this.traces = await this.source.overview();
    this.graphs = (await this.source.graphs?.()) ?? [];
    const hash = new URLSearchParams(location.hash.slice(1));
    const start = this.source.start;
    this.t = clampInt(hash.get("trace") ?? String(start?.trace ?? ""), 0, this.traces.length - 1, 0);
    this.run = clampInt(hash.get("run") ?? String(start?.run ?? ""), 0, this.traces[this.t].runs.length - 1, 0);
    const n = this.currentRun().labels.length;
    this.pos = clampInt(hash.get("pos") ?? String(start?.position ?? ""), 0, n - 1, n - 1);
    // A sweep written by `hexray patch -o` is opened to be looked at: its heatmap first, unless the URL says
    const tab = hash.get("tab");
    if (tab === "tokens" || tab === "cot" || tab === "diff" || (tab === "patch" && hasPatch(this.traces))) this.tab = tab;
    else if (tab === "graph" && this.graphs.length) this.tab = tab;
    else if (!tab && (this.traces[this.t].patch ?? []).length > 0) this.tab = "patch";
    document.addEventListener("keydown", (e) => this.onKey(e));
    this.render();
  }

  private currentTrace() { return this.traces[this.t]; }
  private currentRun() { return this.currentTrace().runs[this.run]; }

  private render(): void {
    const tr = this.currentTrace();
    const tabs = h("nav", { class: "tabs" },
      ...(["tokens", "cot", "diff", ...(hasPatch(this.traces) ? ["patch"] as const : []),
        ...(this.graphs.length ? ["graph"] as const : [])] as const).map((name) =>
        h("button", { class: "tab" + (this.tab === name ? " on" : ""), "data-tab": name,
          text: { tokens: "Tokens", cot: "Chain of thought", diff: "Diff", patch: "Patching", graph: "Graph" }[name],
          onclick: () => { this.tab = name; this.render(); } })));
    const traceSel = this.traces.length > 1 ? h("select", { id: "trace-select", onchange: (e) => {
      this.t = Number((e.target as HTMLSelectElement).value); this.run = 0; this.resetRun(); } },
      ...this.traces.map((x, i) => h("option", { value: i, text: x.name, selected: i === this.t }))) : null;
    const runSel = tr.runs.length > 1 ? h("select", { id: "run-select", onchange: (e) => {
      this.run = Number((e.target as HTMLSelectElement).value); this.resetRun(); } },
      ...tr.runs.map((r, i) => h("option", { value: i, text: `run ${r.id}: ${r.prompt.slice(0, 40)}`, selected: i === this.run }))) : null;
    clear(this.root,
      h("header", { class: "top" },
        h("span", { class: "brand", text: "HexRay" }),
        h("span", { class: "meta", text: `${tr.name} · ${tr.model} · ${tr.n_layers} layers × ${tr.n_heads} heads · ${this.currentRun().labels.length} tokens` }),
        traceSel, runSel, tabs),
      this.tabBody);
    if (this.tab === "tokens") this.renderTokensTab();
    else if (this.tab === "cot") void this.renderCot();
    else if (this.tab === "patch") void renderPatchTab(this.tabBody, this.source, this.traces, this.t);
    else if (this.tab === "graph") mountGraph(this.tabBody, this.graphs);
    else this.renderDiffTab();
  }

  private resetRun(): void {
    this.pos = this.currentRun().labels.length - 1;
    this.colours = null;
    this.colourBy = "probability";
    this.head = null;
    this.runFeatures = this.feature = this.featureVals = null;
    this.render();
  }

  // -- tokens tab ---------------------------------------------------------------------------

  private renderTokensTab(): void {
    const r = this.currentRun();
    const options = ["probability", ...r.components, "Bias"];
    const colourSel = h("select", { id: "colour-select", onchange: (e) => void this.setColour((e.target as HTMLSelectElement).value) },
      ...options.map((o) => h("option", { value: o, text: o === "probability" ? "colour: probability" : `colour: ${o} attribution`, selected: o === this.colourBy })));
    clear(this.tabBody,
      h("div", { class: "toolbar" }, colourSel, h("span", { class: "legend", id: "legend" }), h("span", { class: "hint", text: "click a token, or ← / →" })),
      this.strip, this.status, this.panels);
    this.buildStrip();
    this.recolour();
    void this.select(this.pos);
  }

  /** The strip in blocks of a few hundred tokens (ending at a line break where there is one), each with
   * `content-visibility: auto`: the browser lays out and paints only the blocks in view, so a click on a
   * 16k-token strip repaints a few hundred tokens, not all of them. */
  private buildStrip(): void {
    const r = this.currentRun();
    const frag = document.createDocumentFragment();
    let block = h("div", { class: "strip-block" });
    let inBlock = 0;
    let lines = 0; // the block's height, guessed (lines of ~100 characters) until the browser has laid it out
    let chars = 0;
    const close = () => {
      block.style.containIntrinsicSize = `auto ${(1.9 * (lines + Math.ceil(chars / 100))).toFixed(1)}em`;
      frag.append(block);
    };
    // The text itself (Café, an emoji), not the byte escapes of tokens that split a character: the first of them
    // shows the character, the rest are thin marks of their own (still selectable with the arrow keys).
    const texts = r.texts ?? r.labels;
    this.tokens = texts.map((label, i) => {
      const span = document.createElement("span");
      span.className = i >= r.n_prompt_tokens ? "tok gen" : "tok";
      span.dataset.i = String(i);
      if (!label && r.labels[i]) {
        span.classList.add("cont");
      } else if (!label.includes("\n")) {
        span.textContent = label ? visible(label) : "\u2205";
      } else {
        label.split("\n").forEach((p, j) => {
          if (j) span.append(h("span", { class: "nl", text: "↵" }), h("br"));
          if (p) span.append(visible(p));
        });
      }
      block.append(span);
      inBlock++;
      lines += label.split("\n").length - 1;
      chars += label.length;
      // A block ends where a line does (a token ending in a line break), so the text reads as before; a
      // text without one is cut every BLOCK_MAX tokens.
      if ((inBlock >= BLOCK_MIN && label.endsWith("\n")) || inBlock >= BLOCK_MAX) {
        close();
        block = h("div", { class: "strip-block" });
        inBlock = lines = chars = 0;
      }
      return span;
    });
    if (inBlock) close();
    for (const i of this.source.embedded?.(this.t, this.run) ?? []) this.tokens[i]?.classList.add("held");
    this.strip.replaceChildren(frag);
    this.strip.onmouseover = (e) => {
      const tok = (e.target as HTMLElement).closest(".tok") as HTMLElement | null;
      if (tok) tok.title = this.tokenTitle(Number(tok.dataset.i));
    };
    this.strip.onclick = (e) => {
      const tok = (e.target as HTMLElement).closest(".tok") as HTMLElement | null;
      if (tok) void this.select(Number(tok.dataset.i));
    };
  }

  private async setColour(by: string): Promise<void> {
    this.colourBy = by;
    this.feature = this.featureVals = null; // a component colouring replaces a feature's
    if (by !== "probability" && !this.colours) {
      this.colours = await this.source.colours(this.t, this.run);
    }
    this.recolour();
  }

  private recolour(): void {
    const r = this.currentRun();
    const legend = document.getElementById("legend");
    const comp = this.colours && this.colourBy !== "probability" ? this.colours.labels.indexOf(this.colourBy) : -1;
    const values = comp >= 0 ? this.colours!.values[comp] : null;
    const scale = values ? values.reduce<number>((m, v) => Math.max(m, Math.abs(v ?? 0)), 1e-9) : 1;
    this.stripValues = values;
    const tokens = this.tokens;
    const fv = this.featureVals;
    const fmax = fv ? Math.max(1e-9, ...fv) : 1;
    for (let i = 0; i < tokens.length; i++) {
      let bg = "";
      if (fv) {
        bg = featureColour(fv[i] ?? 0, fmax);
      } else if (values) {
        const v = i >= 1 ? values[i - 1] : null;
        if (v != null) bg = div(v, scale);
      } else {
        const p = r.prob[i];
        if (p != null) bg = probColour(p);
      }
      tokens[i].style.background = bg;
    }
    if (legend && fv && this.feature) {
      legend.textContent = `orange: activation of feature ${featureLabel(this.feature)} (max ${fmax.toFixed(3)}); click it again to clear`;
    } else if (legend) {
      legend.textContent = values ? `green: ${this.colourBy} raised the logit of the token, red: lowered it (max |${signed(scale)}|)`
        : this.colourBy !== "probability" ? "this report holds no component attributions" : "red: the model found the token unlikely, green: likely (hover for p)";
    }
    this.paintOverlay();
  }

  /** The selected head's weights (underline) and the source tokens on the strip; only touched tokens change. */
  private paintOverlay(): void {
    for (const i of this.painted) {
      const span = this.tokens[i];
      if (span) { span.style.boxShadow = ""; span.classList.remove("src"); }
    }
    this.painted = [];
    for (const [i, w] of this.overlay ?? []) {
      if (w > 0.01 && this.tokens[i]) {
        this.tokens[i].style.boxShadow = `inset 0 -${Math.max(2, Math.round(w * 6))}px 0 rgba(230, 120, 0, ${0.3 + 0.7 * w})`;
        this.painted.push(i);
      }
    }
    for (const i of this.sourcePositions) {
      this.tokens[i]?.classList.add("src");
      this.painted.push(i);
    }
  }

  /** A token's tooltip, made when the pointer reaches it (16k titles up front would delay the first paint). */
  private tokenTitle(i: number): string {
    const r = this.currentRun();
    let title = `#${i} ${q(r.labels[i])}`;
    if (this.featureVals && this.feature) title += `\n${featureLabel(this.feature)}: ${(this.featureVals[i] ?? 0).toFixed(3)}`;
    const v = this.stripValues && i >= 1 ? this.stripValues[i - 1] : null;
    if (this.stripValues) {
      if (v != null) title += `\n${this.colourBy} → this token: ${signed(v)}`;
    } else if (r.prob[i] != null) {
      title += `\np = ${pct(r.prob[i])}`;
    }
    if (r.top[i] !== undefined) title += `\ntop prediction next: ${q(r.top[i])}`;
    return title;
  }

  private onKey(e: KeyboardEvent): void {
    if (this.tab !== "tokens") return;
    const target = e.target as HTMLElement;
    if (target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA")) return;
    const n = this.currentRun().labels.length;
    if (e.key === "ArrowLeft" && this.pos > 0) { e.preventDefault(); void this.select(this.pos - 1); }
    if (e.key === "ArrowRight" && this.pos < n - 1) { e.preventDefault(); void this.select(this.pos + 1); }
  }

  async select(pos: number): Promise<void> {
    const my = ++this.seq;
    this.tokens[this.pos]?.classList.remove("sel");
    this.pos = pos;
    const tok = this.tokens[pos];
    tok?.classList.add("sel");
    if (tok) this.scrollToToken(tok);
    try { history.replaceState(null, "", `#trace=${this.t}&run=${this.run}&pos=${pos}`); } catch { /* a sandboxed notebook frame */ }
    const r = this.currentRun();
    this.status.textContent = `#${pos} ${q(r.labels[pos])}` + (r.prob[pos] != null ? ` · p = ${pct(r.prob[pos])}` : "") + " · loading…";
    // Ask for the three answers at once (the server computes them one after another, without a round trip
    // between); the head is the one selected before, so its rows can be fetched before the detail arrives.
    const lens = this.lensWindow(pos);
    const head = this.head;
    const rows = head && r.has_attention ? this.source.attention(this.t, this.run, pos, head[0], head[1]) : null;
    lens.catch(() => undefined);
    rows?.catch(() => undefined);
    let detail: Detail | null;
    try {
      detail = await this.source.detail(this.t, this.run, pos);
    } catch (err) {
      if (my === this.seq) this.fail(String(err));
      return;
    }
    if (my !== this.seq) return;
    if (!detail) {
      this.status.textContent = `#${pos} ${q(r.labels[pos])}: this report embeds the details of some positions only ` +
        "(the bold ones); `hexray view` shows every position";
      clear(this.panels);
      await this.showFeatures(my);
      this.overlay = null;
      this.paintOverlay();
      document.body.dataset.pos = String(pos);
      return;
    }
    this.status.textContent = `#${pos} ${q(detail.token)} → predicts ${q(detail.attribution.target)}`;
    const top = detail.attention?.top[0];
    if (!this.head && top) this.head = [top.layer, top.head];
    this.sourcePositions = sourcePositions(detail.source);
    clear(this.panels,
      this.predictionsPanel(detail), this.dlaPanel(detail), this.headsPanel(detail), this.neuronsPanel(detail),
      this.sourcePanel(detail),
      h("section", { id: "p-lens", class: "panel wide" }, h("h3", { text: "Logit lens" })),
      h("section", { id: "p-attn", class: "panel wide" }, h("h3", { text: "Attention" })));
    await Promise.all([this.renderLens(my, lens), this.renderAttention(my, detail, head && rows ? { head, rows } : null),
      this.showFeatures(my)]);
    if (my === this.seq) document.body.dataset.pos = String(pos);
  }

  /** With --dict: the features panel of the selected token (before the wide panels); its rows pick the feature the
   * strip is coloured by. */
  private async showFeatures(my: number): Promise<void> {
    if (!this.currentTrace().features) return;
    const t = this.t, run = this.run;
    try {
      this.runFeatures ??= await this.source.features(t, run);
    } catch (err) {
      this.runFeatures = { run, dict: "", kind: "", layers: [], info: {}, error: String(err) };
    }
    if (my !== this.seq || t !== this.t || run !== this.run) return;
    const panel = featuresPanel(this.runFeatures, this.pos, this.feature, (f) => {
      this.feature = f;
      this.featureVals = f && this.runFeatures ? featureValues(this.runFeatures, f) : null;
      this.recolour();
      void this.select(this.pos);
    });
    this.panels.insertBefore(panel, this.panels.querySelector(".panel.wide"));
    const f = this.feature;
    if (f && this.currentTrace().feature_dataset && this.source.meaning) {
      const slot = h("section", { id: "p-meaning", class: "panel wide" }, h("h3", { text: `${featureLabel(f)}: reading the dataset…` }));
      this.panels.insertBefore(slot, panel.nextSibling);
      try {
        const m = await this.source.meaning(f.layer, f.feature);
        if (m && my === this.seq) slot.replaceWith(meaningPanel(m));
      } catch (err) {
        slot.append(h("div", { class: "dim", text: String(err) }));
      }
    }
  }

  /** Scroll the strip (only the strip: scrollIntoView would also scroll a notebook around its frame). */
  private scrollToToken(tok: HTMLElement): void {
    const s = this.strip;
    // Lay out the token's block and the one before it for real first: an off-screen block has its guessed
    // height (content-visibility), and a guess off by a few wrapped lines would move the token once in view.
    for (const b of this.laidOut) b.style.contentVisibility = "";
    const block = tok.parentElement as HTMLElement | null;
    this.laidOut = [block, block?.previousElementSibling as HTMLElement | null].filter(
      (b): b is HTMLElement => !!b && b.classList.contains("strip-block"));
    for (const b of this.laidOut) b.style.contentVisibility = "visible";
    // From the rectangles: the token's offsetParent is its block (content-visibility contains layout).
    const t = tok.getBoundingClientRect(), box = s.getBoundingClientRect();
    const top = t.top - box.top - s.clientTop + s.scrollTop;
    if (top < s.scrollTop || top + t.height > s.scrollTop + s.clientHeight) {
      s.scrollTop = Math.max(0, top - s.clientHeight / 2);
    }
    // The strip wraps, so this is for a token wider than the strip only (one very long unbroken token).
    const left = t.left - box.left - s.clientLeft + s.scrollLeft;
    if (left < s.scrollLeft || left + t.width > s.scrollLeft + s.clientWidth) {
      s.scrollLeft = Math.max(0, left - s.clientWidth / 2);
    }
  }

  private fail(message: string): void {
    this.status.textContent = `error: ${message}`;
    document.body.dataset.pos = String(this.pos);
  }

  private predictionsPanel(d: Detail): HTMLElement {
    return h("section", { id: "p-pred", class: "panel" }, h("h3", { text: "Top predictions" }),
      h("table", { class: "preds" },
        h("tr", {}, h("th", { text: "token" }), h("th", { text: "logit" }), h("th", { text: "p" })),
        ...d.predictions.map((p) => h("tr", { class: "pred", "data-id": p.id },
          h("td", { class: "tok-cell", text: q(p.token) }), h("td", { class: "logit", text: signed(p.logit) }),
          h("td", { class: "prob", text: pct(p.prob) })))));
  }

  private dlaPanel(d: Detail): HTMLElement {
    const a = d.attribution;
    const parts = a.contributions;
    const scale = Math.max(1e-9, ...parts.map((c) => Math.abs(c.value)));
    const denom = parts.filter((c) => c.kind !== "bias").reduce((s, c) => s + Math.abs(c.value), 0) || 1;
    return h("section", { id: "p-dla", class: "panel" },
      h("h3", { text: "Direct logit attribution" }),
      h("div", { class: "sub", id: "dla-target", text: `target ${q(a.target)} (id ${a.target_id}${a.probability != null ? `, p = ${pct(a.probability)}` : ""}, logit ${signed(a.logit, 3)})` }),
      ...parts.map((c) => barRow(c.label, c.value, scale, signed(c.value),
        { label: c.label, share: c.kind === "bias" ? "" : pct(Math.abs(c.value) / denom) })),
      h("div", { class: "dim", text: `parts + bias ${signed(a.total, 4)} vs ${a.logit_source} logit ${signed(a.logit, 4)}: error ${sci(a.error)}` }));
  }

  private headsPanel(d: Detail): HTMLElement {
    const sec = h("section", { id: "p-heads", class: "panel" }, h("h3", { text: "Head attribution (layer × head)" }));
    if (!d.heads) return sec.appendChild(h("div", { class: "dim", text: "not in this trace: needs the model kit (W_O) and blocks.*.attn.hook_z (--hooks default)" })), sec;
    const scale = Math.max(1e-9, ...d.heads.flat().map(Math.abs));
    sec.append(heatmap({
      rows: d.heads.map((_, l) => `L${l}`), cols: d.heads[0].map((_, i) => `H${i}`), colour: (v) => div(v, scale),
      cells: d.heads.map((row, l) => row.map((v, i) => ({ value: v, text: signed(v), title: `L${l}H${i}: ${signed(v)}`, data: { label: `L${l}H${i}`, value: signed(v) } }))),
    }));
    return sec;
  }

  private neuronsPanel(d: Detail): HTMLElement {
    const sec = h("section", { id: "p-neurons", class: "panel" }, h("h3", { text: "Top neurons" }));
    if (!d.neurons) return sec.appendChild(h("div", { class: "dim", text: "not in this trace: needs the model kit (W_out) and blocks.*.mlp.hook_post (--hooks default)" })), sec;
    const scale = Math.max(1e-9, ...d.neurons.map((n) => Math.abs(n.value)));
    sec.append(...d.neurons.map((n) => barRow(n.label, n.value, scale, signed(n.value), { label: n.label })));
    return sec;
  }

  private sourcePanel(d: Detail): HTMLElement | null {
    if (d.source == null) return null;
    const r = this.currentRun();
    const items = sourceItems(d.source).slice(0, 12);
    const scale = Math.max(1e-9, ...items.map((x) => Math.abs(x.value)));
    return h("section", { id: "p-source", class: "panel" }, h("h3", { text: "Source tokens (one hop, through heads)" }),
      h("div", { class: "sub", text: "the earlier tokens heads carried into this prediction; wavy underline in the strip" }),
      ...items.map((x) => {
        const row = barRow(`#${x.position} ${q(r.labels[x.position] ?? "")}`, x.value, scale, signed(x.value), { pos: String(x.position) });
        if (x.heads?.length) row.title = x.heads.map(([label, v]) => `${label} ${signed(v)}`).join("  ");
        return row;
      }));
  }

  /** The lens columns around pos, asked for in aligned pages so that a neighbour's click finds them cached. */
  private async lensWindow(pos: number): Promise<LensGrid | null> {
    const r = this.currentRun();
    if (!r.has_lens) return null;
    const start = Math.max(0, pos - LENS_BEFORE);
    const end = Math.min(r.labels.length, pos + LENS_AFTER + 1);
    const pages = [];
    for (let p = Math.floor(start / LENS_PAGE) * LENS_PAGE; p < end; p += LENS_PAGE) {
      pages.push(this.source.lens(this.t, this.run, p, Math.min(r.labels.length, p + LENS_PAGE)));
    }
    const grids = await Promise.all(pages);
    if (grids.some((g) => !g)) return null;
    const columns = grids.flatMap((g) => g!.columns).filter((c) => c.position >= start && c.position < end);
    return { ...grids[0]!, start, end, columns };
  }

  private async renderLens(my: number, pending: Promise<LensGrid | null>): Promise<void> {
    const sec = document.getElementById("p-lens")!;
    const r = this.currentRun();
    if (!r.has_lens) { sec.append(h("div", { class: "dim", text: "this trace has no logit lens (and no model kit)" })); return; }
    let grid;
    try { grid = await pending; } catch (err) {
      if (my === this.seq) sec.append(h("div", { class: "dim", text: String(err) })); return;
    }
    if (my !== this.seq) return;
    if (!grid) { sec.append(h("div", { class: "dim", text: "not embedded in this report" })); return; }
    const layers = grid.layers;
    const col = grid.columns.findIndex((c) => c.position === this.pos);
    sec.append(h("div", { class: "sub", text: "probability of each position's final top prediction after every layer (hover: the layer's top tokens)" }),
      heatmap({
        cls: "lens", rows: layers, cols: grid.columns.map((c) => r.labels[c.position]), selectedCol: col,
        colour: (v) => seq(v),
        cells: layers.map((label, i) => grid!.columns.map((c) => ({
          value: c.prob[i], text: (c.prob[i] * 100).toFixed(0),
          title: `#${c.position} ${label}: target ${q(c.target)} rank ${c.rank[i]}, p = ${pct(c.prob[i], 2)}\ntop: ${c.top[i].map(([s, p]) => `${q(s)} ${pct(p, 0)}`).join("  ")}`,
          data: { pos: c.position, layer: label, prob: pct(c.prob[i], 2) },
        }))),
        onClick: (_r, c) => void this.select(grid!.columns[c].position),
      }));
  }

  private async renderAttention(my: number, d: Detail, early: { head: [number, number]; rows: Promise<AttnRows | null> } | null): Promise<void> {
    const sec = document.getElementById("p-attn")!;
    if (!d.attention) { sec.append(h("div", { class: "dim", text: "this trace recorded no attention patterns" })); this.overlay = null; this.paintOverlay(); return; }
    const focus = d.attention.focus;
    const grid = heatmap({
      cls: "focus", rows: focus.map((_, l) => `L${l}`), cols: focus[0].map((_, i) => `H${i}`), colour: seq,
      selected: this.head, cells: focus.map((row, l) => row.map((v, i) => ({ value: v, text: (v * 100).toFixed(0), title: `L${l}H${i}: heaviest key (first token excluded) ${pct(v, 0)}`, data: { label: `L${l}H${i}` } }))),
      onClick: (l, i) => { this.head = [l, i]; void this.select(this.pos); },
    });
    const headBox = h("div", { class: "head-rows", id: "head-rows" });
    sec.append(h("div", { class: "attn-cols" }, h("div", {}, h("div", { class: "sub", text: "focus per head (click one)" }), grid), headBox));
    if (!this.head) return;
    const [layer, head] = this.head;
    let rows: AttnRows | null;
    const same = early && early.head[0] === layer && early.head[1] === head;
    try { rows = await (same ? early!.rows : this.source.attention(this.t, this.run, this.pos, layer, head)); } catch (err) {
      if (my === this.seq) headBox.append(h("div", { class: "dim", text: String(err) })); return;
    }
    if (my !== this.seq) return;
    if (!rows) {
      headBox.append(h("div", { class: "dim", text: `L${layer}H${head}: not embedded in this report (it keeps the ${d.attention.top.length} most focused heads)` }));
      this.overlay = null; this.paintOverlay(); return;
    }
    this.overlay = rows.keys;
    this.paintOverlay();
    const r = this.currentRun();
    const keys = [...rows.keys].sort((a, b) => b[1] - a[1]).slice(0, 6);
    headBox.append(h("h4", { text: `${rows.label} from ${q(r.labels[this.pos])} (index ${this.pos})${rows.sparse ? " · heaviest keys only" : ""}` }),
      h("div", { class: "keys" }, ...keys.map(([k, w]) => h("span", { class: "key", "data-key": k, text: `${q(r.labels[k])}@${k} ${pct(w, 0)}` }))),
      h("div", { class: "dim", text: "orange underline in the strip: this head's weights" +
        (rows.rest != null && rows.n_keys > rows.keys.length
          ? ` · the other ${rows.n_keys - rows.keys.length} keys (each under 0.1%) together ${pct(rows.rest, 1)}` : "") }));
    if (rows.window.length > 1) {
      const labels = rows.window.map((_, i) => r.labels[rows!.first + i]);
      headBox.append(h("div", { class: "sub", text: "pattern rows (queries × keys) up to the selected token" }),
        heatmap({ cls: "pattern", rows: labels, cols: labels, colour: seq,
          cells: rows.window.map((row, i) => row.map((w, j) => ({ value: j <= i ? w : 0, title: `${q(labels[i])} → ${q(labels[j])}: ${pct(w, 1)}` }))) }));
    }
  }

  // -- chain of thought ---------------------------------------------------------------------

  private async renderCot(): Promise<void> {
    const body = h("div", { id: "cot", class: "cot" }, h("div", { class: "dim", text: "loading…" }));
    clear(this.tabBody, body);
    let cot;
    try { cot = await this.source.cot(this.t, this.run); } catch (err) { clear(body, h("div", { class: "dim", text: String(err) })); return; }
    if (!cot) { clear(body, h("div", { class: "dim", text: "not embedded in this report" })); return; }
    const scale = Math.max(1e-9, ...cot.steps.flatMap((s) => s.components.slice(0, 3).map(([, v]) => Math.abs(v))));
    const blocks = cot.steps.map((s) => h("div", { class: "step", "data-step": s.index },
      h("div", { class: "step-head", text: `Step ${s.index + 1}: ${s.text}` }),
      h("div", { class: "dim", text: `tokens ${s.tokens[0]}..${s.tokens[1] - 1}${s.mean_logprob != null ? `, mean log-prob ${s.mean_logprob.toFixed(2)}` : ""}` }),
      ...s.components.slice(0, 3).map(([label, v]) => barRow(label, v, scale, signed(v), { label })),
      s.attends_to.length ? h("div", { class: "sub", text: "attends to: " + s.attends_to.slice(0, 3).map(([j, m]) => `step ${j + 1} (${pct(m, 0)})`).join(", ") }) : null));
    const n = cot.steps.length;
    const peak = Math.max(1e-9, ...cot.attention.flat());
    clear(body, h("div", { class: "sub", text: `Chain of thought: ${n} steps split by ${cot.mode}; each step's figures sum the logit attribution of its tokens` }),
      h("div", { class: "cot-cols" }, h("div", { class: "steps" }, ...blocks),
        h("div", {}, h("h4", { text: "step → step attention" }),
          heatmap({ cls: "steps-attn", rows: cot.steps.map((s) => `S${s.index + 1}`), cols: cot.steps.map((s) => `S${s.index + 1}`), colour: (v) => seq(v / peak),
            cells: cot.attention.map((row, i) => row.map((v, j) => ({ value: j < i ? v : 0, text: j < i ? pct(v, 0) : "", title: `step ${i + 1} → step ${j + 1}: ${pct(v, 1)}` }))) }))));
  }

  // -- diff -----------------------------------------------------------------------------------

  private renderDiffTab(): void {
    const body = h("div", { id: "diff", class: "diff" });
    const out = h("div", { id: "diff-out" });
    const fixed = this.source.diffSides?.();
    if (fixed) {
      if (!fixed.length) { clear(this.tabBody, h("div", { class: "dim", text: "this report holds one run: nothing to compare (`hexray report a.hxr b.hxr` compares two)" })); return; }
      const sel = h("select", { id: "diff-select", onchange: () => void this.showDiff(fixed[Number(sel.value)][0], fixed[Number(sel.value)][1], out) },
        ...fixed.map(([a, b], i) => h("option", { value: i, text: `${this.sideName(a)}  vs  ${this.sideName(b)}` })));
      clear(this.tabBody, body);
      body.append(sel, out);
      void this.showDiff(fixed[0][0], fixed[0][1], out);
      return;
    }
    const a: Side = { trace: this.t, run: this.run, position: this.pos };
    const other = this.currentTrace().runs.length > 1 ? { trace: this.t, run: (this.run + 1) % this.currentTrace().runs.length }
      : { trace: (this.t + 1) % this.traces.length, run: 0 };
    const b: Side = { ...other, position: Math.min(this.pos, this.traces[other.trace].runs[other.run].labels.length - 1) };
    const pick = (side: Side, name: string) => {
      const traceSel = h("select", { id: `diff-${name}-trace` }, ...this.traces.map((x, i) => h("option", { value: i, text: x.name, selected: i === side.trace })));
      const runSel = h("select", { id: `diff-${name}-run` }, ...this.traces[side.trace].runs.map((r, i) => h("option", { value: i, text: `run ${r.id}`, selected: i === side.run })));
      const posIn = h("input", { id: `diff-${name}-pos`, type: "number", value: side.position, min: 0 });
      return { el: h("span", { class: "side" }, `${name.toUpperCase()}: `, traceSel, runSel, " position ", posIn),
        read: (): Side => ({ trace: Number(traceSel.value), run: Number(runSel.value), position: Number(posIn.value) }) };
    };
    const pa = pick(a, "a");
    const pb = pick(b, "b");
    const go = h("button", { id: "diff-go", text: "compare", onclick: () => void this.showDiff(pa.read(), pb.read(), out) });
    clear(this.tabBody, body);
    body.append(h("div", { class: "toolbar" }, pa.el, pb.el, go), out);
    void this.showDiff(a, b, out);
  }

  private sideName(s: Side): string {
    const tr = this.traces[s.trace];
    return `${tr.name} run ${tr.runs[s.run].id} #${s.position}`;
  }

  private async showDiff(a: Side, b: Side, out: HTMLElement): Promise<void> {
    clear(out, h("div", { class: "dim", text: "loading…" }));
    let d;
    try { d = await this.source.diff(a, b); } catch (err) { clear(out, h("div", { class: "dim", text: `error: ${String(err).replace(/^Error: /, "")}` })); return; }
    if (!d) { clear(out, h("div", { class: "dim", text: "not embedded in this report" })); return; }
    const fmt = (v: number | null) => (v == null ? "—" : signed(v));
    const scale = Math.max(1e-9, ...d.rows.map((r) => Math.abs(r.delta)));
    clear(out,
      h("div", { class: "sub", text: `A: ${q(d.a.token)} (run ${d.a.run}, index ${d.a.position}) → target ${q(d.a.target)}, logit ${signed(d.a.logit, 3)}` }),
      h("div", { class: "sub", text: `B: ${q(d.b.token)} (run ${d.b.run}, index ${d.b.position}) → target ${q(d.b.target)}, logit ${signed(d.b.logit, 3)}` }),
      h("table", { class: "diff-table" },
        h("tr", {}, ...["component", "A", "B", "Δ", ""].map((c) => h("th", { text: c }))),
        ...d.rows.map((r) => h("tr", { class: "diff-row", "data-label": r.label },
          h("td", { text: r.label }), h("td", { class: "a", text: fmt(r.a) }), h("td", { class: "b", text: fmt(r.b) }),
          h("td", { class: "delta", text: signed(r.delta) }), h("td", {}, barRow("", r.delta, scale, ""))))));
  }
}

/** Probability of a token as a light background (red: unlikely, green: likely), dark text stays readable. */
function probColour(p: number): string {
  const t = Math.max(0, Math.min(1, p));
  return `hsl(${(120 * Math.sqrt(t)).toFixed(0)} 75% ${(82 + 8 * t).toFixed(0)}%)`;
}

function clampInt(s: string | null, lo: number, hi: number, fallback: number): number {
  const n = s === null || s === "" ? NaN : Number(s);
  return Number.isInteger(n) && n >= lo && n <= hi ? n : fallback;
}

/** Source tokens: [{position, value, heads}] from hexray_view/data.py (also {positions, values} or
 * {sources: [...]} shapes, should the replay engine's form change; anything else shows nothing). */
interface SourceItem { position: number; value: number; heads?: [string, number][] }

function sourceItems(src: unknown): SourceItem[] {
  const pick = (x: unknown): SourceItem | null => {
    const o = x as Record<string, unknown>;
    const position = Number(o?.position ?? o?.pos ?? o?.index);
    const value = Number(o?.value ?? o?.score ?? o?.weight);
    const heads = Array.isArray(o?.heads) ? (o.heads as [string, number][]) : undefined;
    return Number.isInteger(position) && Number.isFinite(value) ? { position, value, heads } : null;
  };
  let list: unknown[] = [];
  if (Array.isArray(src)) list = src;
  else if (src && typeof src === "object") {
    const o = src as Record<string, unknown>;
    if (Array.isArray(o.positions) && Array.isArray(o.values)) list = o.positions.map((p, i) => ({ position: p, value: (o.values as unknown[])[i] }));
    else for (const k of ["sources", "contributions", "tokens", "top"]) if (Array.isArray(o[k])) { list = o[k] as unknown[]; break; }
  }
  return list.map(pick).filter((x): x is SourceItem => x !== null).sort((a, b) => Math.abs(b.value) - Math.abs(a.value));
}

function sourcePositions(src: unknown): Set<number> {
  return new Set(sourceItems(src).slice(0, 12).map((x) => x.position));
}
