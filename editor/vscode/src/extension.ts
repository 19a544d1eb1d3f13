// HexRay for VS Code: starts `hexray lsp` for prompt files (language `hexray-prompt`) and adds a status bar
// item for the active prompt's trace, commands, and a clear message when hexray is not installed.
//
// Commands: the server's own (hexray.recordTrace, hexray.cancelRecording, hexray.restartWorker) are
// registered by vscode-languageclient from the server's executeCommandProvider — registering them here too
// would fail with "command already exists"; the middleware below fills in the active document for the palette.
// The extension adds hexray.restartServer, hexray.showOutput and hexray.openTraceView (the viewer in a webview).
import * as path from 'node:path';
import * as vscode from 'vscode';
import {
  DidChangeConfigurationNotification, ExecuteCommandRequest, LanguageClient, LanguageClientOptions,
  RevealOutputChannelOn, ServerOptions, State, TransportKind,
} from 'vscode-languageclient/node';
import { describeSource, installCommand, resolveCandidates, ServerCommand } from './interpreter';
import { probe, ProbeResult } from './probe';
import { onInterpreterChange, pythonExtensionInstalled, selectedInterpreter } from './python';
import { documentSelector, getterOf, LANGUAGE_ID, RESTART_SETTINGS, serverSettings } from './settings';
import { DocStatus, fromDiagnosticCodes, fromStatusReport, present, ServerState } from './status';
import { OPEN_VIEW, renderReport, traceFor } from './traceView';

export const RECORD = 'hexray.recordTrace';
export const CANCEL = 'hexray.cancelRecording';
export const STATUS = 'hexray.status';
const SECTION = 'hexray';

/** Replaceable in unit tests (the fake-vscode activation test stubs the probe). */
export const hooks = { probe, selectedInterpreter };

interface Failure { cmd: ServerCommand; result: Extract<ProbeResult, { ok: false }> }

export class HexRay implements vscode.Disposable {
  client: LanguageClient | undefined;
  serverState: ServerState = 'stopped';
  problem: string | undefined;
  command: ServerCommand | undefined;
  readonly output: vscode.LogOutputChannel;
  readonly item: vscode.StatusBarItem;
  private readonly subs: vscode.Disposable[] = [];
  private clientSubs: vscode.Disposable[] = [];
  private recording = new Set<string>();
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private starting: Promise<void> | undefined;
  private stopping = false;
  private refreshSeq = 0;
  private disposed = false;

  constructor() {
    this.output = vscode.window.createOutputChannel('HexRay', { log: true });
    this.item = vscode.window.createStatusBarItem('hexray.status', vscode.StatusBarAlignment.Right, 100);
    this.item.name = 'HexRay trace';
    this.subs.push(
      this.output,
      this.item,
      vscode.commands.registerCommand('hexray.restartServer', () => this.restart()),
      vscode.commands.registerCommand('hexray.showOutput', () => this.output.show(true)),
      vscode.commands.registerCommand(OPEN_VIEW, (uri?: vscode.Uri) => this.openTraceView(uri)),
      vscode.window.onDidChangeActiveTextEditor(() => this.scheduleRefresh(0)),
      vscode.languages.onDidChangeDiagnostics((e) => {
        const uri = this.activePrompt()?.uri.toString();
        if (uri && e.uris.some((u) => u.toString() === uri)) this.scheduleRefresh(50);
      }),
      vscode.workspace.onDidSaveTextDocument((doc) => {
        if (doc.languageId === LANGUAGE_ID) this.scheduleRefresh(400); // record on save starts after a debounce
      }),
      vscode.workspace.onDidChangeConfiguration((e) => this.configurationChanged(e)),
    );
  }

  private config(): vscode.WorkspaceConfiguration {
    return vscode.workspace.getConfiguration(SECTION, this.folder()?.uri);
  }

  hasConfiguredInterpreter(): boolean {
    return this.config().get<string[]>('interpreter', []).some((a) => a.trim() !== '');
  }

  private folder(): vscode.WorkspaceFolder | undefined {
    return vscode.workspace.workspaceFolders?.[0];
  }

  private settingsForServer(): Record<string, unknown> {
    const cfg = this.config();
    return serverSettings((k) => cfg.get(k), this.folder()?.uri.fsPath);
  }

