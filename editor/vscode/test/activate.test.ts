// activate()/deactivate(), commands, the not-installed message and the status bar, with fake `vscode` and
// `vscode-languageclient/node` modules (see fake-vscode.ts).
import { afterEach, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Emitter, FakeLanguageClient, FakeUri, install, reset, state } from './fake-vscode';

install();
const ext = require('../src/extension') as typeof import('../src/extension');
import type { ServerCommand } from '../src/interpreter';
import type { ProbeResult } from '../src/probe';

const probed: string[] = [];
function stubProbe(answer: (cmd: ServerCommand) => ProbeResult) {
  probed.length = 0;
  ext.hooks.probe = async (cmd) => { probed.push(cmd.command); return answer(cmd); };
}
const OK: ProbeResult = { ok: true, version: '0.1.0' };

function promptEditor(file = '/ws/a.prompt') {
  state.activeEditor = { document: { uri: new FakeUri(file), languageId: 'hexray-prompt', isDirty: false } };
}

function changeConfig(...keys: string[]) {
  state.onConfig.fire({ affectsConfiguration: (k: string) => k === 'hexray' || keys.includes(k) });
}

const context = () => ({ subscriptions: [] as Array<{ dispose(): unknown }> });

afterEach(async () => {
  await ext.deactivate();
  ext.hooks.selectedInterpreter = async () => undefined;
});

test('activate probes the configured interpreter and starts `python -m hexray lsp` with the settings', async () => {
  reset({
    'hexray.interpreter': ['${workspaceFolder}/.venv/bin/python', '-X', 'utf8'],
    'hexray.serverArgs': ['--log-level', 'INFO'],
    'hexray.model': 'gpt2', 'hexray.device': 'cuda', 'hexray.inlayHints': 'surprisal',
    'hexray.hover.predictions': 8, 'hexray.recordOptions': { top_k: 20 }, 'hexray.extraPaths': ['${workspaceFolder}/models'],
    'hexray.trace.server': 'verbose',
  });
  stubProbe(() => OK);
  ext.hooks.selectedInterpreter = async () => '/should/not/be/used';
  const h = await ext.activate(context() as any);
  assert.deepEqual(probed, ['/ws/.venv/bin/python']);
  assert.equal(state.clients.length, 1);
  const c = state.clients[0];
  assert.equal(c.started, true);
  assert.equal(h.serverState, 'running');
  assert.equal(c.serverOptions.command, '/ws/.venv/bin/python');
  assert.deepEqual(c.serverOptions.args, ['-X', 'utf8', '-m', 'hexray', 'lsp', '--log-level', 'INFO']);
  assert.equal(c.serverOptions.options.cwd, '/ws');
  assert.deepEqual(c.clientOptions.documentSelector, [
    { scheme: 'file', language: 'hexray-prompt' }, { scheme: 'untitled', language: 'hexray-prompt' }]);
  const init = c.clientOptions.initializationOptions;
  assert.equal(init.model, 'gpt2');
  assert.equal(init.device, 'cuda');
  assert.equal(init.inlayHints, 'surprisal');
  assert.equal(init['hover.predictions'], 8);
  assert.deepEqual(init.recordOptions, { top_k: 20 });
  assert.deepEqual(init.extraPaths, ['/ws/models']);
  for (const clientOnly of ['interpreter', 'serverArgs', 'trace', 'trace.server']) assert.ok(!(clientOnly in init), clientOnly);
  // the server's commands are registered by vscode-languageclient, not by the extension
  assert.deepEqual([...state.commands.keys()].sort(), ['hexray.openTraceView', 'hexray.restartServer', 'hexray.showOutput']);
  await ext.deactivate();
  assert.equal(c.stopped, true);
});

test("no setting: the Python extension's interpreter first, then PATH; the first with hexray wins", async () => {
  const bin = fs.mkdtempSync(path.join(os.tmpdir(), 'hxr-path-'));
  fs.writeFileSync(path.join(bin, 'python3'), '#!/bin/sh\n', { mode: 0o755 });
  const oldPath = process.env.PATH;
  process.env.PATH = bin;
  try {
    reset({});
    ext.hooks.selectedInterpreter = async () => '/envs/project/bin/python';
    stubProbe((cmd) => (cmd.command === '/envs/project/bin/python'
      ? { ok: false, reason: 'not-installed', detail: 'no module hexray_core' } : OK));
    await ext.activate(context() as any);
    assert.deepEqual(probed, ['/envs/project/bin/python', path.join(bin, 'python3')]);
    assert.equal(state.clients[0].serverOptions.command, path.join(bin, 'python3'));
    assert.deepEqual(state.clients[0].serverOptions.args, ['-m', 'hexray', 'lsp']);
    assert.ok(state.logs.some((l) => l.startsWith('warn Not using') && l.includes('no module hexray_core')), state.logs.join('\n'));
    assert.equal(state.errors.length, 0);
  } finally {
    process.env.PATH = oldPath;
  }
});

