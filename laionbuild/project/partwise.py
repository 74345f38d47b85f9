"""The per-kind stage graph (`laionbuild graph per-kind`, issue #21): one DVC stage per kind of
per-part work (fetch, prepare, download, ...) instead of one per part, each running every part
in one process and skipping the parts that are up to date.

Why: DVC rewrites the whole `dvc.lock` after every stage it runs, so the per-part graph (8
stages a part) costs O(stages^2) in DVC alone, and every stage is a process (~1 s of start-up).
Here the graph has the same 19 stages at any part count; the lock holds one directory hash per
kind; a kind's process starts once.

The part stays the unit of work, caching and resume: each part's output directory
(`data/<kind>/part_N/`, the same paths as the per-part graph) carries a marker, `MARKER`, with
the part's *fingerprint*: a hash of the stage's command, the values of the params dvc.yaml
lists for it, and a digest per input of that part (an upstream part's own fingerprint, read
from its marker, or the md5s of a file or folder: `files.memo_digest`, a stat when unchanged).
A part whose marker matches is skipped; a part without one (a killed run, a new part) or with
another is run, and its marker written after its output is in place, so a half-written part
never looks done. The outputs are `persist: true` (DVC must not delete the parts it would not
rerun); DVC still hashes and caches them, checks them out in experiments and pulls them, and
`dvc repro` still runs a kind only when one of its dependencies changed.

What DVC's run-cache did per part, restoring an output an earlier run of the same inputs made,
is not done here (DVC keeps no run-cache for persist outputs): a per-part param switched back
recomputes that part. The global stages keep their run-cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from laionbuild.project.layout import DATA, INPUTS, PART_DIRS, PER_PART_STAGES, part_of

log = logging.getLogger(__name__)

MARKER = ".laionbuild-part.json"
MANIFEST = "parts.json"  # in each per-part folder: [part, its output's id] for every part, in order
KEPT = DATA / ".kept"  # parts no longer in subset.parts, moved out of a kind's output
VERSION = 1  # of the fingerprint's recipe: a new one reruns every part once
ITEM = "${item}"
PER_KIND_FROM = 128  # parts: compose suggests the per-kind graph from here on


# ---- the graph: the shipped per-part dvc.yaml, rewritten --------------------------------------

def per_kind_stage(name: str, stage: dict) -> dict:
    """A per-part stage (`foreach: ${subset.parts}`) as one stage over every part: `--part
    ${item}` becomes `--all-parts`; `data/<kind>/part_${item}` paths their folder; the
    per-part fingerprint files (`data/inputs/source/part_${item}.json`) their folder; the output
    persists (the process skips the parts that are done)."""
    do = stage["do"]
    cmd = do["cmd"].replace(f"--part {ITEM}", "--all-parts")
    if ITEM in cmd:
        raise ValueError(f"dvc.yaml stage {name}: cmd {do['cmd']!r} uses {ITEM} other than in `--part {ITEM}`")
    deps = list(dict.fromkeys(_folder(d, name) for d in do.get("deps", [])))
    if name == "fetch":  # the parts' order: the first kind reruns (no part) and its manifest reorders
        do = {**do, "params": ["subset.parts", *do.get("params", [])]}
    outs = [{_folder(o if isinstance(o, str) else next(iter(o)), name): {"persist": True}} for o in do["outs"]]
    return {k: v for k, v in {**do, "cmd": cmd, "deps": deps, "outs": outs}.items() if v}


def _folder(path: str, stage: str) -> str:
    head, sep, _ = path.partition(f"/part_{ITEM}")
    if not sep:
        if ITEM in path:
            raise ValueError(f"dvc.yaml stage {stage}: path {path!r} uses {ITEM} other than as part_{ITEM}")
        return path
    return head


def per_kind_graph(graph: dict) -> dict:
    """Every per-part stage as one per kind; then every dependency on a per-part folder
    (`data/raw`, `data/deduped`...) as that folder's manifest, `MANIFEST` (one line a part, in
    subset.parts order: the part and its output's id): DVC hashes a small file instead of
    walking every part's files for each stage that reads them (at 1,024 parts, most of DVC's
    time). And `subset` as a param becomes `subset.name`: the manifests change with the parts and
    their order (the fetch kind tracks subset.parts: a new order reruns it, which rewrites its
    manifest in that order, and so on down to dedup, every part skipped), and the lock does not
    repeat 1,024 part ids in every global stage."""
    stages = {name: per_kind_stage(name, st) if "foreach" in st else dict(st) for name, st in graph["stages"].items()}
    for stage in stages.values():
        if "deps" in stage:
            stage["deps"] = [f"{d}/{MANIFEST}" if d in PART_FOLDERS else d for d in stage["deps"]]
        if "params" in stage:
            stage["params"] = ["subset.name" if p == "subset" else p for p in stage["params"]]
    return {**graph, "stages": stages}


def is_per_kind(dvc_yaml: Path = Path("dvc.yaml")) -> bool:
    """Whether this project's dvc.yaml is the per-kind graph (its fetch stage has no foreach)."""
    import yaml

    if not dvc_yaml.exists():
        return False
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    return "fetch" in stages and "foreach" not in stages["fetch"]