  // -- starting and stopping ---------------------------------------------------------------------

  start(): Promise<void> {
    if (!this.starting) this.starting = this.doStart().finally(() => { this.starting = undefined; });
    return this.starting;
  }

  private async doStart(): Promise<void> {
    this.setState('starting');
    const folder = this.folder();
    const cfg = this.config();
    const candidates = resolveCandidates({
      configured: cfg.get<string[]>('interpreter', []),
      pythonExtension: await hooks.selectedInterpreter(folder?.uri),
      serverArgs: cfg.get<string[]>('serverArgs', []),
      workspaceFolder: folder?.uri.fsPath,
    });
    let chosen: ServerCommand | undefined;
    let failure: Failure | undefined;
    for (const cmd of candidates) {
      const result = await hooks.probe(cmd, { cwd: folder?.uri.fsPath });
      if (result.ok) {
        this.output.info(`Using ${describeSource(cmd.source)}: ${cmd.command} (hexray ${result.version})`);
        chosen = cmd;
        break;
      }
      this.output.warn(`Not using ${describeSource(cmd.source)}: ${cmd.command}: ${result.detail}`);
      failure ??= { cmd, result };
    }
    if (!chosen) {
      this.notInstalled(failure!);
      return;
    }
    this.command = chosen;
    this.output.info(`Starting: ${chosen.command} ${chosen.args.join(' ')}`);
    const serverOptions: ServerOptions = {
      command: chosen.command,
      args: chosen.args,
      transport: TransportKind.stdio,
      options: { cwd: folder?.uri.fsPath, env: { ...process.env, PYTHONUNBUFFERED: '1' } },
    };
    const clientOptions: LanguageClientOptions = {
      documentSelector: documentSelector(cfg.get('filePatterns')),
      outputChannel: this.output,
      revealOutputChannelOn: RevealOutputChannelOn.Never,
      initializationOptions: this.settingsForServer(),
      middleware: {
        executeCommand: (command, args, next) => this.executeCommand(command, args, next),
        workspace: {
          // The server pulls section "hexray": answer with its settings only, variables expanded.
          configuration: async (params, token, next) => {
            const res = await next(params, token);
            if (!Array.isArray(res)) return res;
            return res.map((value, i) => (params.items[i]?.section === SECTION
              ? serverSettings(getterOf(value), this.folder()?.uri.fsPath) : value));
          },
        },
      },
    };
    const client = new LanguageClient('hexray', 'HexRay', serverOptions, clientOptions);
    this.client = client;
    this.clientSubs.push(client.onDidChangeState((e) => {
      if (e.newState === State.Running) this.setState('running');
      else if (e.newState === State.Stopped && !this.stopping && this.client === client) {
        this.setState('stopped', 'the language server stopped; see the HexRay output');
      }
    }));
    try {
      await client.start();
      this.setState('running');
    } catch (err) {
      const msg = err instanceof Error ? err.message : String(err);
      this.output.error(`The language server failed to start: ${msg}`);
      this.setState('failed', `the language server failed to start: ${msg}`);
      void vscode.window.showErrorMessage(`HexRay: the language server failed to start (${msg}).`, 'Show Output')
        .then((pick) => { if (pick) this.output.show(true); });
    }
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    this.clientSubs.forEach((d) => d.dispose());
    this.clientSubs = [];
    this.recording.clear();
    if (!client) return;
    this.stopping = true;
    try {
      await client.stop(5000);
    } catch (err) {
      this.output.warn(`Stopping the language server: ${err instanceof Error ? err.message : String(err)}`);
    } finally {
      this.stopping = false;
    }
  }

  async restart(): Promise<void> {
    if (this.starting) await this.starting;
    this.output.info('Restarting the language server');
    await this.stop();
    await this.start();
  }

