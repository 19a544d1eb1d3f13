"""`hexray record --dict`: features computed from the live activations while recording, stored sparsely.

Joins the recorder (which keeps the hooks a dictionary reads in memory for each run) and the replay's feature
code (which rebuilds the dictionary's space from them): neither layer imports the other, and the dataset layer,
above both, records a dataset's shards with it (each Ray worker builds its own from the dictionaries' paths).
"""

from __future__ import annotations


def run_extra(recorder, dict_paths):
    """A ``RunExtra`` for ``Recorder.record(extra=...)`` that stores every listed dictionary's features."""
    import numpy as np

    from hexray_core.record.recorder import RunExtra
    from hexray_core.replay.dictionary import load_dictionary
    from hexray_core.replay.features import ArrayRun, needed_hooks, stored_meta, stored_tensors

    dsets = [load_dictionary(p) for p in dict_paths]
    model_meta = recorder.loaded.model_meta
    n_layers = int(model_meta["config"]["n_layers"])
    upto = max(max(d.layers) for d in dsets)
    kit = {name: np.asarray(arr, dtype=np.float32) for name, (arr, tag) in recorder.kit().arrays.items()
           if name.startswith("raw/")}
    meta = {"model": model_meta, "hooks": {"set": "kept in memory"}}

    def compute(arrays, ids):
        return stored_tensors(ArrayRun(arrays, ids, meta, kit), dsets)

    return RunExtra(hooks=needed_hooks(n_layers, upto), compute=compute, meta=stored_meta(dsets))
