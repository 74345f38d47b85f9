"""watermark: LAION-5B's watermark probability of one part (`data/watermark/part_N/watermark.parquet`:
key, watermark_score), from the downloaded shards with the pixel model of
LAION-AI/LAION-5B-WatermarkDetection (`tag.watermark`, laionbuild/models/watermark.py,
docs/watermark.md).

Images are decoded and resized on `tag.watermark.decode_threads` threads and scored
`tag.watermark.batch_size` at a time on `tag.watermark.device`. Each finished shard's scores are
written atomically to `data/.work/watermark/part_N-<fingerprint>/`, so a killed run resumes with the
shards it has not finished; the part is assembled in key order and moved into place only when
every shard is done. With `tag.watermark.weights: null` the table has the keys and no score, and
nothing is decoded; a weights file that does not exist skips the score with a warning (as a
missing score head's weights do: the column is absent, never made up), recorded in stats.json."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laionbuild.project.atomic import atomic_dir, atomic_file
from laionbuild.project.funnel import Counts
from laionbuild.project.inputs import recorded
from laionbuild.project.layout import KEY_COLUMN, WORK, part_dir
from laionbuild.recipe.errors import InputError
from laionbuild.recipe.values import WATERMARK_COLUMN as COLUMN
from laionbuild.shards.storage import Shard, is_url, part_shards

log = logging.getLogger(__name__)
SCHEMA = pa.schema([("key", pa.string()), (COLUMN, pa.float32())])


def _downloaded_keys(part: int) -> list[str]:
    """The part's downloaded keys from img2dataset's parquet files (always in the part's directory)."""
    keys = []
    for path in sorted(part_dir("download", part).glob("*.parquet")):
        t = pq.read_table(path, columns=["status", KEY_COLUMN]).to_pydict()
        keys += [k for k, s in zip(t[KEY_COLUMN], t["status"]) if s == "success"]
    return sorted(str(k) for k in keys)


def _fingerprint(cfg, shards: list[Shard]) -> str:
    w = cfg.tag.watermark
    # with the checkpoint's digest (the inputs stage's record)
    digest = hashlib.sha256(json.dumps([w.weights, w.architecture, list(w.head), w.image_size,
                                        recorded("watermark.json")], sort_keys=True).encode())
    for shard in shards:  # a URL's prefix is named by its content; a local file also by its mtime
        mtime = 0 if is_url(shard.location) else Path(shard.location).stat().st_mtime_ns
        digest.update(f"{shard.location}:{shard.size}:{mtime}".encode())
    return digest.hexdigest()[:16]


def _tag_shard(scorer, shard: Shard, target: Path, batch_size: int, pool: ThreadPoolExecutor) -> int:
    """Scores of one shard -> `target` (written atomically). Returns the row count."""
    import torch
    from PIL import Image

    from laionbuild.shards.samples import shard_images

    samples = shard_images(shard.location)

    def tensor(sample: tuple[str, bytes]):
        key, data = sample
        try:
            return scorer.transform(Image.open(io.BytesIO(data)))
        except OSError as err:
            raise InputError(f"{shard.location}: sample {key}: the image cannot be decoded ({err}); "
                             f"rebuild the part's download") from None

    scores = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        scores += scorer.score_tensors(torch.stack(list(pool.map(tensor, batch)))).tolist()
    table = pa.table({"key": pa.array([k for k, _ in samples], pa.string()), COLUMN: pa.array(scores, pa.float32())},
                     schema=SCHEMA)
    with atomic_file(target) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def run(cfg, part: int) -> None:
    w = cfg.tag.watermark
    counts = Counts()
    skipped = []
    weights = Path(w.weights).expanduser() if w.weights is not None else None
    if weights is not None and not weights.is_file():
        skipped.append(f"tag.watermark.weights: {weights} not found; the {COLUMN} column is skipped (no score is "
                       "made up)")
        log.warning(skipped[-1])
    if weights is None or skipped:
        table = pa.table({"key": pa.array(_downloaded_keys(part), pa.string())})
    else:
        from laionbuild.models.watermark import WatermarkScorer

        # a bad checkpoint or architecture fails here, before any image is read
        scorer = WatermarkScorer(weights, w.architecture, w.head, w.image_size, w.device)
        shards = part_shards(part_dir("download", part))
        work = WORK / "watermark" / f"part_{part}-{_fingerprint(cfg, shards)}"
        work.mkdir(parents=True, exist_ok=True)
        targets = [work / f"{shard.name}.parquet" for shard in shards]
        with ThreadPoolExecutor(max_workers=w.decode_threads) as pool:
            for shard, target in zip(shards, targets):
                if not target.exists():
                    log.debug("scored a shard of %d images", _tag_shard(scorer, shard, target, w.batch_size, pool))
        table = pa.concat_tables([pq.read_table(t) for t in targets]) if targets else SCHEMA.empty_table()
        table = table.sort_by("key")
        log.info("watermark scores of part %d on %s: %d images", part, scorer.device, table.num_rows)
    counts.set("watermark_tagged", table.num_rows)
    with atomic_dir(part_dir("watermark", part)) as out:
        pq.write_table(table, out / "watermark.parquet")
        counts.save(out, weights=w.weights, skipped=skipped)
    if weights is not None and not skipped:
        shutil.rmtree(work, ignore_errors=True)
