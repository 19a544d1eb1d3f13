"""`hexray view`'s server and `hexray report`, over real HTTP and real files (no browser here).

The server must refuse requests without its token, refuse path traversal however it is encoded,
serve only the traces named on the command line, listen on loopback only, and answer with the
figures `hexray replay --json` prints.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys

import pytest
from viewer_support import REPO, Served, env, hexray, record_demo, replay_json


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory):
    return record_demo(tmp_path_factory.mktemp("viewer-server"))


@pytest.fixture(scope="module")
def served(demo_trace):
    s = Served(demo_trace)
    yield s
    s.close()


def raw_get(s: Served, path: str, host: str | None = None) -> tuple[int, bytes]:
    """A GET with the path sent exactly as given (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host or f"127.0.0.1:{s.port}")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def api(s: Served, view: str, **params) -> tuple[int, object]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, body = raw_get(s, f"/{s.token}/api/{view}?{query}")
    return status, json.loads(body)


def test_url_is_the_first_line_and_the_page_is_served(served):
    assert served.host == "127.0.0.1"
    status, body = raw_get(served, f"/{served.token}/")
    assert status == 200
    assert b'id="hexray-app"' in body and b"Content-Security-Policy" in body
    assert b"connect-src 'self'" in body


@pytest.mark.parametrize("path", ["/", "/index.html", "/api/overview", "/{bad}/", "/{bad}/api/overview",
                                  "/{half}/api/overview", "/{tok}x/api/overview"])
