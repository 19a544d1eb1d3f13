import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { documentSelector, getterOf, RESTART_SETTINGS, SERVER_SETTINGS, serverSettings } from '../src/settings';

const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8'));
const props: Record<string, any> = pkg.contributes.configuration.properties;

test('package.json contributes every server setting, and the client-only ones', () => {
  const contributed = Object.keys(props).map((k) => k.replace(/^hexray\./, ''));
  const clientOnly = ['interpreter', 'serverArgs', 'trace.server'];
  assert.deepEqual(contributed.filter((k) => !clientOnly.includes(k)).sort(), [...SERVER_SETTINGS].sort());
  for (const k of RESTART_SETTINGS) assert.ok(k in props, k);
  for (const [k, v] of Object.entries(props)) {
    assert.ok(v.description || v.markdownDescription, `${k} has a description`);
    assert.ok('default' in v, `${k} has a default`);
  }
});

test('server settings: only server keys; dotted keys read from nested objects; paths expanded', () => {
  const cfg = { model: 'gpt2', interpreter: ['x'], hover: { predictions: 3, contributors: null },
                extraPaths: ['${workspaceFolder}/m', 7], python: '${env:PY}', trace: { server: 'off' } };
  assert.deepEqual(serverSettings(getterOf(cfg), '/ws', { PY: '/py' }),
                   { model: 'gpt2', 'hover.predictions': 3, extraPaths: ['/ws/m', 7], python: '/py' });
  assert.equal(getterOf(null)('a.b'), undefined);
});

test('document selector: the language, plus the other filePatterns as globs', () => {
  assert.deepEqual(documentSelector(['*.prompt', '*.txt', 'prompts/*.md', '*/x/*.p', '/abs/*.q', '**/deep', 3]), [
    { scheme: 'file', language: 'hexray-prompt' },
    { scheme: 'untitled', language: 'hexray-prompt' },
    { scheme: 'file', pattern: '**/*.txt' },
    { scheme: 'file', pattern: '**/prompts/*.md' },
    { scheme: 'file', pattern: '**/x/*.p' },
    { scheme: 'file', pattern: '/abs/*.q' },
    { scheme: 'file', pattern: '**/deep' },
  ]);
  assert.equal(documentSelector(undefined).length, 2);
});

test('language, grammar and commands are declared', () => {
  const c = pkg.contributes;
  assert.deepEqual(c.languages[0].extensions, ['.prompt']);
  assert.equal(c.languages[0].id, 'hexray-prompt');
  assert.equal(c.grammars[0].language, 'hexray-prompt');
  assert.ok(fs.existsSync(path.join(__dirname, '..', '..', c.grammars[0].path)));
  assert.ok(fs.existsSync(path.join(__dirname, '..', '..', c.languages[0].configuration)));
  assert.deepEqual(c.commands.map((x: any) => x.command).sort(), [
    'hexray.cancelRecording', 'hexray.openTraceView', 'hexray.recordTrace', 'hexray.restartServer', 'hexray.restartWorker', 'hexray.showOutput']);
  assert.equal(props['hexray.inlayHints'].default, 'probability');
});
