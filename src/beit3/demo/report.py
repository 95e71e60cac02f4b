"""Pictures for the demo report, drawn with PIL alone (no plotting library to install).

* :func:`line_chart`: loss curves, one panel per series group, with axes and a legend;
* :func:`captioned_grid`: images with lines of text drawn under each (captions, answers);
* :func:`retrieval_grid`: one row per text query, its top images, the correct one framed green.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
GOOD, BAD = (30, 150, 60), (200, 40, 40)


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


@dataclass
class Series:
    """One line of a chart: ``x`` and ``y`` of equal length."""

    label: str
    x: Sequence[float]
    y: Sequence[float]


def increasing(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    """The points of a series in increasing ``x``, the later of two points at one ``x`` kept (a resumed
    run logs its steps again), so a line never runs back across the chart."""
    latest = dict(zip(x, y))
    order = sorted(latest)
    return order, [latest[k] for k in order]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * k / (count - 1) for k in range(count)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: Sequence[Series],
           x_label: str) -> None:
    left, top, right, bottom = box
    font = _font(12)
    draw.text((left + 50, top), title, fill=INK, font=_font(14))
    plot = (left + 50, top + 24, right - 10, bottom - 34)
    xs = [x for s in series for x in s.x]
    ys = [y for s in series for y in s.y]
    if not xs:
        draw.text((plot[0] + 10, plot[1] + 10), "no data", fill=INK, font=font)
        return
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (plot[0] + (x - x0) / (x1 - x0) * (plot[2] - plot[0]),
                plot[3] - (y - y0) / (y1 - y0) * (plot[3] - plot[1]))

    for value in _ticks(y0, y1):
        _, py = to_px(x0, value)
        draw.line([(plot[0], py), (plot[2], py)], fill=GRID)
        draw.text((left + 2, py - 6), f"{value:.2f}", fill=INK, font=font)
    for value in _ticks(x0, x1):
        px, _ = to_px(value, y0)
        draw.text((px - 12, plot[3] + 4), f"{value:.0f}", fill=INK, font=font)
    draw.rectangle(plot, outline=INK)
    draw.text(((plot[0] + plot[2]) // 2 - 15, bottom - 16), x_label, fill=INK, font=font)
    for number, line in enumerate(series):
        colour = SERIES_COLOURS[number % len(SERIES_COLOURS)]
        points = [to_px(x, y) for x, y in zip(*increasing(line.x, line.y))]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        legend_y = plot[1] + 4 + 15 * number
        draw.line([(plot[2] - 150, legend_y + 6), (plot[2] - 130, legend_y + 6)], fill=colour, width=3)
        draw.text((plot[2] - 125, legend_y), line.label, fill=INK, font=font)


def line_chart(panels: Sequence[tuple[str, Sequence[Series]]], *, x_label: str = "step", columns: int = 3,
               panel_size: tuple[int, int] = (420, 280)) -> Image.Image:
    """A grid of panels, each ``(title, series)``."""
    rows = -(-len(panels) // columns)
    width, height = panel_size
    image = Image.new("RGB", (width * min(columns, len(panels)), height * rows), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for number, (title, series) in enumerate(panels):
        col, row = number % columns, number // columns
        _panel(draw, (col * width, row * height, (col + 1) * width, (row + 1) * height), title, series, x_label)
    return image


def _wrap(text: str, width: int, font: ImageFont.ImageFont, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    return lines + ([current] if current else [])


def captioned_grid(items: Sequence[tuple[Image.Image, Sequence[tuple[str, tuple[int, int, int]]]]], *,
                   columns: int = 4, image_size: int = 160, text_width: int = 240, lines: int = 9) -> Image.Image:
    """Images (scaled to ``image_size``) each with coloured lines of text under it (wrapped)."""
    font = _font(12)
    cell_w, cell_h = text_width + 16, image_size + 14 + lines * 15
    rows = -(-len(items) // columns)
    canvas = Image.new("RGB", (cell_w * min(columns, len(items)), cell_h * rows), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for number, (image, texts) in enumerate(items):
        x, y = (number % columns) * cell_w + 8, (number // columns) * cell_h + 6
        thumb = image.convert("RGB").resize((image_size, image_size), Image.NEAREST)
        canvas.paste(thumb, (x + (text_width - image_size) // 2, y))
        ty = y + image_size + 4
        for text, colour in texts:
            for line in _wrap(text, text_width, font, draw):
                if ty + 15 > (number // columns + 1) * cell_h:
                    break
                draw.text((x, ty), line, fill=colour, font=font)
                ty += 15
    return canvas


def retrieval_grid(rows: Sequence[tuple[str, Sequence[tuple[Image.Image, bool]]]], *, image_size: int = 96,
                   text_width: int = 260) -> Image.Image:
    """One row per query: the query text, then its ranked images; the correct one framed green."""
    font = _font(12)
    k = max((len(hits) for _, hits in rows), default=1)
    row_h = image_size + 12
    canvas = Image.new("RGB", (text_width + k * (image_size + 8) + 8, row_h * len(rows) + 24), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 4), "text query", fill=INK, font=font)
    for rank in range(k):
        draw.text((text_width + rank * (image_size + 8) + 8, 4), f"#{rank + 1}", fill=INK, font=font)
    for number, (query, hits) in enumerate(rows):
        y = 24 + number * row_h
        for line_no, line in enumerate(_wrap(query, text_width - 16, font, draw)[: image_size // 15]):
            draw.text((8, y + line_no * 15), line, fill=INK, font=font)
        for rank, (image, correct) in enumerate(hits):
            x = text_width + rank * (image_size + 8) + 8
            canvas.paste(image.convert("RGB").resize((image_size, image_size), Image.NEAREST), (x, y))
            if correct:
                draw.rectangle([x - 3, y - 3, x + image_size + 2, y + image_size + 2], outline=GOOD, width=3)
    return canvas
