// Fake `vscode` and `vscode-languageclient/node` modules for unit tests outside VS Code (VS Code itself cannot be
// downloaded here). `install()` hooks Node's module loader so that `require('vscode')` gets the fake.
import Module = require('node:module');

type Listener = (e: any) => void;

export class Emitter {
  listeners: Listener[] = [];
  event = (l: Listener) => { this.listeners.push(l); return { dispose: () => { this.listeners = this.listeners.filter((x) => x !== l); } }; };
  fire(e?: any) { for (const l of [...this.listeners]) l(e); }
}

export class FakeUri {
  constructor(public fsPath: string, public scheme = 'file') {}
  toString() { return `${this.scheme}://${this.fsPath}`; }
}

export interface FakeState {
  settings: Record<string, unknown>;
  folder?: string;
  activeEditor?: { document: any };
  commands: Map<string, (...args: any[]) => any>;
  executed: Array<[string, any[]]>;
  errors: Array<{ message: string; items: string[] }>;
  warnings: string[];
  statusMessages: string[];
  clipboard: string;
  pickError?: string;
  items: any[];
  logs: string[];
  diagnostics: Map<string, any[]>;
  clients: FakeLanguageClient[];
  extensions: Record<string, any>;
  onConfig: Emitter;
  onEditor: Emitter;
  onDiagnostics: Emitter;
  onSave: Emitter;
  panels: Array<{ viewType: string; title: string; column: unknown; options: any; webview: { html: string } }>;
  /** Answer of the fake server to `workspace/executeCommand` requests sent with sendRequest. */
  statusReport?: unknown;
}

export const state: FakeState = fresh();

function fresh(): FakeState {
  return {
    settings: {}, commands: new Map(), executed: [], errors: [], warnings: [], statusMessages: [], clipboard: '',
    items: [], logs: [], diagnostics: new Map(), clients: [], extensions: {}, panels: [],
    onConfig: new Emitter(), onEditor: new Emitter(), onDiagnostics: new Emitter(), onSave: new Emitter(),
  };
}

export function reset(settings: Record<string, unknown> = {}, folder = '/ws'): void {
  Object.assign(state, fresh(), { settings, folder });
}

function getSetting(key: string): unknown {
  if (key in state.settings) return state.settings[key];
  // nested read, e.g. get('hover') → {predictions: ...}
  const prefix = key + '.';
  const sub = Object.entries(state.settings).filter(([k]) => k.startsWith(prefix));
  if (sub.length === 0) return undefined;
  const obj: Record<string, unknown> = {};
  for (const [k, v] of sub) obj[k.slice(prefix.length)] = v;
  return obj;
}

const log = (level: string) => (m: string) => { state.logs.push(`${level} ${m}`); };

