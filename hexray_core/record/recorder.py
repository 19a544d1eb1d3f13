"""Record prompts into one trace: ``record(...)`` and the reusable ``Recorder``.

    from hexray_core.record import record, Recorder
    path = record(["Hello", "World"], model="hexray-demo", output="t.hxr")   # one run per prompt

    rec = Recorder(model=hf_model, tokenizer=tok)       # or a TransformerBridge, a name, a path
    result = rec.record("Hello", "t.hxr", hooks="full", act_dtype="float32")

The model is loaded once per ``Recorder``; each prompt is one run. What a run and the file hold
is specified in docs/ARCHITECTURE.md ("What a recording contains").
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from hexray_core.errors import HexRayError
from hexray_core.kit import builder as kitmod
from trace_format import TraceWriter

from .attention import AttentionCheck, FlashCheck, attention_spec
from .capture import Capture, as_numpy, resolve_act_dtype, to_host
from .flash import flash_attention, flash_support
from .generate import generate as run_generation
from .generate import no_generation
from .hooks import HookPlan, plan_hooks
from .intervene import Interventions, bind
from .models import LoadedModel, from_objects, load_model, writer_meta
from .spec import check_generation, check_output_path, human_bytes, normalize_prompts
from .tokens import encode_prompt, mentioned_token_texts, token_text, vocab_strings

DEFAULT_TOP_K = 20
RUN_TENSORS = ("hexray.topk_ids", "hexray.topk_logits", "hexray.next_logit", "hexray.logsumexp",
               "hexray.unembed_ids", "hexray.unembed_cols", "hexray.unembed_bias")
CODEC = "zstd:1"


@dataclass
class RecordResult:
    path: str
    runs: int
    tokens: int
    tensors: int
    bytes: int
    seconds: float
    kit_sha256: str
    kit_path: str | None
    kit_written: bool
    bundled: bool

    def summary(self) -> str:
        kit = "bundled" if self.bundled else ("written to cache" if self.kit_written else "cached")
        return (f"recorded {self.runs} run{'s' if self.runs != 1 else ''}, {self.tokens} tokens, "
                f"{self.tensors} tensors, {human_bytes(self.bytes)} in {self.seconds:.1f} s -> {self.path} "
                f"(kit {self.kit_sha256[:12]}, {kit})")


def _write_error(path: str, e: OSError) -> HexRayError:
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        why = "no space left on device"
    elif e.errno == errno.EFBIG:
        why = "file too large (disk quota or file size limit)"
    return HexRayError(f"cannot write {path}: {why}; nothing was written there")


class Recorder:
    """A model loaded once, ready to record any number of prompts into traces."""

    def __init__(self, model="gpt2", *, tokenizer=None, device: str | None = "auto", dtype="float32",
                 n_devices: int | None = None, device_map=None, trust_remote_code: bool = False,
                 revision: str | None = None, progress=None):
        if isinstance(model, LoadedModel):
            self.loaded = model
        elif isinstance(model, str | os.PathLike):
            self.loaded = load_model(os.fspath(model), device=device, dtype=dtype, n_devices=n_devices,
                                     device_map=device_map, trust_remote_code=trust_remote_code,
                                     revision=revision, progress=progress)
        else:
            self.loaded = from_objects(model, tokenizer)

    @property
    def bridge(self):
        return self.loaded.bridge

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def kit(self) -> kitmod.Kit:
        """The model's kit (computed once per loaded model)."""
        k = self.loaded.cache.get("kit")
        if k is None:
            vocab = vocab_strings(self.tokenizer, self.loaded.d_vocab)
            k = kitmod.Kit(kitmod.kit_arrays(self.bridge), self.loaded.model_meta, vocab)
            self.loaded.cache["kit"] = k
        return k

    def tokenize(self, prompt: str, prepend_bos: bool | None = None) -> list[int]:
        if prepend_bos is None:
            prepend_bos = bool(getattr(self.bridge.cfg, "default_prepend_bos", True))
        return encode_prompt(self.tokenizer, prompt, prepend_bos)

    def record(self, prompts, output: str | os.PathLike | None = None, *, hooks="default", act_dtype: str = "auto",
               overflow: str = "f32", top_k: int = DEFAULT_TOP_K, generate: int = 0, temperature: float = 0.0,
               seed: int | None = None, prepend_bos: bool | None = None, bundle: bool = False,
               cache_dir: str | None = None, progress=None, lens: bool | str = "auto",
               extra: RunExtra | None = None, interventions=None, grad=None, extra_meta: dict | None = None,
               run_tensors: dict[int, dict[str, np.ndarray]] | None = None,
               attention: str = "auto", features=None) -> RecordResult:
        """Record each prompt as one run of a new trace at ``output`` (replaced atomically when complete).

        ``extra``: per-run tensors computed from activations kept in memory (float32 numpy; they need not be
        stored), e.g. a dictionary's features (``hexray record --dict``); see ``RunExtra``.

        ``lens``: also store the logit lens at every layer and position (True, False, or "auto": on a
        GPU, or on a CPU when its cost is small). ``interventions``: ``--intervene`` specs (strings, see
        ``intervene_spec.py``) applied during generation and the recorded forward pass of every prompt.
        ``grad``: a ``--grad`` metric (``logit-diff:" Mary"," John"``): also store the gradient of that
        metric with respect to every recorded activation, as ``grad.<hook name>``.
        ``features``: the dictionaries (``feature_weights.FeatureDictionary``, built by
        ``hexray_core.dataset.record_features``) that feature interventions (``L3F120*8``) name.
        ``extra_meta`` / ``run_tensors`` (``{run: {name: array}}``): what a caller such as ``hexray patch``
        stores beside the recording.
        ``attention``: ``flash`` runs attention blockwise without n × n scores (flash.py), ``eager`` runs
        TransformerLens's own attention, ``auto`` flash where it applies (architecture covered, no patterns
        asked for), else eager with one warning.
        """
        t0 = time.perf_counter()
        check_generation(temperature, seed)  # a 64-bit seed, before anything runs
        opts = self.validate(prompts, output, act_dtype=act_dtype, overflow=overflow, top_k=top_k,
                             generate=generate, temperature=temperature, prepend_bos=prepend_bos,
                             cache_dir=cache_dir, interventions=interventions, grad=grad, features=features)
        if attention not in ATTENTION_MODES:
            raise HexRayError(f"--attention {attention}: expected eager, flash or auto")
        plan = self._plan(opts, hooks, lens, progress, attention)
        plan.extra = extra
        kit = self.kit()
        try:
            kit.ensure_cached(cache_dir)
        except OSError as e:
            _emit(progress, "warning", message=f"could not cache the model kit ({e.strerror or e}); "
                                               "the trace will name it but replay may lack its weights")
        else:
            _emit(progress, "kit", path=kit.path, written=kit.written, sha256=kit.sha256)
        meta = {**self._meta(opts, plan, kit, bundle), **(extra_meta or {})}
        if plan.extra is not None and plan.extra.check is not None:
            for message in plan.extra.check(meta) or []:
                _emit(progress, "warning", message=message)
        try:
            writer = TraceWriter(opts.output, meta=meta)
        except OSError as e:
            raise _write_error(opts.output, e) from None
        capture = Capture(self.bridge, plan.hooks, writer, act_tag=opts.act_tag, overflow=opts.overflow,
                          dedupe=plan.hooks.label != "default",
                          keep=(frozenset(plan.lens_layers) if plan.lens else frozenset())
                          | frozenset(extra.hooks if extra is not None else ()),
                          check=(FlashCheck if plan.forward == "flash" else AttentionCheck)(
                              plan.attention, opts.act_tag, self.loaded.dtype) if plan.check_attention else None,
                          flash=plan.flash)
        total_tokens = 0
        n_tensors = len(kit.arrays) if bundle else 0
        try:
            if bundle:
                _emit(progress, "status", message="bundling the model kit")
                kit.write_into(writer)
            for i, (prompt, ids) in enumerate(zip(opts.prompts, opts.token_lists, strict=True)):
                _emit(progress, "run_start", index=i, total=len(opts.prompts))
                n_tokens, n_written = self._record_run(writer, capture, plan, opts, prompt, ids, seed, progress,
                                                       (run_tensors or {}).get(i, {}))
                total_tokens += n_tokens
                n_tensors += n_written
                _emit(progress, "run_done", index=i, total=len(opts.prompts), tokens=n_tokens,
                      bytes=writer.bytes_written)
            _emit(progress, "status", message="finishing the trace")
            path = writer.close()
        except OSError as e:
            writer.abort()
            raise _write_error(opts.output, e) from None
        except BaseException:
            writer.abort()
            raise
        return RecordResult(path=path, runs=len(opts.prompts), tokens=total_tokens, tensors=n_tensors,
                            bytes=os.path.getsize(path), seconds=time.perf_counter() - t0, kit_sha256=kit.sha256,
                            kit_path=kit.path, kit_written=kit.written, bundled=bool(bundle))

    # -- the steps of record() ----------------------------------------------------------------

    def validate(self, prompts, output=None, *, act_dtype: str = "auto", overflow: str = "f32",
                 top_k: int = DEFAULT_TOP_K, generate: int = 0, temperature: float = 0.0,
                 prepend_bos: bool | None = None, cache_dir: str | None = None,
                 interventions=None, grad=None, features=None) -> RecordOptions:
        """Check every option and tokenize every prompt before anything runs (one HexRayError per problem)."""
        prompts = normalize_prompts(prompts)
        if output is None:
            folder = os.path.join(cache_dir or kitmod.cache_dir(), "traces")
            os.makedirs(folder, exist_ok=True)
            output = os.path.join(folder, time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8] + ".hxr")
        output = check_output_path(os.fspath(output))
        if int(top_k) < 1:
            raise HexRayError(f"top_k= must be at least 1, not {top_k}")
        if int(generate) < 0:
            raise HexRayError(f"generate= must be 0 or more, not {generate}")
        check_generation(temperature, None)  # a finite temperature >= 0 (NaN refused); the seed: record()
        if overflow not in ("f32", "bf16", "float32", "bfloat16"):
            raise HexRayError(f"overflow fallback must be float32 or bfloat16, not {overflow}")
        try:
            act_tag = resolve_act_dtype(act_dtype, self.loaded.dtype)
        except ValueError as e:
            raise HexRayError(f"act_dtype={act_dtype!r}: {e}") from None
        if prepend_bos is None:
            prepend_bos = bool(getattr(self.bridge.cfg, "default_prepend_bos", True))
        token_lists = [self.tokenize(p, prepend_bos) for p in prompts]
        n_ctx = self.loaded.n_ctx
        for i, ids in enumerate(token_lists):
            if len(ids) == 0:
                raise HexRayError(f"prompt {i + 1} has no tokens")
            if len(ids) + int(generate) > n_ctx:
                extra = f" + {generate} to generate = {len(ids) + int(generate)}" if generate else ""
                which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
                raise HexRayError(f"{which} is {len(ids)} tokens{extra}, over the model's context of {n_ctx} tokens")
        bound = bind(self.bridge, interventions, features=features)
        for ids in token_lists:
            bound.check_run(len(ids), len(ids) + int(generate), int(generate))
        metric = self._grad_metric(grad, token_lists, int(generate)) if grad is not None else None
        return RecordOptions(prompts=prompts, token_lists=token_lists, output=output, act_tag=act_tag,
                             overflow={"float32": "f32", "bfloat16": "bf16"}.get(overflow, overflow),
                             top_k=min(int(top_k), self.loaded.d_vocab), generate=int(generate),
                             temperature=float(temperature), prepend_bos=bool(prepend_bos), interventions=bound,
                             grad=metric)

    def _grad_metric(self, grad, token_lists, generate: int) -> dict:
        """The --grad metric, its tokens resolved, its position checked against every prompt."""
        from .metric_spec import MetricSpec, parse_metric
        from .sweep import token_id

        spec = grad if isinstance(grad, MetricSpec) else parse_metric(grad)
        ids = [token_id(self.tokenizer, t, self.loaded.d_vocab, "grad") for t in spec.tokens]
        for toks in token_lists:
            n = len(toks) + generate
            if not -n <= spec.position < n:
                raise HexRayError(f"--grad {spec.spec!r}: position {spec.position} is outside the run's {n} tokens")
        return {**spec.describe(), "token_ids": ids}

    def attention_spec(self) -> dict | None:
        """How replay recomputes this model's attention from q and k (None: patterns are stored). Once per model."""
        if "attention" not in self.loaded.cache:
            self.loaded.cache["attention"] = attention_spec(self.bridge)
        return self.loaded.cache["attention"][0]

    def _plan(self, opts: RecordOptions, hooks, lens, progress, mode: str = "auto") -> RecordPlan:
        lm = self.loaded
        attention = self.attention_spec()
        if attention is None:
            _emit(progress, "warning", message=f"this model's attention is stored as full patterns and runs eager "
                                               f"({self.loaded.cache['attention'][1]}): traces and recording memory "
                                               "grow with the square of the context")
        key = ("plan", hooks if isinstance(hooks, str | None) else tuple(hooks))
        plan = lm.cache.get(key)
        if plan is None:
            plan = lm.cache[key] = plan_hooks(self.bridge, hooks, attention)
        # Check q/k recomputation whenever the trace relies on it: q and k recorded, patterns not.
        check = attention is not None and all(
            plan.wants(attention[w].format(layer=i)) and not plan.wants(f"blocks.{i}.attn.hook_pattern")
            for i in range(len(attention["layers"])) for w in ("q", "k"))
        cfg = self.bridge.cfg
        lens_layers = _lens_hooks(int(cfg.n_layers))
        if lens == "auto":
            # On a GPU the lens costs next to nothing; on a CPU only while it stays small next to the forward.
            longest = max(len(ids) for ids in opts.token_lists) + opts.generate
            cost = (int(cfg.n_layers) + 1) * longest * int(cfg.d_model) * lm.d_vocab
            lens = lm.input_device.type == "cuda" or cost <= LENS_AUTO_MACS
        lens = bool(lens) and all(name in plan._set for name in lens_layers)
        forward, why = self._forward(plan, attention, mode)
        if why is not None and attention is not None:  # (no spec: the warning above said so)
            _emit(progress, "warning", message=f"attention runs eager ({why}): recording memory grows with the square "
                                               "of the context")
        flash = None
        if forward == "flash":
            flash = dict(attention, lse=LSE_NAME) if check else dict(attention)
        return RecordPlan(hooks=plan, attention=flash if check and flash else attention if check else None,
                          check_attention=check, lens=lens, lens_layers=lens_layers, forward=forward, flash=flash,
                          requested=mode, fallback=why)

    def _forward(self, plan: HookPlan, attention: dict | None, mode: str) -> tuple[str, str | None]:
        """("flash" or "eager", why flash was asked for but cannot run, or None)."""
        if mode == "eager":
            return "eager", None
        if attention is None:
            return "eager", self.loaded.cache["attention"][1]
        n_layers = int(self.bridge.cfg.n_layers)
        patterns = [n for i in range(n_layers) for n in (f"blocks.{i}.attn.hook_pattern",
                                                          f"blocks.{i}.attn.hook_attn_scores") if plan.wants(n)]
        if patterns:
            why = f"--hooks asks for {patterns[0]}, which only eager attention computes"
            return "eager", (why if mode == "flash" else None)
        key = "flash_support"
        if key not in self.loaded.cache:
            self.loaded.cache[key] = flash_support(self.bridge, attention)
        why = self.loaded.cache[key]
        return ("eager", why) if why is not None else ("flash", None)

    def _meta(self, opts: RecordOptions, plan: RecordPlan, kit: kitmod.Kit, bundle: bool) -> dict:
        lm = self.loaded
        meta = {
            "hexray": {"version": _version(), "trace": "recording"},
            "model": lm.model_meta,
            "tokenizer": lm.tokenizer_meta,
            "kit": {"sha256": kit.sha256, "bundled": bool(bundle)},
            "hooks": {"set": plan.hooks.label, "requested": list(plan.hooks.requested)},
            "storage": {"act_dtype": opts.act_tag, "codec": CODEC, "chunk_bytes": 1 << 20,
                        "overflow_fallback": opts.overflow, "scales": "f32", "lens": plan.lens},
            "writer": lm.cache.setdefault("writer_meta", writer_meta(lm.device)),
        }
        if plan.attention is not None:
            meta["attention"] = plan.attention
        if plan.extra is not None:
            meta.update(plan.extra.meta)
        if opts.interventions:
            meta["interventions"] = opts.interventions.describe()
        if opts.grad is not None:
            meta["grad"] = opts.grad
        meta["forward"] = {"attention": plan.forward, "requested": plan.requested, "fallback": plan.fallback}
        if bundle:
            meta["vocab"] = kit.vocab  # a bundled trace replays with no cache: it needs the token strings too
        return meta

    def _generation_attention(self, plan: RecordPlan):
        """Generation with the KV cache runs the same attention as the recording (flash: no n × n anywhere)."""
        if plan.forward != "flash":
            return contextlib.nullcontext()
        return flash_attention(self.bridge, plan.flash)

    def _record_run(self, writer: TraceWriter, capture: Capture, plan: RecordPlan, opts: RecordOptions,
                    prompt: str, ids: list[int], seed, progress, run_tensors: dict) -> tuple[int, int]:
        """Generate (if asked), then one forward pass over the whole run. Returns (tokens, tensors written)."""
        lm, tok = self.loaded, self.tokenizer

        def on_token(done, total, rate):
            _emit(progress, "generate", done=done, total=total, tokens_per_s=rate)

        iv = opts.interventions
        iv.reset()
        with _out_of_memory(len(ids) + opts.generate, plan), self._generation_attention(plan), \
                iv.applied(self.bridge):
            gen = run_generation(self.bridge, ids, opts.generate, device=lm.input_device,
                                 temperature=opts.temperature, seed=seed,
                                 eos_token_id=getattr(tok, "eos_token_id", None), progress=on_token,
                                 window=lambda start: iv.window(start, len(ids)))
        all_ids = ids + gen.tokens
        bos = getattr(tok, "bos_token_id", None)
        prepended = int(opts.prepend_bos and bos is not None and ids[0] == bos)
        text = token_text(tok, all_ids, len(ids), prompt, prepended=prepended)
        writer.begin_run(prompt=text.text, tokens=all_ids, token_strs=text.token_strs,
                         char_spans=text.char_spans, byte_spans=text.byte_spans, n_prompt_tokens=len(ids),
                         generated=gen.info() if opts.generate else no_generation(), prepend_bos=opts.prepend_bos)
        if opts.generate:
            _emit(progress, "status", message=f"recording {len(all_ids)} tokens")
        iv.reset()
        iv.window(0, len(ids))
        # interventions are added before the capture's hooks, so the trace holds what the model used
        with _out_of_memory(len(all_ids), plan), iv.applied(self.bridge):
            logits = capture.forward(torch.tensor([all_ids], device=lm.input_device))
        iv.check_fired()
        need = _write_run_tensors(writer, self.bridge, logits, all_ids, opts.top_k)
        lens_ids = np.zeros(0, np.int64)
        if plan.lens:
            lens_ids = _write_lens(writer, self.bridge, [capture.kept[n] for n in plan.lens_layers], logits, all_ids,
                                   opts.top_k)
        n_extra = 0
        if plan.extra is not None:
            n_extra = _write_extra(writer, plan.extra, capture.kept, all_ids, opts.act_tag)
        capture.kept.clear()
        info = {"aliases": dict(capture.aliases), **_token_texts(writer, tok, need, lens_ids)}
        if capture.refired:
            info["refired"] = sorted(set(capture.refired))
        if capture.check is not None:
            info["attention"] = capture.check.run_info()
            for layer in capture.check.failed:
                _emit(progress, "warning", message=f"layer {layer}'s attention could not be recomputed from q and k "
                                                   f"within the {opts.act_tag} rounding bound; its patterns are "
                                                   "stored in the trace")
        n_grads = 0
        if opts.grad is not None:
            value, n_grads = self._write_grads(writer, plan, opts, all_ids, len(ids))
            info["grad"] = {"metric_value": value}
        for name, arr in run_tensors.items():
            writer.write(name, np.ascontiguousarray(arr))
        writer.end_run(**info)
        n_written = n_extra + n_grads + len(run_tensors) + len(capture.written) + len(RUN_TENSORS) + (
            len(LENS_TENSORS) + len(TEXT_TENSORS) if plan.lens else 0)
        return len(all_ids), n_written

    def _write_grads(self, writer: TraceWriter, plan: RecordPlan, opts: RecordOptions, all_ids: list[int],
                     n_prompt: int) -> tuple[float, int]:
        """One more forward, with gradients, through TransformerLens's ``cache_activation_and_gradient`` (its
        backward hooks deliver each gradient in the hook's own shape); writes ``grad.<name>`` for every
        recorded activation and every layer's attention pattern (AtP* needs d metric / d pattern)."""
        from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

        bridge, g = self.bridge, opts.grad
        gated = getattr(bridge, "_gated_hook_reason", lambda _n: None)
        names = [n for n in plan.hooks.names if n in bridge.hook_dict and gated(n) is None and n != "hook_unembed"]
        names += [f"blocks.{i}.attn.hook_pattern" for i in range(int(bridge.cfg.n_layers))
                  if f"blocks.{i}.attn.hook_pattern" not in names]
        ids = g["token_ids"]

        def metric(logits: torch.Tensor) -> torch.Tensor:
            lg = logits[0, g["position"]].float()
            if g["kind"] == "logprob":
                return torch.log_softmax(lg, -1)[ids[0]]
            return lg[ids[0]] - lg[ids[1]] if g["kind"] == "logit-diff" else lg[ids[0]]

        iv = opts.interventions
        iv.reset()
        iv.window(0, n_prompt)
        tokens = torch.tensor([all_ids], device=self.loaded.input_device)
        with torch.enable_grad(), iv.applied(bridge):
            gc = cache_activation_and_gradient(bridge, tokens, metric, names_filter=names)
        n = 0
        for name in names:
            if name not in gc.activations:
                continue
            grad = gc.gradients.get(name)
            if grad is None:  # the metric does not depend on it: its gradient is exactly zero
                grad = torch.zeros_like(gc.activations[name])
            x, tag, attrs = to_host(grad.detach(), opts.act_tag, overflow=opts.overflow)
            arr, dt = as_numpy(x.cpu(), tag)
            writer.write(f"grad.{name}", arr, dtype=dt, attrs=attrs or None)
            n += 1
        return float(gc.metric), n


