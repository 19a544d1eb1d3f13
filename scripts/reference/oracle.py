"""Run the reference oracles (SAELens, circuit-tracer) on any model folder: for faithfulness checks beyond the
committed fixtures (the demo model, its shipped dictionaries) and for the graph benchmarks' baseline.

Run with the reference venv (scripts/reference/make_venv.sh):

    PY=/work/refvenv/bin/python
    # circuit-tracer transcoders with seeded random weights, in its on-disk format, calibrated on a prompt
    $PY scripts/reference/oracle.py make-transcoders --model DIR --prompt "..." --features 4096 \\
        [--cross-layer] [--input-hook hook_resid_mid] [--jumprelu] [--skip] [--active-fraction 0.01] -o TC_DIR
    # circuit-tracer's encode, attribution graph and pruning (npz as tests/fixtures/reference/README.md)
    $PY scripts/reference/oracle.py graph --model DIR --transcoders TC_DIR (--prompt "..." | --tokens 0,5,9) \\
        [--max-feature-nodes N] [--batch-size 256] [--no-prune] [-o graph.npz]
    # SAELens's encode of a dictionary folder on the model loaded as SAELens loads it
    $PY scripts/reference/oracle.py sae --model DIR --sae SAE_DIR (--prompt "..." | --tokens ...) [-o out.npz]

Prompts are tokenized as HexRay does: BOS (config.json's bos_token_id), then the prompt without special tokens.
Each command prints one JSON line: what it computed, wall seconds and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (the oracles' loaders live there)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _tokens(args) -> torch.Tensor:
    if args.tokens:
        return torch.tensor([int(t) for t in args.tokens.split(",")])
    from tokenizers import Tokenizer

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    tok = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    bos = cfg.get("bos_token_id")
    return torch.tensor(([bos] if bos is not None else []) + ids)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _plain_model(folder: str):
    from transformer_lens import HookedTransformer

    mf.allow_local_folders()
    return HookedTransformer.from_pretrained(mf.tl_path(Path(folder)), fold_ln=False, center_writing_weights=False,
                                             center_unembed=False, device="cpu")


def cmd_make_transcoders(args) -> dict:
    tokens = _tokens(args)[: args.calibration_tokens]
    model = _plain_model(args.model)
    folder, config = mf.write_transcoder_set(
        Path(args.output), model, tokens[None], clt=args.cross_layer, in_hook=args.input_hook, jump=args.jumprelu,
        skip=args.skip, d_tc=args.features, active_fraction=args.active_fraction, seed=args.seed,
        model_name=Path(args.model).name, scan=f"hexray-reference/{Path(args.output).name}")
    return {**config, "folder": str(folder)}


def cmd_graph(args) -> dict:
    import yaml

    tokens = _tokens(args)
    tc = Path(args.transcoders)
    config = yaml.safe_load((tc / "config.yaml").read_text())
    start = time.perf_counter()
    arrays, info = mf.circuit_tracer_graph(Path(args.model), tc, config, tokens, batch_size=args.batch_size,
                                           max_feature_nodes=args.max_feature_nodes, prune=not args.no_prune)
    info["seconds"] = round(time.perf_counter() - start, 3)
    if args.output:
        mf.savez(args.output, arrays)
        info["output"] = args.output
    return info


def cmd_sae(args) -> dict:
    from sae_lens import SAE

    tokens = _tokens(args)
    sae = SAE.load_from_disk(args.sae, device="cpu")
    kwargs = dict(sae.cfg.metadata.model_from_pretrained_kwargs or {})
    model = mf.load_tl(Path(args.model), **kwargs)
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n == hook)
        x = cache[hook][0].float()
        acts = sae.encode(x)
    arrays = {"tokens": tokens.numpy().astype(np.int64), "input": x.numpy(), "feature_acts": acts.numpy()}
    if args.output:
        mf.savez(args.output, arrays)
    return {"hook_name": hook, "architecture": sae.cfg.architecture(), "model_from_pretrained_kwargs": kwargs,
            "n": len(tokens), "l0": float((acts > 0).sum(-1).float().mean()), "output": args.output}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, need_output=False):
        p.add_argument("--model", required=True, help="a Hugging Face save_pretrained folder")
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--prompt")
        g.add_argument("--tokens", help="comma-separated token ids")
        p.add_argument("-o", "--output", required=need_output)

    p = sub.add_parser("make-transcoders")
    common(p, need_output=True)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--cross-layer", action="store_true")
    p.add_argument("--input-hook", default="hook_resid_mid")
    p.add_argument("--jumprelu", action="store_true")
    p.add_argument("--skip", action="store_true")
    p.add_argument("--active-fraction", type=float, default=0.01)
    p.add_argument("--calibration-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("graph")
    common(p)
    p.add_argument("--transcoders", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int)
    p.add_argument("--no-prune", action="store_true")
    p = sub.add_parser("sae")
    common(p)
    p.add_argument("--sae", required=True)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    run = {"make-transcoders": cmd_make_transcoders, "graph": cmd_graph, "sae": cmd_sae}[args.cmd]
    start = time.perf_counter()
    info = run(args)
    info.update(total_seconds=round(time.perf_counter() - start, 3), peak_rss_mb=round(_peak_mb(), 1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
