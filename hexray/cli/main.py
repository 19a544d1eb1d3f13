"""Entry point of the `hexray` command.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args)``;
modules are imported only when their command runs, so `hexray replay` never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from hexray.cli.parser import Parser
from hexray_core import __version__
from hexray_core.errors import HexRayError, one_line

COMMANDS = {
    "record": "hexray.cli.record_cmd",
    "replay": "hexray.cli.replay_cmd",
    "diff": "hexray.cli.diff_cmd",
    "info": "hexray.cli.info_cmd",
    "verify": "hexray.cli.verify_cmd",
    "lsp": "hexray.cli.lsp_cmd",
    "view": "hexray.cli.view_cmd",
    "report": "hexray.cli.report_cmd",
    "aggregate": "hexray.cli.aggregate_cmd",
    "fuzz": "hexray.cli.fuzz_cmd",
    "features": "hexray.cli.features_cmd",
}
HELP = {
    "record": "run a model on prompts and record the forward pass into a .hxr trace",
    "replay": "attribution, logit lens, attention, residual and CoT views from a trace",
    "diff": "compare the attribution of two runs or two traces",
    "info": "summarise a trace: runs, tokens, tensors, sizes, provenance",
    "verify": "check every record and checksum of a trace (like gzip -t)",
    "lsp": "language server: per-token attribution in the editor",
    "view": "open traces in the browser viewer (served on 127.0.0.1)",
    "report": "write a self-contained HTML viewer of traces (offline, one file)",
    "aggregate": "attribution statistics over every run of a recorded dataset",
    "fuzz": "perturb a prompt and rank its tokens by how much the prediction depends on them",
    "features": "a trace's active features through sparse autoencoders or transcoders (--dict)",
}


TOP_LEVEL_FLAGS = ("-h", "--help", "--version")  # any other option before a command is the one-shot form's


def _load(command: str):
    return importlib.import_module(COMMANDS[command])


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="hexray",
        description="HexRay: an X-ray for transformer language models.",
        epilog="One-shot mode (record and replay in one go): "
               "hexray --prompt TEXT [--top-k-attribution N] [--cot-debug] [--save TRACE]",
    )
    parser.add_argument("--version", action="version", version=f"hexray {__version__}")
    # Listed for --help only: any of these (or another option) without a command runs oneshot_cmd instead.
    one = parser.add_argument_group("one-shot mode (record a prompt and explain it in one go; "
                                    "hexray --prompt TEXT --help lists every option)")
    one.add_argument("--prompt", metavar="TEXT", help="the prompt to record and explain")
    one.add_argument("--top-k-attribution", metavar="N", help="contributors to show (default 10)")
    one.add_argument("--cot-debug", action="store_true", help="also show the chain-of-thought attribution trace")
    one.add_argument("--save", metavar="TRACE", help="keep the recorded trace at this path")
    one.add_argument("--model", metavar="MODEL", help="hub id (default gpt2), local folder, .gguf file or hexray-demo")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if name == command:
            _load(name).add_parser(sub)
        else:
            sub.add_parser(name, help=HELP[name], add_help=False)
    return parser


#: Library errors name parameters (``by=``, ``position=``); the CLI says the flag that sets each.
PARAM_FLAGS = {"by": "--by", "position": "--position", "pos": "--position", "target": "--target",
               "baseline": "--baseline", "step_regex": "--step-regex", "mode": "--split", "top_k": "--top-k",
               "run": "--run", "generate": "--generate", "temperature": "--temperature", "act_dtype": "--act-dtype",
               "hooks": "--hooks", "seed": "--seed", "device": "--device", "n_devices": "--n-devices"}
_PARAM = re.compile(r"(?<![\w.\-])(" + "|".join(PARAM_FLAGS) + r")= ?")


def as_flags(message: str) -> str:
    """A library error as the command line says it: ``by= must be ...`` -> ``--by must be ...``."""
    return _PARAM.sub(lambda m: PARAM_FLAGS[m.group(1)] + " ", message)


def _is_user_error(e: BaseException) -> bool:
    """HexRayError, or a TraceFormatError (checked without importing trace_format, which pulls numpy)."""
    errors = sys.modules.get("trace_format.errors")
    return isinstance(e, HexRayError) or (errors is not None and isinstance(e, errors.TraceFormatError))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        oneshot = bool(argv) and argv[0].startswith("-") and argv[0] not in TOP_LEVEL_FLAGS
        if oneshot or (command not in COMMANDS and any(a.startswith("-") and a not in TOP_LEVEL_FLAGS for a in argv)):
            from hexray.cli import oneshot_cmd

            return oneshot_cmd.main(argv)
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(_load(args.command).run(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError):
            pass
        return 0
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"hexray: error: {as_flags(one_line(str(e)))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hexray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
