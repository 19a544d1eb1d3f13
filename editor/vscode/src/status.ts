// What the status bar item says. Pure logic (no `vscode` import).
//
// The server has no custom notification for the trace state; it answers the `hexray.status` command
// ({documents: {uri: {state, trace, recording}}, settings: {...}, worker: {...}}) and publishes diagnostics
// with codes (no-trace, stale-trace, trace-unreadable, recording-failed). The item asks `hexray.status` when the
// active prompt or its diagnostics change, and falls back to the diagnostic codes if that request fails.

export type ServerState = 'starting' | 'running' | 'stopped' | 'not-installed' | 'failed';
export type TraceState = 'fresh' | 'stale' | 'none' | 'error' | 'loading' | 'recording' | 'failed' | 'unknown';

export interface DocStatus {
  state: TraceState;
  trace?: string | null;
  model?: string;
}

export interface StatusView {
  text: string;
  tooltip: string;
  /** Background: warning/error items are coloured. */
  level: 'normal' | 'warning' | 'error';
  /** What clicking does. */
  action: 'record' | 'cancel' | 'output';
}

/** The active document's entry in a `hexray.status` answer. */
export function fromStatusReport(report: unknown, uri: string): DocStatus | undefined {
  if (!report || typeof report !== 'object') return undefined;
  const r = report as { documents?: Record<string, { state?: string; trace?: string | null; recording?: boolean }>;
                        settings?: { model?: string; modelFactory?: string } };
  const model = r.settings?.modelFactory || r.settings?.model;
  const doc = r.documents?.[uri];
  if (!doc) return { state: 'loading', model };
  const known: TraceState[] = ['fresh', 'stale', 'none', 'error', 'loading'];
  const state: TraceState = doc.recording ? 'recording'
    : known.includes(doc.state as TraceState) ? (doc.state as TraceState) : 'unknown';
  return { state, trace: doc.trace ?? null, model };
}

/** Fallback: the state from the server's diagnostic codes on the document (a fresh trace has none of these). */
export function fromDiagnosticCodes(codes: Array<string | number | undefined>): DocStatus {
  const has = (c: string) => codes.includes(c);
  if (has('recording-failed')) return { state: 'failed' };
  if (has('no-trace')) return { state: 'none' };
  if (has('trace-unreadable')) return { state: 'error' };
  if (has('stale-trace')) return { state: 'stale' };
  return { state: 'fresh' };
}

export function present(server: ServerState, doc: DocStatus | undefined, problem?: string): StatusView {
  switch (server) {
    case 'starting':
      return { text: '$(loading~spin) HexRay', tooltip: 'HexRay: starting the language server…', level: 'normal',
               action: 'output' };
    case 'not-installed':
      return { text: '$(error) HexRay: not installed', tooltip: `HexRay: ${problem ?? 'hexray is not installed'}`,
               level: 'error', action: 'output' };
    case 'failed':
    case 'stopped':
      return { text: '$(error) HexRay: server stopped',
               tooltip: `HexRay: ${problem ?? 'the language server is not running'}. Run "HexRay: Restart language server".`,
               level: 'error', action: 'output' };
    case 'running':
      break;
  }
  const model = doc?.model ? ` · ${doc.model}` : '';
  const trace = doc?.trace ? `\nTrace: ${doc.trace}` : '';
  switch (doc?.state) {
    case 'fresh':
      return { text: '$(pass) HexRay: trace', tooltip: `HexRay: the trace is up to date${model}${trace}\nClick to record again.`,
               level: 'normal', action: 'record' };
    case 'stale':
      return { text: '$(warning) HexRay: stale', tooltip: `HexRay: the prompt changed since the trace was recorded${trace}\nClick to record it again.`,
               level: 'warning', action: 'record' };
    case 'none':
      return { text: '$(circle-slash) HexRay: no trace', tooltip: `HexRay: no trace for this prompt${model}\nClick to record one.`,
               level: 'normal', action: 'record' };
    case 'error':
      return { text: '$(error) HexRay: unreadable', tooltip: `HexRay: the trace cannot be read${trace}\nClick to record it again.`,
               level: 'error', action: 'record' };
    case 'failed':
      return { text: '$(error) HexRay: record failed', tooltip: 'HexRay: the last recording failed (see the diagnostic)\nClick to try again.',
               level: 'error', action: 'record' };
    case 'recording':
      return { text: '$(sync~spin) HexRay: recording…', tooltip: `HexRay: recording the trace${model}\nClick to cancel.`,
               level: 'normal', action: 'cancel' };
    case 'loading':
      return { text: '$(loading~spin) HexRay', tooltip: 'HexRay: loading the trace…', level: 'normal', action: 'record' };
    default:
      return { text: '$(question) HexRay', tooltip: 'HexRay: trace state unknown', level: 'normal', action: 'record' };
  }
}