@dataclass
class RecordOptions:
    """Everything ``Recorder.record`` was asked, checked, with the prompts tokenized."""

    prompts: list[str]
    token_lists: list[list[int]]
    output: str
    act_tag: str
    overflow: str
    top_k: int
    generate: int
    temperature: float
    prepend_bos: bool
    interventions: Interventions
    grad: dict | None = None  # meta["grad"]: the --grad metric, its token ids resolved


@dataclass
class RunExtra:
    """Per-run tensors computed while recording from activations kept in memory.

    ``hooks``: canonical hook names to keep for the run (captured even when not stored); ``compute(arrays, ids)``
    gets them as float32 numpy arrays (batch removed) and returns {tensor name: (float32 array, "act" | "raw")}:
    "act" tensors are stored in the trace's activation dtype, "raw" ones as they are (indices, offsets).
    ``meta``: merged into the trace's metadata. ``check(meta)``: called with the trace's whole metadata before the
    forward pass (interventions included); returns warnings (what ``compute`` will leave out as not exact)."""

    hooks: tuple[str, ...]
    compute: object
    meta: dict
    check: object = None


def _write_extra(writer: TraceWriter, extra: RunExtra, kept: dict, ids: list[int], act_tag: str) -> int:
    with torch.no_grad():
        arrays = {n: t[0].float().cpu().numpy() if t.dim() > 1 else t.float().cpu().numpy() for n, t in kept.items()}
    out = extra.compute(arrays, ids)
    for name, (arr, kind) in out.items():
        if kind == "act":
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]  # to_host drops a batch axis
            host, tag, attrs = to_host(t, act_tag, overflow="f32")
            arr, dt = as_numpy(host, tag)
            writer.write(name, arr, dtype=dt, attrs=attrs or None)
        else:
            writer.write(name, np.ascontiguousarray(arr))
    return len(out)


