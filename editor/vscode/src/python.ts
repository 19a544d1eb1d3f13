// The Python interpreter selected in VS Code, from the Python extensions, without depending on them:
// the Python Environments extension (ms-python.vscode-python-envs) first, then the Python extension's
// environments API (ms-python.python), as Microsoft's python-tools extension template does.
import * as vscode from 'vscode';

const ENVS_EXTENSION = 'ms-python.vscode-python-envs';
const PYTHON_EXTENSION = 'ms-python.python';

function withTimeout<T>(p: Thenable<T>, ms: number): Promise<T | undefined> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(undefined), ms);
    Promise.resolve(p).then((v) => { clearTimeout(timer); resolve(v); }, () => { clearTimeout(timer); resolve(undefined); });
  });
}

async function api(id: string): Promise<any> {
  const ext = vscode.extensions.getExtension(id);
  if (!ext) return undefined;
  return ext.isActive ? ext.exports : withTimeout(ext.activate(), 15_000);
}

export function pythonExtensionInstalled(): boolean {
  return !!(vscode.extensions.getExtension(PYTHON_EXTENSION) || vscode.extensions.getExtension(ENVS_EXTENSION));
}

/** Absolute path of the interpreter the user selected for `resource`, or undefined. */
export async function selectedInterpreter(resource?: vscode.Uri): Promise<string | undefined> {
  try {
    const envs = await api(ENVS_EXTENSION);
    if (envs?.getEnvironment) {
      const env = await withTimeout(envs.getEnvironment(resource), 10_000);
      const exe = (env as any)?.execInfo?.run?.executable;
      if (typeof exe === 'string' && exe) return exe;
    }
  } catch {
    // fall through to the Python extension
  }
  try {
    const py = await api(PYTHON_EXTENSION);
    const environments = py?.environments;
    if (environments?.getActiveEnvironmentPath) {
      const envPath = environments.getActiveEnvironmentPath(resource);
      const resolved = envPath ? await withTimeout(environments.resolveEnvironment(envPath), 10_000) : undefined;
      const exe = (resolved as any)?.executable?.uri?.fsPath ?? envPath?.path;
      if (typeof exe === 'string' && exe) return exe;
    }
  } catch {
    // no usable Python extension
  }
  return undefined;
}

/** Calls `listener` when the selected interpreter changes (in either extension). */
export async function onInterpreterChange(listener: () => void): Promise<vscode.Disposable[]> {
  const subs: vscode.Disposable[] = [];
  for (const id of [ENVS_EXTENSION, PYTHON_EXTENSION]) {
    if (!vscode.extensions.getExtension(id)) continue;
    try {
      const a = await api(id);
      const event = id === ENVS_EXTENSION ? a?.onDidChangeEnvironment : a?.environments?.onDidChangeActiveEnvironmentPath;
      if (typeof event === 'function') subs.push(event(() => listener()));
    } catch {
      // ignore
    }
  }
  return subs;
}
