"""Regenerate the bundled demo source (demo/metadata + demo/images).

The demo is committed; this script documents how it was made and lets anyone remake it
byte-for-byte (fixed seed). Needs scikit-image (its sample photos ship inside the package).

    .venv/bin/python scripts/make_demo.py
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1] / "demo"
HOST = "http://demo.laionbuild.invalid"
PARTS = 3
SEED = 1234

# (skimage name, caption, has a human face)
PHOTOS = [
    ("astronaut", "portrait of an astronaut in a white space suit with the american flag", True),
    ("coffee", "a cup of coffee on a saucer seen from above", False),
    ("chelsea", "a tabby cat looking to the side", False),
    ("cat", "close-up of a ginger cat", False),
    ("rocket", "a rocket on the launch pad at dusk", False),
    ("camera", "black and white photo of a cameraman with a tripod", True),
    ("immunohistochemistry", "microscope image of stained tissue", False),
    ("hubble_deep_field", "hubble deep field, thousands of galaxies", False),
    ("coins", "old coins laid out on a table", False),
    ("moon", "grayscale photo of the surface of the moon", False),
    ("clock", "a wall clock, black and white", False),
    ("colorwheel", "a colour wheel with every hue", False),
]
SHAPES = ["circle", "square", "triangle", "stripes", "checkerboard"]
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 210), "yellow": (240, 210, 40),
    "purple": (140, 50, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245),
}
LICENSES = ["?", "creativecommons.org/licenses/by/4.0/", "creativecommons.org/licenses/by-sa/3.0/"]


def _photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    return image.convert("RGB")


def _shape(shape: str, fg, bg, size) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    m = min(w, h)
    if shape == "circle":
        draw.ellipse([w / 2 - m / 3, h / 2 - m / 3, w / 2 + m / 3, h / 2 + m / 3], fill=fg)
    elif shape == "square":
        draw.rectangle([w / 2 - m / 3, h / 2 - m / 3, w / 2 + m / 3, h / 2 + m / 3], fill=fg)
    elif shape == "triangle":
        draw.polygon([(w / 2, h / 2 - m / 3), (w / 2 - m / 3, h / 2 + m / 3), (w / 2 + m / 3, h / 2 + m / 3)], fill=fg)
    elif shape == "stripes":
        for x in range(0, w, max(4, w // 8)):
            draw.rectangle([x, 0, x + max(2, w // 16), h], fill=fg)
    else:
        step = max(4, m // 6)
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2 == 0:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=fg)
    return image


def _resized(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop then a resize, so sizes and aspect ratios vary (some very wide or tall)."""
    w, h = image.size
    aspect = rng.choice([1.0, 1.0, 0.75, 1.33, 0.5, 2.0, 3.0])
    cw = min(w, int(h * aspect)) if aspect >= 1 else w
    ch = int(cw / aspect) if aspect >= 1 else min(h, int(w / aspect))
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = image.crop((x0, y0, x0 + cw, y0 + ch))
    longest = rng.choice([64, 96, 128, 160, 200, 256, 320])
    scale = longest / max(crop.size)
    return crop.resize((max(8, int(crop.width * scale)), max(8, int(crop.height * scale))), Image.BILINEAR)


def main() -> None:
    rng = random.Random(SEED)
    if ROOT.exists():
        shutil.rmtree(ROOT)
    (ROOT / "images").mkdir(parents=True)
    (ROOT / "metadata").mkdir(parents=True)

    samples = []  # (file name, caption, has_face, image)
    for name, caption, face in PHOTOS:
        base = _photo(name)
        for variant in range(5 if face else 3):
            image = base if variant == 0 else _resized(base, rng)
            if variant == 0:
                image = image.resize((image.width * 256 // max(image.size), image.height * 256 // max(image.size)))
            if variant % 2 == 1:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            samples.append((f"{name}_{variant}.jpg", caption if variant == 0 else f"{caption}, variant {variant}", face, image))
    while len(samples) < 108:
        shape = rng.choice(SHAPES)
        fg, bg = rng.sample(sorted(COLOURS), 2)
        size = rng.choice([(64, 64), (128, 128), (200, 100), (96, 288), (320, 160), (150, 150), (400, 100)])
        caption = f"a {fg} {shape} on a {bg} background"
        samples.append((f"shape_{len(samples):03d}.jpg", caption, False, _shape(shape, COLOURS[fg], COLOURS[bg], size)))

    rows = []
    for file_name, caption, face, image in samples:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        (ROOT / "images" / file_name).write_bytes(buffer.getvalue())
        rows.append({"URL": f"{HOST}/images/{file_name}", "TEXT": caption, "WIDTH": image.width,
                     "HEIGHT": image.height, "has_face": face})
    # Broken URLs: missing files (404) and a file that is not an image (decode error).
    (ROOT / "images" / "not_an_image.jpg").write_text("this is text, not a jpeg\n")
    for i in range(4):
        rows.append({"URL": f"{HOST}/images/missing_{i}.jpg", "TEXT": f"a photo that is gone {i}",
                     "WIDTH": 100, "HEIGHT": 100, "has_face": False})
    rows.append({"URL": f"{HOST}/images/not_an_image.jpg", "TEXT": "a file that is not an image",
                 "WIDTH": 100, "HEIGHT": 100, "has_face": False})
    rng.shuffle(rows)

    for i, row in enumerate(rows):
        row["SAMPLE_ID"] = 1_000_000 + i
        row["LICENSE"] = rng.choice(LICENSES)
        row["NSFW"] = rng.choices(["UNLIKELY", "UNSURE", "NSFW", None], weights=[80, 8, 6, 6])[0]
        row["similarity"] = round(rng.uniform(0.25, 0.40), 4)

    parts = [rows[i::PARTS] for i in range(PARTS)]
    # A few exact duplicate rows (same URL and TEXT, other SAMPLE_ID), as the crawl had.
    for p, part in enumerate(parts):
        for j in (1, 5):
            dup = dict(part[j])
            dup["SAMPLE_ID"] = 2_000_000 + 10 * p + j
            part.insert(len(part) - 2, dup)
    columns = ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW", "similarity", "has_face"]
    schema = pa.schema([("SAMPLE_ID", pa.int64()), ("URL", pa.string()), ("TEXT", pa.string()),
                        ("HEIGHT", pa.int32()), ("WIDTH", pa.int32()), ("LICENSE", pa.string()),
                        ("NSFW", pa.string()), ("similarity", pa.float64()), ("has_face", pa.bool_())])
    for p, part in enumerate(parts):
        table = pa.table({c: [r[c] for r in part] for c in columns}, schema=schema)
        pq.write_table(table, ROOT / "metadata" / f"part-{p:05d}.parquet")
    summary = {"parts": PARTS, "rows": sum(len(p) for p in parts), "images": len(samples)}
    (ROOT / "README.md").write_text(
        "# Demo source\n\nGenerated by `scripts/make_demo.py` (seeded; scikit-image sample photos and drawn shapes).\n"
        f"{summary['rows']} metadata rows in {PARTS} parts, {summary['images']} images, a few exact duplicate rows,\n"
        "4 URLs that 404 and one that is not an image. URLs use the host `demo.laionbuild.invalid`, which the\n"
        "download stage serves from `demo/` on 127.0.0.1 while it runs (`download.local_server`).\n"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
