"""What the recorder needs to intervene on a dictionary's features (``L3F120*8`` with ``--dict``), torch-free.

The recorder cannot read dictionaries itself (the loaders are replay-side, and ``hexray_core.record`` never imports
``hexray_core.replay``): ``hexray_core/dataset/record_features.py``, above both, copies each loaded dictionary
into these plain numpy records, in the dictionary's own activation space, and ``intervene_features.py`` converts spaces
live. Fields mirror ``hexray_core.replay.dictionary.Dictionary`` (SAELens orientation: ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_out]``, cross-layer ``[d_sae, n_out_layers, d_out]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hexray_core.errors import HexRayError


@dataclass
class FeatureLayer:
    """One layer's encoder and decoder, as the dictionary's library computes them."""

    layer: int
    hook_in: str
    hook_out: str
    architecture: str
    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False
    relu_before_threshold: bool = True
    b_gate: np.ndarray | None = None
    r_mag: np.ndarray | None = None
    b_mag: np.ndarray | None = None

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def cross_layer(self) -> bool:
        return self.W_dec.ndim == 3


@dataclass
class FeatureDictionary:
    """A dictionary set: ``layers`` by layer; ``fold_ln`` / ``center_writing_weights`` / ``fold_value_biases``: the
    TransformerLens 3 processing of the model it was trained on (its activation space; the last only moves a
    hook_z dictionary's input)."""

    name: str
    fingerprint: str
    path: str
    kind: str  # "sae" | "transcoder" | "clt"
    fold_ln: bool
    center_writing_weights: bool
    layers: dict[int, FeatureLayer] = field(default_factory=dict)
    fold_value_biases: bool = False

    def describe(self) -> dict:
        """The dictionary's identity, as ``meta["interventions"]`` records it beside a feature intervention."""
        return {"name": self.name, "fingerprint": self.fingerprint, "path": self.path, "kind": self.kind,
                "space": {"fold_ln": self.fold_ln, "center_writing_weights": self.center_writing_weights,
                          "fold_value_biases": self.fold_value_biases}}


def pick_dictionary(iv, features: list[FeatureDictionary]) -> tuple[FeatureDictionary, FeatureLayer]:
    """The dictionary and layer an ``L<l>F<f>`` spec names, checked (one --dict must hold layer l and feature f)."""
    where = f"--intervene {iv.spec!r}"
    if not features:
        raise HexRayError(f"{where}: a feature intervention needs a dictionary: add --dict DIR (a dictionary with a "
                          f"layer {iv.layer})")
    have = [fd for fd in features if iv.layer in fd.layers]
    if not have:
        held = "; ".join(f"{fd.name}: layers {sorted(fd.layers)}" for fd in features)
        raise HexRayError(f"{where}: no --dict has a dictionary for layer {iv.layer} ({held})")
    if len(have) > 1:
        raise HexRayError(f"{where}: {len(have)} --dict dictionaries have layer {iv.layer} "
                          f"({', '.join(fd.name for fd in have)}): give only the one to intervene with")
    fd = have[0]
    fl = fd.layers[iv.layer]
    if not 0 <= iv.index < fl.d_sae:
        raise HexRayError(f"{where}: feature {iv.index} does not exist ({fd.name} layer {iv.layer} has features "
                          f"0-{fl.d_sae - 1})")
    return fd, fl
