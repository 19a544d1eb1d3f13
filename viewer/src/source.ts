// Where the data comes from: the `hexray view` server (fetched lazily, one panel at a time), or the
// JSON a report / notebook cell embeds (null where the report did not embed a position).

import type { PatchSweep } from "./patch";
import type { GraphView } from "./graph";
import type { AttnRows, Colours, Cot, Detail, Diff, FeatureMeaning, LensGrid, RunFeatures, Side, TraceOverview } from "./types";

export interface Source {
  readonly kind: "server" | "embedded";
  readonly start?: Side;
  overview(): Promise<TraceOverview[]>;
  detail(t: number, run: number, pos: number): Promise<Detail | null>;
  lens(t: number, run: number, start: number, end: number): Promise<LensGrid | null>;
  attention(t: number, run: number, pos: number, layer: number, head: number): Promise<AttnRows | null>;
  colours(t: number, run: number): Promise<Colours | null>;
  cot(t: number, run: number): Promise<Cot | null>;
  diff(a: Side, b: Side): Promise<Diff | null>;
  patch(t: number, i: number): Promise<PatchSweep | null>; // a `hexray patch -o` sweep (patch.ts)
  features(t: number, run: number): Promise<RunFeatures | null>; // null: no --dict
  meaning?(layer: number, feature: number): Promise<FeatureMeaning | null>; // hexray view --dataset
  diffSides?(): [Side, Side][];
  graphs?(): Promise<GraphView[]>; // attribution graphs given beside (or instead of) traces: the graph tab
  embedded?(t: number, run: number): Set<number>; // positions a report holds the details of
}

export class ServerSource implements Source {
  readonly kind = "server";
  private cache = new Map<string, Promise<unknown>>();

  private get<T>(path: string, params: Record<string, number>): Promise<T> {
    const query = Object.entries(params).map(([k, v]) => `${k}=${v}`).join("&");
    const url = `api/${path}${query ? "?" + query : ""}`; // relative: the page's URL carries the token
    let hit = this.cache.get(url);
    if (!hit) {
      hit = fetch(url).then(async (r) => {
        const body = await r.json();
        if (!r.ok) throw new Error(body.error ?? `${r.status} ${r.statusText}`);
        return body;
      });
      hit.catch(() => this.cache.delete(url));
      this.cache.set(url, hit);
    }
    return hit as Promise<T>;
  }

  overview() { return this.get<TraceOverview[]>("overview", {}); }
  detail(t: number, run: number, pos: number) { return this.get<Detail>("detail", { t, run, pos }); }
  lens(t: number, run: number, start: number, end: number) { return this.get<LensGrid>("lens", { t, run, start, end }); }
  attention(t: number, run: number, pos: number, layer: number, head: number) {
    return this.get<AttnRows>("attention", { t, run, pos, layer, head });
  }
  colours(t: number, run: number) { return this.get<Colours>("colours", { t, run }); }
  features(t: number, run: number) { return this.get<RunFeatures>("features", { t, run }); }
  meaning(layer: number, f: number) { return this.get<FeatureMeaning>("meaning", { layer, f }); }
  cot(t: number, run: number) { return this.get<Cot>("cot", { t, run }); }
  patch(t: number, i: number) { return this.get<PatchSweep>("patch", { t, i }); }
  graphs() { return this.get<GraphView[]>("graphs", {}); }
  diff(a: Side, b: Side) {
    return this.get<Diff>("diff", { ta: a.trace, ra: a.run, pa: a.position, tb: b.trace, rb: b.run, pb: b.position });
  }
}

export interface Embedded {
  traces: TraceOverview[];
  details: Record<string, Detail>; // "t.run.pos"
  lens: Record<string, LensGrid>; // "t.run": every position the report embeds
  colours: Record<string, Colours>;
  cot: Record<string, Cot>;
  diffs: { a: Side; b: Side; diff: Diff }[];
  features?: Record<string, RunFeatures>; // "t.run", with --dict
  patch?: Record<string, PatchSweep>; // "t.index": each patching sweep, or {error}
  graphs?: GraphView[]; // attribution graph files given to hexray report
  start?: Side; // where a notebook cell opens
}

export class EmbeddedSource implements Source {
  readonly kind = "embedded";
  readonly start?: Side;
  constructor(private data: Embedded) { this.start = data.start; }

  async overview() { return this.data.traces; }
  async detail(t: number, run: number, pos: number) { return this.data.details[`${t}.${run}.${pos}`] ?? null; }

  async lens(t: number, run: number, start: number, end: number) {
    const grid = this.data.lens[`${t}.${run}`];
    if (!grid) return null;
    const columns = grid.columns.filter((c) => c.position >= start && c.position < end);
    return columns.length ? { ...grid, start, end, columns } : null;
  }

  async attention(t: number, run: number, pos: number, layer: number, head: number): Promise<AttnRows | null> {
    const keys = this.data.details[`${t}.${run}.${pos}`]?.attention?.rows?.[`${layer}.${head}`];
    if (!keys) return null;
    const self = keys.find(([k]) => k === pos)?.[1] ?? 0;
    return { label: `L${layer}H${head}`, layer, head, position: pos, keys, n_keys: pos + 1, rest: null, first: pos,
      window: [[self]], sparse: true };
  }

  async colours(t: number, run: number) { return this.data.colours[`${t}.${run}`] ?? null; }
  async features(t: number, run: number) { return this.data.features?.[`${t}.${run}`] ?? null; }
  async cot(t: number, run: number) { return this.data.cot[`${t}.${run}`] ?? null; }
  async patch(t: number, i: number) { return this.data.patch?.[`${t}.${i}`] ?? null; }
  async graphs() { return this.data.graphs ?? []; }

  async diff(a: Side, b: Side) {
    const same = (x: Side, y: Side) => x.trace === y.trace && x.run === y.run && x.position === y.position;
    return this.data.diffs.find((d) => same(d.a, a) && same(d.b, b))?.diff ?? null;
  }

  diffSides(): [Side, Side][] { return this.data.diffs.map((d) => [d.a, d.b]); }

  embedded(t: number, run: number): Set<number> {
    const prefix = `${t}.${run}.`;
    return new Set(Object.keys(this.data.details).filter((k) => k.startsWith(prefix)).map((k) => Number(k.slice(prefix.length))));
  }
}
