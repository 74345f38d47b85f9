"""`laionbuild serve`: a local search page and JSON API over a build's index.

The API follows clip-retrieval's back end (`clip_retrieval/clip_back.py`), so its clients
(`clip_retrieval.clip_client.ClipClient`, the clip-retrieval front end) work against a build:

- `POST /knn-service` {text | image (base64) | embedding_input, modality, num_images,
  num_result_ids, indice_name, deduplicate, use_mclip, use_safety_model, use_violence_detector,
  aesthetic_score, aesthetic_weight} -> [{id, similarity, url, caption, key, <tags>}], best first;
  the first `num_images` results carry metadata, the rest (up to `num_result_ids`) id and
  similarity only, as in clip-back. Extension: `tag_filters` {tag: {min, max}} keeps results
  whose tag lies in range. `image_url` is refused (the server makes no outbound request: send
  the image itself); use_mclip, the safety and violence models and aesthetic re-weighting are
  not available and are ignored, listed in the `X-Laionbuild-Ignored` response header.
- `GET /indices-list` -> [the recipe's name]; `POST /metadata` {ids} -> [{id, metadata}].
- Ours: `GET /image/ID` (the image, from `data/dataset` shards: a build's URLs may be gone; on
  an unmaterialised point from the download's shards),
  `GET /embedding/ID` (its image embedding: the page's "neighbours" query), `GET /build-info`.

On an unmaterialised point (`assemble.materialize=false`) the index holds every embedded sample
and every endpoint answers for the selected ones only: searches apply the selection as a faiss id
filter built once at start (laionbuild/project/index_filter.py), and an id outside it is a 404.

Errors are JSON {"error": ...} with a 4xx/5xx status; the page shows them."""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
from importlib import resources

import numpy as np

from laionbuild.explore.query import BuildIndex, Encoder
from laionbuild.project.atomic import read_json
from laionbuild.project.layout import DATASET, EMBEDDINGS, part_dir
from laionbuild.shards.thumbs import ShardImages, add_downloaded_parts

log = logging.getLogger(__name__)
DEDUP_SIMILARITY = 0.94  # clip-back's threshold for "the same image" among results
IGNORED = ("use_mclip", "use_safety_model", "use_violence_detector", "aesthetic_score")
META_COLUMNS = ("url", "caption", "key")
MEDIA_TYPES = {b"\xff\xd8": "image/jpeg", b"\x89P": "image/png", b"RI": "image/webp"}


class RequestError(ValueError):
    """A request the server cannot answer as asked: 400 with this message."""


