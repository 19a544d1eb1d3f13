"""`hexray record --prompts-file FILE -o OUT/ [--ray [auto|ADDRESS]]`: a dataset of shards plus a manifest."""

from __future__ import annotations

import os
import time

from hexray.cli.record_support import Progress, device_map, ray_quietly, read_text
from hexray_core.errors import HexRayError


class DatasetProgress(Progress):
    """Progress of a dataset: prompts done, prompts/s, ETA, workers (a bar on a terminal, else lines)."""

    LINE_EVERY_S = 2.0

    def __init__(self, quiet: bool):
        super().__init__(quiet)
        self._last_line = 0.0

    def __call__(self, event: str, **info) -> None:
        if event == "dataset_start":
            if self.quiet:
                return
            skipped = f", {info['skipped']} already recorded" if info["skipped"] else ""
            where = f"{info['workers']} Ray worker(s)" if info["engine"] == "ray" else "this process"
            gpu = " with one GPU each" if info.get("gpus") else ""
            shards = f"{info['shards']} shard{'s' if info['shards'] != 1 else ''}"
            self._line(f"hexray: recording {info['pending']} of {info['total']} prompts in {shards} "
                       f"on {where}{gpu}{skipped}")
            if self.live is not None:
                self.live.update(self.task, description="recording", total=info["pending"], completed=0, info="")
        elif event == "shard_done":
            if self.quiet:
                return
            eta = "" if info["eta"] is None else f", ETA {_duration(info['eta'])}"
            msg = f"{info['rate']:.1f} prompts/s{eta}, {info['workers_seen']}/{info['workers']} workers"
            if self.live is not None:
                self.live.update(self.task, completed=info["done"], info=msg)
            elif time.perf_counter() - self._last_line >= self.LINE_EVERY_S or info["done"] == info["total"]:
                self._last_line = time.perf_counter()
                self._line(f"hexray: [{info['done']}/{info['total']} prompts] {msg}")
        else:
            super().__call__(event, **info)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60:02d} s"


def run(args) -> int:
    from hexray_core.dataset import layout as datasetstore
    from hexray_core.record.spec import precheck

    if args.prompts_file is None:
        raise HexRayError("--ray records a dataset: give --prompts-file FILE and -o DIR/")
    if not args.output:
        raise HexRayError("no output folder: add -o DIR/")
    if args.bundle:
        raise HexRayError("--bundle is not available for datasets (every shard would carry the kit); "
                          "copy the kit from $HEXRAY_CACHE/kits/ with the folder instead")
    if args.shard_size < 1:
        raise HexRayError(f"--shard-size must be at least 1, not {args.shard_size}")
    if args.workers is not None and args.workers < 1:
        raise HexRayError(f"--workers must be at least 1, not {args.workers}")
    if args.worker_cpus <= 0:
        raise HexRayError(f"--worker-cpus must be more than 0, not {args.worker_cpus}")
    rows = datasetstore.parse_rows(read_text(args.prompts_file, "--prompts-file"), args.prompts_file)
    precheck(args.model)
    if args.cache_dir:
        os.environ["HEXRAY_CACHE"] = os.path.expanduser(args.cache_dir)
    from hexray_core.dataset.writer import record_dataset

    model_opts = {"device": args.device, "dtype": args.dtype, "n_devices": args.n_devices,
                  "device_map": device_map(args.device_map), "trust_remote_code": args.trust_remote_code,
                  "revision": args.revision}
    options = {"hooks": args.hooks, "act_dtype": args.act_dtype, "overflow": args.overflow_dtype, "top_k": args.top_k,
               "generate": args.generate, "temperature": args.temperature, "seed": args.seed,
               "prepend_bos": False if args.no_bos else None,
               "lens": {"auto": "auto", "on": True, "off": False}[args.lens], "attention": args.attention,
               "dicts": [_dict_option(p) for p in args.dict or []]}
    with ray_quietly(args.ray is not None), DatasetProgress(args.quiet) as progress:
        result = record_dataset(rows, args.output, model=args.model, ray=args.ray, workers=args.workers,
                                worker_cpus=args.worker_cpus, shard_size=args.shard_size, progress=progress,
                                model_opts=model_opts, **options)
    print(f"hexray: {result.summary()}")
    return 0


def _dict_option(p: str) -> str:
    """A --dict as dataset.json keeps it (and Ray workers load it): a local path made absolute, a reference or an
    embedded dictionary's name (hf://..., hexray-demo-sae) as given."""
    q = os.path.expanduser(p)
    return os.path.abspath(q) if os.path.exists(q) else p
