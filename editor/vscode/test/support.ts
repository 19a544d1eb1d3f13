// Shared by the tests that run real processes: which Python has hexray, and where the repository is.
import * as fs from 'node:fs';
import * as path from 'node:path';

/** editor/vscode */
export const EXTENSION_ROOT = path.join(__dirname, '..', '..');
export const REPO = path.join(EXTENSION_ROOT, '..', '..');

/**
 * The Python with hexray installed: $HEXRAY_TEST_PYTHON, else the repository's .venv. Tests that need it skip
 * without one, unless $HEXRAY_TEST_REQUIRE_PYTHON=1 (set by tests/test_editors.py), where they fail instead.
 */
export function testPython(): string | undefined {
  const fromEnv = process.env.HEXRAY_TEST_PYTHON;
  if (fromEnv) return fromEnv;
  for (const p of [path.join(REPO, '.venv', 'bin', 'python'), path.join(REPO, '.venv', 'Scripts', 'python.exe')]) {
    if (fs.existsSync(p)) return p;
  }
  return undefined;
}

export function skipWithoutPython(): string | false {
  if (testPython()) return false;
  if (process.env.HEXRAY_TEST_REQUIRE_PYTHON === '1') return false; // run, and fail
  return 'no Python with hexray: set HEXRAY_TEST_PYTHON';
}

export function requirePython(): string {
  const p = testPython();
  if (!p) throw new Error('HEXRAY_TEST_REQUIRE_PYTHON=1 but no Python with hexray was found: set HEXRAY_TEST_PYTHON');
  return p;
}
