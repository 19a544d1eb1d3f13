"""circuit-tracer's own graph JSON for the reference GPT-2 and its per-layer transcoders (a viewer fixture).

Runs in the reference venv (scripts/reference/make_venv.sh): circuit-tracer 0.5's ``attribute`` on the model of
``tests/fixtures/reference/gpt2`` with the transcoders of ``tests/fixtures/reference/transcoders/gpt2_plt`` (as
``make_fixtures.py`` does), then its ``create_graph_files`` (pruned at 0.8 / 0.98), which writes the JSON its own
frontend and Neuronpedia read. HexRay's viewer must open that file.

    /work/refvenv/bin/python scripts/reference/circuit_tracer_json.py     # ~30 s on 2 vCPUs
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_fixtures as mf  # noqa: E402

REF = mf.REPO / "tests" / "fixtures" / "reference"


def main() -> int:
    import torch
    import yaml
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.utils.create_graph_files import create_graph_files

    mf.allow_local_folders()
    manifest = json.loads((REF / "manifest.json").read_text())
    tokens = torch.tensor(manifest["models"]["gpt2"]["token_ids"])
    tc_folder = REF / "transcoders" / "gpt2_plt"
    config = yaml.safe_load((tc_folder / "config.yaml").read_text())
    tset = mf.load_set(tc_folder, config)
    model = TransformerLensReplacementModel.from_pretrained_and_transcoders(mf.tl_path(REF / "gpt2"), tset,
                                                                            device="cpu")
    graph = attribute(tokens, model, batch_size=256, verbose=False)
    graph.cfg.tokenizer_name = str(REF / "gpt2")  # create_graph_files loads the tokenizer by this name
    with tempfile.TemporaryDirectory() as tmp:
        create_graph_files(graph, slug="gpt2-plt", output_path=tmp, scan="hexray-reference-gpt2-plt")
        doc = json.loads(Path(tmp, "gpt2-plt.json").read_text())
    out = REF / "circuit_tracer_gpt2_plt.json"
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"{out}: {len(doc['nodes'])} nodes, {len(doc['links'])} links, {os.path.getsize(out):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