# ---- fingerprints -----------------------------------------------------------------------------

def _load(path: Path) -> dict:
    import yaml

    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def _spec(stage: str, dvc_yaml: Path = Path("dvc.yaml")) -> dict:
    stages = _load(dvc_yaml).get("stages") or {}
    spec = stages.get(stage)
    if not spec or "foreach" in spec:
        raise RuntimeError(f"{dvc_yaml} has no per-kind `{stage}` stage: `laionbuild stage {stage} --all-parts` "
                           "runs in the per-kind graph (`laionbuild graph per-kind`); the per-part graph runs "
                           f"`--part N`")
    return spec


def _param(raw: Any, key: str) -> Any:
    for name in key.split("."):
        raw = raw.get(name) if isinstance(raw, dict) else None
    return raw


def _param_keys(spec: dict) -> list[str]:
    keys: list[str] = []
    for entry in spec.get("params") or []:
        if isinstance(entry, dict):  # {file: [keys]}: only params.yaml's are the recipe's
            keys += [k for file, ks in entry.items() if file == "params.yaml" for k in ks]
        else:
            keys.append(entry)
    return keys


PART_FOLDERS = {d.as_posix(): d for d in PART_DIRS.values()}
PER_PART_INPUTS = (INPUTS / "source").as_posix()  # data/inputs/source/part_N.json


def part_inputs(spec: dict, part: int) -> list[Path]:
    """The paths of part `part`'s inputs: a kind's folder dependency as that part's folder,
    data/inputs/source as its file, any other dependency whole."""
    paths = []
    for dep in spec.get("deps") or []:
        dep = dep.removesuffix(f"/{MANIFEST}")
        if dep in PART_FOLDERS:
            paths.append(Path(dep) / f"part_{part}")
        elif dep == PER_PART_INPUTS:
            paths.append(Path(dep) / f"part_{part}.json")
        else:
            paths.append(Path(dep))
    return paths


def input_digest(path: Path) -> str:
    """An upstream part's fingerprint (its marker), else the md5s of the file or the folder's
    files (memoised by path, size and mtime); `missing` for a path that is not there."""
    from laionbuild.project.files import memo_digest

    marker = path / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        return "part:" + record.get("output", record["fingerprint"])
    if path.is_file():
        return memo_digest(path)
    if path.is_dir():
        return "dir:" + folder_digest(path, memo_digest)
    return "missing"