export const fakeVscode = {
  StatusBarAlignment: { Left: 1, Right: 2 },
  ViewColumn: { Active: -1, Beside: -2, One: 1, Two: 2 },
  ThemeColor: class { constructor(public id: string) {} },
  Uri: { file: (p: string) => new FakeUri(p) },
  workspace: {
    get workspaceFolders() {
      return state.folder ? [{ uri: new FakeUri(state.folder), name: 'ws', index: 0 }] : undefined;
    },
    getConfiguration: (section: string) => ({
      get: (k: string, d?: unknown) => { const v = getSetting(`${section}.${k}`); return v === undefined ? d : v; },
    }),
    onDidChangeConfiguration: (l: Listener) => state.onConfig.event(l),
    onDidSaveTextDocument: (l: Listener) => state.onSave.event(l),
  },
  window: {
    get activeTextEditor() { return state.activeEditor; },
    createOutputChannel: () => ({
      info: log('info'), warn: log('warn'), error: log('error'), debug: log('debug'), trace: log('trace'),
      appendLine: log('line'), show: () => state.logs.push('shown'), dispose() {},
    }),
    createStatusBarItem: (id: string) => {
      const item = { id, text: '', tooltip: '', visible: false, command: undefined as any, backgroundColor: undefined,
                     show() { item.visible = true; }, hide() { item.visible = false; }, dispose() {} };
      state.items.push(item);
      return item;
    },
    onDidChangeActiveTextEditor: (l: Listener) => state.onEditor.event(l),
    showErrorMessage: (message: string, ...items: string[]) => {
      state.errors.push({ message, items });
      return Promise.resolve(state.pickError);
    },
    showWarningMessage: (message: string) => { state.warnings.push(message); return Promise.resolve(undefined); },
    createWebviewPanel: (viewType: string, title: string, column: unknown, options: any) => {
      const panel = { viewType, title, column, options, webview: { html: '' }, dispose() {} };
      state.panels.push(panel);
      return panel;
    },
    setStatusBarMessage: (m: string) => { state.statusMessages.push(m); return { dispose() {} }; },
  },
  languages: {
    onDidChangeDiagnostics: (l: Listener) => state.onDiagnostics.event(l),
    getDiagnostics: (uri: FakeUri) => state.diagnostics.get(uri.toString()) ?? [],
  },
  extensions: { getExtension: (id: string) => state.extensions[id] },
  env: { clipboard: { writeText: async (s: string) => { state.clipboard = s; } } },
  commands: {
    registerCommand: (id: string, fn: (...args: any[]) => any) => {
      if (state.commands.has(id)) throw new Error(`command '${id}' already exists`);
      state.commands.set(id, fn);
      return { dispose: () => state.commands.delete(id) };
    },
    executeCommand: async (id: string, ...args: any[]) => {
      state.executed.push([id, args]);
      return state.commands.get(id)?.(...args);
    },
  },
};

export class FakeLanguageClient {
  started = false;
  stopped = false;
  requests: Array<[string, any]> = [];
  notifications: Array<[string, any]> = [];
  stateEmitter = new Emitter();
  code2ProtocolConverter = { asUri: (u: FakeUri) => u.toString() };
  constructor(public id: string, public name: string, public serverOptions: any, public clientOptions: any) {
    state.clients.push(this);
  }
  onDidChangeState(l: Listener) { return this.stateEmitter.event(l); }
  async start() { this.started = true; this.stateEmitter.fire({ oldState: 3, newState: 2 }); }
  async stop() { this.stopped = true; this.stateEmitter.fire({ oldState: 2, newState: 1 }); }
  async sendRequest(type: { method: string }, params: any) {
    this.requests.push([type.method, params]);
    return state.statusReport;
  }
  async sendNotification(type: { method: string }, params: any) { this.notifications.push([type.method, params]); }
  /** What vscode-languageclient does for a server command run from the palette or a code lens. */
  async runServerCommand(command: string, args: any[], server: (c: string, a: any[]) => any) {
    const mw = this.clientOptions.middleware?.executeCommand;
    return mw ? mw(command, args, server) : server(command, args);
  }
}

export const fakeLanguageClient = {
  LanguageClient: FakeLanguageClient,
  TransportKind: { stdio: 0, ipc: 1, pipe: 2, socket: 3 },
  State: { Stopped: 1, Running: 2, Starting: 3 },
  RevealOutputChannelOn: { Debug: 0, Info: 1, Warn: 2, Error: 3, Never: 4 },
  ExecuteCommandRequest: { type: { method: 'workspace/executeCommand' } },
  DidChangeConfigurationNotification: { type: { method: 'workspace/didChangeConfiguration' } },
};

let installed = false;
export function install(): void {
  if (installed) return;
  installed = true;
  const origLoad = (Module as any)._load;
  (Module as any)._load = function (request: string, ...rest: unknown[]) {
    if (request === 'vscode') return fakeVscode;
    if (request === 'vscode-languageclient/node') return fakeLanguageClient;
    return origLoad.call(this, request, ...rest);
  };
}
