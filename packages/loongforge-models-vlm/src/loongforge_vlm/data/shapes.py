"""``builtin:shapes``: a small deterministic multimodal conversation set (coloured shapes on white,
captioned) for demos and tests, written as PNG files plus a ``messages`` jsonl."""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("square", "circle", "triangle")
QUESTIONS = ("<image>\nWhat is in the picture?", "<image>\nDescribe the image.", "What do you see?\n<image>")


def shape_image(width: int, height: int, colour: str, shape: str = "square"):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = width // 5, height // 5, 4 * width // 5, 4 * height // 5
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        d.rectangle((x0, y0, x1, y1), fill=colour)
    return img


def write_shapes(out_dir: str | Path, n: int = 64, seed: int = 0) -> Path:
    """Write ``n`` captioned images under ``out_dir`` (if not there yet); returns the jsonl path."""
    out = Path(out_dir)
    path = out / "shapes.jsonl"
    if path.is_file():
        return path
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        size = (rng.choice((56, 84, 112)), rng.choice((56, 84, 112)))
        name = f"shape_{i:04d}.png"
        shape_image(*size, colour, shape).save(out / name)
        lines.append({"messages": [{"role": "user", "content": rng.choice(QUESTIONS)},
                                   {"role": "assistant", "content": f"A {colour} {shape}."}],
                      "images": [name]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(path)
    return path
