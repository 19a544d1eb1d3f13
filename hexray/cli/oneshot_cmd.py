"""The original one-shot interface: `hexray --prompt TEXT [--top-k-attribution N] [--cot-debug]`.

Records the prompt (loading the model once) into a temporary trace, replays it in the same process
and prints the attribution table, and with --cot-debug the chain-of-thought trace.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from hexray.cli.replay_cmd import add_view_options, show
from hexray_core.errors import HexRayError


def build_parser() -> argparse.ArgumentParser:
    from hexray.cli.parser import Parser

    p = Parser(
        prog="hexray",
        description="Record a prompt's forward pass and show what produced the model's prediction "
                    "(shares are |contribution| / Σ|contribution| over the rows shown). "
                    "For the full tool see: hexray record | replay | diff | info | verify | lsp.",
    )
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text")
    p.add_argument("--top-k-attribution", type=int, default=10, metavar="N", help="contributors to show (default 10)")
    p.add_argument("--cot-debug", action="store_true", help="also show the chain-of-thought attribution trace")
    p.add_argument("--model", default="gpt2", help="hub id (default gpt2), local folder, .gguf file, or hexray-demo")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="let the model continue by N tokens first")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--save", metavar="TRACE", help="keep the recorded trace at this path")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_view_options(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k_attribution < 1:
        raise HexRayError(f"--top-k-attribution must be at least 1, not {args.top_k_attribution}")
    if not args.prompt:
        raise HexRayError("empty prompt: nothing to record")
    from hexray.cli.record_support import Progress, recorder_class
    from hexray_core.record.context import check_context
    from hexray_core.record.spec import check_output_path, precheck

    check_context(*precheck(args.model), [args.prompt], args.generate)
    tmp = None
    if args.save:
        output = check_output_path(args.save)
    else:
        tmp = tempfile.mkdtemp(prefix="hexray-")
        output = os.path.join(tmp, "oneshot.hxr")
    try:
        with Progress(args.quiet) as progress:
            progress("status", message="importing torch and TransformerLens")
            Recorder = recorder_class()
            rec = Recorder(args.model, device=args.device, dtype=args.dtype, progress=progress)
            rec.record(args.prompt, output, act_dtype="float32", generate=args.generate,
                       temperature=args.temperature, seed=args.seed, progress=progress)
        from hexray_core.replay import open_trace

        args.cot = args.cot or args.cot_debug
        with open_trace(output) as trace:
            show(trace, args, args.top_k_attribution, always_attribution=True, shares_of_shown=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