  private notInstalled({ cmd, result }: Failure): void {
    const where = `${cmd.python ? cmd.interpreter.join(' ') : cmd.command} (${describeSource(cmd.source)})`;
    const install = installCommand(result.reason === 'missing' ? undefined : cmd);
    let message: string;
    switch (result.reason) {
      case 'missing':
        message = `HexRay: cannot start the language server: ${where} was not found. Install HexRay with \`${install}\`, `
          + 'or set "hexray.interpreter" to a Python that has it.';
        break;
      case 'not-installed':
        message = `HexRay is not installed for ${where}. Install it with \`${install}\`, or select an interpreter that has it.`;
        break;
      case 'old-python':
        message = `HexRay needs Python 3.10 or newer; ${where} is ${result.detail.split(';')[0]}. `
          + 'Select a newer interpreter (setting "hexray.interpreter").';
        break;
      default:
        message = `HexRay: ${where} cannot run hexray: ${result.detail}`;
    }
    this.output.error(message);
    this.setState('not-installed', message);
    const actions = ['Copy Install Command', ...(pythonExtensionInstalled() ? ['Select Interpreter'] : []),
                     'Open Settings', 'Show Output'];
    void vscode.window.showErrorMessage(message, ...actions).then(async (pick) => {
      if (pick === 'Copy Install Command') await vscode.env.clipboard.writeText(install);
      else if (pick === 'Select Interpreter') await vscode.commands.executeCommand('python.setInterpreter');
      else if (pick === 'Open Settings') await vscode.commands.executeCommand('workbench.action.openSettings', 'hexray.interpreter');
      else if (pick === 'Show Output') this.output.show(true);
    });
  }

  // -- settings ------------------------------------------------------------------------------------

  private configurationChanged(e: vscode.ConfigurationChangeEvent): void {
    if (!e.affectsConfiguration(SECTION)) return;
    if (RESTART_SETTINGS.some((k) => e.affectsConfiguration(k))) {
      void this.restart();
      return;
    }
    const client = this.client;
    if (client && this.serverState === 'running') {
      void client.sendNotification(DidChangeConfigurationNotification.type, {
        settings: { [SECTION]: this.settingsForServer() },
      });
      this.scheduleRefresh(300);
    }
  }

  // -- commands --------------------------------------------------------------------------------------

  private activePrompt(): vscode.TextDocument | undefined {
    const doc = vscode.window.activeTextEditor?.document;
    return doc && doc.languageId === LANGUAGE_ID ? doc : undefined;
  }

  private protocolUri(doc: vscode.TextDocument): string {
    return this.client?.code2ProtocolConverter.asUri(doc.uri) ?? doc.uri.toString();
  }

  /** Middleware for the server's commands: the palette passes no arguments, so add the active prompt. */
  private async executeCommand(command: string, args: any[], next: (command: string, args: any[]) => any): Promise<any> {
    if ((command === RECORD || command === CANCEL) && args[0] && typeof args[0] === 'object' && 'scheme' in args[0]) {
      // the editor title button passes the document's vscode.Uri; the server wants the URI string
      args = [this.client?.code2ProtocolConverter.asUri(args[0]) ?? String(args[0])];
    }
    if (command === RECORD) {
      if (args.length === 0) {
        const doc = this.activePrompt();
        if (!doc) {
          void vscode.window.showWarningMessage('HexRay: open a prompt file to record its trace.');
          return undefined;
        }
        args = [this.protocolUri(doc)];
      }
      const uri = String(args[0]);
      this.recording.add(uri);
      this.scheduleRefresh(0);
      try {
        const result = await next(command, args);
        if (result?.status === 'recorded') {
          const secs = typeof result.seconds === 'number' ? ` in ${result.seconds.toFixed(1)} s` : '';
          vscode.window.setStatusBarMessage(`HexRay: recorded ${result.tokens ?? '?'} tokens${secs}`, 5000);
        }
        return result;
      } finally {
        this.recording.delete(uri);
        this.scheduleRefresh(0);
      }
    }
    if (command === CANCEL && args.length === 0) {
      const doc = this.activePrompt();
      if (doc) args = [this.protocolUri(doc)];
    }
    return next(command, args);
  }

  // -- status bar ------------------------------------------------------------------------------------

  private setState(state: ServerState, problem?: string): void {
    this.serverState = state;
    this.problem = problem;
    this.scheduleRefresh(0);
  }

