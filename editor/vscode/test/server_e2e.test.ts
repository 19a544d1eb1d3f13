// The real `hexray lsp`, driven by the JSON-RPC stack inside vscode-languageclient (no VS Code): the command
// the extension resolves, the settings it sends (the package.json defaults), record through
// the server's command (progress), hover, inlay hints + resolve, hexray.status for the status bar, stale
// trace after an edit, shutdown. The settings are the package.json defaults, so the record worker loads
// hexray-demo, the small model shipped with HexRay.
import { after, before, test } from 'node:test';
import * as assert from 'node:assert/strict';
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import {
  createProtocolConnection, DidChangeTextDocumentNotification, DidOpenTextDocumentNotification, ExecuteCommandRequest,
  ExitNotification, HoverRequest, InitializedNotification, InitializeRequest, InlayHintRequest, InlayHintResolveRequest,
  ProtocolConnection, PublishDiagnosticsNotification, ShutdownRequest, StreamMessageReader, StreamMessageWriter,
} from 'vscode-languageserver-protocol/node';
import { resolveCandidates } from '../src/interpreter';
import { probe } from '../src/probe';
import { getterOf, SERVER_SETTINGS, serverSettings } from '../src/settings';
import { fromStatusReport, present } from '../src/status';
import { EXTENSION_ROOT, requirePython, skipWithoutPython } from './support';

const skip = skipWithoutPython();
const pkg = JSON.parse(fs.readFileSync(path.join(EXTENSION_ROOT, 'package.json'), 'utf8'));
const props: Record<string, any> = pkg.contributes.configuration.properties;
const SAMPLE = 'It is a truth universally acknowledged, that a single man in possession of a good fortune \u{1F642}\n'
  + 'must be in want of a naïve wife.\n';

/** What VS Code sends on a fresh install: the contributed defaults. */
function userSettings(): Record<string, unknown> {
  const nested: Record<string, any> = {};
  for (const [key, spec] of Object.entries(props)) {
    const parts = key.replace(/^hexray\./, '').split('.');
    let cur = nested;
    for (const p of parts.slice(0, -1)) cur = cur[p] ??= {};
    cur[parts.at(-1)!] = spec.default;
  }
  return nested;
}

test('package.json defaults and choices are the server\'s own (hexray_lsp/settings.py)', { skip }, () => {
  const code = 'import json; from hexray_lsp import settings as s; '
    + 'print(json.dumps({"defaults": s.Settings().to_json(), "inlay": s.INLAY_MODES, "recordTo": s.RECORD_TO}))';
  const server = JSON.parse(execFileSync(requirePython(), ['-c', code], { encoding: 'utf8' }));
  assert.deepEqual(Object.keys(server.defaults).sort(), [...SERVER_SETTINGS].sort());
  for (const key of SERVER_SETTINGS) {
    assert.deepEqual(props[`hexray.${key}`].default, server.defaults[key], `default of hexray.${key}`);
  }
  assert.deepEqual(props['hexray.inlayHints'].enum, server.inlay);
  assert.deepEqual(props['hexray.recordTo'].enum, server.recordTo);
});

let proc: ChildProcess | undefined;
let conn: ProtocolConnection | undefined;

before(() => undefined);
after(() => { conn?.dispose(); if (proc && proc.exitCode === null) proc.kill(); });

