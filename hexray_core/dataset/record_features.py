"""`hexray record --dict`: features computed from the live activations while recording, stored sparsely, and the
dictionaries that feature interventions (``--intervene L3F120*8``) name, copied for the recorder.

Joins the recorder (which keeps the hooks a dictionary reads in memory for each run) and the replay's feature
code (which rebuilds the dictionary's space from them): neither layer imports the other, and the dataset layer,
above both, records a dataset's shards with it (each Ray worker builds its own from the dictionaries' paths).
"""

from __future__ import annotations

import os

from hexray_core.errors import HexRayError


def run_extra(recorder, dict_paths):
    """A ``RunExtra`` for ``Recorder.record(extra=...)`` that stores every listed dictionary's features."""
    import numpy as np

    from hexray_core.record.recorder import RunExtra
    from hexray_core.replay.features import ArrayRun, check_defined, needed_hooks, stored_meta, stored_tensors

    dsets = load_dictionaries(dict_paths)
    model_meta = recorder.loaded.model_meta
    n_layers = int(model_meta["config"]["n_layers"])
    upto = max(max(d.layers) for d in dsets)
    kit = {name: np.asarray(arr, dtype=np.float32) for name, (arr, tag) in recorder.kit().arrays.items()
           if name.startswith("raw/")}
    meta = {"model": model_meta, "hooks": {"set": "kept in memory"}}

    skip: set = set()  # (slot, layer) whose input the recording's edits leave undefined

    def compute(arrays, ids):
        return stored_tensors(ArrayRun(arrays, ids, meta, kit), dsets, skip)

    def check(trace_meta):  # what the recording edits decides which spaces are defined (--intervene L0.mlp=0)
        meta["interventions"] = trace_meta.get("interventions") or []
        run, warnings = ArrayRun({}, [], meta, kit), []
        for slot, dset in enumerate(dsets):
            for layer, d in sorted(dset.layers.items()):
                try:
                    check_defined(run.trace, d)
                except HexRayError as e:
                    skip.add((slot, layer))
                    warnings.append(f"{dset.name} layer {layer}: features not stored ({e})")
        return warnings

    return RunExtra(hooks=needed_hooks(n_layers, upto), compute=compute, meta=stored_meta(dsets), check=check)


def feature_dictionaries(dsets) -> list:
    """The recorder's plain copies (``FeatureDictionary``) of loaded dictionary sets, for feature interventions."""
    from hexray_core.record.feature_weights import FeatureDictionary, FeatureLayer

    out = []
    for ds in dsets:
        layers = {}
        for layer, d in ds.layers.items():
            layers[layer] = FeatureLayer(
                layer=layer, hook_in=d.hook_in, hook_out=d.hook_out, architecture=d.architecture, W_enc=d.W_enc,
                b_enc=d.b_enc, W_dec=d.W_dec, b_dec=d.b_dec, threshold=d.threshold,
                apply_b_dec_to_input=d.apply_b_dec_to_input, normalize_activations=d.normalize_activations, k=d.k,
                rescale_acts_by_decoder_norm=d.rescale_acts_by_decoder_norm,
                relu_before_threshold=d.relu_before_threshold, b_gate=d.b_gate, r_mag=d.r_mag, b_mag=d.b_mag)
        out.append(FeatureDictionary(name=ds.name, fingerprint=ds.fingerprint, path=ds.path, kind=ds.kind,
                                     fold_ln=bool(ds.space.fold_ln),
                                     center_writing_weights=bool(ds.space.center_writing_weights), layers=layers,
                                     fold_value_biases=bool(ds.space.fold_value_biases)))
    return out


def load_dictionaries(dicts) -> list:
    """``--dict`` / ``dict=`` values (paths, references, or loaded ``DictionarySet``s) as ``DictionarySet``s."""
    from hexray_core.replay.dictionary import DictionarySet, load_dictionary

    if dicts is None:
        return []
    if isinstance(dicts, str | os.PathLike | DictionarySet):
        dicts = [dicts]
    return [d if isinstance(d, DictionarySet) else load_dictionary(os.fspath(d)) for d in dicts]
