// The `hexray.*` settings the server understands (hexray_lsp/settings.py: same names, same defaults; the
// `settings consistency` test compares them with the server's own list), and the document selector.
// Pure logic, no `vscode` import.
import { substitute } from './interpreter';

export const LANGUAGE_ID = 'hexray-prompt';

/** Server settings, as named in hexray_lsp/settings.py. Everything else under `hexray.` is the client's. */
export const SERVER_SETTINGS = [
  'model',
  'modelFactory',
  'device',
  'python',
  'extraPaths',
  'workerNice',
  'workerThreads',
  'inlayHints',
  'recordOptions',
  'recordOnSave',
  'recordOnSaveDelayMs',
  'recordTo',
  'traceFolder',
  'surpriseThreshold',
  'maxSurpriseDiagnostics',
  'hover.predictions',
  'hover.contributors',
  'hover.sources',
  'hover.features',
  'features.dictionary',
  'highlights.threshold',
  'highlights.max',
  'filePatterns',
  'maxDocumentBytes',
] as const;

/** Client-side settings; changing one of these restarts the server. */
export const RESTART_SETTINGS = ['hexray.interpreter', 'hexray.serverArgs', 'hexray.filePatterns'];

/** Settings that hold paths: `${workspaceFolder}`, `${userHome}`, `${env:X}` and `~` are expanded. */
const PATH_SETTINGS = new Set(['python', 'extraPaths', 'traceFolder', 'features.dictionary']);

export type Getter = (key: string) => unknown;

/** Reads dotted keys from a nested settings object (what `workspace/configuration` returns). */
export function getterOf(obj: unknown): Getter {
  return (key) => {
    let cur: unknown = obj;
    for (const part of key.split('.')) {
      if (cur === null || typeof cur !== 'object') return undefined;
      cur = (cur as Record<string, unknown>)[part];
    }
    return cur;
  };
}

/** The settings object sent to the server (initializationOptions, didChangeConfiguration, configuration pulls). */
export function serverSettings(get: Getter, workspaceFolder?: string,
                               env: NodeJS.ProcessEnv = process.env): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of SERVER_SETTINGS) {
    let v = get(key);
    if (v === undefined || v === null) continue;
    if (PATH_SETTINGS.has(key)) {
      if (typeof v === 'string') v = substitute(v, workspaceFolder, env);
      else if (Array.isArray(v)) v = v.map((x) => (typeof x === 'string' ? substitute(x, workspaceFolder, env) : x));
    }
    out[key] = v;
  }
  return out;
}

export interface DocumentFilter {
  scheme: string;
  language?: string;
  pattern?: string;
}

/**
 * Documents the client sends to the server: the `hexray-prompt` language (*.prompt), plus files matching any
 * other `hexray.filePatterns` glob (the server serves those too). The server's globs without "/" match the
 * file name anywhere, so they become `**∕glob` here.
 */
export function documentSelector(filePatterns: unknown): DocumentFilter[] {
  const sel: DocumentFilter[] = [
    { scheme: 'file', language: LANGUAGE_ID },
    { scheme: 'untitled', language: LANGUAGE_ID },
  ];
  const pats = Array.isArray(filePatterns) ? filePatterns.filter((p): p is string => typeof p === 'string' && !!p) : [];
  for (const p of pats) {
    if (p === '*.prompt') continue;
    let glob: string;
    if (p.startsWith('/')) glob = p;
    else if (p.startsWith('**/')) glob = p;
    else if (p.startsWith('*/')) glob = `*${p}`;
    else glob = `**/${p}`;
    sel.push({ scheme: 'file', pattern: glob });
  }
  return sel;
}