def test_requests_without_the_token_are_refused(served, path):
    bad = "A" * len(served.token)
    status, body = raw_get(served, path.format(bad=bad, half=served.token[: len(served.token) // 2], tok=served.token))
    assert status == 403
    assert body == b"403 Forbidden\n"  # nothing of the page or the traces


@pytest.mark.parametrize("path", [
    "/../../etc/passwd",
    "/{tok}/../../etc/passwd",
    "/{tok}/%2e%2e/%2e%2e/etc/passwd",
    "/{tok}/..%2f..%2f..%2fetc%2fpasswd",
    "/{tok}/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
    "/{tok}/api/..%2f..%2fetc%2fpasswd",
    "/{tok}/..\\..\\etc\\passwd",
    "/{tok}//etc/passwd",
    "/{tok}/etc/passwd",
    "/{tok}/static/viewer.js",
    "/{tok}/api/overview/../../../../etc/passwd",
])
def test_path_traversal_is_refused(served, path):
    status, body = raw_get(served, path.format(tok=served.token))
    assert 400 <= status < 500
    assert b"root:" not in body


def test_a_foreign_host_header_is_refused(served):  # DNS rebinding: evil.example resolving to 127.0.0.1
    status, _ = raw_get(served, f"/{served.token}/api/overview", host=f"evil.example:{served.port}")
    assert status == 403
    assert raw_get(served, f"/{served.token}/api/overview", host=f"localhost:{served.port}")[0] == 200


def test_only_the_named_traces_are_served(served, demo_trace):
    status, body = api(served, "overview")
    assert status == 200 and [t["name"] for t in body] == [os.path.basename(demo_trace)]
    for t in ("1", "-1", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd"):
        status, body = api(served, "detail", t=t, run=0, pos=0)
        assert status == 400 and "error" in body
    status, body = api(served, "detail", run=7, pos=0)
    assert status == 400 and "run 7" in body["error"]
    status, body = api(served, "detail", run=0, pos=10_000)
    assert status == 400 and "out of range" in body["error"]
    assert raw_get(served, f"/{served.token}/api/nothing")[0] == 404
    many = "&".join(f"x{i}=1" for i in range(50))
    assert raw_get(served, f"/{served.token}/api/overview?{many}")[0] == 400
    assert raw_get(served, f"/{served.token}/api/overview?" + "x" * 5000)[0] == 414
    assert api(served, "detail", run=0, pos="1e9")[0] == 400


def test_listens_on_loopback_only(served):
    with open("/proc/net/tcp") as f:  # Linux: local address of the listening socket (state 0A)
        rows = [line.split() for line in f.readlines()[1:]]
    listening = [r[1] for r in rows if r[3] == "0A" and int(r[1].split(":")[1], 16) == served.port]
    assert listening == [f"0100007F:{served.port:04X}"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # this machine's outward address (no packet sent)
        try:
            probe.connect(("10.255.255.255", 9))
            outward = probe.getsockname()[0]
        except OSError:
            outward = None
    if outward and not outward.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((outward, served.port), timeout=2).close()


def test_figures_equal_replay_json(served, demo_trace):
    _, overview = api(served, "overview")
    run = overview[0]["runs"][0]
    for pos in (5, len(run["labels"]) - 1):
        _, detail = api(served, "detail", run=0, pos=pos)
        cli = replay_json("replay", demo_trace, "--position", pos, "--top-k", 1000)["attribution"]
        assert [(c["label"], f"{c['value']:+.2f}") for c in detail["attribution"]["contributions"]] == \
               [(c["label"], f"{c['value']:+.2f}") for c in cli["contributions"]]
        assert detail["attribution"]["target"] == cli["target"]
        assert detail["attribution"]["logit"] == pytest.approx(cli["logit"], abs=1e-9)
        heads = replay_json("replay", demo_trace, "--position", pos, "--by", "head", "--top-k", 1000)["attribution"]
        for c in heads["contributions"]:
            if c["kind"] == "head":
                assert detail["heads"][c["layer"]][c["index"]] == pytest.approx(c["value"], abs=1e-9)
        att = replay_json("replay", demo_trace, "--position", pos, "--attention", "--top-k", 3)["attention"]
        for h in att["heads"]:
            assert detail["attention"]["focus"][h["layer"]][h["head"]] == pytest.approx(h["focus"], abs=1e-9)
    _, lens = api(served, "lens", run=0, start=10, end=12)
    cli_lens = replay_json("replay", demo_trace, "--position", 11, "--lens")["lens"]
    assert lens["columns"][1]["prob"] == pytest.approx([x["target_prob"] for x in cli_lens["layers"]], abs=1e-9)
    _, cot = api(served, "cot", run=0)
    cli_cot = replay_json("replay", demo_trace, "--cot")["cot"]
    assert [s["text"] for s in cot["steps"]] == [s["text"] for s in cli_cot["steps"]]
    _, diff = api(served, "diff", ta=0, ra=0, pa=-1, tb=0, rb=1, pb=-1)
    cli_diff = json.loads(hexray("diff", demo_trace, "--runs", "0", "1", "--json", "--top-k", 20).stdout)
    assert [(r["label"], round(r["delta"], 6)) for r in diff["rows"]] == \
           [(r["label"], round(r["delta"], 6)) for r in cli_diff["rows"]]


def test_attention_rows_are_the_replay_rows_heavy_keys(served, demo_trace):
    from hexray_core.replay import open_trace
    from hexray_core.replay.attention import attention_row
    from hexray_view.data import KEY_MIN, TOP_KEYS

    _, rows = api(served, "attention", run=0, pos=40, layer=2, head=2)
    row = attention_row(open_trace(demo_trace), 0, 2, 40)[2][:41]  # what `hexray replay --attention` reads
    top = set(sorted(range(41), key=lambda k: -row[k])[:TOP_KEYS])  # listed even when under KEY_MIN
    heavy = [k for k in range(41) if row[k] >= KEY_MIN or k in top]
    assert 0 < len(heavy) < 41, "the case must have both heavy and light keys"
    assert [k for k, _ in rows["keys"]] == heavy and rows["n_keys"] == 41
    assert [w for _, w in rows["keys"]] == pytest.approx([float(row[k]) for k in heavy], rel=1e-5)  # float32 sums
    assert rows["rest"] == pytest.approx(float(sum(row[k] for k in range(41) if k not in heavy)), abs=1e-6)
    assert rows["rest"] >= 0 and sum(w for _, w in rows["keys"]) + rows["rest"] == pytest.approx(1.0, abs=2e-3)
    assert len(rows["window"]) == 41 - rows["first"]
    assert rows["window"][-1] == pytest.approx(row[rows["first"]:].tolist(), rel=1e-5)
    status, body = api(served, "attention", run=0, pos=20, layer=9, head=0)
    assert status == 400 and "L9H0" in body["error"]


def test_view_and_report_refuse_bad_input_in_one_line(tmp_path):
    missing = tmp_path / "missing.hxr"
    junk = tmp_path / "junk.hxr"
    junk.write_bytes(b"not a trace at all" * 10)
    for args in (("view", missing, "--no-browser"), ("report", missing, "-o", tmp_path / "r.html"),
                 ("view", junk, "--no-browser"), ("report", junk, "-o", tmp_path / "r.html")):
        out = hexray(*args, check=False, timeout=60)
        assert out.returncode == 1, out
        assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("hexray: error")
    assert not (tmp_path / "r.html").exists()


def test_report_is_one_offline_file(demo_trace, tmp_path):
    out = tmp_path / "r.html"
    result = hexray("report", demo_trace, "-o", out, "--detail", 5)
    assert "wrote" in result.stdout
    text = out.read_text(encoding="utf-8")
    assert "default-src 'none'" in text and "connect-src" not in text
    # nothing that could reach the network: no external URLs in src/href attributes, no fetch of a URL
    for pattern in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert pattern not in text
    payload = json.loads(text.split('<script type="application/json" id="hexray-data">')[1].split("</script>")[0])
    assert len([k for k in payload["details"] if k.startswith("0.0.")]) == 5
    assert f"0.0.{len(payload['traces'][0]['runs'][0]['labels']) - 1}" in payload["details"]
    assert len(payload["diffs"]) == 1


def test_another_address_needs_host_and_still_the_token(demo_trace):
    s = Served(demo_trace, extra=("--host", "127.0.0.2"))
    try:
        assert s.host == "127.0.0.2"
        conn = http.client.HTTPConnection("127.0.0.2", s.port, timeout=30)
        conn.request("GET", "/api/overview", headers={"Host": "hexray.example"})
        resp = conn.getresponse()
        assert resp.status == 403 and resp.read()
        conn.request("GET", f"/{s.token}/api/overview", headers={"Host": "hexray.example"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()  # a chosen address: any Host name, the token still guards
        conn.close()
        with pytest.raises(OSError):  # and nothing on 127.0.0.1
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
    finally:
        s.close()
    assert "anyone who can reach it" in s.proc.stderr.read()


@pytest.mark.slow  # the CLI in a subprocess that records (imports torch): the slow tier
def test_a_trace_without_lens_attention_or_heads_still_reports_and_serves(tmp_path):
    trace = tmp_path / "sparse.hxr"
    hexray("record", "--model", "hexray-demo", "--device", "cpu", "--prompt", "The cat sat on the mat.",
           "--lens", "off", "--hooks", "hook_embed,hook_pos_embed,blocks.*.hook_attn_out,blocks.*.hook_mlp_out,"
           "blocks.*.hook_resid_post,ln_final.hook_scale", "-o", trace, "-q")
    out = tmp_path / "sparse.html"
    hexray("report", trace, "-o", out)
    text = out.read_text(encoding="utf-8")
    payload = json.loads(text.split('<script type="application/json" id="hexray-data">')[1].split("</script>")[0])
    run = payload["traces"][0]["runs"][0]
    assert run["has_attention"] is False and payload["lens"] == {}
    detail = payload["details"][f"0.0.{len(run['labels']) - 1}"]
    assert detail["attention"] is None and detail["heads"] is None and detail["neurons"] is None
    cli = replay_json("replay", trace, "--top-k", 100)["attribution"]
    assert [c["value"] for c in detail["attribution"]["contributions"]] == \
           pytest.approx([c["value"] for c in cli["contributions"]], abs=1e-6)
    s = Served(trace)
    try:
        status, body = api(s, "lens", run=0, start=0, end=3)
        assert status == 400 and "lens" in body["error"]
        assert api(s, "detail", run=0, pos=3)[0] == 200
    finally:
        s.close()


def test_a_trace_shows_in_a_notebook_through_the_viewer_hexray_plugs_in(demo_trace):
    """The replay layer imports no viewer (tests/test_layers.py): `import hexray` plugs hexray_view in."""
    code = ("import sys; from hexray_core.replay import open_trace; t = open_trace(sys.argv[1]); "
            "print(t._repr_html_() is None, t.run(0)._repr_html_() is None, 'hexray_view' in sys.modules); "
            "import hexray; print(t._repr_html_().startswith('<iframe'), t.run(1).show(position=3).html[:7])")
    out = subprocess.run([sys.executable, "-c", code, str(demo_trace)], capture_output=True, text=True, env=env(),
                         cwd=REPO, timeout=120)
    assert out.stdout.split() == ["True", "True", "False", "True", "<iframe"], out.stderr[-2000:]
    import hexray as hexray_package
    from hexray_core.errors import HexRayError
    from hexray_core.replay import display, open_trace

    display.use_viewer(None)
    try:
        with pytest.raises(HexRayError, match="import hexray"):
            open_trace(demo_trace).show()
    finally:
        display.use_viewer(hexray_package._show)
