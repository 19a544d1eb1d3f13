"""`hexray view`: serve the viewer of traces on loopback, behind a random token."""

from __future__ import annotations

import os
import sys

from hexray_core.errors import HexRayError


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="open traces in the browser viewer (served on 127.0.0.1)",
                       description="Serve the viewer of the named traces on 127.0.0.1 and open the browser. The "
                                   "first line printed is the URL; it carries a random token, and requests "
                                   "without it are refused. Press Ctrl-C to stop.")
    p.add_argument("traces", nargs="+", help=".hxr traces written by `hexray record`, and/or attribution graph JSON "
                                             "files (`hexray graph`, circuit-tracer), shown in a graph tab")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1); another address serves other machines "
                        "(anyone with the URL can read the traces)")
    p.add_argument("--no-browser", action="store_true", help="print the URL only")
    p.add_argument("--idle-timeout", type=float, default=30.0, metavar="S",
                   help="close a connection silent for S seconds (default 30)")
    p.add_argument("--dict", metavar="DIR", help="a dictionary (SAE or transcoders) whose features the viewer shows "
                                                 "per token, and by which it can colour the strip")
    p.add_argument("--dataset", metavar="DIR", help="with --dict: a recorded dataset (hexray record --prompts-file "
                                                    "F -o DIR/) over which a clicked feature's top contexts, density "
                                                    "and histogram are shown")


def run(args) -> int:
    # One BLAS thread: the server answers one small request at a time, and on a busy machine a threaded
    # BLAS spends more on waking its threads than on the products (attention rows of 24 queries over 1,000
    # keys: 51 ms threaded vs 0.4 ms on one thread, bench/README.md). Set before numpy is first imported.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from hexray_core.replay import open_trace
    from hexray_view.server import ViewServer

    if not 0 <= args.port <= 65535:
        raise HexRayError(f"--port must be 0..65535, not {args.port}")
    if not 0 < args.idle_timeout <= 86400:
        raise HexRayError(f"--idle-timeout must be more than 0 and at most 86400 seconds, not {args.idle_timeout}")
    dictionary = None
    if args.dict:
        from hexray_core.replay.dictionary import load_dictionary

        dictionary = load_dictionary(args.dict)
    meaning = dataset = None
    if args.dataset:
        if dictionary is None:
            raise HexRayError("--dataset needs --dict (the dictionary whose features it describes)")
        from hexray_core.dataset.features import feature_meaning
        from hexray_core.dataset.reader import open_dataset

        dataset = open_dataset(args.dataset)

        def meaning(layer: int, feature: int) -> dict:
            return feature_meaning(dataset, dictionary, layer, feature)
    from hexray_view import graph

    graph_paths = [p for p in args.traces if graph.is_graph(p)]  # recognised by content, not by name
    graphs = [graph.load(p) for p in graph_paths]
    trace_paths = [p for p in args.traces if p not in graph_paths]
    traces = [open_trace(p) for p in trace_paths]
    try:
        server = ViewServer(traces, [os.path.basename(p) for p in trace_paths], host=args.host, port=args.port,
                            idle_timeout=args.idle_timeout, dictionary=dictionary, meaning=meaning,
                            dataset_name=dataset.path if dataset is not None else None, graphs=graphs)
    except OSError as e:
        raise HexRayError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(server.url, flush=True)
    if server.explicit_host:
        print(f"hexray: serving {args.host}: anyone who can reach it and has the URL can read these traces",
              file=sys.stderr)
    if not args.no_browser and not _open_browser(server.url):
        from urllib.parse import urlsplit

        port = urlsplit(server.url).port
        print(f"hexray: no browser could be opened here (no display); open the URL above in a browser on this "
              f"machine, or forward the port (ssh -L {port}:127.0.0.1:{port} this-machine) and open it on yours",
              file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for t in traces:
            t.close()
    return 0


def _open_browser(url: str) -> bool:
    """Whether a browser was started: without a display (SSH, a container) webbrowser finds none, or only a
    text browser that would take over this terminal, and says nothing."""
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) \
            and not os.environ.get("BROWSER"):
        return False
    try:
        return bool(webbrowser.open(url))
    except webbrowser.Error:
        return False
