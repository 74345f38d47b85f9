"""Progress of `laionbuild build` in the terminal (`--progress`; on by default when stderr is a
terminal): DVC's output passes through unchanged, and below it, whenever they change,

    [progress] [########............] 9/21 stages · download@1 · part 2/2 · 5 shards · 71 samples · 14.2 samples/s
    [funnel] rows_in 80 › after_has_url 80 › after_nsfw 76 › after_dedup 73 › downloaded_ok 34 (1/2 parts) › ...

Which stage runs comes from DVC's own lines ("Running stage 'download@1'", "... skipping");
shards and samples from img2dataset's per-shard `*_stats.json` (in `data/.work/download/` while
a part downloads, or under `download.shards_url`; in `data/images/part_N/` once done); the funnel from the `stats.json` every
stage writes (the workspace's: a part about to be rebuilt shows its previous counts)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

from laionbuild.project.layout import GLOBAL_STAGES, PART_DIRS, PER_PART_STAGES, SELECTED, STATS_FILE, WORK, part_dir

_STAGE = re.compile(r"Running stage '([^']+)'|Stage '([^']+)' (?:didn't change|is cached)|'([^']+)' didn't change")
# the per-kind graph (project/partwise.py): one DVC stage per kind, which names its parts itself
_PART = re.compile(r"laionbuild: running part stage '([^']+)'")
_KIND_DONE = re.compile(r"laionbuild: (\w+): \d+ part\(s\) run, \d+ up to date")
_RATE = re.compile(r" · [\d.]+ samples/s")
_FUNNEL_STAGES = ("prepare", "dedup", "download", "embed")


class BuildProgress:
    """Follows one `dvc repro` of a build of `parts`; `order` is the funnel's steps in pipeline
    order (report.step_order)."""

    def __init__(self, parts: list[int], order: list[str], stream: TextIO = sys.stderr, width: int = 20,
                 shards_prefix: Callable[[int], str] | None = None):
        self.parts, self.order, self.stream, self.width = list(parts), order, stream, width
        # with download.shards_url: part -> the prefix its shards are being written to
        self.shards_prefix = shards_prefix
        self._remote: dict[str, int] = {}  # stats file there -> its count (written once)
        self._remote_before: dict[int, set[str]] = {}  # part -> stats files there when its download started
        self._prefixes: dict[int, str] = {}
        self._remote_last: dict[int, tuple[float, tuple[int, int, int]]] = {}
        self.total = len(PER_PART_STAGES) * len(self.parts) + len(GLOBAL_STAGES)
        self.started = time.time()
        self.done: set[str] = set()
        self.running: str | None = None
        self.running_since = self.started
        self._shown: dict[str, str] = {}
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        """One line of DVC's output."""
        match = _STAGE.search(line) or _PART.search(line)
        kind_done = _KIND_DONE.search(line)
        if not match and not kind_done:
            return
        with self._lock:
            # (a per-kind stage's parts run inside it: its running parts do not finish it)
            inside = self.running in PER_PART_STAGES and match is not None and bool(_PART.search(line))
            if self.running and not inside:
                self.done.update(self._names(self.running))
                self.running = None
            if kind_done:
                self.done.update(self._names(kind_done.group(1)))
            elif match.group(1):
                self.running, self.running_since = match.group(1), time.time()
            else:
                self.done.update(self._names(match.group(2) or match.group(3)))
        self.show()

    def _names(self, stage: str) -> list[str]:
        """What a finished stage counts as: a per-part kind's stage of the per-kind graph is
        all of its parts."""
        return [f"{stage}@{p}" for p in self.parts] if stage in PER_PART_STAGES else [stage]

    def finish(self) -> None:
        with self._lock:
            if self.running:
                self.done.add(self.running)
                self.running = None
        self.show()

    def show(self) -> None:
        with self._lock:
            for kind, text in (("stage", self.stage_line()), ("funnel", self.funnel_line())):
                shape = _RATE.sub("", text)  # a new rate alone is not news
                if text and shape != self._shown.get(kind):
                    print(text, file=self.stream, flush=True)
                    self._shown[kind] = shape

    def stage_line(self) -> str:
        done = min(len(self.done), self.total)
        filled = round(self.width * done / self.total) if self.total else self.width
        line = f"[progress] [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} stages"
        if self.running is None:
            return line + (" · done" if done == self.total else "")
        line += f" · {self.running}"
        stage, _, part = self.running.partition("@")
        if part:
            finished = sum(f"{stage}@{p}" in self.done for p in self.parts)
            line += f" · part {finished + 1}/{len(self.parts)}"
        if stage == "download" and part:
            shards, samples, recent = self._shards(int(part))
            seconds = max(time.time() - self.running_since, 1e-3)
            line += f" · {shards} shards · {samples} samples · {recent / seconds:.1f} samples/s"
        return line

    def _shards(self, part: int) -> tuple[int, int, int]:
        """(finished shards, their samples, samples of shards finished since the stage started)
        of a part being downloaded."""
        if self.shards_prefix:
            return self._remote_shards(part)
        files = list((WORK / "download").glob(f"part_{part}-*/shards/*_stats.json"))
        files += list(part_dir("download", part).glob("*_stats.json"))
        samples = recent = 0
        for path in files:
            try:
                count = int(json.loads(path.read_text()).get("count", 0))
                fresh = path.stat().st_mtime >= self.running_since - 1
            except (OSError, ValueError):
                continue  # being written, or moved into place just now
            samples += count
            recent += count if fresh else 0
        return len(files), samples, recent

    def _remote_shards(self, part: int) -> tuple[int, int, int]:
        """The same, listed in the part's prefix under download.shards_url (one listing per
        refresh); "recent" are the stats files not there at the first listing of this download."""
        from laionbuild.shards.storage import filesystem

        cached = self._remote_last.get(part)
        if cached and time.time() - cached[0] < 2:  # one listing per 2 s at most
            return cached[1]
        try:
            if part not in self._prefixes:  # (hashes the part's metadata: once)
                self._prefixes[part] = self.shards_prefix(part)
            fs, root = filesystem(self._prefixes[part])
            fs.invalidate_cache(root)  # (fsspec caches listings; the shards are written by other processes)
            files = fs.glob(f"{root.rstrip('/')}/*_stats.json")
            for path in files:
                if path not in self._remote:
                    with fs.open(path, "rb") as f:
                        self._remote[path] = int(json.loads(f.read()).get("count", 0))
        except (OSError, ValueError):
            return 0, 0, 0  # the store unreachable or a file being written: no numbers this time
        before = self._remote_before.setdefault(part, set(files))
        result = (len(files), sum(self._remote[p] for p in files), sum(self._remote[p] for p in files if p not in before))
        self._remote_last[part] = (time.time(), result)
        return result

    def funnel_line(self) -> str:
        totals: dict[str, int] = {}
        seen: dict[str, int] = {}
        for stage in _FUNNEL_STAGES:
            for part in self.parts:
                counts = _counts(PART_DIRS[stage] / f"part_{part}" / STATS_FILE)
                for name, value in counts.items():
                    totals[name] = totals.get(name, 0) + value
                    seen[name] = seen.get(name, 0) + 1
        for name, value in _counts(SELECTED / STATS_FILE).items():
            totals[name], seen[name] = value, len(self.parts)
        steps = [f"{name} {totals[name]}" + (f" ({seen[name]}/{len(self.parts)} parts)"
                                             if seen[name] < len(self.parts) else "")
                 for name in self.order if name in totals]
        return "[funnel] " + " › ".join(steps) if steps else ""


def _counts(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads(path.read_text())["counts"].items()}
    except (OSError, ValueError, KeyError):
        return {}


def run_with_progress(command: list[str], env: dict, progress: BuildProgress, interval: float = 1.0) -> int:
    """Run `command` (a `dvc repro`), echoing its output and feeding it to `progress`, which a
    thread also refreshes every `interval` seconds (shards finish between DVC's lines)."""
    proc = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(interval):
            progress.show()

    ticker = threading.Thread(target=refresh, daemon=True)
    ticker.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            progress.feed(line)
        code = proc.wait()
    finally:
        stop.set()
        ticker.join()
    progress.finish()
    return code
