"""The on-disk layout of a recorded dataset: shared by the recorder and the replay (no torch, no ray).

    OUT/dataset.json          what was recorded: model, recording options, last command's counts
    OUT/manifest.jsonl        one line per recorded prompt, grouped by shard:
                              {"id", "line", "shard": "shards/NAME.hxr", "run", "target", "baseline", "meta"}
    OUT/shards/NAME.json      a shard's rows (id, line, target, baseline, meta), written *before* its trace
    OUT/shards/NAME.hxr       the shard's trace, one run per row in the same order (atomic rename)
    OUT/.lock                 held (flock) by the one `hexray record` writing into OUT/

A shard is complete exactly when its ``.hxr`` exists: the trace writer renames it into place only
once it is whole, and its sidecar was written before. Shard names are fixed by their rows
(``shard-<first line>-<hash of the ids>``), so a shard that Ray retries after a dead worker is written
again under the same name (replaced atomically): a prompt can never land in two shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import uuid
from dataclasses import dataclass, field

from hexray_core.dataset import folder as safe
from hexray_core.errors import HexRayError, json_problem

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.jsonl"
SHARDS_DIR = "shards"
LOCK_FILE = ".lock"
FORMAT_VERSION = 1
RESERVED = ("prompt", "id", "target", "baseline")
_SHARD_NAME = re.compile(r"^shard-\d{9}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class Row:
    """One prompt of a dataset: its text, id, optional target/baseline, and the row's other fields."""

    id: str | int
    line: int  # 1-based line in the prompts file (or position in the list given)
    prompt: str
    target: str | None = None
    baseline: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return id_key(self.id)

    def entry(self) -> dict:
        return {"id": self.id, "line": self.line, "target": self.target, "baseline": self.baseline, "meta": self.meta}


def id_key(value) -> str:
    """Ids compare as JSON values: 3 and "3" are different ids."""
    return json.dumps(value, ensure_ascii=False)


