"""`hexray fuzz`: perturb a prompt token by token and rank the tokens by what they do to the target."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from hexray_core.errors import HexRayError

DEFAULT_MAX_VARIANTS = 2000  # a 200-token prompt with --alternatives 3 makes 800; 2,000 take ~minutes on a CPU

DESCRIPTION = """\
Record the prompt, then variants of it as one dataset through the same engine as
`hexray record --prompts-file ... -o DIR/` (--ray spreads them over a cluster): each prompt token
deleted, each token replaced by the model's own top predictions at that position (--alternatives),
and any prompts of --variants FILE. Then rank every prompt token by how much its perturbation moves
the target's logit (and probability) at the last position. The variants' traces stay in -o DIR for
hexray replay / hexray aggregate."""


def add_parser(sub) -> None:
    p = sub.add_parser("fuzz", help="perturb a prompt and rank its tokens by how much the prediction depends on them",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog='example: hexray fuzz --model hexray-demo --prompt "It is a truth universally" --json')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt")
    src.add_argument("--prompt-file", metavar="FILE", help="the prompt: the whole file, exactly (- for stdin)")
    p.add_argument("--model", default="gpt2", help="as for hexray record (default gpt2)")
    p.add_argument("--target", help="token whose logit is followed: top (the prediction, default), a token's text, "
                                    "or '#id'")
    p.add_argument("--alternatives", type=int, default=3, metavar="K",
                   help="replacements per token, from the model's top predictions there (default 3; 0: deletions only)")
    p.add_argument("--variants", metavar="FILE", help="more variants: a prompts file (one per line, or JSONL)")
    p.add_argument("--max-variants", type=int, default=DEFAULT_MAX_VARIANTS, metavar="N",
                   help=f"refuse more variants than this in all (default {DEFAULT_MAX_VARIANTS:,}; 0: no limit)")
    p.add_argument("-o", "--output", metavar="DIR", help="keep the base and variant traces in this folder")
    p.add_argument("--act-dtype", default="float32", choices=["auto", "float32", "float16", "bfloat16"],
                   help="activation storage (default float32, so logits outside the top-k are exact too)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS", help="record the variants on a Ray cluster")
    p.add_argument("--workers", type=int, metavar="N", help="model replicas on Ray")
    p.add_argument("--shard-size", type=int, default=16, metavar="N", help="variants per shard trace (default 16)")
    p.add_argument("--top-k", type=int, default=15, metavar="N", help="tokens to show in the table (default 15)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")


def run(args) -> int:
    from hexray.cli.record_dataset_cmd import DatasetProgress
    from hexray.cli.record_support import read_text
    from hexray_core.dataset import layout as datasetstore
    from hexray_core.record.spec import precheck

    if args.alternatives < 0:
        raise HexRayError(f"--alternatives must be 0 or more, not {args.alternatives}")
    if args.top_k < 1:
        raise HexRayError(f"--top-k must be at least 1, not {args.top_k}")
    if args.max_variants < 0:
        raise HexRayError(f"--max-variants must be 0 (no limit) or more, not {args.max_variants}")
    prompt = args.prompt if args.prompt is not None else read_text(args.prompt_file, "--prompt-file")
    if not prompt:
        raise HexRayError("empty prompt: nothing to fuzz")
    datasetstore.make_row(prompt, 1, "--prompt" if args.prompt is not None else "--prompt-file")  # storable text
    extra = []
    if args.variants:
        extra = [r.prompt for r in datasetstore.parse_rows(read_text(args.variants, "--variants"), args.variants)]
        check_variant_count(len(extra), args.max_variants, "--variants gives")
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise HexRayError(f"-o {args.output}: is a file (give a folder)")
    precheck(args.model)
    out = args.output or tempfile.mkdtemp(prefix="hexray-fuzz-")
    try:
        with DatasetProgress(args.quiet or args.json) as progress:
            report = fuzz(prompt, out, model=args.model, target=args.target, alternatives=args.alternatives,
                          extra=extra, act_dtype=args.act_dtype, device=args.device, ray=args.ray,
                          workers=args.workers, shard_size=args.shard_size, progress=progress,
                          max_variants=args.max_variants)
    finally:
        if not args.output:
            shutil.rmtree(out, ignore_errors=True)
    from hexray.cli import render

    if args.json:
        render.print_json({"fuzz": report.to_dict()})
    else:
        render.fuzz(render.console(), report, args.top_k)
        if args.output:
            print(f"hexray: base and variant traces in {out} (hexray aggregate {out} --target '#{report.target_id}')")
    return 0


def check_variant_count(n: int, limit: int, what: str) -> None:
    """Each variant is one recording: refuse hours of work nobody asked for, in one line, before it starts."""
    if limit and n > limit:
        raise HexRayError(f"{what} {n:,} variants, over --max-variants {limit:,} (each is one recording; pass "
                          "--max-variants 0 or a larger number to record them all)")


def fuzz(prompt: str, out: str, *, model: str, target: str | None = None, alternatives: int = 3, extra=(),
         act_dtype: str = "float32", device: str = "auto", ray: str | None = None, workers: int | None = None,
         shard_size: int = 16, progress=None, max_variants: int = DEFAULT_MAX_VARIANTS):
    """Record the prompt and its variants into the dataset ``out``; return the FuzzReport."""
    from hexray_core.dataset.reader import open_dataset
    from hexray_core.dataset.writer import record_dataset
    from hexray_core.replay.attribution import resolve_target
    from hexray_core.replay.fuzz import fuzz_report, make_variants

    recorder = None
    if ray is None:  # one model for both rounds
        from hexray.cli.record_support import recorder_class

        recorder = recorder_class()(model, device=device, progress=progress)
    common = {"model": model, "ray": ray, "workers": workers, "shard_size": shard_size, "recorder": recorder,
              "progress": progress, "model_opts": {"device": device}, "act_dtype": act_dtype}
    base = {"id": "base", "prompt": prompt, "kind": "base"}
    record_dataset([base], out, **common)
    ds = open_dataset(out)
    path, entries = next(ds.shards())
    from hexray_core.replay.trace import Trace

    with Trace(path) as trace:
        run = next(int(e["run"]) for e in entries if e["id"] == "base")
        if trace.run(run).prompt != prompt:
            raise HexRayError(f"{out} holds the fuzzing of another prompt: use another -o folder")
        tid = resolve_target(trace, run, trace.run(run).position(-1), target)
        variants = make_variants(trace, run, alternatives=alternatives, extra=list(extra))
    if not variants:
        raise HexRayError("the prompt has no token to perturb")
    check_variant_count(len(variants), max_variants, "the prompt makes")
    rows = [base] + [{"id": v.id, "prompt": v.prompt, "target": f"#{tid}", "kind": v.kind, "position": v.position,
                      "replacement": v.replacement} for v in variants]
    record_dataset(rows, out, **common)
    return fuzz_report(open_dataset(out), base_id="base", target_id=tid, variants=variants)