@dataclass
class RecordPlan:
    """What one recording captures: hooks, attention recomputation, logit lens."""

    hooks: HookPlan
    attention: dict | None  # meta["attention"] when replay recomputes patterns from q and k
    check_attention: bool
    lens: bool
    lens_layers: list[str]
    extra: RunExtra | None = None
    forward: str = "eager"  # how attention ran: "flash" (blockwise, flash.py) or "eager" (TransformerLens's own)
    flash: dict | None = None  # the attention spec flash.py runs with (its "lse" names the stored LSE tensors)
    requested: str = "auto"  # --attention
    fallback: str | None = None  # why flash was wanted but eager ran


def _write_run_tensors(writer: TraceWriter, bridge, logits: torch.Tensor, ids: list[int], k: int) -> np.ndarray:
    """hexray.* per-run tensors: top-k, next-token logit, logsumexp, unembedding of the tokens needed."""
    with torch.no_grad():
        n, vocab = logits.shape[1], logits.shape[2]
        ids_t = torch.tensor(ids + [ids[-1]], device=logits.device)
        step = max(1, RUN_TENSOR_BYTES // (4 * vocab))  # rows at once: float32 logits of a long run are GBs
        parts = []
        for r0 in range(0, n, step):
            lg = logits[0, r0:r0 + step].float()
            rows = torch.arange(lg.shape[0], device=lg.device)
            top = lg.topk(k, dim=-1)
            parts.append((top.indices.to(torch.int32).cpu(), top.values.cpu(), torch.logsumexp(lg, dim=-1).cpu(),
                          lg[rows, ids_t[r0 + 1:r0 + 1 + lg.shape[0]]].cpu()))
            del lg, top
        topk_ids = torch.cat([p[0] for p in parts]).numpy()
        top_values = torch.cat([p[1] for p in parts])
        lse = torch.cat([p[2] for p in parts])
        next_logit = torch.cat([p[3] for p in parts]).float()
        next_logit[-1] = float("nan")  # no next token after the last one
        need = np.unique(np.concatenate([np.asarray(ids, dtype=np.int64), topk_ids.reshape(-1).astype(np.int64)]))
        need_t = torch.as_tensor(need, device=bridge.W_U.device)
        cols = bridge.W_U[:, need_t].T.float().cpu().numpy()
        bias = bridge.b_U[need_t.to(bridge.b_U.device)].float().cpu().numpy()
    writer.write("hexray.topk_ids", topk_ids)
    writer.write("hexray.topk_logits", top_values.numpy().astype(np.float32))
    writer.write("hexray.next_logit", next_logit.cpu().numpy().astype(np.float32))
    writer.write("hexray.logsumexp", lse.cpu().numpy().astype(np.float32))
    writer.write("hexray.unembed_ids", need.astype(np.int32))
    writer.write("hexray.unembed_cols", np.ascontiguousarray(cols, dtype=np.float32))
    writer.write("hexray.unembed_bias", bias.astype(np.float32))
    return need


#: Bytes of float32 logits handled at once by ``_write_run_tensors``.
RUN_TENSOR_BYTES = 256 << 20
ATTENTION_MODES = ("auto", "flash", "eager")
#: Per layer, the softmax's log-sum-exp ``[heads, n]`` float32 (flash path): a pattern entry is exp(score - LSE).
LSE_NAME = "hexray.attn_lse.{layer}"


@contextlib.contextmanager
def _out_of_memory(n_tokens: int, plan: RecordPlan):
    """Running out of memory is one line naming the context and --attention (the writer removes the file)."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, torch.OutOfMemoryError | MemoryError) and not any(
                s in text for s in ("can't allocate memory", "out of memory", "not enough memory")):
            raise
        hint = ("; --attention flash keeps attention linear in the context" if plan.forward == "eager" and
                plan.fallback is None else "")
        raise HexRayError(f"out of memory recording {n_tokens} tokens with --attention {plan.forward} "
                          f"({_first_line(text)}){hint}; nothing was written") from None


def _first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "out of memory"
    return line if len(line) <= limit else line[: limit - 1] + "…"


LENS_AUTO_MACS = 2_000_000_000  # CPU budget for the precomputed logit lens (~40 ms at 50 GFLOP/s)
LENS_TENSORS = ("hexray.lens_topk_ids", "hexray.lens_topk_logits", "hexray.lens_logsumexp", "hexray.lens_top_logit",
                "hexray.lens_top_rank", "hexray.lens_next_logit", "hexray.lens_next_rank")


def _lens_hooks(n_layers: int) -> list[str]:
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def _write_lens(writer: TraceWriter, bridge, resids: list[torch.Tensor], logits: torch.Tensor, ids: list[int],
                k: int) -> np.ndarray:
    """The logit lens at every layer and position, computed where the model runs (a hover then reads it).

    As TransformerLens's logit_lens: the stream entering each block and the final stream, normalised
    with recomputed statistics (centred for LayerNorm; the final norm's gain is folded into W_U),
    times W_U plus b_U. Also the lens logit and rank of the model's final top prediction and of the
    actual next token, so the common targets need no full unembedding at replay. Returns the ids it mentions.
    """
    cfg = bridge.cfg
    layernorm = str(cfg.normalization_type or "LN").upper().startswith("LN")
    eps = float(getattr(cfg, "eps", 1e-5))
    with torch.no_grad():
        W_U, b_U = bridge.W_U.float(), bridge.b_U.float()
        n = logits.shape[1]
        final_top = logits[0].float().argmax(-1).to(W_U.device)
        nxt = torch.tensor(ids[1:] + [ids[-1]], device=W_U.device)
        rows = torch.arange(n, device=W_U.device)
        out = {name: [] for name in LENS_TENSORS}
        step = max(1, RUN_TENSOR_BYTES // (4 * W_U.shape[1]))  # rows at once: [rows, d_vocab] floats
        for resid in resids:  # one layer at a time, in row chunks: never [layers or n, d_vocab] floats
            layer = {name: [] for name in LENS_TENSORS}
            for r0 in range(0, n, step):
                x = resid[0, r0:r0 + step].float().to(W_U.device)
                r = rows[r0:r0 + step]
                if layernorm:
                    x = x - x.mean(-1, keepdim=True)
                lg = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)) @ W_U + b_U
                r = r - r0
                top = lg.topk(k, dim=-1)
                top_logit, next_logit = lg[r, final_top[r0:r0 + step]], lg[r, nxt[r0:r0 + step]]
                layer["hexray.lens_topk_ids"].append(top.indices.to(torch.int32))
                layer["hexray.lens_topk_logits"].append(top.values)
                layer["hexray.lens_logsumexp"].append(torch.logsumexp(lg, -1))
                layer["hexray.lens_top_logit"].append(top_logit)
                layer["hexray.lens_top_rank"].append(((lg > top_logit[:, None]).sum(-1) + 1).to(torch.int32))
                if r0 + step >= n:
                    next_logit[-1] = float("nan")  # no next token after the last one
                layer["hexray.lens_next_logit"].append(next_logit)
                layer["hexray.lens_next_rank"].append(((lg > next_logit[:, None]).sum(-1) + 1).to(torch.int32))
                del lg, top
            for name, parts in layer.items():
                out[name].append(torch.cat(parts))
    for name, parts in out.items():
        arr = torch.stack(parts).cpu().numpy()
        writer.write(name, arr if arr.dtype == np.int32 else arr.astype(np.float32))
    return np.unique(torch.stack(out["hexray.lens_topk_ids"]).cpu().numpy())


TEXT_TENSORS = ("hexray.extra_token_ids", "hexray.extra_token_offsets", "hexray.extra_token_text")


def _token_texts(writer: TraceWriter, tok, need: np.ndarray, lens_ids: np.ndarray) -> dict:
    """The text of every token id the run's tensors mention. Run info: ``unembed_strs`` (one per
    hexray.unembed_ids) and ``partial_token_bytes`` ([id, bytes] of those holding part of a UTF-8
    character). The logit lens's further ids (thousands for a large vocabulary) go to tensors, read
    only when such a token is shown, so opening a trace stays fast: ``hexray.extra_token_ids``, and
    their UTF-8 texts laid end to end in ``hexray.extra_token_text`` at ``hexray.extra_token_offsets``."""
    extra = np.setdiff1d(lens_ids, need)
    strs, partial = mentioned_token_texts(tok, np.concatenate([need, extra]))
    if lens_ids.size:
        blobs = [t.encode("utf-8", errors="surrogatepass") for t in strs[len(need):]]
        offsets = np.zeros(len(blobs) + 1, np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        writer.write("hexray.extra_token_ids", extra.astype(np.int32))
        writer.write("hexray.extra_token_offsets", offsets)
        writer.write("hexray.extra_token_text", np.frombuffer(b"".join(blobs), np.uint8))
    return {"unembed_strs": strs[:len(need)], "partial_token_bytes": partial}


def _emit(progress, event: str, **info) -> None:
    if progress is not None:
        progress(event, **info)


def _version() -> str:
    from hexray_core import __version__

    return __version__


def record(prompts, model="gpt2", output: str | os.PathLike | None = None, *, tokenizer=None,
           device: str | None = "auto", dtype="float32", n_devices: int | None = None, device_map=None,
           trust_remote_code: bool = False, revision: str | None = None, progress=None, **opts) -> str:
    """Record one prompt or a list of prompts (one run each) and return the trace's path.

    ``model``: a hub id, a local folder, a .gguf file, ``"hexray-demo"``, a ``TransformerBridge``, or a
    Hugging Face model (with ``tokenizer=``). Other options as ``Recorder.record``: ``hooks``,
    ``act_dtype``, ``top_k``, ``generate``, ``temperature``, ``seed``, ``prepend_bos``, ``bundle``,
    ``cache_dir``. Without ``output`` the trace goes to ``$HEXRAY_CACHE/traces/``.
    """
    rec = Recorder(model, tokenizer=tokenizer, device=device, dtype=dtype, n_devices=n_devices,
                   device_map=device_map, trust_remote_code=trust_remote_code, revision=revision, progress=progress)
    return rec.record(prompts, output, progress=progress, **opts).path