test('hexray not installed: one error naming the interpreter and the install command; no client', async () => {
  reset({ 'hexray.interpreter': ['/venv/bin/python'] });
  promptEditor();
  stubProbe(() => ({ ok: false, reason: 'not-installed', detail: 'no module hexray_core' }));
  state.pickError = 'Copy Install Command';
  const h = await ext.activate(context() as any);
  assert.equal(state.clients.length, 0);
  assert.equal(h.serverState, 'not-installed');
  assert.equal(state.errors.length, 1);
  const { message, items } = state.errors[0];
  assert.match(message, /HexRay is not installed for \/venv\/bin\/python \(the hexray\.interpreter setting\)/);
  assert.ok(message.includes('`/venv/bin/python -m pip install "hexray[record]"`'), message);
  assert.deepEqual(items, ['Copy Install Command', 'Open Settings', 'Show Output']);
  await new Promise((r) => setImmediate(r));
  assert.equal(state.clipboard, '/venv/bin/python -m pip install "hexray[record]"');
  await h.refresh();
  const item = state.items[0];
  assert.equal(item.visible, true);
  assert.match(item.text, /not installed/);
  assert.equal(item.command.command, 'hexray.showOutput');
});

test('no Python at all: the message says so and gives the generic install command', async () => {
  reset({ 'hexray.interpreter': ['/nowhere/python'] });
  stubProbe(() => ({ ok: false, reason: 'missing', detail: '/nowhere/python: not found' }));
  await ext.activate(context() as any);
  assert.equal(state.errors.length, 1);
  assert.match(state.errors[0].message, /\/nowhere\/python \(the hexray\.interpreter setting\) was not found/);
  assert.match(state.errors[0].message, /python3? -m pip install "hexray\[record\]"/);
});

test('record from the palette uses the active prompt; the status bar follows hexray.status', async () => {
  reset({ 'hexray.interpreter': ['/venv/bin/python'], 'hexray.model': 'gpt2' });
  stubProbe(() => OK);
  promptEditor();
  const uri = 'file:///ws/a.prompt';
  state.statusReport = { documents: { [uri]: { state: 'none', trace: null, recording: false } }, settings: { model: 'gpt2' } };
  const h = await ext.activate(context() as any);
  const c: FakeLanguageClient = state.clients[0];
  await h.refresh();
  const item = state.items[0];
  assert.equal(item.visible, true);
  assert.match(item.text, /no trace/);
  assert.deepEqual(item.command, { title: 'Record trace', command: 'hexray.recordTrace', arguments: [uri] });
  assert.deepEqual(c.requests.at(-1), ['workspace/executeCommand', { command: 'hexray.status', arguments: [] }]);

  let seen: any[] = [];
  let textWhileRecording = '';
  const result = await c.runServerCommand('hexray.recordTrace', [], async (_cmd, args) => {
    seen = args;
    await h.refresh();
    textWhileRecording = item.text;
    state.statusReport = { documents: { [uri]: { state: 'fresh', trace: '/ws/a.hxr' } }, settings: { model: 'gpt2' } };
    return { status: 'recorded', tokens: 12, seconds: 0.5 };
  });
  assert.deepEqual(seen, [uri]);
  assert.equal(result.status, 'recorded');
  // the editor title button passes the vscode.Uri of the document
  await c.runServerCommand('hexray.recordTrace', [new FakeUri('/ws/b.prompt'), {}], async (_cmd, args) => { seen = args; });
  assert.deepEqual(seen, ['file:///ws/b.prompt']);
  assert.match(textWhileRecording, /recording/);
  assert.deepEqual(state.statusMessages, ['HexRay: recorded 12 tokens in 0.5 s']);
  await h.refresh();
  assert.match(item.text, /HexRay: trace/);
  assert.match(item.tooltip, /up to date · gpt2\nTrace: \/ws\/a\.hxr/);

  // not a prompt: the item hides, and the palette command asks for a prompt instead of calling the server
  state.activeEditor = { document: { uri: new FakeUri('/ws/x.py'), languageId: 'python' } };
  await h.refresh();
  assert.equal(item.visible, false);
  let called = false;
  await c.runServerCommand('hexray.recordTrace', [], async () => { called = true; });
  assert.equal(called, false);
  assert.match(state.warnings[0], /open a prompt file/);
});

test('status falls back to the diagnostics when hexray.status fails', async () => {
  reset({ 'hexray.interpreter': ['/venv/bin/python'] });
  stubProbe(() => OK);
  promptEditor();
  const h = await ext.activate(context() as any);
  state.clients[0].sendRequest = async () => { throw new Error('unknown command'); };
  state.diagnostics.set('file:///ws/a.prompt', [{ source: 'hexray', code: 'stale-trace' }]);
  await h.refresh();
  assert.match(state.items[0].text, /stale/);
});