class SearchService:
    """The build's index, model, metadata and images, loaded once; one method per endpoint."""

    def __init__(self, cfg):
        self.name = cfg.recipe.name
        self.index = BuildIndex()
        self.encoder = Encoder(cfg)
        meta = self.index.metadata
        self.tags = [c for c in meta.columns if c not in META_COLUMNS and np.issubdtype(meta[c].dtype, np.number)]
        self.images = ShardImages()
        if self.index.filter is None:
            for shard in sorted(DATASET.glob("*.tar")):
                self.images.add_shard(str(shard))
            readme = EMBEDDINGS / "README.txt"  # assemble says there whether the weights were untrained
            self.untrained = readme.exists() and "UNTRAINED" in readme.read_text()
        else:  # an unmaterialised point: images from the download's shards (only selected rows are reachable)
            add_downloaded_parts(self.images, cfg.subset.parts, only=set(meta["key"].astype(str)))
            self.untrained = any(read_json(part_dir("embed", p) / "model.json")["untrained"] for p in cfg.subset.parts)

    def info(self) -> dict:
        meta = self.index.metadata
        tags = {}
        for c in self.tags:
            values = meta[c].dropna()
            tags[c] = {"min": _plain(values.min()) if len(values) else None,
                       "max": _plain(values.max()) if len(values) else None,
                       "integer": bool(len(values) and (values == values.round()).all())}
        return {"name": self.name, "samples": len(self.index), "dimensions": int(self.index.index.d),
                "untrained": self.untrained, "tags": tags}

    def record(self, row: int) -> dict:
        meta = self.index.metadata
        return {c: _plain(meta.at[row, c]) for c in (*META_COLUMNS, *self.tags) if c in meta.columns}

    def query_embedding(self, body: dict) -> np.ndarray:
        text, image = body.get("text"), body.get("image")
        if isinstance(text, str) and text.strip():
            return self.encoder.text(text)
        if image:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(base64.b64decode(image, validate=False))) as opened:
                    return self.encoder.image(opened)
            except (binascii.Error, UnidentifiedImageError, OSError) as exc:
                raise RequestError(f"`image`: not a base64-encoded image ({exc})") from None
        if body.get("image_url"):
            raise RequestError("`image_url`: laionbuild serve makes no outbound request; send the image "
                               "base64-encoded in `image`")
        embedding = body.get("embedding_input")
        if embedding is not None:
            query = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
            if query.shape[1] != self.index.index.d or not np.isfinite(query).all():
                raise RequestError(f"`embedding_input`: {query.shape[1]} numbers; the index holds "
                                   f"{self.index.index.d}-dimensional embeddings")
            return query
        raise RequestError("the query is empty: give one of `text`, `image` or `embedding_input`")

    def knn(self, body: dict) -> list[dict]:
        if body.get("indice_name") not in (None, "", self.name):
            raise RequestError(f"`indice_name`: unknown index `{body['indice_name']}`; this server has ['{self.name}']")
        if body.get("modality", "image") != "image":
            raise RequestError(f"`modality`: `{body['modality']}` is not indexed; this build has an image index "
                               "only (data/index/image.index): use `image`")
        num_images = _count(body, "num_images", 40)
        num_result_ids = max(_count(body, "num_result_ids", num_images), num_images)
        filters = self._filters(body.get("tag_filters") or {})
        query = self.query_embedding(body)
        deduplicate = bool(body.get("deduplicate", False))
        wanted = num_result_ids if not (filters or deduplicate) else max(num_result_ids * 10, 1000)
        scores, rows = self.index.search(query, wanted)
        meta = self.index.metadata
        kept: list[tuple[float, int]] = []
        seen: list[np.ndarray] = []
        for score, row in zip(scores, rows):
            if any(not _in_range(meta.at[row, tag], low, high) for tag, (low, high) in filters.items()):
                continue
            if deduplicate:
                emb = self.index.embedding(int(row))
                emb = emb / (np.linalg.norm(emb) or 1.0)
                if any(float(emb @ other) >= DEDUP_SIMILARITY for other in seen):
                    continue
                seen.append(emb)
            kept.append((float(score), int(row)))
            if len(kept) == num_result_ids:
                break
        return [{**(self.record(row) if i < num_images else {}), "id": row, "similarity": score}
                for i, (score, row) in enumerate(kept)]

    def _filters(self, spec) -> dict[str, tuple[float | None, float | None]]:
        if not isinstance(spec, dict):
            raise RequestError("`tag_filters`: expected {tag: {\"min\": x, \"max\": y}}")
        out = {}
        for tag, bounds in spec.items():
            if tag not in self.tags:
                raise RequestError(f"`tag_filters`: no tag `{tag}` in this build; tags: {', '.join(self.tags)}")
            if not isinstance(bounds, dict) or set(bounds) - {"min", "max"}:
                raise RequestError(f"`tag_filters.{tag}`: expected {{\"min\": x, \"max\": y}}")
            try:
                out[tag] = tuple(None if bounds.get(k) in (None, "") else float(bounds[k]) for k in ("min", "max"))
            except (TypeError, ValueError):
                raise RequestError(f"`tag_filters.{tag}`: min and max must be numbers") from None
        return out

    def metadata(self, body: dict) -> list[dict]:
        ids = body.get("ids")
        if not isinstance(ids, list):
            raise RequestError("`ids`: expected a list of result ids")
        return [{"id": i, "metadata": self.record(self._row(i))} for i in ids]

    def _row(self, value) -> int:
        try:
            row = int(value)
        except (TypeError, ValueError):
            raise RequestError(f"id `{value}`: not an integer") from None
        if row not in self.index:
            where = (f"(0..{len(self.index) - 1})" if self.index.filter is None
                     else "(not a sample of this point's selection, data/selected)")
            raise LookupError(f"id {row}: not in the index {where}")
        return row

    def image(self, value) -> tuple[bytes, str]:
        key = self.index.metadata.at[self._row(value), "key"]
        if key not in self.images:
            raise LookupError(f"id {value}: sample {key} has no image in {DATASET} (an embeddings-only build?)")
        data = self.images.read(key)
        return data, MEDIA_TYPES.get(data[:2], "application/octet-stream")

    def embedding(self, value) -> dict:
        row = self._row(value)
        return {"id": row, "embedding": self.index.embedding(row).tolist()}


def _count(body: dict, name: str, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"`{name}`: expected a positive integer")
    try:
        count = int(value)
    except ValueError:
        raise RequestError(f"`{name}`: expected a positive integer, got `{value}`") from None
    if count < 1:
        raise RequestError(f"`{name}`: expected a positive integer, got {count}")
    return count


def _in_range(value, low: float | None, high: float | None) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def page() -> str:
    return resources.files("laionbuild").joinpath("explore/static/search.html").read_text()


def create_app(service: SearchService):
    """The Flask app over `service` (clip-back's routes, plus the page and ours)."""
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    app = Flask("laionbuild.explore.serve")

    def body() -> dict:
        data = request.get_json(force=True, silent=True)
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        return data

    @app.errorhandler(RequestError)
    def bad_request(exc):
        return jsonify(error=str(exc)), 400

    @app.errorhandler(LookupError)
    def not_found(exc):
        return jsonify(error=str(exc).strip("'\"")), 404

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return jsonify(error=f"{request.path}: {exc.description}"), exc.code

    @app.errorhandler(Exception)
    def failed(exc):
        log.exception("request failed")
        return jsonify(error=f"{type(exc).__name__}: {exc}"), 500

    @app.get("/")
    def index():
        return Response(page(), mimetype="text/html")

    @app.get("/indices-list")
    def indices_list():
        return jsonify([service.name])

    @app.get("/build-info")
    def build_info():
        return jsonify(service.info())

    @app.post("/knn-service")
    def knn_service():
        data = body()
        response = jsonify(service.knn(data))
        ignored = [name for name in IGNORED if data.get(name) not in (None, "", False)]
        if ignored:
            response.headers["X-Laionbuild-Ignored"] = ", ".join(ignored)
        return response

    @app.post("/metadata")
    def metadata():
        return jsonify(service.metadata(body()))

    @app.get("/image/<value>")
    def image(value):
        data, media_type = service.image(value)
        return Response(data, mimetype=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.get("/embedding/<value>")
    def embedding(value):
        return jsonify(service.embedding(value))

    return app


def serve(cfg, host: str, port: int) -> None:
    """Load the build, then answer requests until interrupted. Prints the URL once listening
    (`--port 0` picks a free port)."""
    from werkzeug.serving import make_server

    print("loading the index, the metadata and the model ...", flush=True)
    service = SearchService(cfg)
    server = make_server(host, port, create_app(service), threaded=True)
    print(f"serving {service.name} ({len(service.index)} samples) on http://{host}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
