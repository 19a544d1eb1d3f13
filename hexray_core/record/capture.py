"""Streaming capture: each hooked tensor goes to the trace writer the moment its hook fires.

Nothing is cached: a hook function converts its tensor (batch dimension dropped, narrowed to the
storage dtype on the model's device) and hands it to ``TraceWriter.write``, which compresses it
on a thread pool with a bounded number of chunks in flight. On CUDA the device-to-host copy is
asynchronous into pinned memory, and a single drain thread waits for each copy and feeds the
writer, so the forward pass is not held up by the copies.

Storage dtype (``act_dtype``): ``f32``, ``f16`` or ``bf16``. ``*.hook_scale`` (LayerNorm /
RMSNorm scales, ``[n, 1]``) are always float32: exact attribution divides by them. A tensor that
would overflow float16 (finite |x| > 65504) is stored as ``overflow`` (``f32`` by default, or
``bf16``) and its attrs say so: ``{"overflow": {"wanted": "f16", "absmax": 1.2e5}}``. Non-finite
values (``-inf`` in masked attention scores) are stored as they are, and ``attrs["nonfinite"]``
says which kinds occur: ``{"nan": False, "posinf": False, "neginf": True}``.

Deduplication: a hook point has one canonical name (hooks.py); beyond that, distinct hook points
often carry the very same tensor (``attn.hook_in`` is ``ln1.hook_out``). Tensors that are not
*protected* (default-set names and explicit names) are written once per distinct tensor: a later
hook whose tensor is still alive, at the same address, with the same shape, strides, dtype and
in-place version counter it had when the first hook saw it, is recorded as an alias of the first (``run["aliases"]``).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import weakref

import numpy as np
import torch

F16_MAX = 65504.0
_TAG = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}
_TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ACT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "f32": "f32", "f16": "f16", "bf16": "bf16"}


def resolve_act_dtype(act_dtype: str, model_dtype: torch.dtype) -> str:
    """``auto``: a 16-bit model's own dtype; float16 for a float32 model (half the size; use float32 for
    attribution exact to 1e-6)."""
    if act_dtype in (None, "auto"):
        return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model_dtype, "f16")
    try:
        return ACT_DTYPES[act_dtype]
    except KeyError:
        raise ValueError(f"act dtype must be auto, float32, float16 or bfloat16, not {act_dtype!r}") from None


def to_host(t: torch.Tensor, tag: str, *, overflow: str = "f32", force_f32: bool = False):
    """Convert one activation to its stored form on the device.

    Returns ``(tensor, stored_tag, attrs)``; the tensor is still on the device (on CPU: never sharing
    memory with the model's tensor).
    """
    attrs: dict = {}
    if t.dim() >= 1 and t.shape[0] == 1:
        t = t[0]
    if not t.is_floating_point():
        x = t.to(torch.int64) if t.dtype not in (torch.int32, torch.int64, torch.bool) else t
        return (x.clone() if x.data_ptr() == t.data_ptr() and x.device.type == "cpu" else x), None, attrs
    want = "f32" if force_f32 else tag
    src = _TAG.get(t.dtype, "f32")
    if t.numel():
        lo, hi = torch.aminmax(t)  # one fused pass; NaN and inf propagate into it
        amax = max(-float(lo), float(hi))
        if not math.isfinite(amax):  # masked attention scores (-inf), or a model producing NaN
            nan = math.isnan(amax)
            if nan:  # NaN hides whether there are infinities too
                attrs["nonfinite"] = {"nan": True, "posinf": bool(torch.isposinf(t).any()),
                                      "neginf": bool(torch.isneginf(t).any())}
            else:
                attrs["nonfinite"] = {"nan": False, "posinf": float(hi) == math.inf, "neginf": float(lo) == -math.inf}
            lo, hi = torch.aminmax(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0))
            amax = max(-float(lo), float(hi))
        if want == "f16" and src != "f16" and amax > F16_MAX:
            want = overflow
            attrs["overflow"] = {"wanted": "f16", "absmax": amax}
    x = t.to(_TORCH[want])
    if x.device.type == "cpu" and x.data_ptr() == t.data_ptr():
        x = x.clone()  # the model may still change its tensor in place; the writer compresses later
    if want != src:
        attrs.setdefault("src_dtype", src)
    return x, want, attrs


def as_numpy(x: torch.Tensor, tag: str | None) -> tuple[np.ndarray, str | None]:
    """Host tensor -> (ndarray, writer dtype argument)."""
    if tag == "bf16":
        return x.contiguous().view(torch.int16).numpy().view(np.uint16), "bf16"
    return x.numpy(), None


class _DrainThread:
    """CUDA path: waits for each asynchronous copy, then writes it. Bounded by bytes in flight."""

    def __init__(self, write, max_bytes: int = 512 << 20):
        self._write = write
        self._q: queue.Queue = queue.Queue()
        self._cv = threading.Condition()
        self._inflight = 0
        self._max = max_bytes
        self.error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="hexray-d2h", daemon=True)
        self._thread.start()

    def submit(self, name, host, event, tag, attrs):
        if self.error is not None:
            raise self.error
        n = host.numel() * host.element_size()
        with self._cv:
            while self._inflight > 0 and self._inflight + n > self._max and self.error is None:
                self._cv.wait()
            self._inflight += n
        self._q.put((name, host, event, tag, attrs, n))

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            name, host, event, tag, attrs, n = item
            try:
                if self.error is None and not self._stop:
                    event.synchronize()
                    arr, dt = as_numpy(host, tag)
                    self._write(name, arr, dt, attrs)
            except BaseException as e:  # handed back to the forward pass's thread
                self.error = e
            finally:
                with self._cv:
                    self._inflight -= n
                    self._cv.notify_all()

    def flush(self):
        """Wait until every submitted tensor has been written; re-raise a write error."""
        with self._cv:
            while self._inflight > 0 and self.error is None:
                self._cv.wait(timeout=0.05)
        if self.error is not None:
            raise self.error

    def close(self):
        """Stop the thread; tensors still queued (after an error or Ctrl-C) are dropped."""
        self._stop = True
        self._q.put(None)
        self._thread.join(timeout=30)


class Capture:
    """Hooks for one model and one hook plan; ``forward(...)`` records one run's activations."""

    def __init__(self, bridge, plan, writer, *, act_tag: str, overflow: str = "f32", dedupe: bool = True,
                 keep: frozenset[str] = frozenset(), check=None, flash: dict | None = None):
        self.bridge, self.plan, self.writer = bridge, plan, writer
        self.flash = flash  # meta["attention"] when attention runs blockwise (flash.py): its LSEs are stored
        self.act_tag, self.overflow, self.dedupe = act_tag, overflow, dedupe
        self.keep = keep  # names whose device tensors stay available in ``kept`` after the forward pass
        self.check = check  # an attention.AttentionCheck: sees q, k and patterns; a pattern is stored only if it fails
        self._name_of: dict[int, str] = {}
        self._points = []  # (hook point, canonical name), one per hook point
        for n, hp in dict(bridge.hook_dict).items():
            c = plan.canon.get(n, n)
            if (c in plan._set or c in keep or (check is not None and check.watches(c))) and \
                    id(hp) not in self._name_of:
                self._name_of[id(hp)] = c
                self._points.append((hp, c))
        self._drain = None
        self._reset()

    def _reset(self):
        if self.check is not None:
            self.check.reset()
        self.aliases: dict[str, str] = {}
        self.written: list[str] = []
        self.refired: list[str] = []
        self._seen: dict[tuple, tuple] = {}
        self._done: set[str] = set()
        self.kept: dict[str, torch.Tensor] = {}

    # -- the hook --------------------------------------------------------------------------

    def _hook(self, tensor, hook):
        if isinstance(tensor, tuple):
            tensor = tensor[0] if tensor and isinstance(tensor[0], torch.Tensor) else None
        if not isinstance(tensor, torch.Tensor):
            return None
        name = self._name_of.get(id(hook))
        if name is None:
            return None
        if name in self._done:
            self.refired.append(name)
            return None
        wanted = name in self.plan._set
        if not wanted and name in self.keep:  # kept for a computation after the forward, not stored
            self.kept[name] = tensor.detach().clone()  # the model may later change it in place
            if self.check is None or not self.check.watches(name):
                self._done.add(name)
                return None
        if self.check is not None and self.check.watches(name):
            reproduced = self.check.see(name, tensor)
            if reproduced is False and hasattr(self.check, "failed_pattern"):  # blockwise: no hook_pattern fired
                layer = int(name.split(".")[1])
                pattern = self.check.failed_pattern(layer)
                if pattern is not None:
                    self._store(f"blocks.{layer}.attn.hook_pattern", pattern[None], protected=True)
            if not wanted:
                self._done.add(name)
                if reproduced is False:  # replay could not recompute this layer from q and k: keep its pattern
                    self._store(name, tensor, protected=True)
                return None
        self._store(name, tensor, protected=name in self.plan.protected)
        return None

    def _store(self, name: str, tensor: torch.Tensor, *, protected: bool) -> None:
        if not protected and not tensor.is_floating_point():
            return  # token ids / positions: the run already has them
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if self.dedupe and not protected:
            prev = self._seen.get(key)
            if prev is not None:
                ref, version, first = prev
                alive = ref()
                # Same storage and layout is not enough: the model may have changed it in place since
                # the first hook saw it (x += ...), which bumps the version counter the views share.
                if alive is not None and tensor._version == version and alive.data_ptr() == key[1]:
                    self.aliases[name] = first
                    self._done.add(name)
                    if name in self.keep:  # stored once under its first name, but a computation after the forward
                        self.kept[name] = tensor.detach()  # (the logit lens, features) asks for it by this one
                    return
        try:
            self._seen[key] = (weakref.ref(tensor), tensor._version, name)
        except TypeError:
            pass
        self._done.add(name)
        if name in self.keep:
            self.kept[name] = tensor.detach()
        with torch.no_grad():
            x, tag, attrs = to_host(tensor.detach(), self.act_tag, overflow=self.overflow,
                                    force_f32=name.endswith("hook_scale") or name.startswith("hexray.attn_lse."))
            if x.device.type == "cuda":
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                host.copy_(x, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._drain.submit(name, host, event, tag, attrs)
            else:
                arr, dt = as_numpy(x, tag)
                self._write(name, arr, dt, attrs)
        self.written.append(name)

    def _on_lse(self, layer: int, lse: torch.Tensor, used: dict) -> None:
        """flash.py hands over each layer's log-sum-exp ``[1, heads, n]`` (float32) before its ``hook_z`` fires."""
        if self.check is not None and hasattr(self.check, "see_lse"):
            self.check.see_lse(layer, lse, used)
        if self.flash.get("lse"):  # stored beside q and k: replay's pattern rows are exp(score - LSE)
            self._store(self.flash["lse"].format(layer=layer), lse, protected=True)

    def _write(self, name, arr, dt, attrs):
        self.writer.write(name, arr, dtype=dt, attrs=attrs or None)

    # -- one forward pass --------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor):
        """Run the model on ``tokens`` ``[1, n]`` with the capture hooks; returns the logits ``[1, n, d_vocab]``."""
        self._reset()
        restore = {}
        for flag in set(self.plan.gated.values()):
            restore[flag] = bool(getattr(self.bridge.cfg, flag, False))
            getattr(self.bridge, f"set_{flag}")(True)
        cuda = tokens.device.type == "cuda"
        self._drain = _DrainThread(self._write) if cuda else None
        handles = []
        try:
            # Hooks go straight onto the hook points (run_with_hooks would re-resolve every name on
            # every call: a quarter of a second on GPT-2 small).
            for hp, _ in self._points:
                handles.append((hp, hp.add_hook(self._hook)))
            with torch.no_grad(), self._attention():
                logits = self.bridge(tokens, return_type="logits")
            if self._drain is not None:
                self._drain.flush()
        finally:
            for hp, handle in handles:
                handle.hook.remove()
                hp.fwd_hooks[:] = [h for h in hp.fwd_hooks if h is not handle]
            if self._drain is not None:
                self._drain.close()
                self._drain = None
            for flag, value in restore.items():
                getattr(self.bridge, f"set_{flag}")(value)
        self._seen.clear()
        return logits

    def _attention(self):
        if self.flash is None:
            return contextlib.nullcontext()
        from .flash import flash_attention

        return flash_attention(self.bridge, self.flash, on_lse=self._on_lse)
