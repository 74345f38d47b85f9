"""Generated stand-ins for the real metadata sources: real file names, column names and value
quirks (NSFW tags UNLIKELY/UNSURE/NSFW/missing, duplicates within and across parts, MS-COCO's
five rows per image, LAION-Face's per-part id list)."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

LAION400M_NAME = "part-{part:05d}-5b54c5d5-bbcf-484d-a2ce-0d6f73df1a36-c000.snappy.parquet"
LAION400M_SCHEMA = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
                              ("HEIGHT", pa.int32()), ("WIDTH", pa.int32()), ("LICENSE", pa.string()),
                              ("NSFW", pa.string()), ("similarity", pa.float64())])


def laion400m_rows(part: int, rows: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(rows):
        sid = part * 1_000_000 + i
        words = " ".join(rng.choice(["a", "red", "cat", "on", "the", "beach", "photo", "of", "dog"])
                         for _ in range(rng.randint(0, 12)))
        out.append({
            "SAMPLE_ID": sid,
            "URL": f"http://img.example.com/{rng.randint(0, rows * 3)}.jpg",
            "TEXT": words,
            "HEIGHT": rng.choice([None, 50, 120, 300, 640, 1000]),
            "WIDTH": rng.choice([None, 40, 100, 300, 800, 2000]),
            "LICENSE": rng.choice(["?", "creativecommons.org/licenses/by/4.0/"]),
            "NSFW": rng.choice(["UNLIKELY", "UNLIKELY", "UNSURE", "NSFW", None]),
            "similarity": round(rng.uniform(0.25, 0.45), 4),
        })
    return out


def write_laion400m(directory: Path, parts: int = 3, rows: int = 200, seed: int = 0) -> dict[int, list[dict]]:
    """Parts with duplicates (same URL and TEXT) inside a part and across parts."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    data = {p: laion400m_rows(p, rows, rng) for p in range(parts)}
    for p in range(parts):
        for i in range(0, rows, 17):  # copies of earlier rows of this part and of the previous part
            source = data[p][rng.randrange(i + 1)] if i else data[p][0]
            data[p][i] = {**data[p][i], "URL": source["URL"], "TEXT": source["TEXT"]}
            if p:
                other = data[p - 1][rng.randrange(rows)]
                data[p][i + 1] = {**data[p][i + 1], "URL": other["URL"], "TEXT": other["TEXT"]}
        table = pa.Table.from_pylist(data[p], schema=LAION400M_SCHEMA)
        pq.write_table(table, directory / LAION400M_NAME.format(part=p))
    return data


def write_mscoco(directory: Path, images: int = 30) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"URL": f"http://images.cocodataset.org/train2017/{i:012d}.jpg", "TEXT": f"caption {c} of image {i}",
             "key": f"{i * 5 + c}"} for i in range(images) for c in range(5)]
    random.Random(1).shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows), directory / "mscoco.parquet")
    return rows


CRAWL_LAYOUTS = [  # (extension, header) — names and order differ from file to file, as in raw crawls
    ("csv", ["URL", "TEXT", "WIDTH"]),
    ("tsv", ["TEXT", "URL", "HEIGHT", "extra"]),
    ("csv", ["url", "text"]),
    ("tsv", ["alt", "image_url"]),
    ("csv", ["caption", "license", "url"]),
]


def write_crawl(directory: Path, rows_per_file: int = 40) -> list[tuple[str, str]]:
    """Raw crawl CSV/TSV files; returns every (url, caption) written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for f, (ext, header) in enumerate(CRAWL_LAYOUTS):
        sep = "," if ext == "csv" else "\t"
        lines = [sep.join(header)]
        for r in range(rows_per_file):
            url, caption = f"http://crawl{f}.example/{r}.jpg", f"crawled caption {f} {r}"
            values = {"URL": url, "url": url, "image_url": url, "TEXT": caption, "text": caption, "alt": caption,
                      "caption": caption, "WIDTH": "64", "HEIGHT": "48", "extra": "x", "license": "?"}
            lines.append(sep.join(values[h] for h in header))
            written.append((url, caption))
        (directory / f"crawl_{f:03d}.{ext}").write_text("\n".join(lines) + "\n")
    return written


# LAION-2B-multi's metadata release: LAION-400M's columns plus LANGUAGE (as detected at crawl time)
LAION2B_MULTI_NAME = "part-{part:05d}-fc82da14-99c9-4ff6-ab6a-ac853ac82819-c000.snappy.parquet"
LAION2B_MULTI_SCHEMA = pa.schema([*LAION400M_SCHEMA, ("LANGUAGE", pa.string())])
# captions in several scripts: Latin with diacritics, Cyrillic, Greek, Japanese (kana and kanji)
MULTI_WORDS = {
    "de": ["eine", "rote", "Katze", "am", "Strand", "Hund", "Foto", "schöne", "Straße", "über"],
    "fr": ["un", "chat", "rouge", "sur", "la", "plage", "photo", "été", "chien", "très"],
    "ru": ["кошка", "на", "пляже", "красная", "собака", "фото", "улица", "ёж"],
    "el": ["γάτα", "στην", "παραλία", "κόκκινη", "σκύλος", "φωτογραφία"],
    "ja": ["海", "の", "猫", "赤い", "写真", "犬", "です", "ビーチ"],
}


def write_laion2b_multi(directory: Path, image_url: str, parts: int = 2, rows: int = 30,
                        seed: int = 0) -> dict[int, list[dict]]:
    """LAION-2B-multi-style parts whose URLs are `image_url`/img/N.jpg (tests/imageserver.py),
    captions in five languages and scripts with their LANGUAGE code, and LAION's NSFW tags."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    data = {}
    for p in range(parts):
        data[p] = []
        for i in range(rows):
            language = rng.choice(sorted(MULTI_WORDS))
            words = MULTI_WORDS[language]
            sep = "" if language == "ja" else " "
            data[p].append({
                "SAMPLE_ID": p * 1_000_000 + i, "URL": f"{image_url}/img/{p * rows + i}.jpg",
                "TEXT": sep.join(rng.choice(words) for _ in range(rng.randint(2, 8))),
                "HEIGHT": 40, "WIDTH": 48, "LICENSE": "?",
                "NSFW": rng.choice(["UNLIKELY", "UNLIKELY", "UNLIKELY", "UNSURE", "NSFW", None]),
                "similarity": round(rng.uniform(0.2, 0.4), 4), "LANGUAGE": language})
        pq.write_table(pa.Table.from_pylist(data[p], schema=LAION2B_MULTI_SCHEMA),
                       directory / LAION2B_MULTI_NAME.format(part=p))
    return data
