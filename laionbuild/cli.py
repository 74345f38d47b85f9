"""`laionbuild` command line: compose a recipe, build it with DVC (a sweep: one experiment per
point; `materialize` the point kept), run one stage, show status; look at a build (search page,
projector export)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from laionbuild.project.atomic import atomic_write_text
from laionbuild.project.layout import SPLIT_STAGES, STAGES, output_layout_error
from laionbuild.project.repo import (
    check_output_layouts,
    clear_dead_dvc_locks,
    dvc_env,
    enable_dvc_hydra,
    prune_stale_parts,
    run_dvc,
    stage_status,
)
from laionbuild.recipe.errors import LaionbuildError
from laionbuild.recipe.schema import RecipeError, compose, compose_splits_recipe, load_params, to_yaml
from laionbuild.web import without_torch

log = logging.getLogger("laionbuild")
# stages whose process (and its spawned img2dataset workers) never import torch: see without_torch
TORCH_FREE_STAGES = ("download",)


def cmd_compose(args) -> int:
    if getattr(args, "help_keys", False):
        from laionbuild.recipe.keys import keys_table

        sys.stdout.write(keys_table())
        return 0
    try:
        cfg = compose(args.overrides, conf_dir=args.conf_dir)
    except RecipeError:  # (a split build's recipe never composes as one build's: `splits` is no section)
        if (splits := compose_splits_recipe(args.overrides, conf_dir=args.conf_dir)) is not None:
            return compose_split_build(args, splits)
        raise
    if Path(args.output).resolve() != Path("params.yaml").resolve():
        atomic_write_text(args.output, to_yaml(cfg))
        print(f"wrote {args.output} (recipe={cfg.recipe.name}, parts={list(cfg.subset.parts)})")
        return 0  # not this project's build recipe: leave the workspace alone
    from laionbuild.project.splits import is_split_root

    if is_split_root():  # its dvc.yaml is the union graph: one build's params.yaml would not fit it
        raise RecipeError(f"recipe {cfg.recipe.name} is one build, and this repository is a split build (dvc.yaml holds "
                          "`union`): compose a split build's recipe here, or build this one in a repository of its "
                          "own (`laionbuild init DIR`)")
    atomic_write_text(args.output, to_yaml(cfg))
    removed, kept = prune_stale_parts(list(cfg.subset.parts))
    for path in removed:
        log.info("removed %s from the workspace (part not in subset.parts; kept in DVC's cache)", path)
    for path, target in kept:
        print(f"kept {path} in {target}: part not in subset.parts, and DVC's cache does not hold it as it is "
              f"(never committed); move it back with the part in subset.parts and `dvc commit` it, or delete it",
              file=sys.stderr)
    print(f"wrote {args.output} (recipe={cfg.recipe.name}, parts={list(cfg.subset.parts)})")
    from laionbuild.project.partwise import PER_KIND_FROM, is_per_kind

    if len(cfg.subset.parts) >= PER_KIND_FROM and Path("dvc.yaml").exists() and not is_per_kind():
        print(f"{len(cfg.subset.parts)} parts on the per-part stage graph (8 DVC stages a part): `laionbuild graph "
              "per-kind` builds the same outputs at a fraction of the fixed cost per part (docs/stages.md)",
              file=sys.stderr)
    return 0


def compose_split_build(args, recipe) -> int:
    """A split build (recipe=laion5b): each split's params.yaml and dvc.yaml in splits/<split>/,
    the `union` graph at the root (laionbuild/project/splits.py)."""
    from laionbuild.project import splits
    from laionbuild.project.template import template_root

    if Path(args.output).resolve() != Path("params.yaml").resolve():
        raise RecipeError(f"recipe {recipe.recipe.name} is a split build ({', '.join(recipe.splits)}): it composes "
                          "into the project (splits/<split>/params.yaml), not into --output")
    splits.check_root(recipe)  # (before composing: compose makes the split folders)
    composed = splits.compose_splits(recipe, args.overrides, args.conf_dir)
    splits.write_layout(recipe, composed, template_root())
    for name, cfg in composed.items():
        with splits._in(splits.split_dir(name)):
            removed, kept = prune_stale_parts(list(cfg.subset.parts))
        for path in removed:
            log.info("removed %s/%s from the workspace (part not in subset.parts; kept in DVC's cache)",
                     splits.split_dir(name), path)
        for path, target in kept:
            print(f"kept {splits.split_dir(name)}/{path} in {target}: part not in subset.parts, and DVC's cache does "
                  "not hold it as it is", file=sys.stderr)
        print(f"wrote {splits.split_dir(name)}/params.yaml (recipe={cfg.recipe.name}, parts={list(cfg.subset.parts)})")
    print(f"wrote params.yaml and dvc.yaml (recipe={recipe.recipe.name}: splits {', '.join(composed)} and their union)")
    return 0


def cmd_sweep(args) -> int:
    """Each point of a Hydra multirun sweep as one DVC experiment, run one after the other in
    this workspace; stages a point shares with an earlier one are restored, not recomputed. A
    point is its selection (assemble.materialize=false) unless the overrides set the key."""
    from laionbuild.project.sweeps import experiment_name, sweep_points, with_sweep_defaults

    points, varying = sweep_points(args.overrides)
    if compose_splits_recipe(points[0], conf_dir=args.conf_dir) is not None:
        raise RecipeError("build -m: a split build (recipe.splits) is not swept: DVC's Hydra composition writes one "
                          "params.yaml; sweep a split's recipe in a repository of its own")
    points = [with_sweep_defaults(point) for point in points]
    for point in points:  # every point is a valid recipe before any work starts
        compose(point, conf_dir=args.conf_dir)
    enable_dvc_hydra()
    clear_dead_dvc_locks()
    names = [experiment_name(v) for v in varying]
    if len(set(names)) != len(names):
        raise RecipeError(f"build -m: sweep points would share experiment names: {names}")
    for point, name in zip(points, names):
        print(f"experiment {name}: {' '.join(point)}", flush=True)
        command = ["exp", "run", "-n", name]
        for override in point:
            command += ["-S", override]
        if args.stage:
            command.append(args.stage)
        code = run_dvc(*command).returncode
        if code:
            return code
    print(f"{len(points)} experiments: {', '.join(names)} (dvc exp show)")
    if all("++assemble.materialize=false" in point for point in points):
        print("each point is its selection (assemble.materialize=false): keep one with "
              "`dvc exp apply NAME && laionbuild materialize`")
    return 0


def cmd_init(args) -> int:
    from laionbuild.project.sweeps import init_project, run
    from laionbuild.project.template import template_root

    target = Path(args.dir).resolve()
    template = template_root()
    init_project(target, template, copy_conf=args.copy_conf)
    run(["git", "init", "-q"], target)
    old = os.getcwd()
    os.chdir(target)
    try:
        if run_dvc("init", "-q").returncode:
            raise RuntimeError(f"dvc init failed in {target}")
        enable_dvc_hydra()
        atomic_write_text("params.yaml", to_yaml(compose([], conf_dir="conf")))
        if args.graph != "per-part":
            from laionbuild.project.partwise import graph_text

            atomic_write_text("dvc.yaml", graph_text(args.graph, template / "dvc.yaml"))
    finally:
        os.chdir(old)
    run(["git", "add", "-A"], target)
    run(["git", "-c", "user.name=laionbuild", "-c", "user.email=laionbuild@localhost", "commit", "-qm",
         "laionbuild init: recipes (conf/), stage graph (dvc.yaml), composed demo recipe (params.yaml)"], target)
    print(f"initialised a dataset repo in {target} (template: {template}): cd {target} && laionbuild build")
    return 0


def cmd_graph(args) -> int:
    """Write this project's dvc.yaml as the per-part graph (the shipped one: a stage per part and
    kind) or the per-kind graph (a stage per kind over every part: project/partwise.py). Outputs
    stay where they are. To per-kind: every part whose per-part stages DVC finds up to date is
    adopted (its marker written), so the next build reruns only the global stages. Back to
    per-part: the per-part stages have no lock entries, so the next build runs them once."""
    import yaml

    from laionbuild.project.partwise import adopt, graph_text, is_per_kind
    from laionbuild.project.splits import is_split_root
    from laionbuild.project.template import template_root

    if is_split_root():
        raise RecipeError("graph: this is a split build; its splits' dvc.yaml files are the shipped graph")
    was_per_kind = is_per_kind()
    stale = None
    if args.kind == "per-kind" and not was_per_kind and Path("dvc.lock").exists():
        # the per-part stages DVC finds up to date now: their parts are adopted as built
        result = run_dvc("status", "--json", capture=True)
        if result.returncode != 0:
            raise RuntimeError(f"dvc status failed: {result.stderr.strip()}")
        stale = set(json.loads(result.stdout or "{}"))
        lock = set((yaml.safe_load(Path("dvc.lock").read_text()) or {}).get("stages") or {})
    atomic_write_text("dvc.yaml", graph_text(args.kind, template_root() / "dvc.yaml"))
    print(f"wrote dvc.yaml: the {args.kind} graph")
    if stale is not None:
        cfg = load_params("params.yaml")
        adopted = adopt(list(cfg.subset.parts), lambda kind, part: f"{kind}@{part}" in lock - stale)
        print("adopted the built parts (their markers written: the next build reruns none of them): "
              + ", ".join(f"{kind} {n}/{len(cfg.subset.parts)}" for kind, n in adopted.items()))
    elif args.kind == "per-part" and was_per_kind:
        print("the per-part stages have no lock entries yet: the next build runs every part's stages once "
              "(or, with the outputs up to date, `dvc commit --force` records them as built)")
    return 0


def cmd_build(args) -> int:
    check_output_layouts()  # (an up-to-date stage of an old layout would never run to refuse it)
    if args.multirun:
        return cmd_sweep(args)
    cmd_compose(args)
    return _repro(args)


def _repro(args) -> int:
    """`dvc repro` of params.yaml as it is (up to --stage), with progress lines when asked."""
    clear_dead_dvc_locks()
    repro = ["repro"]
    if args.force:
        repro.append("--force")
    from laionbuild.project.splits import is_split_root

    split_build = is_split_root()
    if args.stage and split_build:  # DVC's own names: union, splits/<split>/dvc.yaml:select, ...
        repro.append(args.stage)
    elif args.stage:
        if args.stage not in STAGES and args.stage.split("@")[0] not in STAGES:
            raise RecipeError(f"--stage: unknown stage `{args.stage}`; stages: {', '.join(STAGES)}")
        from laionbuild.project.partwise import is_per_kind

        if "@" in args.stage and is_per_kind():
            raise RecipeError(f"--stage {args.stage}: this project's dvc.yaml is the per-kind graph, whose stages run "
                              f"every part: --stage {args.stage.split('@')[0]}")
        repro.append(args.stage)
    if not split_build and (args.progress or (args.progress is None and sys.stderr.isatty())):
        from laionbuild.explore.progress import BuildProgress, run_with_progress
        from laionbuild.project.outputs import step_order

        cfg = load_params("params.yaml")
        from laionbuild.shards.storage import shards_prefix

        prefix = (lambda part: shards_prefix(cfg, part)) if cfg.download.shards_url else None
        progress = BuildProgress(list(cfg.subset.parts), step_order(cfg), shards_prefix=prefix)
        return run_with_progress([sys.executable, "-m", "dvc", *repro], dvc_env(), progress)
    return run_dvc(*repro).returncode


def cmd_materialize(args) -> int:
    """Build the outputs of the sweep point in the workspace (assemble.materialize=false, e.g.
    after `dvc exp apply NAME`): its params.yaml with only assemble.materialize set to true
    (project/sweeps.materialized_params: the point's other values kept as they are, not
    recomposed from conf/), then `dvc repro`: assemble, export, index, report and card run;
    everything before them is up to date. The outputs are those of a plain build of the same
    recipe. Run again after a failure, it resumes (params.yaml already says true)."""
    import yaml

    from laionbuild.project.layout import SELECTED
    from laionbuild.project.sweeps import materialized_params

    check_output_layouts()
    if args.experiment:
        code = run_dvc("exp", "apply", args.experiment).returncode
        if code:
            return code
    params = Path("params.yaml")
    if not params.exists():
        raise RecipeError("materialize: params.yaml not found: run it in a dataset repo holding a sweep point "
                          "(`dvc exp apply NAME` first, or `laionbuild materialize NAME`)")
    load_params(params)  # a valid recipe before anything is written
    if not (SELECTED / "selected.parquet").exists():
        raise RecipeError(f"materialize: {SELECTED / 'selected.parquet'} not found: nothing selected to materialise "
                          "in this workspace; `dvc exp apply NAME` (a point of `laionbuild build -m`) or "
                          "`dvc checkout` first")
    text = params.read_text()
    if (yaml.safe_load(text) or {}).get("assemble", {}).get("materialize", True) is False:
        atomic_write_text(params, materialized_params(text))
        load_params(params)
        print("params.yaml: assemble.materialize=true (nothing else changed); building the point's data/dataset, "
              "data/embeddings, data/export, data/index", flush=True)
    elif _fully_materialized():
        raise RecipeError("materialize: nothing to materialise: params.yaml has assemble.materialize=true and "
                          "data/embeddings is materialised (`dvc repro` builds what is stale); a sweep point: "
                          "`dvc exp apply NAME && laionbuild materialize` (or `laionbuild materialize NAME`)")
    else:
        print("params.yaml: assemble.materialize is true already; building what is not yet materialised", flush=True)
    args.stage, args.force = None, False
    return _repro(args)


def _fully_materialized() -> bool:
    """Whether every output a point materialises is there as a plain build's: data/embeddings,
    data/export without the marker, data/index over the selection (no all-samples parts.json).
    A failed `laionbuild materialize` (say, autofaiss out of memory) leaves one short: run again,
    it resumes."""
    from laionbuild.project.index_filter import PARTS_FILE
    from laionbuild.project.layout import EMBEDDINGS, EXPORT, INDEX
    from laionbuild.project.outputs import UNMATERIALIZED_FILE, materialized

    return (EMBEDDINGS.is_dir() and materialized() and EXPORT.is_dir() and not (EXPORT / UNMATERIALIZED_FILE).exists()
            and (INDEX / "image.index").exists() and not (INDEX / PARTS_FILE).exists())


def cmd_stage(args) -> int:
    from laionbuild.stages import run_stage

    if wrong := output_layout_error(args.name, args.layout):
        raise LaionbuildError(wrong)
    if args.name in SPLIT_STAGES:  # a split build's root stage: its params.yaml is the SplitsRecipe
        from laionbuild.project.splits import load_root

        cfg = load_root(args.params)
    else:
        cfg = load_params(args.params)
    if args.name in TORCH_FREE_STAGES and without_torch.enable():
        log.info("stage %s runs without torch, in this process and those it spawns (img2dataset needs none; "
                 "LAIONBUILD_WITHOUT_TORCH=0 turns this off)", args.name)
    run_stage(args.name, cfg, args.part, all_parts=args.all_parts, params_yaml=args.params)
    # The stage's outputs are committed (atomic renames). Leave without the interpreter's
    # teardown: pyarrow's parquet threads can abort it at random after all the work is done
    # (apache/arrow#34314, "terminate called without an active exception", SIGABRT), which DVC
    # would count as a failed stage. (A JVM this process started exits when its stdin closes.)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_retry_failed(args) -> int:
    """Re-attempt the transient download failures of built parts and merge the successes in;
    then record the new outputs in dvc.lock (`dvc commit`), so the next build reruns only what
    follows the download of the parts that changed."""
    from laionbuild.project.funnel import load_stats
    from laionbuild.project.layout import part_dir
    from laionbuild.project.partwise import changed_in_place, is_per_kind, marker_of, refresh_manifest, restore_marker
    from laionbuild.stages.download import retry_part

    cfg = load_params(args.params)
    without_torch.enable()
    parts = args.part if args.part else list(cfg.subset.parts)
    per_kind = is_per_kind()
    if per_kind and Path("dvc.lock").exists():
        # the download kind is committed whole afterwards: it must be up to date but for its parts
        pending = json.loads(run_dvc("status", "--json", "download", capture=True).stdout or "{}").get("download", [])
        if any(k != "changed outs" for entry in pending if isinstance(entry, dict) for k in entry):
            raise RecipeError("retry-failed: the download stage is not up to date (its params or inputs changed): "
                              "`laionbuild build` first, then retry")
    changed = []
    for part in parts:
        if part not in cfg.subset.parts:
            raise RecipeError(f"--part {part}: not in subset.parts {list(cfg.subset.parts)}")
        marker = marker_of("download", part) if per_kind else None
        failed, recovered = retry_part(cfg, part)
        if marker is not None:
            restore_marker("download", part, marker)  # (a part rebuilt from its manifest has none)
        print(f"part {part}: {failed} transient failures re-attempted, {recovered} recovered")
        if recovered:
            changed.append(part)
    for part in changed if per_kind else []:  # (what reads the part must see it changed)
        changed_in_place("download", part, f"retry-failed: {json.dumps(load_stats(part_dir('download', part)), sort_keys=True)}")
    if changed and per_kind:
        refresh_manifest("download", list(cfg.subset.parts))
    if changed and Path("dvc.lock").exists():
        result = run_dvc("commit", "--force", *(["download"] if per_kind else [f"download@{p}" for p in changed]))
        if result.returncode:
            return result.returncode
    if changed:
        print("run `laionbuild build` to rebuild what follows (embeddings, tags, selection, index)")
    return 0


def cmd_gc_shards(args) -> int:
    """Prefixes under download.shards_url that no build refers to (laionbuild/project/shards_gc.py): listed,
    deleted with --delete."""
    from laionbuild.project.shards_gc import GcError, collect

    url = args.url or load_params(args.params).download.shards_url
    if not url:
        raise RecipeError(f"gc-shards: download.shards_url is not set in {args.params} (and no --url): "
                          "the shards are in the workspace, where `dvc gc` cleans them")
    try:
        lines, status = collect(url, delete=args.delete, incomplete=args.incomplete)
    except GcError as exc:
        raise RecipeError(str(exc)) from None
    print("\n".join(lines))
    return status


def cmd_query(args) -> int:
    from laionbuild.explore.query import encode, search

    if (args.text is None) == (args.image is None):
        raise RecipeError("query: give exactly one of --text or --image")
    cfg = load_params(args.params)
    results = search(encode(cfg, text=args.text, image=args.image), args.k)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['score']:.4f}\t{r['url']}\t{r['caption']}")
    return 0


def cmd_serve(args) -> int:
    from laionbuild.explore.serve import serve

    serve(load_params(args.params), args.host, args.port)
    return 0


def cmd_projector(args) -> int:
    from laionbuild.explore.projector import export, parse_build

    summary = export([parse_build(b) for b in args.builds], Path(args.out), cell=args.sprite_size,
                     limit=args.max_per_build)
    builds = ", ".join(f"{label}: {n}" for label, n in summary["builds"].items())
    print(f"wrote {args.out}: {summary['points']} points x {summary['dimensions']} ({builds}); "
          f"sprite {summary['sprite'] or 'none (no images)'}"
          + (f", {summary['missing_images']} without an image" if summary["missing_images"] else ""))
    print(f"view: tensorboard --logdir {args.out}  (Projector tab)")
    return 0


def cmd_status(args) -> int:
    from laionbuild.project.splits import is_split_root

    if is_split_root():
        raise RecipeError("status: this is a split build (dvc.yaml holds `union`): `dvc status` shows its stages; "
                          "`laionbuild status` reads one build's params.yaml")
    check_output_layouts()
    rows = stage_status()
    width = max(len(n) for n, _, _ in rows)
    for name, state, why in rows:
        print(f"{name:<{width}}  {state}" + (f" ({why})" if why else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laionbuild", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of expected errors too (or LAIONBUILD_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p):
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. recipe=demo select.min_clip_similarity=0.3")
        p.add_argument("--conf-dir", default="conf", help="config directory (default: conf)")
        p.add_argument("--output", default="params.yaml", help="where to write the composed recipe")

    p = sub.add_parser("compose", help="compose conf/ into params.yaml (validated)")
    overrides(p)
    p.add_argument("--help-keys", action="store_true",
                   help="print every recipe key with its type, default and allowed values, and exit")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("build", help="compose, then `dvc repro`")
    overrides(p)
    p.add_argument("--stage", help="build only up to this stage (e.g. embed, embed@0, select)")
    p.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: Hydra multirun overrides (a=1,2 b=x,y), one DVC experiment per point")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress lines (stages, parts, shards, samples/s) and a live funnel "
                        "(default: on when stderr is a terminal)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("materialize", help="build the shards, embeddings, export and index of the sweep point in "
                                           "the workspace (assemble.materialize=false, e.g. after `dvc exp apply "
                                           "NAME`): byte-identical to a plain build of its recipe")
    p.add_argument("experiment", nargs="?", help="`dvc exp apply` this experiment first")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress lines (default: on when stderr is a terminal)")
    p.set_defaults(func=cmd_materialize)

    p = sub.add_parser("init", help="scaffold a dataset repo (git + DVC, conf/config.yaml over the shipped conf/, "
                                    "dvc.yaml, params.yaml)")
    p.add_argument("dir")
    p.add_argument("--copy-conf", action="store_true",
                   help="copy every shipped group and recipe into conf/ (a frozen copy) instead of searching them "
                        "after the repo's own conf/")
    p.add_argument("--graph", choices=("per-part", "per-kind"), default="per-part",
                   help="the stage graph: a DVC stage per part and kind (default), or per kind over every part "
                        "(fewer, longer stages: for 1,000+ parts; see `laionbuild graph`)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("graph", help="write dvc.yaml as the per-part or the per-kind stage graph")
    p.add_argument("kind", choices=("per-part", "per-kind"))
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    p.add_argument("name", choices=STAGES + SPLIT_STAGES)
    p.add_argument("--part", type=int, help="part id, for per-part stages")
    p.add_argument("--all-parts", action="store_true",
                   help="a per-part stage over every part of subset.parts not up to date (the per-kind graph)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--layout", type=int, help="the output layout dvc.yaml was written for (assemble: 2); a stage "
                                              "refuses another, so an old dvc.yaml never keeps outputs of an old layout")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("retry-failed", help="re-attempt transient download failures (timeouts, connection "
                                            "errors, 429, 5xx) of built parts and merge the successes in")
    p.add_argument("--part", type=int, action="append", help="part id (repeatable; default: every part)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_retry_failed)

    p = sub.add_parser("gc-shards", help="list (and with --delete, delete) the prefixes under download.shards_url "
                                         "that no build refers to (workspace, commits, experiments)")
    p.add_argument("--delete", action="store_true", help="delete them (default: only list)")
    p.add_argument("--incomplete", action="store_true",
                   help="also unreferenced prefixes never committed (killed downloads) and retry scratch")
    p.add_argument("--url", help="the shards_url to clean (default: download.shards_url of --params)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_gc_shards)

    p = sub.add_parser("query", help="nearest selected samples to a text or an image (url, caption, score)")
    p.add_argument("--text")
    p.add_argument("--image", help="path of an image file")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="JSON with key, url, caption, score")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("serve", help="search page and clip-retrieval-compatible JSON API (/knn-service) "
                                     "over the build's index")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1234, help="0: any free port (printed)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("projector", help="TensorBoard projector files of one or several builds' embeddings")
    p.add_argument("builds", nargs="+", metavar="BUILD",
                   help="[LABEL=]PATH[@REV]: a built project dir, at a git revision or DVC experiment with @REV")
    p.add_argument("--out", required=True, help="output directory (replaced)")
    p.add_argument("--sprite-size", type=int, default=64, help="thumbnail side in the sprite, px (default 64)")
    p.add_argument("--max-per-build", type=int, help="at most this many points per build (evenly spaced)")
    p.set_defaults(func=cmd_projector)

    p = sub.add_parser("status", help="per stage and part: built / stale (file: PATH | params: KEY | deps: PATH) / "
                                      "missing")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # wherever it is on the line (`laionbuild build --debug ...` too)
        argv = [arg for arg in argv if arg != "--debug"]
        os.environ["LAIONBUILD_DEBUG"] = "1"  # the stage processes DVC starts show tracebacks too
    # overrides may come after options too (`build --stage dedup engine=spark`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except LaionbuildError as exc:
        # a user's mistake (recipe, input file, command line): one line; anything else is a bug
        # and keeps its traceback
        if os.environ.get("LAIONBUILD_DEBUG", "") not in ("", "0"):
            raise
        print(f"laionbuild: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
