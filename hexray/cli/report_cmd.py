"""`hexray report`: a self-contained HTML view of one or more traces (no network request at all)."""

from __future__ import annotations

import os

from hexray_core.errors import HexRayError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML viewer of traces (offline, one file)",
                       description="Write one HTML file holding the viewer and the data of the views it shows: "
                                   "the token strip of every run, the logit lens, the chain of thought, a diff of "
                                   "the first run against the others, and every panel for --detail positions "
                                   "per run (the last tokens, then the least likely ones). Nothing is fetched "
                                   "from the network when it is opened.")
    p.add_argument("traces", nargs="+", help=".hxr traces written by `hexray record`, and/or attribution graph JSON "
                                             "files (`hexray graph`, circuit-tracer), shown in a graph tab")
    p.add_argument("-o", "--output", help="HTML file to write (default: the first trace's name with .html)")
    p.add_argument("--detail", type=int, default=100, help="positions per run with every panel embedded (default 100)")
    p.add_argument("--position", type=int, action="append", default=[],
                   help="also embed this position's detail (repeatable; negative counts from the end)")
    p.add_argument("--dict", metavar="DIR", help="a dictionary (SAE or transcoders) whose features the report shows "
                                                 "per token, and by which it can colour the strip")


def run(args) -> int:
    from hexray_view import report

    output = args.output or os.path.splitext(os.path.basename(args.traces[0]))[0] + ".html"
    if os.path.isdir(output):
        raise HexRayError(f"{output} is a folder; give a file name with -o")
    dictionary = None
    if args.dict:
        from hexray_core.replay.dictionary import load_dictionary

        dictionary = load_dictionary(args.dict)
    size = report.write(args.traces, output, detail=args.detail, positions=tuple(args.position),
                        dictionary=dictionary)
    print(f"hexray: wrote {output} ({size / 1e6:.2f} MB)")
    return 0