def _token_field(value, name: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise HexRayError(f"{where}: \"{name}\" must be a token's text, 'top', 'next' or '#id', "
                          f"not {type(value).__name__}")
    return f"#{value}" if isinstance(value, int) else value


def make_row(obj, line: int, where: str) -> Row:
    """A row from a prompt string or an object with "prompt" and optional "id", "target", "baseline"."""
    if isinstance(obj, Row):
        return obj
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise HexRayError(f"{where}: expected an object with a \"prompt\" string")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise HexRayError(f"{where}: expected an object with a \"prompt\" string")
    if prompt == "":
        raise HexRayError(f"{where}: the prompt is empty")
    rid = obj.get("id", line)
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise HexRayError(f"{where}: \"id\" must be a string or an integer")
    meta = {k: v for k, v in obj.items() if k not in RESERVED}
    _check_storable(obj, where)
    return Row(rid, line, prompt, _token_field(obj.get("target"), "target", where),
               _token_field(obj.get("baseline"), "baseline", where), meta)


def _check_storable(obj, where: str) -> None:
    """A row is written to JSON files and a trace: refuse what cannot be (a lone surrogate from a JSON
    escape, metadata nested past Python's recursion limit) in one line, before anything is recorded."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise HexRayError(f"{where}: text that is not valid Unicode (a lone surrogate at character {e.start})") \
            from None
    except RecursionError:
        raise HexRayError(f"{where}: nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise HexRayError(f"{where}: cannot be stored as JSON ({e})") from None


def parse_rows(text: str, path: str = "prompts") -> list[Row]:
    """A prompts file: one prompt per line, or JSONL objects (the first non-blank line decides).

    Blank lines are skipped; a row's default id is its line number. Duplicate ids are an error.
    """
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise HexRayError(f"--prompts-file {path}: no prompts in it")
    jsonl = lines[0][1].lstrip().startswith("{")
    rows = []
    for number, line in lines:
        where = f"--prompts-file {path}:{number}"
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise HexRayError(f"{where}: not JSON ({json_problem(e)})") from None
            except RecursionError:
                raise HexRayError(f"{where}: nested too deeply") from None
        else:
            obj = line
        rows.append(make_row(obj, number, where))
    check_unique(rows, path)
    return rows


def normalize_rows(rows, where: str = "prompts") -> list[Row]:
    """Rows from a list of strings, dicts or Rows (ids default to their 1-based position)."""
    if isinstance(rows, str | dict | Row):
        rows = [rows]
    out = [make_row(r, i + 1, f"{where} {i + 1}") for i, r in enumerate(rows)]
    if not out:
        raise HexRayError("no prompts to record")
    check_unique(out, where)
    return out


def check_unique(rows: list[Row], where: str) -> None:
    seen: dict[str, int] = {}
    for r in rows:
        if r.key in seen:
            raise HexRayError(f"{where}: id {r.key} is used twice (lines {seen[r.key]} and {r.line})")
        seen[r.key] = r.line


# -- shards --------------------------------------------------------------------------------------

def shard_name(rows: list[Row]) -> str:
    digest = hashlib.sha256("\n".join(r.key for r in rows).encode()).hexdigest()[:12]
    return f"shard-{rows[0].line:09d}-{digest}"


def plan_shards(rows: list[Row], shard_size: int) -> list[tuple[str, list[Row]]]:
    if shard_size < 1:
        raise HexRayError(f"--shard-size must be at least 1, not {shard_size}")
    chunks = [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]
    return [(shard_name(c), c) for c in chunks]


def shards_dir(out: str) -> str:
    """OUT/shards, refused if it is a symbolic link (folder.py)."""
    return safe.inside(out, SHARDS_DIR)


def check_folder(out: str) -> None:
    """Refuse a dataset folder whose own files are links (before the lock is taken or anything written)."""
    for name in (SHARDS_DIR, LOCK_FILE, DATASET_FILE, MANIFEST_FILE):
        safe.inside(out, name)


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def write_json_atomic(path: str, obj, *, lines: bool = False) -> None:
    """Write JSON (or JSON lines from an iterable) under a temporary name, then rename into place."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # (exclusive: never through a link planted under that name)
            if lines:
                for item in obj:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
            else:
                json.dump(obj, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_sidecar(out: str, name: str, rows: list[Row]) -> None:
    # the prompt's digest lets a later command see an id recorded with another prompt
    write_json_atomic(os.path.join(shards_dir(out), name + ".json"),
                      {"shard": name, "rows": [{**r.entry(), "prompt_sha256": prompt_digest(r.prompt)} for r in rows]})


def read_sidecar(out: str, name: str) -> list[dict]:
    rel = f"{SHARDS_DIR}/{name}.json"
    path = os.path.join(out, rel)
    try:
        data = safe.read_json(out, rel)
    except FileNotFoundError:
        raise HexRayError(f"{path}: missing (the shard's trace has no list of its prompts)") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and _is_id(r.get("id")) for r in rows):
        raise HexRayError(f"{path}: not a shard list (rows of objects with an \"id\")")
    return rows


def _is_id(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, str | int)


def complete_shards(out: str) -> list[str]:
    """Names of the complete shards (their .hxr exists), sorted (= by first line)."""
    folder = shards_dir(out)
    if not os.path.isdir(folder):
        return []
    return sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".hxr") and _SHARD_NAME.match(n[:-4]))


def clean_stale(out: str) -> int:
    """Remove what dead writers left: temporary files, and sidecars whose trace never landed.

    Only called while OUT/.lock is held, so no writer of ours is running.
    """
    folder = shards_dir(out)
    if not os.path.isdir(folder):
        return 0
    names = set(os.listdir(folder))
    removed = 0
    for n in names:
        orphan = n.endswith(".json") and _SHARD_NAME.match(n[:-5]) and n[:-5] + ".hxr" not in names
        stale = n.endswith(".tmp") or orphan
        if stale:
            try:
                os.unlink(os.path.join(folder, n))
                removed += 1
            except OSError:
                pass
    return removed


