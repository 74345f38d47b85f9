"""`laionbuild build --progress`: progress lines per stage (parts, shards, samples/s) and a live
funnel, read from the shared demo's build output."""

from __future__ import annotations

import json
import re

from laionbuild.project.layout import GLOBAL_STAGES, PER_PART_STAGES

from .shared_demo import OVERRIDES, shared_demo

ALL_STAGES = len(PER_PART_STAGES) * 2 + len(GLOBAL_STAGES)  # the demo's two parts, and the global ones (inputs too)


def test_progress_lines_follow_the_build(tmp_path_factory):
    project, result = shared_demo(tmp_path_factory)
    lines = result.output.splitlines()
    stages = [line for line in lines if line.startswith("[progress] ")]
    assert stages[-1].endswith(f"{ALL_STAGES}/{ALL_STAGES} stages · done")
    order = [m.group(1) for line in stages if (m := re.search(r" stages · (\S+)", line)) and m.group(1) != "done"]
    assert order.index("prepare@1") < order.index("dedup") < order.index("download@0") < order.index("report")
    downloads = [re.search(r"download@(\d) · part (\d)/2 · (\d+) shards · (\d+) samples · ([\d.]+) samples/s", line)
                 for line in stages if "· download@" in line]
    assert all(downloads)
    assert {m.group(1) for m in downloads} == {"0", "1"} and max(int(m.group(3)) for m in downloads) > 0
    assert any(float(m.group(5)) > 0 for m in downloads)
    bars = [len(re.search(r"\[(#*)\.*\]", line).group(1)) for line in stages]
    assert bars == sorted(bars) and bars[-1] == 20

    funnel_lines = [line for line in lines if line.startswith("[funnel] ")]
    assert any("(1/2 parts)" in line for line in funnel_lines)  # live: a part's counts before the other's
    last = dict((name, int(value)) for name, value in re.findall(r"(\w+) (\d+)", funnel_lines[-1]))
    steps = json.loads((project / "data/metrics/funnel_steps.json").read_text())
    assert last == {s["step"]: s["rows"] for s in steps if s["step"] != "indexed"}


def test_progress_is_off_without_a_terminal_unless_asked(tmp_path_factory):
    project, _ = shared_demo(tmp_path_factory)
    quiet = project.laionbuild("build", *OVERRIDES)  # nothing to do: DVC skips every stage
    assert "[progress]" not in quiet.output and "[funnel]" not in quiet.output
    noop = project.laionbuild("build", "--progress", *OVERRIDES)
    lines = [line for line in noop.output.splitlines() if line.startswith("[progress]")]
    assert noop.ran == [] and noop.checked and lines[-1].endswith(f"{ALL_STAGES}/{ALL_STAGES} stages · done")
