import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { fromDiagnosticCodes, fromStatusReport, present } from '../src/status';

const uri = 'file:///w/a.prompt';

test('the hexray.status answer gives the document state; recording wins', () => {
  const report = (doc: object) => ({ documents: { [uri]: doc }, settings: { model: 'gpt2', modelFactory: '' } });
  assert.deepEqual(fromStatusReport(report({ state: 'fresh', trace: '/w/a.hxr', recording: false }), uri),
                   { state: 'fresh', trace: '/w/a.hxr', model: 'gpt2' });
  assert.equal(fromStatusReport(report({ state: 'stale', recording: true }), uri)!.state, 'recording');
  assert.equal(fromStatusReport(report({ state: 'weird' }), uri)!.state, 'unknown');
  assert.equal(fromStatusReport({ documents: {} }, uri)!.state, 'loading'); // not opened on the server yet
  assert.equal(fromStatusReport(null, uri), undefined);
});

test('fallback from diagnostic codes', () => {
  assert.equal(fromDiagnosticCodes(['no-trace']).state, 'none');
  assert.equal(fromDiagnosticCodes(['stale-trace']).state, 'stale');
  assert.equal(fromDiagnosticCodes(['trace-unreadable']).state, 'error');
  assert.equal(fromDiagnosticCodes(['recording-failed', 'no-trace']).state, 'failed');
  assert.equal(fromDiagnosticCodes(['surprising-token', 'kit-missing']).state, 'fresh');
});

test('presentation: text, colour and click action per state', () => {
  assert.deepEqual(present('running', { state: 'stale' }), {
    text: '$(warning) HexRay: stale', level: 'warning', action: 'record',
    tooltip: 'HexRay: the prompt changed since the trace was recorded\nClick to record it again.' });
  assert.equal(present('running', { state: 'recording' }).action, 'cancel');
  assert.equal(present('running', { state: 'none', model: 'gpt2' }).tooltip, 'HexRay: no trace for this prompt · gpt2\nClick to record one.');
  assert.equal(present('not-installed', undefined, 'x').level, 'error');
  assert.equal(present('starting', undefined).action, 'output');
  assert.match(present('stopped', undefined).text, /server stopped/);
});
