"""Datasets on a real local Ray cluster (``ray.init(num_cpus=2)``, started once for this module).

Two CPU actors each load the embedded demo model and record shards through Ray Data. The tests
check, through the manifest and the shard traces on disk, that every prompt is recorded exactly
once: on a normal run, when a worker process is SIGKILLed while it writes a shard, and when a run
is interrupted and then resumed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest
from prereq import require_module

pytestmark = pytest.mark.slow  # a local Ray cluster whose workers each load the demo model

ray = require_module("ray", "the [dev] or [ray] extra: pip install 'ray[data]'", module_level=True)

from ray_support import local_ray  # noqa: E402
from test_dataset import PROMPTS, assert_exactly_once, manifest, run_cli  # noqa: E402

from hexray_core.dataset.writer import record_dataset  # noqa: E402

ITEMS = [{"prompt": f"{p} {k}", "id": f"r{k}-{i}", "k": k} for k in range(2) for i, p in enumerate(PROMPTS)]  # 22


@pytest.fixture(scope="module")
def cluster():
    with local_ray() as ray:
        yield ray


def events():
    seen = []

    def progress(event, **info):
        seen.append((event, {**info, "at": time.monotonic()}))

    return seen, progress


def test_every_prompt_exactly_once_on_two_workers(cluster, tmp_path):
    seen, progress = events()
    out = str(tmp_path / "out")
    result = record_dataset(ITEMS, out, model="hexray-demo", ray="auto", shard_size=3, progress=progress)
    assert (result.engine, result.workers, result.recorded, result.manifest) == ("ray", 2, 22, 22)
    assert_exactly_once(out, ITEMS)
    done = [info for e, info in seen if e == "shard_done"]
    assert len(done) == 8 and done[-1]["done"] == 22  # 22 prompts in shards of 3
    assert len({d["pid"] for d in done}) == 2 and all(d["pid"] != os.getpid() for d in done)  # two actors
    assert all(d["rate"] > 0 for d in done) and done[-1]["eta"] == 0
    meta = {e["id"]: e["meta"] for e in manifest(out)}
    assert all(meta[r["id"]] == {"k": r["k"]} for r in ITEMS)


def test_a_worker_killed_mid_shard_is_replaced_and_the_job_completes(cluster, tmp_path):
    out = tmp_path / "out"
    shards = out / "shards"
    killed: list[int] = []

    def killer():
        # A worker writes a shard under ".NAME.hxr.<pid>.<random>.tmp" until it is complete: kill the
        # process that owns the first one seen, while it is writing.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if shards.is_dir():
                for n in os.listdir(shards):
                    m = re.match(r"^\.shard-.*\.hxr\.(\d+)\.[0-9a-f]+\.tmp$", n)
                    if m:
                        os.kill(int(m.group(1)), signal.SIGKILL)
                        killed.append((int(m.group(1)), time.monotonic()))
                        break
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    seen, progress = events()
    result = record_dataset(ITEMS, str(out), model="hexray-demo", ray="auto", shard_size=2, progress=progress)
    thread.join(timeout=5)
    assert killed, "no worker was seen writing a shard"
    assert result.recorded == 22 and result.manifest == 22
    assert_exactly_once(str(out), ITEMS)  # also: no temporary file of the dead worker is left
    pid, when = killed[0]
    assert not [i for e, i in seen if e == "shard_done" and i["pid"] == pid and i["at"] > when + 1]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_fuzz_on_ray_equals_fuzz_in_process(cluster, tmp_path):
    from hexray.cli.fuzz_cmd import fuzz

    on_ray = fuzz("It was the", str(tmp_path / "ray"), model="hexray-demo", alternatives=1, ray="auto")
    local = fuzz("It was the", str(tmp_path / "local"), model="hexray-demo", alternatives=1, device="cpu")
    assert on_ray.target_id == local.target_id and on_ray.base_logit == pytest.approx(local.base_logit, abs=1e-6)
    assert [t["position"] for t in on_ray.tokens] == [t["position"] for t in local.tokens]
    for a, b in zip(on_ray.tokens, local.tokens, strict=True):
        assert a["delta_logit"] == pytest.approx(b["delta_logit"], abs=1e-5)
        assert a["worst_variant"] == b["worst_variant"]
    assert len(manifest(str(tmp_path / "ray"))) == len(on_ray.variants) + 1


def test_resume_after_an_interrupted_ray_run(cluster, tmp_path, capfd):
    capsys = capfd  # file descriptor 2 too: Ray's native lines would land there
    out = str(tmp_path / "out")

    def stop(event, **info):
        if event == "shard_done" and info["done"] >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_dataset(ITEMS, out, model="hexray-demo", ray="auto", shard_size=2, progress=stop)
    partial = len(manifest(out))
    assert 4 <= partial < 22
    assert json.load(open(os.path.join(out, "dataset.json")))["last"]["recorded"] == partial

    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    rc, text, err = run_cli(capsys, "record", "--model", "hexray-demo", "--prompts-file", str(src), "-o", out,
                            "--ray", "--shard-size", "2")
    assert rc == 0, err
    m = re.search(r"recorded (\d+) prompts in \d+ shards, (\d+) already recorded", text)
    assert m and int(m.group(1)) + int(m.group(2)) == 22 and int(m.group(2)) >= partial
    assert "prompts/s" in err and "Ray worker" in err  # progress on stderr
    assert "core_worker" not in err and not re.search(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [EWI] \d+ \d+\]", err, re.M)
    assert_exactly_once(out, ITEMS)

    # the aggregate reduced as Ray tasks equals the one of local processes
    rc, on_ray, err = run_cli(capsys, "aggregate", out, "--ray", "--json")
    assert rc == 0, err
    rc, local, err = run_cli(capsys, "aggregate", out, "--json", "--jobs", "1")
    a, b = json.loads(on_ray)["aggregate"], json.loads(local)["aggregate"]
    assert a["n"] == b["n"] == 22
    assert [r["label"] for r in a["rows"]] == [r["label"] for r in b["rows"]]
    for x, y in zip(a["rows"], b["rows"], strict=True):
        assert x["mean"] == pytest.approx(y["mean"], abs=1e-12) and x["std"] == pytest.approx(y["std"], abs=1e-12)

    # a shard gone missing: one line from the Ray task, not its remote traceback
    gone = os.path.join(out, manifest(out)[0]["shard"])
    os.unlink(gone)
    rc, _, err = run_cli(capsys, "aggregate", out, "--ray")
    assert rc == 1 and err == f"hexray: error: {gone}: no such file\n"
