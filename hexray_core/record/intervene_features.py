"""Feature interventions while recording (``L3F120=0``, ``L3F120*8``, ``L3F120=+5`` with ``--dict``).

A feature f of a dictionary layer is read where the dictionary reads (its ``hook_in``) and written where it writes
(``hook_out``: the same hook for an SAE, ``hook_mlp_out`` for a transcoder, every later layer's ``hook_mlp_out``
for a cross-layer transcoder). At each chosen position the feature's live activation a is computed in the
dictionary's own space, the action gives a new value a' (``=0``/``=X`` set, ``=mean`` the mean of a over the
prompt, ``*X`` scale, ``=+X`` add), and the write hook adds (a' − a) · W_dec[f] (SAELens's ``decode`` of the change:
a rescaled-by-decoder-norm dictionary divides by the row's norm). So ``L3F120=0`` removes the feature's decoded
contribution and ``L3F120*8`` adds 7 · a · W_dec[f]. Nothing else of the dictionary (its bias, its error, the
other features) enters: the model keeps its own activation plus the change.

**Spaces.** The recording bridge is in compatibility mode (LayerNorm folded, writing weights centred). What the
dictionary reads is rebuilt live, exactly as ``replay/features.py`` rebuilds it from a trace:
``lnX.hook_normalized`` is the same in every space; ``ln2.hook_out`` / ``mlp.hook_in`` get the norm's raw weight
and bias (the kit's ``raw/``) unless the dictionary's model folded them; a residual hook (``hook_resid_pre/mid/
post``, ``hook_mlp_in``) or a layer's write (``hook_attn_out``, ``hook_mlp_out``) of a LayerNorm model gets back
the per-position mean centring removed, tracked during the pass from the tokens, positions, ``attn.hook_z`` and
``mlp.hook_post`` (``raw/W_E.mean`` ...), unless the dictionary's model was centred too. The write: every read of
the residual stream of a LayerNorm model goes through a norm that removes the mean, so adding v to the raw
residual is adding centre(v) to the centred one; HexRay adds centre(v) (the trace stays centred) and counts the
removed mean in the tracker, so a later raw-space read is still exact. RMSNorm models are never centred.

**Attention-output (``attn.hook_z``) dictionaries** read and write the heads' outputs before W_O, concatenated
([n, n_heads · d_head]). The live hook_z is value-bias folded (compatibility mode): the dictionary's z is it plus
what the recording's processing removed minus what the dictionary's removed (``fold_value_biases``: each query
head's b_V, and with ``fold_ln`` on a LayerNorm model ln1's bias through W_V: the kit's ``raw/b_V`` and
``raw/ln1.b.W_V``), a constant per head, as ``replay/features._hook_z`` does from a trace. The write adds
(a' − a) · W_dec[f] reshaped to [n_heads, d_head] (the constant cancels in a change); the tracker's hook_z hook
runs after every edit of that hook, so a later raw-space read counts the write's mean through W_O. Anything else
(normalised dictionaries, a write to ``hook_resid_mid``) is refused in one line.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from hexray_core.errors import HexRayError

from .feature_weights import FeatureDictionary, FeatureLayer, pick_dictionary
from .intervene_spec import Intervention

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_RESID = {"hook_resid_pre": "hook_resid_pre", "hook_resid_mid": "hook_resid_mid", "hook_mlp_in": "hook_resid_mid",
          "hook_resid_post": "hook_resid_post"}
_WRITES = {"hook_attn_out": "hook_attn_out", "attn.hook_out": "hook_attn_out", "hook_mlp_out": "hook_mlp_out",
           "mlp.hook_out": "hook_mlp_out"}
_NORMED = re.compile(r"(ln[12])\.hook_normalized")
_NORM_OUT = {"ln1.hook_out": "ln1", "ln2.hook_out": "ln2", "mlp.hook_in": "ln2", "attn.hook_in": "ln1"}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: the arrays may be read-only maps


class RawMeans:
    """The per-position mean over d_model that compatibility mode removed from the residual stream, tracked during
    a forward pass (LayerNorm models): embedding and position means, then each layer's attention and MLP write
    means (``raw/*.mean`` of the kit, the same formula as ``replay/features.resid_offset``), then the means of the
    feature writes HexRay centred. Hooks fire in the model's order, so ``total`` at a read is the read's offset."""

    def __init__(self, bridge, state: dict):
        raw = {k[4:]: v[0] for k, v in (getattr(bridge, "_hexray_raw", None) or {}).items()}
        need = ("W_E.mean", "W_O.mean", "b_O.mean", "W_out.mean", "b_out.mean")
        missing = [n for n in need if n not in raw]
        if missing:
            raise HexRayError(f"this model's bridge lacks what compatibility mode removed ({', '.join(missing)}): it "
                              "was handed over already processed, so a raw-space dictionary cannot be read live")
        if "embed.hook_in" not in bridge.hook_dict:
            raise HexRayError("this model's bridge has no embed.hook_in (the token ids), so the means compatibility "
                              "mode removed cannot be tracked: a raw-space dictionary cannot be read live")
        self.state = state
        self.n_layers = int(bridge.cfg.n_layers)
        self.w = {n: _t(a) for n, a in raw.items() if n in need or n == "W_pos.mean"}
        self.positional = (str(getattr(bridge.cfg, "positional_embedding_type", "standard")) == "standard"
                           and "W_pos.mean" in self.w)
        self.total: torch.Tensor | None = None  # [batch, m]
        self.last: dict = {}  # ("attn" | "mlp", layer) -> [batch, m]

    def _w(self, name: str, like: torch.Tensor) -> torch.Tensor:
        w = self.w[name]
        if w.device != like.device:
            w = self.w[name] = w.to(like.device)
        return w

    def hooks(self) -> list:
        out = [("embed.hook_in", self._tokens)]
        for layer in range(self.n_layers):
            out.append((f"blocks.{layer}.attn.hook_z", lambda z, hook=None, layer=layer: self._attn(z, layer)))
            out.append((f"blocks.{layer}.mlp.hook_post", lambda p, hook=None, layer=layer: self._mlp(p, layer)))
        return out

    def _tokens(self, ids, hook=None):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            return None
        we = self._w("W_E.mean", torch.empty(0, device=ids.device))
        total = we[ids.long()]
        if self.positional:
            start = self.state["start"]
            total = total + self._w("W_pos.mean", total)[start:start + ids.shape[-1]]
        self.total, self.last = total, {}
        return None

    def _add(self, t: torch.Tensor, key) -> None:
        self.last[key] = t
        if self.total is None:
            raise HexRayError("the raw-space offset was not tracked in this pass (embed.hook_in did not fire first)")
        self.total = self.total + t.to(self.total.device)

    def _attn(self, z, layer: int):
        self._add(torch.einsum("bphd,hd->bp", z.float(), self._w("W_O.mean", z)[layer])
                  + self._w("b_O.mean", z)[layer], ("attn", layer))
        return None

    def _mlp(self, post, layer: int):
        self._add(post.float() @ self._w("W_out.mean", post)[layer] + self._w("b_out.mean", post)[layer],
                  ("mlp", layer))
        return None

    def offset(self, kind: str, layer: int, where: str = "") -> torch.Tensor:
        """[batch, m]: raw minus centred at a residual read ("resid", ``where`` its hook) or at a layer's write
        ("attn" / "mlp"). Every write before the read must have been seen in this pass (a hook that did not fire,
        e.g. in an attention path without hook_z, would make the read silently wrong)."""
        if kind != "resid":
            got = self.last.get((kind, layer))
        else:
            need = [(k, i) for i in range(layer) for k in ("attn", "mlp")]
            need += [("attn", layer)] if where in ("hook_resid_mid", "hook_mlp_in", "hook_resid_post") else []
            need += [("mlp", layer)] if where == "hook_resid_post" else []
            missing = [k for k in need if k not in self.last]
            if missing:
                raise HexRayError(f"the raw-space offset misses layer {missing[0][1]}'s {missing[0][0]} write in "
                                  "this pass (its hook_z / hook_post did not fire), so the dictionary cannot be read "
                                  "exactly")
            got = self.total
        if got is None:
            raise HexRayError("the raw-space offset was not tracked in this pass (embed.hook_in did not fire first)")
        return got

    def wrote(self, mean: torch.Tensor) -> None:
        if self.total is not None:
            self.total = self.total + mean.to(self.total.device)


def _encoder(fl: FeatureLayer, f: int) -> dict:
    """The tensors the feature's activation needs (one encoder column, unless TopK needs them all)."""
    e = {"b_dec_in": _t(fl.b_dec) if fl.apply_b_dec_to_input else None}
    dec = np.asarray(fl.W_dec[f], dtype=np.float32)
    norm = float(np.linalg.norm(dec.reshape(-1)))
    e["scale"] = norm if fl.rescale_acts_by_decoder_norm else None
    if fl.k is not None:
        e["W"], e["b"] = _t(fl.W_enc), _t(fl.b_enc)
        if fl.rescale_acts_by_decoder_norm:
            e["norms"] = _t(np.linalg.norm(fl.W_dec.reshape(fl.d_sae, -1), axis=-1))
        return e
    e["w"], e["b"] = _t(fl.W_enc[:, f]), float(fl.b_enc[f])
    if fl.r_mag is not None:
        e["w_mag"] = _t(fl.W_enc[:, f] * np.exp(fl.r_mag[f]))
        e["b_mag"], e["b_gate"] = float(fl.b_mag[f]), float(fl.b_gate[f])
    if fl.threshold is not None:
        e["threshold"] = float(np.asarray(fl.threshold).reshape(-1)[f] if np.ndim(fl.threshold) else fl.threshold)
    return e


class FeatureAct:
    """One bound feature intervention: a read hook (the feature's activation per position, in its own space) and
    one write hook per output layer (adds (a' − a) · the decoder row, centred where the trace is)."""

    def __init__(self, iv: Intervention, fd: FeatureDictionary, fl: FeatureLayer, read_hook: str, convert: dict,
                 writes: list[tuple[str, np.ndarray, bool]], state: dict, raw: RawMeans | None):
        self.iv, self.fd, self.fl, self.state, self.raw = iv, fd, fl, state, raw
        self.hook = writes[0][0]
        self.read_hook, self.convert = read_hook, convert
        self.enc = _encoder(fl, iv.index)
        self.writes = [(h, _t(row / (self.enc["scale"] or 1.0)), centre) for h, row, centre in writes]
        self.act: torch.Tensor | None = None  # [batch, m] of the current pass
        self.z_layer = fl.layer if "z_shift" in convert else None  # a hook_z dictionary's layer
        self.mean: torch.Tensor | None = None
        self.fired = 0

    # -- the feature's activation -------------------------------------------------------------------------------

    def _dev(self, key: str, like: torch.Tensor):
        v = self.enc.get(key)
        if isinstance(v, torch.Tensor) and v.device != like.device:
            v = self.enc[key] = v.to(like.device)
        return v

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """[...]: the feature's activation on x [..., d_in] (float32, in the dictionary's space), as
        ``Dictionary.encode`` computes it."""
        fl, e = self.fl, self.enc
        if e["b_dec_in"] is not None:
            x = x - self._dev("b_dec_in", x)
        if fl.k is not None:
            pre = x @ self._dev("W", x) + self._dev("b", x)
            if fl.rescale_acts_by_decoder_norm:
                pre = pre * self._dev("norms", x)
            k = min(int(fl.k), pre.shape[-1])
            top = pre.topk(k, dim=-1).indices
            chosen = (top == self.iv.index).any(-1)
            return torch.where(chosen, pre[..., self.iv.index].clamp(min=0), torch.zeros_like(pre[..., 0]))
        if fl.r_mag is not None:  # gated: the magnitude path where the gate is open
            gate = (x @ self._dev("w", x) + e["b_gate"]) > 0
            mag = x @ self._dev("w_mag", x) + e["b_mag"]
            return torch.where(gate, mag.clamp(min=0), torch.zeros_like(mag))
        pre = x @ self._dev("w", x) + e["b"]
        if e["scale"] is not None:
            pre = pre * e["scale"]
        if "threshold" in e:
            kept = pre.clamp(min=0) if fl.relu_before_threshold else pre
            return torch.where(pre > e["threshold"], kept, torch.zeros_like(pre))
        return pre.clamp(min=0)

    def _space(self, x: torch.Tensor) -> torch.Tensor:
        """The live activation at the read hook, in the dictionary's space (float32)."""
        x = x.float()
        c = self.convert
        if "z_shift" in c:  # hook_z [batch, m, n_heads, d_head]: the heads concatenated, plus the folded biases
            x = x.flatten(-2)
            if c["z_shift"] is not None:
                if c["z_shift"].device != x.device:
                    c["z_shift"] = c["z_shift"].to(x.device)
                x = x + c["z_shift"]
            return x
        if c.get("offset") is not None:
            kind, layer, where = c["offset"]
            x = x + self.raw.offset(kind, layer, where).unsqueeze(-1).to(x.device)
        if c.get("norm") is not None:
            w, b = c["norm"]
            if w.device != x.device:
                w = w.to(x.device)
                b = None if b is None else b.to(x.device)
                c["norm"] = (w, b)
            x = x * w if b is None else x * w + b
        return x

    def read(self, x, hook=None):
        if not isinstance(x, torch.Tensor):
            return None
        a = self.activation(self._space(x))
        self.act = a
        start, n_prompt = self.state["start"], self.state["n_prompt"]
        if self.iv.op == "mean" and start == 0 and a.shape[1] >= n_prompt:
            self.mean = a[:, :n_prompt].mean(dim=1, keepdim=True)
        return None

    # -- the write ----------------------------------------------------------------------------------------------

    def _target(self, a: torch.Tensor) -> torch.Tensor:
        op, val = self.iv.op, self.iv.value
        if op == "set":
            return torch.full_like(a, val)
        if op == "add":
            return a + val
        if op == "scale":
            return a * val
        if self.mean is None:
            raise HexRayError(f"--intervene {self.iv.spec!r}: the mean needs a pass over the whole prompt")
        return self.mean.to(a.dtype).expand_as(a)

    def write(self, row: torch.Tensor, centre: bool):
        def hook(x, hook=None):
            if not isinstance(x, torch.Tensor):
                return None
            self.fired += 1
            if self.act is None:
                raise HexRayError(f"--intervene {self.iv.spec!r}: {self.read_hook} did not fire before {self.hook}")
            start, m = self.state["start"], x.shape[1]
            pos = self.iv.positions
            mask = torch.ones(m, dtype=torch.bool, device=x.device)
            if pos is not None:
                mask = torch.zeros(m, dtype=torch.bool, device=x.device)
                local = [p - start for p in pos if start <= p < start + m]
                if not local:
                    return None
                mask[torch.tensor(local, dtype=torch.long, device=x.device)] = True
            a = self.act
            change = torch.where(mask, self._target(a) - a, torch.zeros_like(a))  # [batch, m]
            r = row.to(device=x.device)
            delta = change.unsqueeze(-1) * r  # [batch, m, d]
            if self.z_layer is not None:  # hook_z: the decoder row is the heads' outputs concatenated
                delta = delta.reshape(x.shape)  # the raw-space tracker, registered after it, sees the edited z
            if centre:
                mu = delta.mean(-1, keepdim=True)
                delta = delta - mu
                if self.raw is not None:
                    self.raw.wrote(mu.squeeze(-1))
            return x + delta.to(x.dtype)

        return hook

    def hooks(self) -> list:
        return [(self.read_hook, self.read)] + [(h, self.write(row, centre)) for h, row, centre in self.writes]

    def describe(self) -> dict:
        d = self.iv.describe() | {"hook": self.hook, "hook_in": self.fl.hook_in, "dict": self.fd.describe()}
        if len(self.writes) > 1:
            d["hooks_out"] = [h for h, _, _ in self.writes]
        return d


def bind_feature(bridge, iv: Intervention, features: list[FeatureDictionary], canon: dict, state: dict,
                 raw_means) -> FeatureAct:
    """Check one feature spec against the model and its dictionary; ``raw_means()`` gives the shared tracker."""
    where = f"--intervene {iv.spec!r}"
    fd, fl = pick_dictionary(iv, features)
    if iv.direction is not None:
        raise HexRayError(f"{where}: a feature is one number; ~DIRECTION applies to hooks, heads and neurons")
    if iv.op in ("patch", "add_vector"):
        raise HexRayError(f"{where}: a feature takes =0, =mean, =X, =+X or *X (patch its hook from a trace instead)")
    if fl.normalize_activations != "none":
        raise HexRayError(f"{where}: {fd.name} normalises its input ({fl.normalize_activations}) at run time; "
                          "intervening on its features is not supported yet")
    uses_ln = str(getattr(bridge.cfg, "normalization_type", "LN") or "LN").upper().startswith("LN")
    centred = uses_ln  # the recording bridge is in compatibility mode: LayerNorm models are centred
    if (fl.hook_in or "").endswith("attn.hook_z"):
        return _bind_hook_z(bridge, iv, fd, fl, canon, state, uses_ln)
    d_model = int(bridge.cfg.d_model)
    if fl.W_enc.shape[0] != d_model or fl.W_dec.shape[-1] != d_model:
        raise HexRayError(f"{where}: {fd.name} reads {fl.W_enc.shape[0]} and writes {fl.W_dec.shape[-1]} dimensions, "
                          f"the model has d_model {d_model} (a dictionary for another model?)")
    n_layers = int(bridge.cfg.n_layers)

    def hook_name(name: str, what: str) -> str:
        if name not in canon:
            raise HexRayError(f"{where}: {fd.name} {what} {name!r}, which this model does not have")
        return canon[name]

    # the read
    m = _BLOCK.fullmatch(fl.hook_in or "")
    rest = m.group(2) if m else ""
    convert: dict = {}
    raw = None
    if rest in _RESID or rest in _WRITES:
        read = hook_name(f"blocks.{fl.layer}.{_RESID.get(rest) or _WRITES[rest]}", "reads")
        if centred and not fd.center_writing_weights:
            raw = raw_means()
            convert["offset"] = ("resid" if rest in _RESID else {"hook_attn_out": "attn", "hook_mlp_out": "mlp"}[
                _WRITES[rest]], fl.layer, rest)
    elif _NORMED.fullmatch(rest) or rest in _NORM_OUT:
        ln = _NORMED.fullmatch(rest).group(1) if _NORMED.fullmatch(rest) else _NORM_OUT[rest]
        read = hook_name(f"blocks.{fl.layer}.{ln}.hook_normalized", "reads")
        if not _NORMED.fullmatch(rest) and not fd.fold_ln:
            rawt = getattr(bridge, "_hexray_raw", None) or {}
            if f"raw/{ln}.w" not in rawt:
                raise HexRayError(f"{where}: {fd.name} reads {fl.hook_in} with the norm's weight, which this "
                                  "model's bridge no longer has (it was handed over already processed)")
            w = _t(rawt[f"raw/{ln}.w"][0][fl.layer])
            b = _t(rawt[f"raw/{ln}.b"][0][fl.layer]) if uses_ln and f"raw/{ln}.b" in rawt else None
            convert["norm"] = (w, b)
    else:
        raise HexRayError(f"{where}: {fd.name} reads {fl.hook_in!r}; feature interventions read "
                          "blocks.L.hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, lnX.hook_normalized, "
                          "ln2.hook_out or mlp.hook_in")
    # the writes: one decoder row per output layer
    out_rows = [(fl.layer, fl.W_dec[iv.index])] if not fl.cross_layer else \
        [(fl.layer + j, fl.W_dec[iv.index, j]) for j in range(fl.W_dec.shape[1])]
    writes = []
    for layer, row in out_rows:
        if layer >= n_layers:
            raise HexRayError(f"{where}: {fd.name} writes into layer {layer}, the model has layers 0-{n_layers - 1}")
        hook_out = re.sub(r"^blocks\.\d+\.", f"blocks.{layer}.", fl.hook_out)
        mo = _BLOCK.fullmatch(hook_out)
        rest_out = mo.group(2) if mo else ""
        if rest_out in ("hook_resid_mid", "hook_mlp_in"):
            raise HexRayError(f"{where}: {fd.name} writes {hook_out}, and an edit of hook_resid_mid does not reach the "
                              "residual stream on TransformerLens 4.3's bridge")
        if rest_out in _RESID:
            target, centre = hook_name(f"blocks.{layer}.{rest_out}", "writes"), centred
        elif rest_out in _WRITES:
            target, centre = hook_name(f"blocks.{layer}.{_WRITES[rest_out]}", "writes"), centred
        elif _NORMED.fullmatch(rest_out) or (rest_out in _NORM_OUT and fd.fold_ln):
            ln = _NORMED.fullmatch(rest_out).group(1) if _NORMED.fullmatch(rest_out) else _NORM_OUT[rest_out]
            target, centre = hook_name(f"blocks.{layer}.{ln}.hook_normalized", "writes"), False
        else:
            raise HexRayError(f"{where}: {fd.name} writes {hook_out!r}, which HexRay cannot write in the dictionary's "
                              "space (it writes residual hooks, hook_attn_out, hook_mlp_out and lnX.hook_normalized)")
        writes.append((target, np.asarray(row, dtype=np.float32), centre))
    return FeatureAct(iv, fd, fl, read, convert, writes, state, raw)


def _z_removed(bridge, fold_ln: bool, fold_value_biases: bool, layer: int, uses_ln: bool, where: str, name: str):
    """[n_heads, d_head] (or None): what processing with these flags subtracts from layer ``layer``'s hook_z
    (``replay/features._value_bias_folded``, from the bridge's copy of the kit's raw/ tensors)."""
    if not fold_value_biases:
        return None
    raw = getattr(bridge, "_hexray_raw", None) or {}
    need = ["raw/b_V"] + (["raw/ln1.b.W_V"] if fold_ln and uses_ln else [])
    missing = [n for n in need if n not in raw]
    if missing:
        raise HexRayError(f"{where}: {name} reads hook_z in another value-bias space, and this model's bridge lacks "
                          f"{', '.join(missing)} (it was handed over already processed)")
    out = _t(raw["raw/b_V"][0][layer])
    if len(need) > 1:
        out = out + _t(raw["raw/ln1.b.W_V"][0][layer])
    return out


def _bind_hook_z(bridge, iv: Intervention, fd: FeatureDictionary, fl: FeatureLayer, canon: dict, state: dict,
                 uses_ln: bool) -> FeatureAct:
    """An attention-output dictionary: read and write ``blocks.L.attn.hook_z``, heads concatenated."""
    where = f"--intervene {iv.spec!r}"
    cfg = bridge.cfg
    n_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
    width = n_heads * d_head
    if fl.W_enc.shape[0] != width or fl.W_dec.shape[-1] != width:
        raise HexRayError(f"{where}: {fd.name} reads {fl.W_enc.shape[0]} and writes {fl.W_dec.shape[-1]} dimensions, "
                          f"the model's hook_z has n_heads x d_head = {width} (a dictionary for another model?)")
    if fl.hook_out != fl.hook_in or fl.cross_layer:
        raise HexRayError(f"{where}: {fd.name} reads {fl.hook_in} and writes {fl.hook_out}; an attention-output "
                          "dictionary intervenes where it reads (hook_z)")
    hook = f"blocks.{fl.layer}.attn.hook_z"
    if hook not in canon:
        raise HexRayError(f"{where}: {fd.name} reads {hook!r}, which this model does not have")
    proc = getattr(bridge, "_hexray_processing", None) or {}
    live = (bool(proc.get("fold_ln", True)), bool(proc.get("fold_value_biases", True)))
    mine = (bool(fd.fold_ln), bool(fd.fold_value_biases))
    shift = None
    if live != mine:
        plus = _z_removed(bridge, *live, fl.layer, uses_ln, where, fd.name)
        minus = _z_removed(bridge, *mine, fl.layer, uses_ln, where, fd.name)
        if plus is not None or minus is not None:
            zero = torch.zeros(n_heads, d_head)
            shift = ((plus if plus is not None else zero) - (minus if minus is not None else zero)).reshape(-1)
    convert = {"z_shift": shift}
    writes = [(canon[hook], np.asarray(fl.W_dec[iv.index], dtype=np.float32), False)]
    return FeatureAct(iv, fd, fl, canon[hook], convert, writes, state, None)
