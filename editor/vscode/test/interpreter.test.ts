import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { installCommand, resolveCandidates, substitute, which } from '../src/interpreter';

function fakeBin(...names: string[]): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hxr-bin-'));
  for (const n of names) fs.writeFileSync(path.join(dir, n), '#!/bin/sh\n', { mode: 0o755 });
  return dir;
}

test('the hexray.interpreter setting wins, keeps its flags and is the only candidate', () => {
  const env = { PATH: fakeBin('hexray', 'python3'), VENV: '/v' };
  const c = resolveCandidates({
    configured: ['${workspaceFolder}/.venv/bin/python', '-X', 'utf8'],
    pythonExtension: '/usr/bin/python3.12',
    serverArgs: ['--log-file', '${workspaceFolder}/hexray.log'],
    workspaceFolder: '/ws', env, platform: 'linux',
  });
  assert.deepEqual(c, [{
    command: '/ws/.venv/bin/python', args: ['-X', 'utf8', '-m', 'hexray', 'lsp', '--log-file', '/ws/hexray.log'],
    source: 'setting', python: true, interpreter: ['/ws/.venv/bin/python', '-X', 'utf8'],
  }]);
  // relative paths are relative to the workspace folder; bare names stay PATH lookups
  assert.equal(resolveCandidates({ configured: ['.venv/bin/python'], serverArgs: [], workspaceFolder: '/ws', env }).at(0)!.command,
               path.join('/ws', '.venv/bin/python'));
  assert.equal(resolveCandidates({ configured: ['python3.11'], serverArgs: [], workspaceFolder: '/ws', env }).at(0)!.command,
               'python3.11');
  assert.equal(resolveCandidates({ configured: ['${env:VENV}/bin/python'], serverArgs: [], env }).at(0)!.command, '/v/bin/python');
});

test('without a setting: the Python extension, then the hexray script on PATH, then python3 on PATH', () => {
  const bin = fakeBin('hexray', 'python3');
  const c = resolveCandidates({ configured: [''], pythonExtension: '/p/bin/python', serverArgs: ['-v'], env: { PATH: bin }, platform: 'linux' });
  assert.deepEqual(c.map((x) => [x.source, x.command, x.args]), [
    ['python-extension', '/p/bin/python', ['-m', 'hexray', 'lsp', '-v']],
    ['path-script', path.join(bin, 'hexray'), ['lsp', '-v']],
    ['path-python', path.join(bin, 'python3'), ['-m', 'hexray', 'lsp', '-v']],
  ]);
  const bare = resolveCandidates({ configured: [], serverArgs: [], env: { PATH: fakeBin() }, platform: 'linux' });
  assert.deepEqual(bare.map((x) => [x.source, x.command]), [['path-python', 'python3']]);
});

test('which() skips non-executable files and directories', () => {
  const dir = fakeBin();
  fs.writeFileSync(path.join(dir, 'hexray'), '', { mode: 0o644 });
  fs.mkdirSync(path.join(dir, 'python3'));
  assert.equal(which('hexray', { PATH: dir }, 'linux'), undefined);
  assert.equal(which('python3', { PATH: dir }, 'linux'), undefined);
});

test('substitute: ${workspaceFolder}, ${userHome}, ${env:X}, ~; unknown variables stay', () => {
  assert.equal(substitute('${workspaceFolder}/a', '/ws', {}), '/ws/a');
  assert.equal(substitute('${userHome}/a', undefined, {}), path.join(os.homedir(), 'a'));
  assert.equal(substitute('~/a', undefined, {}), path.join(os.homedir(), 'a'));
  assert.equal(substitute('${env:NOPE}x', undefined, {}), 'x');
  assert.equal(substitute('${unknown}', undefined, {}), '${unknown}');
});

test('install command: into the interpreter that lacks hexray, quoted for a shell', () => {
  assert.equal(installCommand({ python: true, interpreter: ['/opt/my env/bin/python', '-X', 'utf8'] }),
               '"/opt/my env/bin/python" -X utf8 -m pip install "hexray[record]"');
  assert.equal(installCommand(undefined, 'linux'), 'python3 -m pip install "hexray[record]"');
  assert.equal(installCommand({ python: false, interpreter: [] }, 'win32'), 'python -m pip install "hexray[record]"');
});
