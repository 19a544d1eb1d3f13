// "HexRay: Open Trace View": the viewer of the active prompt's trace (or of an .hxr file) in a webview
// beside the editor. The page is what `hexray report` writes (self-contained: scripts, styles and data
// inline, no network request), made by the same hexray the language server runs.
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import type { ServerCommand } from './interpreter';

export const OPEN_VIEW = 'hexray.openTraceView';

/** The trace to show for a file: the .hxr itself, the server's trace of a prompt, else name.hxr beside it. */
export function traceFor(file: string, serverTrace?: string | null): string {
  if (file.toLowerCase().endsWith('.hxr')) return file;
  if (serverTrace) return serverTrace;
  const ext = path.extname(file);
  return (ext ? file.slice(0, -ext.length) : file) + '.hxr';
}

/** `hexray report TRACE -o OUT` with the interpreter (or hexray script) the server command uses. */
export function reportCommand(cmd: ServerCommand, trace: string, out: string): { command: string; args: string[] } {
  const lsp = cmd.args.indexOf('lsp');
  const prefix = lsp >= 0 ? cmd.args.slice(0, lsp) : cmd.python ? ['-m', 'hexray'] : [];
  return { command: cmd.command, args: [...prefix, 'report', trace, '-o', out] };
}

/** The report's HTML for a trace; rejects with hexray's own one-line error. */
export async function renderReport(cmd: ServerCommand, trace: string, cwd?: string): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hexray-view-'));
  const out = path.join(dir, 'view.html');
  const { command, args } = reportCommand(cmd, trace, out);
  try {
    await new Promise<void>((resolve, reject) => {
      execFile(command, args, { cwd, timeout: 120_000, maxBuffer: 1 << 20 }, (err, _stdout, stderr) => {
        if (err) reject(new Error(String(stderr).trim().split('\n').pop() || err.message));
        else resolve();
      });
    });
    return fs.readFileSync(out, 'utf8');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
