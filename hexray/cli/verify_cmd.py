"""`hexray verify`: check every record and checksum of a trace, like ``gzip -t``.

Exit 0 and one "OK" line per file when every byte checks out; otherwise one line on stderr per
damaged file, naming the first damaged record and its byte offset, and exit 1.
"""

from __future__ import annotations

import json
import os
import sys

from hexray_core.errors import one_line
from trace_format import TraceFormatError, verify


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check every record and checksum of a trace (like gzip -t)",
                       description="Read every record of each trace and check its checksum, its place in the "
                                   "index, its zstd frame and its padding. Prints OK with record, chunk and byte "
                                   "counts, or names the first damaged record and its byte offset (exit 1).")
    p.add_argument("traces", nargs="+", metavar="trace", help=".hxr file(s) to check")
    p.add_argument("--json", action="store_true", help="print one JSON object per file (stable keys)")


def run(args) -> int:
    status = 0
    for path in args.traces:
        try:
            report = verify(path)
        except TraceFormatError as e:
            status = 1
            # A file that is not there (or not a file) is not damaged: say what it is instead.
            damaged = os.path.isfile(path)
            if args.json:
                print(json.dumps({"path": path, "ok": False, "damaged": damaged, "error": str(e), "offset": e.offset}))
            print(f"hexray verify: {'DAMAGED ' if damaged else ''}{one_line(str(e))}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"path": path, "ok": True, "size": report.size, "records": report.n_records,
                              "record_kinds": report.records, "chunks": report.chunks, "runs": report.runs,
                              "tensors": report.tensors, "raw_bytes": report.raw_bytes,
                              "stored_bytes": report.stored_bytes, "superseded_bytes": report.superseded_bytes,
                              "appends": report.appends}))
        else:
            kinds = ", ".join(f"{n} {k}" for k, n in report.records.items())
            print(f"OK {one_line(path)}: {report.n_records} records ({kinds}), {report.chunks} chunks, "
                  f"{report.raw_bytes:,} bytes decoded from {report.stored_bytes:,} stored, "
                  f"file {report.size:,} bytes")
    return status
