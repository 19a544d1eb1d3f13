// The install check against real processes: a missing interpreter, a Python without hexray, and one with it.
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { resolveCandidates } from '../src/interpreter';
import { probe } from '../src/probe';
import { requirePython, skipWithoutPython } from './support';

const cmd = (python: string) => resolveCandidates({ configured: [python], serverArgs: [] })[0];

test('a missing interpreter is reported as missing', async () => {
  const r = await probe(cmd('/nonexistent/bin/python3'));
  assert.deepEqual(r, { ok: false, reason: 'missing', detail: '/nonexistent/bin/python3: not found' });
});

test('a Python without hexray is reported as not installed', { skip: skipWithoutPython() }, async () => {
  // -I: isolated mode, so neither PYTHONPATH nor the user site can provide hexray; -S: no site-packages at all
  const r = await probe(resolveCandidates({ configured: [requirePython(), '-I', '-S'], serverArgs: [] })[0],
                        { cwd: os.tmpdir() });
  assert.equal(r.ok, false);
  assert.equal(!r.ok && r.reason, 'not-installed');
  assert.match(!r.ok ? r.detail : '', /no module hexray/);
});

test('a failing interpreter is reported with its error', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hxr-probe-'));
  const bad = path.join(dir, 'python');
  fs.writeFileSync(bad, '#!/bin/sh\necho "boom: broken interpreter" >&2\nexit 1\n', { mode: 0o755 });
  const r = await probe(cmd(bad));
  assert.deepEqual(r, { ok: false, reason: 'failed', detail: 'boom: broken interpreter' });
});

test('the Python with hexray passes and reports its version', { skip: skipWithoutPython() }, async () => {
  const r = await probe(cmd(requirePython()));
  assert.equal(r.ok, true, JSON.stringify(r));
  assert.match(r.ok ? r.version : '', /^\d+\.\d+/);
});