class Fingerprints:
    """Each part's fingerprint of one kind, with what goes into it (for `laionbuild status`)."""

    def __init__(self, stage: str, dvc_yaml: Path = Path("dvc.yaml"), params_yaml: Path = Path("params.yaml")):
        self.stage = stage
        self.spec = _spec(stage, dvc_yaml)
        raw = _load(params_yaml)
        # (subset.parts is a param of the fetch kind so that a new order of the parts reruns the
        # chain of manifests down to dedup; it is the graph's, not a part's: no part reruns for it)
        self.params = {key: _param(raw, key) for key in _param_keys(self.spec) if not key.startswith("subset")}
        self._whole: dict[Path, str] = {}  # a dependency every part shares: digested once

    def record(self, part: int, fresh: bool = False) -> dict:
        """Part `part`'s fingerprint now; `fresh`: the dependencies every part shares digested
        again (after a part ran: they may have changed while it did)."""
        deps = {}
        for path in part_inputs(self.spec, part):
            if part_of(path) is None and path.as_posix() != f"{PER_PART_INPUTS}/part_{part}.json":
                if fresh or path not in self._whole:
                    self._whole[path] = input_digest(path)
                deps[path.as_posix()] = self._whole[path]
            else:
                deps[path.as_posix()] = input_digest(path)
        body = {"version": VERSION, "stage": self.stage, "cmd": self.spec["cmd"], "params": self.params, "deps": deps}
        text = json.dumps(body, sort_keys=True, default=str)
        return {"fingerprint": hashlib.sha256(text.encode()).hexdigest(), **body}


