"""`hexray record`: run a model on prompts and record the forward pass into a .hxr trace."""

from __future__ import annotations

import argparse
import json
import os
import time

from hexray.cli.record_support import Progress, device_map, read_text, recorder_class
from hexray_core.errors import HexRayError, json_problem

DESCRIPTION = """\
Run a model on one or more prompts and record every layer, head and neuron of the forward pass
into a .hxr trace (one run per prompt; the model is loaded once). Replay it later without the
model: hexray replay trace.hxr.

Logits are those of the Hugging Face model; weights are processed as TransformerLens's
compatibility mode does (LayerNorm folded, writing weights centred) so that attribution sums
exactly to each logit. The weights replay needs (W_U, W_O, W_out...) form a "model kit" cached
once per model in $HEXRAY_CACHE (default ~/.cache/hexray); --bundle copies it into the trace."""

EPILOG = """\
examples:
  hexray record --model hexray-demo --prompt "It is a truth universally" -o t.hxr
  hexray record --model ./my-model --prompts-file prompts.jsonl --hooks full --act-dtype float32 -o t.hxr
  hexray record --model gpt2 --prompt "Step 1:" --generate 40 --temperature 0.7 --seed 1 -o cot.hxr
  hexray record --model gpt2 --prompt "..." --intervene L1H2=0 --intervene L2N17@3=mean -o ablated.hxr
  hexray record --model gpt2 --prompt "..." --intervene "blocks.2.hook_resid_pre@5<-clean.hxr" -o patched.hxr
  hexray record --model gpt2 --prompt "..." --dict sae/ --intervene L1F12*8 --generate 20 -o steered.hxr
  hexray record --model gpt2 --list-hooks
  hexray record --model gpt2 --prompts-file data.jsonl -o out/ --ray      # a dataset: shards + manifest, on Ray"""


