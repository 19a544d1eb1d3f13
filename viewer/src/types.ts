// The JSON the Python side (hexray_view/data.py) sends: one interface per panel.

import type { PatchSummary } from "./patch";

export interface RunOverview {
  id: number;
  prompt: string;
  labels: string[]; // each token quoted as the CLI shows it (a partial character by its bytes: "\xc3")
  texts?: string[]; // each token's share of the prompt's text, end to end the prompt itself (a split character: "é", "")
  n_prompt_tokens: number;
  prob: (number | null)[]; // probability the model gave token i (null for the first)
  top: string[]; // the model's top prediction at each position
  components: string[];
  has_lens: boolean;
  has_attention: boolean;
  has_source: boolean;
}

export interface TraceOverview {
  name: string;
  model: string;
  n_layers: number;
  n_heads: number;
  has_kit: boolean;
  patch?: PatchSummary[]; // the patching sweeps the trace holds (hexray patch -o; patch.ts)
  runs: RunOverview[];
  features?: { name: string; kind: string; layers: number[]; space: string } | null; // the --dict dictionary
  feature_dataset?: string | null; // hexray view --dataset: a clicked feature's meaning over it
}

export interface Contribution {
  label: string;
  kind: string;
  value: number;
}

export interface Attribution {
  run: number;
  position: number;
  token: string;
  target_id: number;
  target: string;
  logit: number;
  logit_source: string;
  total: number;
  error: number;
  probability: number | null;
  contributions: Contribution[];
}

export interface Prediction {
  id: number;
  token: string;
  logit: number;
  prob: number | null;
}

export interface HeadTop {
  label: string;
  layer: number;
  head: number;
  focus: number;
  keys: [number, number][];
}

export interface Detail {
  run: number;
  position: number;
  token: string;
  predictions: Prediction[];
  attribution: Attribution;
  heads: number[][] | null;
  neurons: { label: string; layer: number; index: number; value: number }[] | null;
  attention: { focus: number[][]; top: HeadTop[]; rows?: Record<string, [number, number][]> } | null;
  source: unknown;
}

export interface LensColumn {
  position: number;
  target: string;
  prob: number[];
  rank: number[];
  top: [string, number][][];
}

export interface LensGrid {
  run: number;
  start: number;
  end: number;
  layers: string[];
  columns: LensColumn[];
}

export interface AttnRows {
  label: string;
  layer: number;
  head: number;
  position: number;
  keys: [number, number][]; // [key, weight] of the keys 0..position that weigh at least 0.001 or are among the 6 heaviest, key order
  n_keys: number; // position + 1
  rest: number | null; // what the other keys weigh together (null: not known)
  first: number;
  window: number[][]; // rows of queries first..position over keys first..position
  sparse?: boolean; // only the heaviest few keys are known (a report)
}

export interface Colours {
  labels: string[];
  values: (number | null)[][]; // [component][position]: attribution to the logit of token position+1
}

export interface CotStep {
  index: number;
  text: string;
  tokens: [number, number];
  total: number;
  mean_logprob: number | null;
  components: [string, number][];
  attends_to: [number, number][];
}

export interface Cot {
  mode: string;
  steps: CotStep[];
  attention: number[][];
}

export interface DiffRow {
  label: string;
  a: number | null;
  b: number | null;
  delta: number;
}

export interface Diff {
  a: Attribution;
  b: Attribution;
  rows: DiffRow[];
}

export interface Side {
  trace: number;
  run: number;
  position: number;
}

/** A run's features through the --dict dictionary (data.run_features): per layer, sparse rows strongest first. */
export interface FeatureLayer {
  layer: number;
  hook: string;
  d_sae: number;
  indptr: number[];
  indices: number[];
  values: number[];
}

export interface RunFeatures {
  run: number;
  dict: string;
  kind: string;
  layers: FeatureLayer[];
  info: Record<string, { top: string[]; bottom: string[]; explanation: string | null }>;
  error: string | null;
}

export interface FeatureContext {
  id: string | number;
  position: number;
  activation: number;
  start: number;
  tokens: string[];
  activations: number[];
}

/** One feature over a dataset (data.feature_meaning, `hexray features DATASET/ --feature`). */
export interface FeatureMeaning {
  label: string;
  dataset: string;
  n_tokens: number;
  n_runs: number;
  n_active: number;
  density: number;
  max: number;
  mean_active: number;
  histogram: { edges: number[]; counts: number[]; under: number; over: number; negative: number };
  top_contexts: FeatureContext[];
  top_logits?: [number, string, number][];
  explanation?: string;
}