def build_manifest(out: str) -> tuple[int, set[str]]:
    """Rewrite OUT/manifest.jsonl from the complete shards; return (entries, ids).

    A prompt id found in two shards (only possible if shards were copied in by hand) is listed once,
    from the first shard.
    """
    seen: set[str] = set()

    def entries():
        for name in complete_shards(out):
            for run, row in enumerate(read_sidecar(out, name)):
                key = id_key(row["id"])
                if key in seen:
                    continue
                seen.add(key)
                yield {"id": row["id"], "line": row.get("line"), "shard": f"{SHARDS_DIR}/{name}.hxr", "run": run,
                       "target": row.get("target"), "baseline": row.get("baseline"), "meta": row.get("meta") or {}}

    items = list(entries())
    write_json_atomic(os.path.join(out, MANIFEST_FILE), items, lines=True)
    return len(items), seen


def done_ids(out: str) -> dict[str, str | None]:
    """The ids of the complete shards, each with its prompt's digest (None from an older recording)."""
    return {id_key(r["id"]): r.get("prompt_sha256") for name in complete_shards(out) for r in read_sidecar(out, name)}


# -- dataset.json and the lock -------------------------------------------------------------------

def read_dataset_info(out: str) -> dict | None:
    try:
        info = safe.read_json(out, DATASET_FILE)
    except FileNotFoundError:
        return None
    wrong = check_info(info)
    if wrong:
        raise HexRayError(f"{os.path.join(out, DATASET_FILE)}: unreadable ({wrong})")
    return info


def check_info(info) -> str | None:
    """What is wrong with a dataset.json's content, or None (only the fields HexRay reads)."""
    if not isinstance(info, dict) or not isinstance(info.get("hexray"), dict):
        return "not a HexRay dataset"
    for key in ("record", "last"):
        if key in info and not isinstance(info[key], dict):
            return f"\"{key}\" is not an object"
    last = info.get("last") or {}
    for key in ("prompts", "recorded"):
        if key in last and (isinstance(last[key], bool) or not isinstance(last[key], int)):
            return f"\"last.{key}\" is not an integer"
    if "model" in info and not isinstance(info["model"], str):
        return "\"model\" is not a string"
    return None


def check_or_write_info(out: str, model: str, options: dict, version: str, later: dict | None = None) -> dict:
    """A new folder gets dataset.json; an existing one must have been recorded the same way.

    ``later``: options newer than some folders, with the value a folder that does not name them was recorded
    with."""
    info = read_dataset_info(out)
    if info is None:
        info = {"hexray": {"version": version, "dataset": FORMAT_VERSION}, "model": model, "record": options,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(os.path.join(out, DATASET_FILE), info)
        return info
    if info.get("model") != model:
        raise HexRayError(f"{out} was recorded with --model {info.get('model')}, not {model}: "
                          "use another output folder")
    old = info.get("record", {})
    old = {**(later or {}), **old} if isinstance(old, dict) else {}
    changed = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} then, {options.get(k)!r} now" for k in changed)
        raise HexRayError(f"{out} was recorded with other options ({diff}): use another output folder")
    return info


def update_info(out: str, **fields) -> None:
    info = read_dataset_info(out) or {}
    info.update(fields)
    write_json_atomic(os.path.join(out, DATASET_FILE), info)


class Lock:
    """An exclusive flock on OUT/.lock for the length of one recording command."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_FILE)
        self.fd: int | None = None

    def __enter__(self) -> Lock:
        import fcntl

        safe.inside(os.path.dirname(self.path), LOCK_FILE)
        try:  # O_NOFOLLOW: a .lock linked elsewhere must not create or lock the file it names
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                              | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as e:
            raise HexRayError(f"{self.path}: cannot open the lock ({e.strerror or e})") from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            self.fd = None
            raise HexRayError(f"{self.path}: not a regular file")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise HexRayError(f"{os.path.dirname(self.path) or '.'} is being recorded by another hexray "
                              "command; wait for it or use another output folder") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def is_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DATASET_FILE))