def marker_of(stage: str, part: int) -> dict | None:
    try:
        return json.loads((PART_DIRS[stage] / f"part_{part}" / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_marker(stage: str, part: int, record: dict) -> None:
    from laionbuild.project.atomic import atomic_write_text

    path = PART_DIRS[stage] / f"part_{part}" / MARKER
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


def refresh_manifest(stage: str, parts: list[int]) -> None:
    """The kind's manifest from its parts' markers, in subset.parts order."""
    write_manifest(PART_DIRS[stage], {part: output_id(stage, part) for part in parts})


def changed_in_place(stage: str, part: int, what: str) -> None:
    """Record on a part's marker that its output changed after its stage ran (`laionbuild
    retry-failed` merging recovered downloads into data/images/part_N): the part stays up to
    date, and what reads it sees a new input (its `output` id), so it reruns."""
    record = marker_of(stage, part)
    if record is None:
        return  # no marker: the next build runs the part anyway
    record["output"] = hashlib.sha256(f"{record.get('output', record['fingerprint'])}\0{what}".encode()).hexdigest()
    write_marker(stage, part, record)


def restore_marker(stage: str, part: int, record: dict) -> None:
    """Put a part's marker back where a command rebuilt its folder without it (retry-failed)."""
    path = PART_DIRS[stage] / f"part_{part}" / MARKER
    if path.parent.is_dir() and not path.exists():
        write_marker(stage, part, record)


# ---- the runner -------------------------------------------------------------------------------

def run_parts(stage: str, parts: Iterable[int], run_part: Callable[[int], None],
              params_yaml: Path = Path("params.yaml")) -> tuple[list[int], list[int]]:
    """Run `run_part` for every part of `parts` whose marker is not its fingerprint, writing
    the marker after each; parts no longer listed move out of the kind's folder to data/.kept
    (nothing built is lost; DVC's cache holds them too). Returns (ran, skipped)."""

    if stage not in PER_PART_STAGES:
        raise ValueError(f"`{stage}` is not a per-part stage ({', '.join(PER_PART_STAGES)})")
    parts = list(parts)
    folder = PART_DIRS[stage]
    _move_dropped(folder, set(parts))
    fingerprints = Fingerprints(stage, params_yaml=params_yaml)
    ran, skipped = [], []
    for part in parts:
        record = fingerprints.record(part)
        if (marker_of(stage, part) or {}).get("fingerprint") == record["fingerprint"]:
            skipped.append(part)
            continue
        print(f"laionbuild: running part stage '{stage}@{part}'", flush=True)
        marker = folder / f"part_{part}" / MARKER
        marker.unlink(missing_ok=True)  # (a persisted output rerun: not done until its marker is back)
        run_part(part)
        # a part's upstream markers are read again after its own run: a part stage that reads
        # its inputs while another process rewrites them is not done (the next run redoes it)
        if fingerprints.record(part, fresh=True)["fingerprint"] != record["fingerprint"]:
            raise RuntimeError(f"{stage}@{part}: its inputs changed while it ran; run the build again")
        # the output's id, what the parts reading it see: new on every run of the part, since a
        # rerun with the same inputs (a deleted output, a download from the live web) need not
        # give the same bytes
        record["output"] = hashlib.sha256(f"{record['fingerprint']}\0{uuid.uuid4()}".encode()).hexdigest()
        write_marker(stage, part, record)
        ran.append(part)
    refresh_manifest(stage, parts)
    print(f"laionbuild: {stage}: {len(ran)} part(s) run, {len(skipped)} up to date", flush=True)
    return ran, skipped


def output_id(stage: str, part: int) -> str:
    record = marker_of(stage, part) or {}
    return record.get("output") or record.get("fingerprint") or "missing"


def write_manifest(folder: Path, ids: dict[int, str]) -> None:
    """`folder/MANIFEST`: one `[part, id]` line a part, in the order given (subset.parts'),
    rewritten only when it changes."""
    from laionbuild.project.atomic import atomic_write_text

    text = "[\n" + ",\n".join(json.dumps([part, value]) for part, value in ids.items()) + "\n]\n"
    path = folder / MANIFEST
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)


def folder_digest(path: Path, file_digest: Callable[[Path], str] | None = None) -> str:
    """md5 over a folder's files (names and contents; `file_digest`: files.digest, or
    memo_digest for inputs read on every run): a part's input, or the manifest of a global
    stage's per-part output (dedup's)."""
    from laionbuild.project.files import digest

    file_digest = file_digest or digest
    h = hashlib.md5()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\0".encode())
    return h.hexdigest()


def _move_dropped(folder: Path, parts: set[int]) -> None:
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        part = part_of(path)
        if part is None or part in parts:
            continue
        target = KEPT / folder.name / path.name
        for n in range(1, 1000):  # (an earlier kept copy stays: as project/repo.py numbers them)
            if not target.exists():
                break
            target = KEPT / folder.name / f"{path.name}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
        log.warning("%s: part %d is not in subset.parts: moved to %s", folder, part, target)


GRAPHS = ("per-part", "per-kind")
HEADER = """\
# The per-kind stage graph, written by `laionbuild graph per-kind` from laionbuild's shipped
# dvc.yaml (the per-part graph; its comments say what each stage reads and writes): each
# per-part stage is one stage over every part, `laionbuild stage KIND --all-parts`, skipping the
# parts whose marker (data/KIND/part_N/.laionbuild-part.json) matches their inputs and params;
# its output persists. `laionbuild graph per-part` writes the shipped graph back. Both give the
# same outputs. See laionbuild/project/partwise.py and docs/stages.md ("Per-kind graph").
"""


def graph_text(kind: str, shipped: Path) -> str:
    """dvc.yaml for the `kind` graph: the shipped one, or it rewritten per kind."""
    import yaml

    if kind not in GRAPHS:
        raise ValueError(f"graph: {kind!r} is not one of {', '.join(GRAPHS)}")
    text = shipped.read_text()
    if kind == "per-part":
        return text
    graph = per_kind_graph(yaml.safe_load(text))
    return HEADER + yaml.safe_dump(graph, sort_keys=False, width=110, default_flow_style=None)


def adopt(parts: list[int], up_to_date: Callable[[str, int], bool]) -> dict[str, int]:
    """After a switch from the per-part graph to this one (`laionbuild graph per-kind`): write
    the marker of every built part whose per-part stage DVC found up to date (`up_to_date(kind,
    part)`), kind by kind in pipeline order (a marker's fingerprint reads the upstream ones),
    and each kind's manifest, so the first per-kind build reruns no part's work. A part not
    adopted (stale, never built) gets no marker and runs then. Returns {kind: parts adopted}."""
    adopted = {}
    for stage in PER_PART_STAGES:
        folder = PART_DIRS[stage]
        if not folder.is_dir():
            continue
        fingerprints, count = Fingerprints(stage), 0
        for part in parts:
            if (folder / f"part_{part}").is_dir() and up_to_date(stage, part):
                write_marker(stage, part, fingerprints.record(part))
                count += 1
        refresh_manifest(stage, parts)
        adopted[stage] = count
    return adopted