INTERVENE_HELP = """\
SPEC = TARGET[~DIR.npy][@POSITIONS]ACTION
  TARGET    L1H2 (head 2 of layer 1: its hook_z), L2N17 (neuron 17: mlp.hook_post),
            L1.attn / L1.mlp / L1.resid_pre / L1.resid_post (layer outputs, the stream),
            or any hook name (blocks.2.hook_resid_pre);
            L3F120: feature 120 of the --dict dictionary's layer 3 (SAE or transcoder)
  ~DIR.npy  act on the component along this direction only (a vector, normalised)
  @POS      3 | 3,5 | 2:6 (positions 2-5); default every position
  ACTION    =0 | =mean (its mean over the prompt's positions) | =X (set) | =+X / =-X (add) | *X (scale)
            +=VEC.npy[*X] (add X times the vector: steering) | <-TRACE.hxr[#RUN] (patch from a trace:
            the same hook recorded there; token counts must agree)
  a feature: its live activation a (in the dictionary's space) becomes a' (=0, =mean, =X, =+X, *X) and
            (a' - a) x its decoder row is added where the dictionary writes (an SAE: its hook; a
            transcoder: hook_mlp_out); L3F120=0 removes its decoded contribution, L3F120*8 adds 7a x row
examples: L1H2=0  L1H2@3=0  L2N17=mean  L1.mlp=0  blocks.2.hook_resid_pre@5<-clean.hxr
          blocks.1.hook_resid_post~refusal.npy=0  blocks.1.hook_resid_post+=steer.npy*4
          with --dict sae/: L1F12=0  L1F12@4:9*8  L1F12=+5 (with --generate: steered generation)"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("record", help="run a model on prompts and record the forward pass into a .hxr trace",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE",
                     help="one prompt: the whole file, exactly (- for stdin; a named pipe waits for its writer)")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="many prompts, one run each: one per line, or JSONL objects with a \"prompt\" key "
                          "(blank lines skipped; - for stdin; a named pipe is read as cat would, waiting for its "
                          "writer; at most 256 MiB). An id already recorded in -o DIR/ is skipped (a warning says "
                          "so when its prompt differs)")
    p.add_argument("-o", "--output", metavar="TRACE", help="trace file to write (replaced when complete)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="gpt2",
                   help="hub id (default gpt2; gpt2-small is an alias), local save_pretrained folder, local .gguf "
                        "file, or hexray-demo (the small model shipped with HexRay)")
    m.add_argument("--revision", help="hub revision (branch, tag or commit)")
    m.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    m.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default float32)")
    m.add_argument("--n-devices", type=int, metavar="N", help="split the model over N CUDA devices")
    m.add_argument("--device-map", metavar="MAP", help="accelerate device map: auto, balanced, or JSON")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow models whose repository ships its own Python code (only for models you trust)")

    r = p.add_argument_group("what to record")
    r.add_argument("--hooks", default="default", metavar="SPEC",
                   help="default | full | hook names and globs, comma-separated, e.g. default,blocks.*.attn.hook_q "
                        "(default: default; full = every distinct activation but the logits)")
    r.add_argument("--act-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="storage dtype of activations (auto: float16 for a float32 model, else the model's; "
                        "float32 for attribution exact to 1e-6; LayerNorm scales are always float32)")
    r.add_argument("--overflow-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype for a tensor that would overflow float16 (default float32; noted in its attrs)")
    r.add_argument("--top-k", type=int, default=20, metavar="K",
                   help="top predictions stored per position (default 20)")
    r.add_argument("--lens", choices=["auto", "on", "off"], default="auto",
                   help="also store the logit lens at every layer and position, so replaying it needs no W_U "
                        "(auto: on a GPU, or on a CPU when it costs little next to the forward pass)")
    r.add_argument("--attention", choices=["auto", "flash", "eager"], default="auto",
                   help="flash: attention in blocks of queries, memory linear in the context (no n x n scores or "
                        "mask; the softmax's log-sum-exp is stored); eager: TransformerLens's own attention; auto "
                        "(default): flash where the architecture is covered and no patterns are asked for")
    r.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    r.add_argument("--dict", action="append", metavar="DIR",
                   help="also store this dictionary's features, sparsely, computed from the unrounded activations "
                        "(its input hook need not be recorded; repeatable). `hexray features` reads them. "
                        "Feature interventions (--intervene L3F120*8) use the one --dict holding layer 3")
    r.add_argument("--list-hooks", action="store_true", help="print the model's hook names and exit")

    iv = p.add_argument_group(
        "interventions (--intervene SPEC, repeatable; applied while generating and recording)",
        INTERVENE_HELP)
    iv.add_argument("--intervene", action="append", default=[], metavar="SPEC",
                    help="change an activation: ablate, set, scale, steer or patch (grammar above)")
    iv.add_argument("--grad", metavar="METRIC",
                    help='also store the gradient of METRIC w.r.t. every recorded activation (grad.<hook>), for '
                         'hexray patch --estimate: logit-diff:"TOKEN","TOKEN" | logit:"TOKEN" | logprob:"TOKEN", '
                         'optionally @POS (default the last position); a token as "text" or #ID')

    g = p.add_argument_group("generation")
    g.add_argument("--generate", type=int, default=0, metavar="N",
                   help="continue each prompt by up to N tokens, then record prompt + continuation in one pass")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    g.add_argument("--seed", type=int, help="sampling seed (one is drawn and recorded if omitted)")

    k = p.add_argument_group("model kit")
    k.add_argument("--bundle", action="store_true",
                   help="embed the model kit in the trace so it replays with no cache (adds W_U, W_O, W_out...)")
    k.add_argument("--cache-dir", metavar="DIR", help="kit cache folder (default $HEXRAY_CACHE or ~/.cache/hexray)")
    d = p.add_argument_group("datasets (--prompts-file FILE -o DIR/: shards and a manifest; rerun to resume)")
    d.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="spread the prompts over a Ray cluster, one model per worker (auto: $RAY_ADDRESS, else a "
                        "local cluster); needs pip install 'hexray[ray]'")
    d.add_argument("--workers", type=int, metavar="N",
                   help="model replicas on Ray (default: one per GPU, else one per --worker-cpus CPUs)")
    d.add_argument("--worker-cpus", type=float, default=1, metavar="C", help="CPUs per Ray CPU worker (default 1)")
    d.add_argument("--shard-size", type=int, default=16, metavar="N", help="prompts per shard trace (default 16)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors and the summary line")
    p.add_argument("--json", action="store_true",
                   help="print what was written as JSON (path, runs, tokens, tensors, bytes, seconds, kit) instead "
                        "of the summary line; with --list-hooks, the hook names")
    return p


def wants_dataset(args) -> bool:
    """-o DIR/ (or an existing folder) with --prompts-file, or --ray: record a dataset, not one trace."""
    out = args.output or ""
    folder = out.endswith(("/", os.sep)) or os.path.isdir(out)
    return args.ray is not None or (args.prompts_file is not None and folder)


# -- prompts ----------------------------------------------------------------------------------

def parse_prompts_file(text: str, path: str = "prompts") -> list[str]:
    """One prompt per line, or JSONL objects with a "prompt" key. Blank lines are skipped."""
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise HexRayError(f"--prompts-file {path}: no prompts in it")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise HexRayError(f"--prompts-file {path}:{number}: not JSON ({json_problem(e)})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise HexRayError(f"--prompts-file {path}:{number}: expected an object with a \"prompt\" string")
        prompts.append(obj["prompt"])
    return prompts


def gather_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file is not None:
        return [read_text(args.prompt_file, "--prompt-file")]
    if args.prompts_file is not None:
        return parse_prompts_file(read_text(args.prompts_file, "--prompts-file"), args.prompts_file)
    raise HexRayError("nothing to record: give --prompt TEXT, --prompt-file FILE or --prompts-file FILE")


def run(args) -> int:
    if args.top_k < 1:
        raise HexRayError(f"--top-k must be at least 1, not {args.top_k}")
    if args.generate < 0:
        raise HexRayError(f"--generate must be 0 or more, not {args.generate}")
    from hexray_core.record.spec import check_device, check_generation

    check_generation(args.temperature, args.seed)
    check_device(args.device, args.n_devices)
    dsets = None
    if getattr(args, "dict", None):
        from hexray_core.replay.dictionary import load_dictionary

        dsets = [load_dictionary(p) for p in args.dict]  # a bad dictionary fails before the model loads
    from hexray_core.record.intervene_spec import parse_interventions

    interventions = parse_interventions(args.intervene)  # torch-free: a bad spec fails before the model loads
    features = None
    if any(iv.kind == "feature" for iv in interventions):
        from hexray_core.dataset.record_features import feature_dictionaries
        from hexray_core.record.feature_weights import pick_dictionary

        features = feature_dictionaries(dsets or [])
        for iv in interventions:  # a missing --dict, layer or feature fails before the model loads
            if iv.kind == "feature":
                pick_dictionary(iv, features)
    grad = None
    if args.grad is not None:
        from hexray_core.record.metric_spec import parse_metric

        grad = parse_metric(args.grad)
    if not args.list_hooks and wants_dataset(args):
        if interventions or grad is not None:
            raise HexRayError("--intervene and --grad record one trace; they cannot be combined with a dataset "
                              "(-o DIR/, --ray)")
        from hexray.cli import record_dataset_cmd

        return record_dataset_cmd.run(args)
    prompts = None
    if not args.list_hooks:
        prompts = gather_prompts(args)
        from hexray_core.record.spec import check_output_path, normalize_prompts

        normalize_prompts(prompts)
        if not args.output:
            raise HexRayError("no output file: add -o trace.hxr")
        check_output_path(args.output)
    from hexray_core.record.spec import precheck

    source, where = precheck(args.model)  # bad --model values fail here, before torch is imported
    if not args.list_hooks:
        from hexray_core.record.context import check_context

        check_context(source, where, prompts, args.generate)  # a prompt over the context, before the model loads
    if args.cache_dir:
        os.environ["HEXRAY_CACHE"] = os.path.expanduser(args.cache_dir)
    with Progress(args.quiet) as progress:
        started = time.perf_counter()  # load time = importing torch + reading and processing the weights
        progress("status", message="importing torch and TransformerLens")
        Recorder = recorder_class()
        rec = Recorder(args.model, device=args.device, dtype=args.dtype, n_devices=args.n_devices,
                       device_map=device_map(args.device_map), trust_remote_code=args.trust_remote_code,
                       revision=args.revision, progress=progress)
        load_seconds = time.perf_counter() - started
        extra = None
        if dsets and not args.list_hooks:
            from hexray_core.dataset.record_features import run_extra

            extra = run_extra(rec, dsets)
        if not args.list_hooks:
            result = rec.record(prompts, args.output, hooks=args.hooks, act_dtype=args.act_dtype,
                                overflow=args.overflow_dtype, top_k=args.top_k, generate=args.generate,
                                temperature=args.temperature, seed=args.seed,
                                prepend_bos=False if args.no_bos else None, bundle=args.bundle, progress=progress,
                                lens={"auto": "auto", "on": True, "off": False}[args.lens], extra=extra,
                                interventions=interventions, grad=grad, attention=args.attention,
                                features=features)
    if args.list_hooks:
        from hexray_core.record.hooks import DEFAULT_HOOKS, list_hooks, plan_hooks

        # what `--hooks default` stores for this model: q and k where replay recomputes attention, else patterns
        default = set(plan_hooks(rec.bridge, "default", rec.attention_spec()).names)
        if args.json:
            print(json.dumps({"model": args.model, "hooks": [
                {"name": name, "default": name in default, "aliases": list(others)}
                for name, others in list_hooks(rec.bridge)]}, ensure_ascii=False, indent=2))
            return 0
        print(f"# hooks of {args.model}; * = in --hooks default ({', '.join(DEFAULT_HOOKS[:3])}, ...)")
        for name, others in list_hooks(rec.bridge):
            mark = "*" if name in default else " "
            print(f"{mark} {name}" + (f"    (also: {', '.join(others)})" if others else ""))
        return 0
    if args.json:
        print(json.dumps(dict(result_json(result), load_seconds=round(load_seconds, 3)), ensure_ascii=False,
                         indent=2))
    else:  # the load (import, weights, processing) apart from the recording: the second is what a prompt costs
        print(f"hexray: loaded {args.model} in {load_seconds:.1f} s; {result.summary()}")
    return 0


def result_json(result) -> dict:
    """What `hexray record --json` prints: the trace written and the model kit it refers to."""
    return {"path": os.path.abspath(result.path), "runs": result.runs, "tokens": result.tokens,
            "tensors": result.tensors, "bytes": result.bytes, "seconds": round(result.seconds, 3),
            "kit": {"sha256": result.kit_sha256, "path": result.kit_path, "written": result.kit_written,
                    "bundled": result.bundled}}
