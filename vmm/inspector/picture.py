"""A picture of physical memory by owner (``vmm pt --png``), drawn with Pillow.

One cell per group of frames, row-major from frame 0 at the top left; a title
says what the picture is and how many frames one cell stands for, a legend
names every owner with its colour and size. The map is at most 512x512 cells
whatever the RAM size: a 16 GiB guest (4 Mi frames) gets 16 frames per cell
instead of a 512x32768 image. A cell shows the owner with the most frames in
it, except that free frames give way to anything else present, so a lone
page table in a mostly free group still shows.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..units import human_size
from .physical import OWNERS, PhysicalView

MAX_CELLS = 512 * 512
MAP_PX = 512  # width of the map in pixels
_FREE = 0
_BG, _FG, _DIM = (255, 255, 255), (20, 20, 20), (110, 110, 110)


def layout(frames: int) -> tuple[int, int, int, int]:
    """(frames per cell, columns, rows, pixels per cell) for ``frames`` frames."""
    per_cell = max(1, -(-frames // MAX_CELLS))
    cells = -(-frames // per_cell)
    cols = 256 if cells <= 256 * 256 else 512
    return per_cell, cols, -(-cells // cols), MAP_PX // cols


def cell_owners(owner: np.ndarray, per_cell: int) -> np.ndarray:
    """The owner each cell shows (see the module doc)."""
    if per_cell == 1:
        return owner
    cells = -(-len(owner) // per_cell)
    padded = np.full(cells * per_cell, _FREE, dtype=np.uint8)
    padded[: len(owner)] = owner
    groups = padded.reshape(cells, per_cell)
    counts = np.stack([(groups == k).sum(axis=1) for k in range(len(OWNERS))], axis=1)
    has_other = counts[:, 1:].sum(axis=1) > 0
    counts[has_other, _FREE] = -1  # free gives way
    return counts.argmax(axis=1).astype(np.uint8)


def _size(frames: int) -> str:
    return human_size(frames * 4096)


def render(view: PhysicalView, title: str = "guest physical memory by owner"):
    """The picture as a Pillow image."""
    font = ImageFont.load_default()
    per_cell, cols, rows, px = layout(view.frames)
    palette = np.array([OWNERS[k][1] for k in range(len(OWNERS))], dtype=np.uint8)
    grid = np.full(rows * cols, len(OWNERS), dtype=np.uint8)  # past the end: background
    grid[: -(-view.frames // per_cell)] = cell_owners(view.owner, per_cell)
    palette_bg = np.vstack([palette, np.array([_BG], dtype=np.uint8)])
    cells = palette_bg[grid.reshape(rows, cols)].repeat(px, axis=0).repeat(px, axis=1)

    margin, title_h, legend_w, line_h = 16, 44, 260, 18
    counts = view.owner_counts()
    legend_h = line_h * (len(OWNERS) + 2)
    map_h = rows * px
    width = margin + MAP_PX + margin + legend_w
    height = margin + title_h + max(map_h, legend_h) + margin
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    draw.text((margin, margin), title, fill=_FG, font=font)
    cell_what = "1 frame (4 KiB)" if per_cell == 1 else f"{per_cell} frames ({_size(per_cell)})"
    draw.text(
        (margin, margin + line_h),
        f"{_size(view.frames)} in {view.frames} frames; frame 0 top left, row by row; one cell = {cell_what}",
        fill=_DIM, font=font,
    )
    top = margin + title_h
    img.paste(Image.fromarray(np.ascontiguousarray(cells), "RGB"), (margin, top))
    draw.rectangle((margin - 1, top - 1, margin + MAP_PX, top + map_h), outline=_DIM)

    x = margin + MAP_PX + margin
    draw.text((x, top), "owner", fill=_FG, font=font)
    for i in range(len(OWNERS)):
        name, colour = OWNERS[i]
        y = top + line_h * (i + 1)
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=colour, outline=_DIM)
        draw.text((x + 20, y + 2), f"{name:<20} {_size(counts.get(name, 0)):>9}", fill=_FG, font=font)
    return img


def write_png(view: PhysicalView, path: str, title: str = "guest physical memory by owner") -> tuple[int, int]:
    """Save the picture; returns its (width, height). OSError if the file cannot be written."""
    img = render(view, title)
    img.save(path, format="PNG")
    return img.size
