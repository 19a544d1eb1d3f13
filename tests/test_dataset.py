"""Datasets in one process: record a prompts file into OUT/ shards, resume, aggregate, fuzz.

Everything runs the embedded demo model for real; aggregates are checked against `hexray replay
--json` of every run, fuzz deltas against recording each variant directly.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from hexray.cli.main import main
from hexray_core.dataset import layout as datasetstore

PROMPTS = [
    "It is a truth universally acknowledged, that a single man",
    "Elizabeth had three letters to answer.",
    "He spoke with the greatest kindness, and the rest of",
    '"I am very glad to see you," said Emma.',
    "Mr. Darcy walked",
    "The ball was to be on Tuesday, and",
    "She could not help smiling at",
    "Mrs. Bennet was",
    "Jane and Elizabeth",
    "They went to the",
    "It was the",
]


def rows():
    out = []
    for i, p in enumerate(PROMPTS):
        row = {"prompt": p, "id": f"q{i}", "source": "austen", "n": i}
        if i % 3 == 1:
            row["target"] = " the"
        if i % 4 == 2:
            row["target"], row["baseline"] = " the", " a"
        out.append(row)
    return out


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def manifest(out) -> list[dict]:
    with open(os.path.join(out, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def shard_runs(out) -> list[tuple[str, int, str]]:
    """(shard, run, prompt) of every run in every shard trace on disk."""
    from trace_format import TraceReader

    found = []
    for name in sorted(os.listdir(os.path.join(out, "shards"))):
        if name.endswith(".hxr"):
            with TraceReader(os.path.join(out, "shards", name)) as r:
                found += [(name, int(run["id"]), run["prompt"]) for run in r.runs]
    return found


def assert_exactly_once(out, items):
    entries = manifest(out)
    assert sorted(map(str, (e["id"] for e in entries))) == sorted(map(str, (r["id"] for r in items)))
    assert len({e["id"] for e in entries}) == len(items)
    on_disk = shard_runs(out)
    assert len(on_disk) == len(items)  # no shard holds a prompt twice, none is left over
    by_place = {(f"shards/{s}", run): p for s, run, p in on_disk}
    prompts = {r["id"]: r["prompt"] for r in items}
    for e in entries:
        assert by_place[(e["shard"], e["run"])] == prompts[e["id"]]
    assert not [n for n in os.listdir(os.path.join(out, "shards")) if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def demo(tiny):
    from hexray_core.record import Recorder

    return Recorder("hexray-demo", device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny):
    """The prompts recorded by the CLI into a folder (in process, float32 activations)."""
    tmp = tmp_path_factory.mktemp("ds")
    src = write_jsonl(tmp / "data.jsonl", rows())
    out = str(tmp / "out") + "/"
    assert main(["record", "--model", "hexray-demo", "--prompts-file", src, "-o", out, "--shard-size", "4",
                 "--act-dtype", "float32", "-q"]) == 0
    return out


def test_records_every_prompt_exactly_once_with_its_metadata(dataset):
    assert_exactly_once(dataset, rows())
    entries = manifest(dataset)
    assert [e["id"] for e in entries] == [r["id"] for r in rows()]  # one session: the file's order
    assert len({e["shard"] for e in entries}) == 3  # 11 prompts, 4 per shard
    by_id = {e["id"]: e for e in entries}
    for r in rows():
        e = by_id[r["id"]]
        assert e["meta"] == {"source": "austen", "n": r["n"]}
        assert e["target"] == r.get("target") and e["baseline"] == r.get("baseline")
    info = json.load(open(os.path.join(dataset, "dataset.json")))
    assert info["model"] == "hexray-demo" and info["record"]["act_dtype"] == "float32"
    assert info["last"]["prompts"] == info["last"]["recorded"] == len(PROMPTS)


def test_rerun_records_nothing_and_keeps_the_shards(dataset, capsys):
    folder = os.path.join(dataset, "shards")
    before = {n: os.stat(os.path.join(folder, n)).st_ino for n in os.listdir(folder)}
    src = os.path.join(os.path.dirname(dataset.rstrip("/")), "data.jsonl")
    rc, out, _ = run_cli(capsys, "record", "--model", "hexray-demo", "--prompts-file", src, "-o", dataset,
                         "--shard-size", "4", "--act-dtype", "float32", "-q")
    assert rc == 0 and "recorded 0 prompts" in out and "11 already recorded" in out
    after = {n: os.stat(os.path.join(folder, n)).st_ino for n in os.listdir(folder)}
    assert after == before


def test_resume_after_an_interrupted_run(demo, tmp_path):
    from hexray_core.dataset.writer import record_dataset

    items = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    out = str(tmp_path / "out")

    def stop_after_first_shard(event, **info):
        if event == "shard_done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_dataset(items, out, model="hexray-demo", recorder=demo, shard_size=3, progress=stop_after_first_shard)
    first = manifest(out)
    assert [e["id"] for e in first] == [0, 1, 2]  # the manifest lists what landed before the interrupt
    assert len(shard_runs(out)) == 3
    kept = {n: os.stat(os.path.join(out, "shards", n)).st_mtime_ns for n in os.listdir(os.path.join(out, "shards"))}
    info = json.load(open(os.path.join(out, "dataset.json")))
    assert info["last"] == {**info["last"], "prompts": 11, "recorded": 3}

    result = record_dataset(items, out, model="hexray-demo", recorder=demo, shard_size=3)
    assert (result.skipped, result.recorded, result.manifest) == (3, 8, 11)
    assert_exactly_once(out, items)
    for n, mtime in kept.items():  # the shard recorded before the interrupt was not touched
        assert os.stat(os.path.join(out, "shards", n)).st_mtime_ns == mtime

    more = items + [{"prompt": "Emma was", "id": 11}]  # a grown file: only the new row is recorded
    result = record_dataset(more, out, model="hexray-demo", recorder=demo, shard_size=3)
    assert (result.skipped, result.recorded) == (11, 1)
    assert_exactly_once(out, more)


def test_a_shard_that_never_landed_is_cleaned_and_redone(demo, tmp_path):
    """A worker killed mid-shard leaves its sidecar and a temporary trace; the next run redoes the shard."""
    from hexray_core.dataset.writer import record_dataset

    items = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS[:4])]
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    name = datasetstore.shard_name([datasetstore.make_row(items[0], 1, "x")])
    (out / "shards" / f"{name}.json").write_text('{"shard": "x", "rows": [{"id": 0}]}')
    (out / "shards" / f".{name}.hxr.999.deadbeef.tmp").write_bytes(b"HXR half")
    result = record_dataset(items, out, model="hexray-demo", recorder=demo, shard_size=2)
    assert result.recorded == 4
    assert_exactly_once(str(out), items)


def replay_json(capsys, shard, run, *extra):
    rc, out, err = run_cli(capsys, "replay", shard, "--run", str(run), "--json", "--top-k", "100000", *extra)
    assert rc == 0, err
    return json.loads(out)["attribution"]


@pytest.mark.parametrize("by", ["component", "head"])
def test_aggregate_is_the_mean_of_each_runs_replay(dataset, capsys, by):
    per_label: dict[str, list[float]] = {}
    logits = []
    for e in manifest(dataset):
        extra = ["--by", by]
        if e["target"]:
            extra += ["--target", e["target"]]
        if e["baseline"]:
            extra += ["--baseline", e["baseline"]]
        a = replay_json(capsys, os.path.join(dataset, e["shard"]), e["run"], *extra)
        logits.append(a["logit"])
        for c in a["top"]:  # every contribution but the bias, labelled as replay labels them
            per_label.setdefault(c["label"], []).append(c["value"])
    n = len(logits)
    assert n == len(PROMPTS) and all(len(v) == n for v in per_label.values())

    rc, out, err = run_cli(capsys, "aggregate", dataset, "--by", by, "--json")
    assert rc == 0, err
    agg = json.loads(out)["aggregate"]
    assert agg["n"] == n and agg["by"] == by
    assert {r["label"] for r in agg["rows"]} == set(per_label)
    means = [abs(r["mean"]) for r in agg["rows"]]
    assert means == sorted(means, reverse=True)
    for r in agg["rows"]:
        v = np.array(per_label[r["label"]])
        assert r["mean"] == pytest.approx(v.mean(), abs=1e-9)
        assert r["std"] == pytest.approx(v.std(ddof=1), abs=1e-9)
        assert r["frac_positive"] == pytest.approx((v > 0).mean())
        half = 2.2281 * v.std(ddof=1) / math.sqrt(n)  # Student t, 10 degrees of freedom
        assert r["ci95"] == pytest.approx([v.mean() - half, v.mean() + half], abs=1e-9)
    assert agg["logit"]["mean"] == pytest.approx(np.mean(logits), abs=1e-9)

    if by == "component":
        import hexray

        ds = hexray.open_dataset(dataset)
        assert len(ds) == n and ds.complete
        py = ds.aggregate(by=by, jobs=2)  # two processes, merged moments
        assert py.labels == [r["label"] for r in agg["rows"]]
        np.testing.assert_allclose(py.mean, [r["mean"] for r in agg["rows"]], atol=1e-12)
        np.testing.assert_allclose(py.ci95, [r["ci95"] for r in agg["rows"]], atol=1e-12)
        rc, csv_out, _ = run_cli(capsys, "aggregate", dataset, "--csv", "--top-k", "3")
        lines = csv_out.splitlines()
        assert lines[0].startswith("label,mean,std") and len(lines) == 4
        assert lines[1].split(",")[0] == agg["rows"][0]["label"]
        rc, table, _ = run_cli(capsys, "aggregate", dataset, "--top-k", "4")
        assert f"Attribution over {n} runs" in table
        from hexray.cli.render import aligned

        # labels as `hexray replay` prints them ("MLP  L0", "Attn L1"), never "MLP L0"
        assert all(aligned(r["label"]) in table for r in agg["rows"][:4]) and "MLP L" not in table


def test_open_dataset_iterates_runs_across_shards(dataset):
    import hexray

    ds = hexray.open_dataset(dataset)
    seen = []
    for r in ds:
        seen.append(r.id)
        assert r.prompt == PROMPTS[int(r.id[1:])]
        assert r.meta["source"] == "austen"
        a = r.attribution()
        assert a.error < 1e-4  # float32 activations: parts sum to the recorded logit
        if r.target:
            assert a.target == r.target
    assert seen == [f"q{i}" for i in range(len(PROMPTS))]


def test_bad_dataset_input_is_one_line(tmp_path, capsys):
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}])
    rc, _, err = run_cli(capsys, "record", "--model", "hexray-demo", "--prompts-file", dup, "-o", f"{tmp_path}/o/")
    assert rc == 1 and err.strip() == f"hexray: error: {dup}: id 1 is used twice (lines 1 and 2)"
    assert len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    rc, _, err = run_cli(capsys, "record", "--model", "hexray-demo", "--prompts-file", str(bad), "-o", f"{tmp_path}/o/")
    assert rc == 1 and f"{bad}:2" in err and "prompt" in err
    rc, _, err = run_cli(capsys, "aggregate", str(tmp_path))
    assert rc == 1 and "not a HexRay dataset" in err
    rc, _, err = run_cli(capsys, "aggregate", str(tmp_path / "nope"))
    assert rc == 1 and "no such folder" in err


def test_a_folder_recorded_otherwise_is_refused(dataset, capsys):
    src = os.path.join(os.path.dirname(dataset.rstrip("/")), "data.jsonl")
    rc, _, err = run_cli(capsys, "record", "--model", "hexray-demo", "--prompts-file", src, "-o", dataset, "-q")
    assert rc == 1 and "other options" in err and "act_dtype" in err


def test_unknown_target_names_the_prompt(tmp_path, demo, capsys):
    from hexray_core.dataset.writer import record_dataset

    out = tmp_path / "out"
    record_dataset([{"prompt": "It was the", "id": "x", "target": "no such token here"}], out, model="hexray-demo",
                   recorder=demo)
    rc, _, err = run_cli(capsys, "aggregate", str(out))
    assert rc == 1 and 'prompt id "x" (line 1)' in err and "unknown target token" in err


FUZZ_PROMPT = "She could not help smiling at"


def test_fuzz_deltas_equal_recording_the_variants_directly(tmp_path, capsys):
    out = tmp_path / "fz"
    rc, text, err = run_cli(capsys, "fuzz", "--model", "hexray-demo", "--prompt", FUZZ_PROMPT, "--alternatives", "2",
                            "-o", str(out), "--json")
    assert rc == 0, err
    fz = json.loads(text)["fuzz"]
    tid = fz["target_id"]
    tokens = fz["tokens"]
    assert sorted(t["position"] for t in tokens) == list(range(1, len(tokens) + 1))  # every token but BOS
    deltas = [abs(t["delta_logit"]) for t in tokens]
    assert deltas == sorted(deltas, reverse=True)
    for t in tokens:  # each token's figure is its largest-moving variant
        mine = [v for v in fz["variants"] if v["position"] == t["position"]]
        assert {v["kind"] for v in mine} == {"delete", "replace"}
        assert abs(t["delta_logit"]) == max(abs(v["delta_logit"]) for v in mine)

    def direct(prompt: str) -> tuple[float, float]:
        path = str(tmp_path / "direct.hxr")
        rc, _, err = run_cli(capsys, "record", "--model", "hexray-demo", "--prompt", prompt, "--act-dtype", "float32",
                             "-o", path, "-q")
        assert rc == 0, err
        rc, o, err = run_cli(capsys, "replay", path, "--target", f"#{tid}", "--json")
        a = json.loads(o)["attribution"]
        prob = a["probability"]
        if prob is None:
            from hexray_core.replay import open_trace

            with open_trace(path) as t:
                prob = float(np.exp(a["logit"] - t.tensor("hexray.logsumexp")[a["position"]]))
        return a["logit"], prob

    base_logit, base_prob = direct(FUZZ_PROMPT)
    assert fz["base_logit"] == pytest.approx(base_logit, abs=1e-5)
    assert fz["base_prob"] == pytest.approx(base_prob, abs=1e-6)
    for t in tokens[:3]:
        w = t["worst_variant"]
        logit, prob = direct(w["prompt"])
        assert t["delta_logit"] == pytest.approx(logit - base_logit, abs=1e-5)
        assert t["delta_prob"] == pytest.approx(prob - base_prob, abs=1e-6)

    # the variants' traces are a dataset: replayable and aggregatable
    rc, agg, err = run_cli(capsys, "aggregate", str(out), "--target", f"#{tid}", "--json")
    assert rc == 0 and json.loads(agg)["aggregate"]["n"] == len(fz["variants"]) + 1
    rc, table, err = run_cli(capsys, "fuzz", "--model", "hexray-demo", "--prompt", FUZZ_PROMPT, "--alternatives", "2",
                             "-o", str(out), "-q")
    assert rc == 0 and "Tokens by how much perturbing them moves the target" in table
    assert f"{tokens[0]['position']:>3}" in table


def test_fuzz_user_variants(tmp_path, capsys):
    extra = tmp_path / "v.txt"
    extra.write_text("She could not help laughing at\nHe could not help smiling at\n")
    rc, text, err = run_cli(capsys, "fuzz", "--model", "hexray-demo", "--prompt", FUZZ_PROMPT, "--alternatives", "0",
                            "--variants", str(extra), "--json")
    assert rc == 0, err
    fz = json.loads(text)["fuzz"]
    users = [v for v in fz["variants"] if v["kind"] == "user"]
    assert [v["prompt"] for v in users] == extra.read_text().splitlines()
    assert {v["kind"] for v in fz["variants"]} == {"delete", "user"}


def test_aggregate_needs_neither_torch_nor_ray(dataset):
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['ray'] = None; "
            "from hexray.cli.main import main; rc = main(['aggregate', sys.argv[1], '--json', '--jobs', '2']); "
            "import hexray; ds = hexray.open_dataset(sys.argv[1]); n = sum(1 for _ in ds); "
            "bad = [m for m in ('torch', 'transformer_lens', 'transformers', 'ray') if sys.modules.get(m)]; "
            "print('IMPORTED', bad, n); sys.exit(rc)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, dataset], capture_output=True, text=True, cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"IMPORTED [] {len(PROMPTS)}" in out.stdout
    assert json.loads(out.stdout[:out.stdout.rindex("IMPORTED")])["aggregate"]["n"] == len(PROMPTS)


def test_attention_reaches_every_shard_and_a_resume_must_agree(tmp_path, capsys):
    """`--attention` is a recording option of datasets too: each shard's metadata says which path ran, a
    resume with another path is refused, and a dataset.json written before the option existed resumes."""
    from trace_format import TraceReader

    src = write_jsonl(tmp_path / "data.jsonl", rows()[:3])
    out = str(tmp_path / "out") + "/"
    args = ["record", "--model", "hexray-demo", "--prompts-file", src, "-o", out, "--shard-size", "2", "-q"]
    assert run_cli(capsys, *args, "--attention", "eager")[0] == 0
    shards = sorted(n for n in os.listdir(os.path.join(out, "shards")) if n.endswith(".hxr"))
    assert len(shards) == 2
    for name in shards:
        with TraceReader(os.path.join(out, "shards", name)) as r:
            assert r.meta["forward"]["attention"] == "eager" and r.meta["forward"]["requested"] == "eager"
    info_path = os.path.join(out, "dataset.json")
    assert json.load(open(info_path))["record"]["attention"] == "eager"
    rc, _, err = run_cli(capsys, *args, "--attention", "flash")
    assert rc == 1 and "other options" in err and "attention: 'eager' then, 'flash' now" in err

    info = json.load(open(info_path))  # as an older HexRay wrote it: no attention option
    del info["record"]["attention"]
    with open(info_path, "w") as f:
        json.dump(info, f)
    rc, printed, _ = run_cli(capsys, *args)
    assert rc == 0 and "recorded 0 prompts" in printed
