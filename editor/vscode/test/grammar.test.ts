// Tokenizes prompts with the real TextMate engine VS Code uses (vscode-textmate + the oniguruma wasm).
import { before, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as vsctm from 'vscode-textmate';
import * as oniguruma from 'vscode-oniguruma';

const root = path.join(__dirname, '..', '..');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'));
let grammar: vsctm.IGrammar;

before(async () => {
  const wasm = fs.readFileSync(require.resolve('vscode-oniguruma/release/onig.wasm'));
  await oniguruma.loadWASM(wasm.buffer.slice(wasm.byteOffset, wasm.byteOffset + wasm.byteLength));
  const contrib = pkg.contributes.grammars[0];
  const registry = new vsctm.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (s: string[]) => new oniguruma.OnigScanner(s),
      createOnigString: (s: string) => new oniguruma.OnigString(s),
    }),
    loadGrammar: async (scope) => (scope === contrib.scopeName
      ? vsctm.parseRawGrammar(fs.readFileSync(path.join(root, contrib.path), 'utf8'), contrib.path) : null),
  });
  grammar = (await registry.loadGrammar(contrib.scopeName))!;
  assert.ok(grammar);
});

/** [text, innermost scope] of every token that is not plain text, over all lines. */
function scoped(text: string): Array<[string, string]> {
  let stack = vsctm.INITIAL;
  const out: Array<[string, string]> = [];
  for (const line of text.split('\n')) {
    const r = grammar.tokenizeLine(line, stack);
    for (const t of r.tokens) {
      const scope = t.scopes.at(-1)!;
      if (scope !== 'text.hexray-prompt') out.push([line.slice(t.startIndex, t.endIndex), scope.replace(/\.hexray-prompt$/, '')]);
    }
    stack = r.ruleStack;
  }
  return out;
}

test('special tokens and template placeholders; emoji and plain text stay plain', () => {
  assert.deepEqual(scoped('Hi {{ user.name }} <|endoftext|> 🙂 naïve {not a var}'), [
    ['{{ user.name }}', 'variable.other.template'],
    ['<|endoftext|>', 'keyword.control.special-token'],
  ]);
});

test('chat templates: ChatML and Llama 3 roles, DeepSeek full-width bars, [INST], <s>', () => {
  assert.deepEqual(scoped('<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|start_header_id|>assistant<|end_header_id|>'), [
    ['<|im_start|>', 'keyword.control.special-token'],
    ['user', 'entity.name.tag.role'],
    ['<|im_end|>', 'keyword.control.special-token'],
    ['<|start_header_id|>', 'keyword.control.special-token'],
    ['assistant', 'entity.name.tag.role'],
    ['<|end_header_id|>', 'keyword.control.special-token'],
  ]);
  assert.deepEqual(scoped('<｜begin▁of▁sentence｜><s>[INST] hi [/INST]</s>'), [
    ['<｜begin▁of▁sentence｜>', 'keyword.control.special-token'],
    ['<s>', 'keyword.control.special-token'],
    ['[INST]', 'keyword.control.special-token'],
    ['[/INST]', 'keyword.control.special-token'],
    ['</s>', 'keyword.control.special-token'],
  ]);
});

test('reasoning tags and Jinja statements; "#" lines are prompt text, not comments', () => {
  assert.deepEqual(scoped('<think>step 1</think>\n{% if x %}y{% endif %}\n# Title'), [
    ['<think>', 'entity.name.tag.reasoning'],
    ['</think>', 'entity.name.tag.reasoning'],
    ['{% if x %}', 'keyword.control.template'],
    ['{% endif %}', 'keyword.control.template'],
  ]);
  assert.deepEqual(scoped('a <| b |> c < |x| >'), []);
});