  scheduleRefresh(delayMs: number): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    if (this.disposed) return;
    this.refreshTimer = setTimeout(() => { this.refreshTimer = undefined; void this.refresh(); }, delayMs);
  }

  /** Updates the status bar item for the active editor; resolves once it is drawn. */
  async refresh(): Promise<void> {
    const seq = ++this.refreshSeq;
    const doc = this.activePrompt();
    if (!doc) {
      this.item.hide();
      return;
    }
    let status: DocStatus | undefined;
    if (this.serverState === 'running' && this.client) {
      const uri = this.protocolUri(doc);
      status = await this.queryStatus(uri, doc);
      if (this.recording.has(uri)) status = { ...status, state: 'recording' };
    }
    if (seq !== this.refreshSeq || this.disposed) return; // a newer refresh is under way
    const view = present(this.serverState, status, this.problem);
    this.item.text = view.text;
    this.item.tooltip = view.tooltip;
    this.item.backgroundColor = view.level === 'normal' ? undefined
      : new vscode.ThemeColor(view.level === 'error' ? 'statusBarItem.errorBackground' : 'statusBarItem.warningBackground');
    const arg = this.serverState === 'running' ? [this.protocolUri(doc)] : [];
    this.item.command = view.action === 'record' ? { title: 'Record trace', command: RECORD, arguments: arg }
      : view.action === 'cancel' ? { title: 'Cancel recording', command: CANCEL, arguments: arg }
        : { title: 'Show output', command: 'hexray.showOutput' };
    this.item.show();
    if (status?.state === 'recording' || status?.state === 'loading') this.scheduleRefresh(1000);
  }

  /** The viewer of the active prompt's trace (or of an .hxr given by the explorer) in a webview beside the editor. */
  async openTraceView(uri?: vscode.Uri): Promise<vscode.WebviewPanel | undefined> {
    const doc = vscode.window.activeTextEditor?.document;
    const file = uri?.fsPath ?? doc?.uri.fsPath;
    if (!file) {
      void vscode.window.showWarningMessage('HexRay: open a prompt file or a .hxr trace to view it.');
      return undefined;
    }
    if (!this.command) {
      void vscode.window.showErrorMessage('HexRay: the trace view needs hexray installed (see the HexRay output).');
      return undefined;
    }
    let serverTrace: string | null | undefined;
    if (!uri && doc && doc.languageId === LANGUAGE_ID && this.client && this.serverState === 'running') {
      serverTrace = (await this.queryStatus(this.protocolUri(doc), doc)).trace;
    }
    const trace = traceFor(file, serverTrace);
    let html: string;
    try {
      html = await renderReport(this.command, trace, this.folder()?.uri.fsPath);
    } catch (err) {
      void vscode.window.showErrorMessage(`HexRay: ${err instanceof Error ? err.message : String(err)}`);
      return undefined;
    }
    const panel = vscode.window.createWebviewPanel('hexray.traceView', `HexRay: ${path.basename(trace)}`,
      { viewColumn: vscode.ViewColumn.Beside, preserveFocus: true }, { enableScripts: true, localResourceRoots: [] });
    panel.webview.html = html;
    return panel;
  }

  private async queryStatus(uri: string, doc: vscode.TextDocument): Promise<DocStatus> {
    try {
      const report = await this.client!.sendRequest(ExecuteCommandRequest.type, { command: STATUS, arguments: [] });
      const st = fromStatusReport(report, uri);
      if (st) return st;
    } catch (err) {
      this.output.debug(`hexray.status failed: ${err instanceof Error ? err.message : String(err)}`);
    }
    const codes = vscode.languages.getDiagnostics(doc.uri)
      .filter((d) => d.source === 'hexray')
      .map((d) => (typeof d.code === 'object' ? String(d.code.value) : d.code as string | number | undefined));
    return fromDiagnosticCodes(codes);
  }

  dispose(): void {
    this.disposed = true;
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.subs.forEach((d) => d.dispose());
  }
}

let hexray: HexRay | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<HexRay> {
  hexray = new HexRay();
  context.subscriptions.push(hexray);
  const h = hexray;
  void onInterpreterChange(() => {
    if (!h.hasConfiguredInterpreter()) void h.restart();
  }).then((subs) => context.subscriptions.push(...subs));
  await hexray.start();
  return hexray;
}

export async function deactivate(): Promise<void> {
  const h = hexray;
  hexray = undefined;
  if (h) {
    await h.stop();
    h.dispose();
  }
}
