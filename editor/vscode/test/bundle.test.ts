// The esbuild bundle that goes into the .vsix loads (all of vscode-languageclient inlined, only `vscode`
// external) and exports the entry points. `vscode` is the fake, with any other name answered by a stub class.
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import Module = require('node:module');
import { fakeVscode } from './fake-vscode';
import { EXTENSION_ROOT } from './support';

const bundle = path.join(EXTENSION_ROOT, 'dist', 'extension.js');

function stub(name: string): any {
  const cls = class {};
  Object.defineProperty(cls, 'name', { value: name });
  return new Proxy(cls, {
    get: (target, prop) => (prop in target || typeof prop === 'symbol' ? (target as any)[prop] : stub(`${name}.${String(prop)}`)),
  });
}

test('dist/extension.js loads with only `vscode` external', { skip: fs.existsSync(bundle) ? false : 'run `npm run bundle` first' }, () => {
  const permissive = new Proxy(fakeVscode as any, {
    get: (target, prop) => (prop in target ? target[prop] : stub(`vscode.${String(prop)}`)),
  });
  const origLoad = (Module as any)._load;
  const seen: string[] = [];
  (Module as any)._load = function (request: string, ...rest: unknown[]) {
    seen.push(request);
    return request === 'vscode' ? permissive : origLoad.call(this, request, ...rest);
  };
  try {
    const ext = require(bundle);
    assert.equal(typeof ext.activate, 'function');
    assert.equal(typeof ext.deactivate, 'function');
  } finally {
    (Module as any)._load = origLoad;
  }
  const external = seen.filter((r) => !r.startsWith('node:') && !Module.builtinModules.includes(r) && r !== bundle);
  assert.deepEqual([...new Set(external)], ['vscode']);
});
