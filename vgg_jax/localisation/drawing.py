"""An image with its localisation guesses drawn on it: boxes, ranks, classes, probabilities."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw

# One colour per rank (best first), bright enough on dark and light images.
RANK_COLOURS = ((255, 48, 48), (255, 160, 0), (255, 230, 0), (64, 200, 255), (200, 120, 255))
# Small images are enlarged so that the labels stay legible: at least this many pixels a side.
_MIN_SIDE = 256
_LINE_WIDTH = 2


def draw_guesses(data: bytes, guesses: Sequence, names: Sequence[str], path: str) -> str:
    """Draws an image's guesses (best first, the best on top) and saves the picture.

    Args:
      data: the encoded image.
      guesses: `image.Guess`es (label, probability, pixel box), best first.
      names: class names, indexed by label.
      path: the output file (its extension picks the format, e.g. .png or .jpg).

    Returns:
      `path`.
    """
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = max(1.0, _MIN_SIDE / min(image.size))
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    ranks = list(reversed(range(len(guesses))))  # the best drawn last, on top
    corners = {}
    for rank in ranks:
        xmin, ymin, xmax, ymax = (v * scale for v in guesses[rank].box)
        corners[rank] = (xmin, ymin)
        # A pixel box covers its last pixel: the rectangle's far edge is xmax + 1.
        draw.rectangle((xmin, ymin, xmax + scale - 1, ymax + scale - 1),
                       outline=RANK_COLOURS[rank % len(RANK_COLOURS)], width=_LINE_WIDTH)
    for rank in ranks:  # labels over every box
        guess = guesses[rank]
        label = f"{rank + 1}. {names[guess.label]} {100 * guess.probability:.0f}%"
        draw.rectangle(draw.textbbox(corners[rank], label),
                       fill=RANK_COLOURS[rank % len(RANK_COLOURS)])
        draw.text(corners[rank], label, fill=(0, 0, 0))
    image.save(path)
    return path
