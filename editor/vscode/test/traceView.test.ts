// "HexRay: Open Trace View": which trace a file maps to, the `hexray report` command line, and the command end
// to end with a real hexray (a demo-model trace recorded here, its report shown in the fake webview).
import { afterEach, test } from 'node:test';
import * as assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { FakeUri, install, reset, state } from './fake-vscode';
import { REPO, skipWithoutPython, testPython } from './support';

install();
const ext = require('../src/extension') as typeof import('../src/extension');
import { reportCommand, traceFor } from '../src/traceView';
import type { ServerCommand } from '../src/interpreter';

afterEach(async () => { await ext.deactivate(); });

test('traceFor: an .hxr is itself, a prompt takes the server\'s trace, else name.hxr beside it', () => {
  assert.equal(traceFor('/ws/t.HXR'), '/ws/t.HXR');
  assert.equal(traceFor('/ws/a.prompt', '/ws/.hexray/traces/a-1.hxr'), '/ws/.hexray/traces/a-1.hxr');
  assert.equal(traceFor('/ws/a.prompt', null), '/ws/a.hxr');
  assert.equal(traceFor('/ws/notes'), '/ws/notes.hxr');
});

test('reportCommand reuses the server command up to `lsp`', () => {
  const py: ServerCommand = { command: '/v/bin/python', args: ['-X', 'utf8', '-m', 'hexray', 'lsp', '--log-level', 'INFO'],
    source: 'setting', python: true, interpreter: ['/v/bin/python', '-X', 'utf8'] } as ServerCommand;
  assert.deepEqual(reportCommand(py, '/t.hxr', '/o.html'),
    { command: '/v/bin/python', args: ['-X', 'utf8', '-m', 'hexray', 'report', '/t.hxr', '-o', '/o.html'] });
  const script = { command: '/usr/bin/hexray', args: ['lsp'], source: 'path-script', python: false, interpreter: [] } as ServerCommand;
  assert.deepEqual(reportCommand(script, '/t.hxr', '/o.html').args, ['report', '/t.hxr', '-o', '/o.html']);
});

test('the command shows the trace of the active prompt in a webview beside the editor', { skip: skipWithoutPython(), timeout: 300_000 }, async () => {
  const python = testPython()!;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hxr-view-'));
  const prompt = path.join(dir, 'capital.prompt');
  fs.writeFileSync(prompt, 'The capital of France is');
  const env = { ...process.env, HF_HUB_OFFLINE: '1', HEXRAY_CACHE: path.join(dir, '.cache'),
    PYTHONPATH: [REPO, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) };
  process.env.HEXRAY_CACHE = env.HEXRAY_CACHE;
  process.env.PYTHONPATH = env.PYTHONPATH;
  execFileSync(python, ['-m', 'hexray', 'record', '--model', 'hexray-demo', '--device', 'cpu', '--prompt-file', prompt,
    '-o', path.join(dir, 'capital.hxr'), '-q'], { env });

  reset({ 'hexray.interpreter': [python] }, dir);
  ext.hooks.probe = async () => ({ ok: true, version: '0.1.0' });
  await ext.activate({ subscriptions: [] } as any);
  state.activeEditor = { document: { uri: new FakeUri(prompt), languageId: 'hexray-prompt', isDirty: false } };
  await state.commands.get('hexray.openTraceView')!();
  assert.deepEqual(state.errors, []);
  assert.equal(state.panels.length, 1);
  const panel = state.panels[0];
  assert.equal(panel.title, 'HexRay: capital.hxr');
  assert.equal(panel.column && (panel.column as any).viewColumn, -2);
  assert.equal(panel.options.enableScripts, true);
  assert.match(panel.webview.html, /^<!DOCTYPE html>/);
  assert.match(panel.webview.html, /default-src 'none'/);
  assert.match(panel.webview.html, /"prompt":"The capital of France is"/);

  // a missing trace: hexray's one-line error, no panel
  state.activeEditor = { document: { uri: new FakeUri(path.join(dir, 'other.prompt')), languageId: 'hexray-prompt', isDirty: false } };
  await state.commands.get('hexray.openTraceView')!();
  assert.equal(state.panels.length, 1);
  const errors = state.errors as Array<{ message: string }>;
  assert.equal(errors.length, 1);
  assert.match(errors[0].message, /^HexRay: hexray: error: .*other\.hxr: no such file/);
});