async function waitFor<T>(what: string, fn: () => T | undefined, ms = 30_000): Promise<T> {
  const t0 = Date.now();
  for (;;) {
    const v = fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

test('initialize, record, hover, inlay hints, status, stale edit, shutdown', { skip, timeout: 300_000 }, async () => {
  const python = requirePython();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hxr-e2e-'));
  const file = path.join(dir, 'sample.prompt');
  fs.writeFileSync(file, SAMPLE);
  const uri = pathToFileURL(file).href;

  // The command and the install check the extension itself would use.
  const [cmd] = resolveCandidates({ configured: [python], serverArgs: [], workspaceFolder: dir });
  assert.deepEqual(cmd.args, ['-m', 'hexray', 'lsp']);
  const probed = await probe(cmd);
  assert.equal(probed.ok, true, JSON.stringify(probed));

  const settings = serverSettings(getterOf(userSettings()), dir);
  proc = spawn(cmd.command, cmd.args, {
    cwd: dir, stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1', HEXRAY_CACHE: path.join(dir, '.cache') },
  });
  let stderr = '';
  proc.stderr!.on('data', (d) => { stderr += String(d); });
  const c = createProtocolConnection(new StreamMessageReader(proc.stdout!), new StreamMessageWriter(proc.stdin!));
  conn = c;
  const diagnostics = new Map<string, any[]>();
  const progress: any[] = [];
  const messages: string[] = [];
  const pulls: any[] = [];
  c.onRequest('window/workDoneProgress/create', () => null);
  c.onNotification('$/progress', (p: any) => { progress.push(p.value); });
  c.onNotification(PublishDiagnosticsNotification.method, (p: any) => { diagnostics.set(p.uri, p.diagnostics); });
  c.onNotification('window/showMessage', (p: any) => { messages.push(p.message); });
  c.onNotification('window/logMessage', () => undefined);
  c.onRequest('workspace/configuration', (p: any) => {
    pulls.push(p);
    // as the extension's middleware answers it
    return p.items.map((it: any) => (it.section === 'hexray' ? serverSettings(getterOf(userSettings()), dir) : null));
  });
  c.onRequest('workspace/inlayHint/refresh', () => null);
  c.onRequest('workspace/codeLens/refresh', () => null);
  c.listen();

  const t0 = Date.now();
  const init: any = await c.sendRequest(InitializeRequest.method, {
    processId: process.pid, rootUri: pathToFileURL(dir).href, workspaceFolders: [{ uri: pathToFileURL(dir).href, name: 'ws' }],
    initializationOptions: settings,
    capabilities: {
      window: { workDoneProgress: true, showMessage: {} },
      workspace: { configuration: true, inlayHint: { refreshSupport: true }, codeLens: { refreshSupport: true } },
      textDocument: {
        hover: { contentFormat: ['markdown', 'plaintext'] },
        inlayHint: { resolveSupport: { properties: ['tooltip'] } },
        publishDiagnostics: { versionSupport: true },
      },
    },
  });
  const initMs = Date.now() - t0;
  assert.equal(init.capabilities.positionEncoding ?? 'utf-16', 'utf-16');
  assert.ok(init.capabilities.hoverProvider);
  assert.ok(init.capabilities.inlayHintProvider);
  assert.deepEqual([...init.capabilities.executeCommandProvider.commands].sort(),
                   ['hexray.cancelRecording', 'hexray.recordTrace', 'hexray.restartWorker', 'hexray.status']);
  await c.sendNotification(InitializedNotification.method, {});
  await c.sendNotification(DidOpenTextDocumentNotification.method,
                           { textDocument: { uri, languageId: 'hexray-prompt', version: 1, text: SAMPLE } });

  const codes = () => (diagnostics.get(uri) ?? []).map((d: any) => d.code);
  await waitFor('the no-trace diagnostic', () => codes().includes('no-trace'));
  const status = async () => fromStatusReport(await c.sendRequest(ExecuteCommandRequest.method, { command: 'hexray.status', arguments: [] }), uri);
  assert.equal((await status())!.state, 'none');
  assert.equal(present('running', await status()).text, '$(circle-slash) HexRay: no trace');
  assert.ok(pulls.length > 0, 'the server pulled its settings');

  // Record through the server, as "HexRay: Record trace" does.
  const t1 = Date.now();
  const rec: any = await c.sendRequest(ExecuteCommandRequest.method, { command: 'hexray.recordTrace', arguments: [uri] });
  const recordMs = Date.now() - t1; // worker start (torch import) + loading hexray-demo + the forward pass
  assert.equal(rec.status, 'recorded', `${JSON.stringify(rec)}\n${stderr}`);
  assert.ok(rec.tokens > 10, JSON.stringify(rec));
  assert.ok(fs.existsSync(path.join(dir, 'sample.hxr')), 'trace written beside the prompt (recordTo: beside)');
  assert.deepEqual([progress[0]?.kind, progress.at(-1)?.kind], ['begin', 'end']);
  await waitFor('the diagnostics to clear', () => (codes().length === 0 ? true : undefined));
  assert.deepEqual(messages.filter((m) => /settings|failed/i.test(m)), []);
  const fresh = (await status())!;
  assert.equal(fresh.state, 'fresh');
  assert.equal(fresh.model, 'hexray-demo');
  assert.equal(present('running', fresh).text, '$(pass) HexRay: trace');

  // Hover: a word, and the emoji (several byte-level tokens share its span; 2 UTF-16 units).
  const lines = SAMPLE.split('\n');
  const hover = (line: number, character: number) =>
    c.sendRequest(HoverRequest.method, { textDocument: { uri }, position: { line, character } }) as Promise<any>;
  const word = await hover(0, lines[0].indexOf('single') + 2);
  assert.equal(word.contents.kind, 'markdown');
  const shown = lines[0].slice(word.range.start.character, word.range.end.character);
  assert.ok(shown.trim() && ' single'.includes(shown), `hover range: ${JSON.stringify(word.range)}`);
  assert.ok(word.contents.value.startsWith(`**\`"${shown}"\`** · token `), word.contents.value);
  assert.match(word.contents.value, /p = \*\*[\d.]+%?\*\*/);
  assert.match(word.contents.value, /Top contributors/);
  const col = lines[0].indexOf('\u{1F642}');
  const emoji = await hover(0, col);
  assert.match(emoji.contents.value, /\u{1F642}/u);
  // the emoji's byte tokens (the first one may carry the space before it) end after its 2 UTF-16 units
  assert.deepEqual(emoji.range.end, { line: 0, character: col + 2 });
  assert.ok(emoji.range.start.character <= col && emoji.range.start.character >= col - 1, JSON.stringify(emoji.range));
  const t2 = Date.now();
  for (let i = 0; i < 20; i++) await hover(1, (i * 3) % lines[1].length);
  const hoverMs = (Date.now() - t2) / 20;

  // Inlay hints for the whole document (probability mode, the default) and a resolved tooltip.
  const hints: any[] = (await c.sendRequest(InlayHintRequest.method, {
    textDocument: { uri }, range: { start: { line: 0, character: 0 }, end: { line: 2, character: 0 } },
  })) as any[];
  assert.ok(hints.length >= 10, `hints: ${hints.length}`);
  for (const h of hints) assert.match(typeof h.label === 'string' ? h.label : h.label[0].value, /\d/);
  const resolved: any = await c.sendRequest(InlayHintResolveRequest.method, hints[2]);
  assert.ok(resolved.tooltip, 'resolve fills the tooltip');

  // An edit makes the trace stale.
  await c.sendNotification(DidChangeTextDocumentNotification.method, {
    textDocument: { uri, version: 2 }, contentChanges: [{ text: SAMPLE.replace('truth', 'fact') }],
  });
  await waitFor('the stale-trace diagnostic', () => codes().includes('stale-trace'));
  assert.equal((await status())!.state, 'stale');

  await c.sendRequest(ShutdownRequest.method);
  await c.sendNotification(ExitNotification.method);
  const code = await new Promise<number | null>((res) => (proc!.exitCode !== null ? res(proc!.exitCode) : proc!.on('exit', res)));
  assert.equal(code, 0, stderr);
  console.log(`# hexray lsp: initialize ${initMs} ms, record ${recordMs} ms (worker start + hexray-demo), hover ${hoverMs.toFixed(1)} ms`);
});
