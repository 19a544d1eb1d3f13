// Checks that a candidate command can run `hexray lsp` before the language client starts it, so a missing
// install gives one clear message (with the command that fixes it) instead of a crashed server.
import { execFile } from 'node:child_process';
import type { ServerCommand } from './interpreter';

export type ProbeResult =
  | { ok: true; version: string }
  | { ok: false; reason: 'missing' | 'not-installed' | 'old-python' | 'failed'; detail: string };

/** Exit 4: Python too old; 3: hexray (or its language-server dependency) missing; else prints the version. */
export const PROBE_SCRIPT = [
  'import sys',
  'if sys.version_info < (3, 10):',
  '    print("Python " + sys.version.split()[0]); sys.exit(4)',
  'import importlib.util as u',
  'missing = [m for m in ("hexray", "hexray_core", "hexray_lsp", "pygls") if u.find_spec(m) is None]',
  'if missing:',
  '    print("no module " + ", ".join(missing)); sys.exit(3)',
  'import hexray',
  'print(getattr(hexray, "__version__", "unknown"))',
].join('\n');

export interface ProbeOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
}

export function probe(cmd: ServerCommand, opts: ProbeOptions = {}): Promise<ProbeResult> {
  const args = cmd.python ? [...cmd.interpreter.slice(1), '-c', PROBE_SCRIPT] : ['--version'];
  const file = cmd.python ? cmd.interpreter[0] : cmd.command;
  return new Promise((resolve) => {
    execFile(file, args, { cwd: opts.cwd, env: opts.env ?? process.env, timeout: opts.timeoutMs ?? 30_000,
                           windowsHide: true },
    (err, stdout, stderr) => {
      const out = String(stdout).trim();
      const tail = (String(stderr).trim() || out).split('\n').slice(-3).join('\n');
      if (!err) {
        resolve({ ok: true, version: cmd.python ? out : out.replace(/^hexray\s+/, '') });
        return;
      }
      const e = err as unknown as { code?: string | number; killed?: boolean };
      if (e.code === 'ENOENT' || e.code === 'EACCES') {
        resolve({ ok: false, reason: 'missing', detail: `${file}: ${e.code === 'ENOENT' ? 'not found' : 'not executable'}` });
      } else if (e.code === 4) {
        resolve({ ok: false, reason: 'old-python', detail: `${out}; HexRay needs Python 3.10 or newer` });
      } else if (e.code === 3) {
        resolve({ ok: false, reason: 'not-installed', detail: out });
      } else {
        resolve({ ok: false, reason: 'failed', detail: e.killed ? `timed out: ${file}` : tail || String(err) });
      }
    });
  });
}