test('setting changes: server settings are pushed, interpreter changes restart the server', async () => {
  reset({ 'hexray.interpreter': ['/venv/bin/python'], 'hexray.model': 'gpt2' });
  stubProbe(() => OK);
  await ext.activate(context() as any);
  const first = state.clients[0];
  state.settings['hexray.model'] = 'Qwen/Qwen2.5-0.5B';
  changeConfig('hexray.model');
  assert.equal(first.notifications.length, 1);
  const [method, params] = first.notifications[0];
  assert.equal(method, 'workspace/didChangeConfiguration');
  assert.equal(params.settings.hexray.model, 'Qwen/Qwen2.5-0.5B');

  state.settings['hexray.interpreter'] = ['/other/bin/python'];
  changeConfig('hexray.interpreter');
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(first.stopped, true);
  assert.equal(state.clients.length, 2);
  assert.equal(state.clients[1].serverOptions.command, '/other/bin/python');
});

test('restart command and an unexpected server exit', async () => {
  reset({ 'hexray.interpreter': ['/venv/bin/python'] });
  stubProbe(() => OK);
  promptEditor();
  const h = await ext.activate(context() as any);
  state.clients[0].stateEmitter.fire({ oldState: 2, newState: 1 });
  assert.equal(h.serverState, 'stopped');
  await h.refresh();
  assert.match(state.items[0].text, /server stopped/);
  await state.commands.get('hexray.restartServer')!();
  assert.equal(state.clients.length, 2);
  assert.equal(h.serverState, 'running');
  await state.commands.get('hexray.showOutput')!();
  assert.ok(state.logs.includes('shown'));
});

test('the workspace/configuration middleware answers with server settings only, variables expanded', async () => {
  reset({ 'hexray.interpreter': ['/venv/bin/python'] });
  stubProbe(() => OK);
  await ext.activate(context() as any);
  const mw = state.clients[0].clientOptions.middleware.workspace.configuration;
  const raw = { interpreter: ['/venv/bin/python'], model: 'gpt2', python: '${workspaceFolder}/.venv/bin/python',
                hover: { predictions: 3 }, trace: { server: 'off' } };
  const res = await mw({ items: [{ section: 'hexray' }, { section: 'editor' }] }, undefined, async () => [raw, { x: 1 }]);
  assert.deepEqual(res, [{ model: 'gpt2', python: '/ws/.venv/bin/python', 'hover.predictions': 3 }, { x: 1 }]);
});

test("the Python extension's selected interpreter, and a restart when the selection changes", async () => {
  reset({});
  const { selectedInterpreter } = require('../src/python') as typeof import('../src/python');
  ext.hooks.selectedInterpreter = selectedInterpreter;
  let active = '/envs/a/bin/python';
  const changed = new Emitter();
  state.extensions['ms-python.python'] = {
    isActive: false,
    activate: async () => state.extensions['ms-python.python'].exports,
    exports: {
      environments: {
        getActiveEnvironmentPath: (resource: FakeUri) => ({ id: active, path: active, resource }),
        resolveEnvironment: async (p: { path: string }) => ({ executable: { uri: { fsPath: p.path } } }),
        onDidChangeActiveEnvironmentPath: changed.event,
      },
    },
  };
  stubProbe(() => OK);
  const h = await ext.activate(context() as any);
  await new Promise((r) => setImmediate(r)); // the change listener is subscribed after activation
  assert.equal(state.clients[0].serverOptions.command, '/envs/a/bin/python');
  active = '/envs/b/bin/python';
  changed.fire({});
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(state.clients.length, 2);
  assert.equal(state.clients[1].serverOptions.command, '/envs/b/bin/python');
  assert.equal(state.clients[0].stopped, true);
  // with hexray.interpreter set, the selection does not matter
  state.settings['hexray.interpreter'] = ['/pinned/python'];
  await h.restart();
  changed.fire({});
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(state.clients.length, 3);
  assert.equal(state.clients[2].serverOptions.command, '/pinned/python');
});

test('the Python Environments extension comes first when installed', async () => {
  reset({});
  const { selectedInterpreter } = require('../src/python') as typeof import('../src/python');
  ext.hooks.selectedInterpreter = selectedInterpreter;
  state.extensions['ms-python.vscode-python-envs'] = {
    isActive: true,
    exports: { getEnvironment: async () => ({ execInfo: { run: { executable: '/envs/new/bin/python' } } }) },
  };
  state.extensions['ms-python.python'] = {
    isActive: true,
    exports: { environments: { getActiveEnvironmentPath: () => ({ id: '/old', path: '/old' }), resolveEnvironment: async () => undefined } },
  };
  stubProbe(() => OK);
  await ext.activate(context() as any);
  assert.equal(state.clients[0].serverOptions.command, '/envs/new/bin/python');
});

test('language configuration: its word pattern compiles and keeps special tokens whole', () => {
  const conf = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'language-configuration.json'), 'utf8'));
  const re = new RegExp(conf.wordPattern, 'g');
  assert.deepEqual('Hi <|im_start|>user naïve 3.5 cats!'.match(re), ['Hi', '<|im_start|>', 'user', 'naïve', '3.5', 'cats']);
});
