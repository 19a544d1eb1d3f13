// Which command starts `hexray lsp`. Pure logic (no `vscode` import) so node:test can cover it.
//
// Order, as Microsoft's Python tool extensions do it:
//   1. the `hexray.interpreter` setting (a Python command, with optional flags) — used as is, no fallback;
//   2. the Python extension's active environment for the workspace;
//   3. PATH: the `hexray` script (e.g. from pipx), else `python3` (`python` on Windows).
// Each Python candidate runs `python -m hexray lsp`; the script runs `hexray lsp`.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export type Source = 'setting' | 'python-extension' | 'path-script' | 'path-python';

export interface ServerCommand {
  /** Executable to spawn. */
  command: string;
  /** Its arguments, ending in `lsp` plus `hexray.serverArgs`. */
  args: string[];
  /** Where the command came from (shown in the output channel and in error messages). */
  source: Source;
  /** True for a Python interpreter (`-m hexray`), false for the `hexray` script. */
  python: boolean;
  /** The interpreter plus its flags: what `-m pip install` must be run with. */
  interpreter: string[];
}

export interface ResolveInputs {
  /** `hexray.interpreter`: a Python command and optional flags, e.g. ["${workspaceFolder}/.venv/bin/python"]. */
  configured: string[];
  /** The Python extension's active interpreter for the workspace, if that extension is installed. */
  pythonExtension?: string;
  /** `hexray.serverArgs`, appended after `lsp`. */
  serverArgs: string[];
  /** `${workspaceFolder}` (relative interpreter paths are resolved against it too). */
  workspaceFolder?: string;
  /** Defaults to process.env (PATH lookup and ${env:NAME}). */
  env?: NodeJS.ProcessEnv;
  /** Defaults to process.platform. */
  platform?: NodeJS.Platform;
}

/** `${workspaceFolder}`, `${userHome}`, `${env:NAME}` and a leading `~`. */
export function substitute(value: string, workspaceFolder: string | undefined, env: NodeJS.ProcessEnv): string {
  let v = value.replace(/\$\{(\w+)(?::([^}]*))?\}/g, (m, name: string, arg?: string) => {
    if (name === 'workspaceFolder' && workspaceFolder !== undefined) return workspaceFolder;
    if (name === 'userHome') return os.homedir();
    if (name === 'env' && arg !== undefined) return env[arg] ?? '';
    return m;
  });
  if (v === '~' || v.startsWith('~/')) v = path.join(os.homedir(), v.slice(1));
  return v;
}

function absolutize(p: string, workspaceFolder: string | undefined): string {
  // "python3" stays a PATH lookup; ".venv/bin/python" is relative to the workspace folder.
  if (workspaceFolder && !path.isAbsolute(p) && /[\\/]/.test(p)) return path.join(workspaceFolder, p);
  return p;
}

/** First executable called `name` on PATH (with PATHEXT on Windows), or undefined. */
export function which(name: string, env: NodeJS.ProcessEnv = process.env,
                      platform: NodeJS.Platform = process.platform): string | undefined {
  const dirs = (env.PATH ?? env.Path ?? '').split(platform === 'win32' ? ';' : ':').filter(Boolean);
  const exts = platform === 'win32' ? (env.PATHEXT ?? '.EXE;.CMD;.BAT').split(';') : [''];
  for (const dir of dirs) {
    for (const ext of exts) {
      const full = path.join(dir, name + ext);
      try {
        const st = fs.statSync(full);
        if (st.isFile()) {
          if (platform !== 'win32') fs.accessSync(full, fs.constants.X_OK);
          return full;
        }
      } catch {
        // not here
      }
    }
  }
  return undefined;
}

const MODULE_ARGS = ['-m', 'hexray', 'lsp'];

/**
 * The commands to try, best first. A configured interpreter is the only candidate (the user chose it);
 * otherwise the Python extension's interpreter, then PATH. The extension probes them in order and starts
 * the first one that has hexray installed.
 */
export function resolveCandidates(inp: ResolveInputs): ServerCommand[] {
  const env = inp.env ?? process.env;
  const platform = inp.platform ?? process.platform;
  const extra = inp.serverArgs.map((a) => substitute(a, inp.workspaceFolder, env));
  const configured = inp.configured.filter((a) => a.trim() !== '');
  if (configured.length > 0) {
    const [cmd, ...flags] = configured.map((a) => substitute(a, inp.workspaceFolder, env));
    const command = absolutize(cmd, inp.workspaceFolder);
    return [{ command, args: [...flags, ...MODULE_ARGS, ...extra], source: 'setting', python: true,
              interpreter: [command, ...flags] }];
  }
  const out: ServerCommand[] = [];
  if (inp.pythonExtension) {
    out.push({ command: inp.pythonExtension, args: [...MODULE_ARGS, ...extra], source: 'python-extension',
               python: true, interpreter: [inp.pythonExtension] });
  }
  const script = which('hexray', env, platform);
  if (script) {
    out.push({ command: script, args: ['lsp', ...extra], source: 'path-script', python: false, interpreter: [] });
  }
  const py = platform === 'win32' ? 'python' : 'python3';
  out.push({ command: which(py, env, platform) ?? py, args: [...MODULE_ARGS, ...extra], source: 'path-python',
             python: true, interpreter: [which(py, env, platform) ?? py] });
  return out;
}

export function describeSource(s: Source): string {
  switch (s) {
    case 'setting': return 'the hexray.interpreter setting';
    case 'python-extension': return "the Python extension's selected interpreter";
    case 'path-script': return 'the hexray script on PATH';
    case 'path-python': return 'Python on PATH';
  }
}

/** Shell-quote one word for a command the user can paste (POSIX shells and PowerShell alike for plain paths). */
export function shellQuote(word: string): string {
  return /^[\w@%+=:,./\\-]+$/.test(word) ? word : `"${word.replace(/(["\\$`])/g, '\\$1')}"`;
}

/** The command that installs hexray (with the recorder's extras) into the interpreter that lacks it. */
export function installCommand(cmd: Pick<ServerCommand, 'interpreter' | 'python'> | undefined,
                               platform: NodeJS.Platform = process.platform): string {
  const spec = '"hexray[record]"';
  if (cmd && cmd.python && cmd.interpreter.length > 0) {
    return [...cmd.interpreter.map(shellQuote), '-m', 'pip', 'install', spec].join(' ');
  }
  return `${platform === 'win32' ? 'python' : 'python3'} -m pip install ${spec}`;
}
