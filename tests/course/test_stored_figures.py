"""Every figure stored in a notebook is readable where a learner reads it: JupyterLab shows an output image at
most ``SHOWN_WIDTH_PX`` (950) pixels wide, scaling wider ones down, and text under ``MIN_TEXT_PX`` (9) pixels
there is unreadable without zooming (#33).

The arithmetic, per stored PNG: its resolution ``dpi`` (the PNG's pHYs chunk, which matplotlib writes) and
width ``w`` give the shown height of a ``pt``-point text as ``pt * dpi / 72 * min(1, 950 / w)`` pixels. The
smallest text a figure can hold is the smallest font size the course style sets (the legend's 8 pt) or that
the notebook's code asks for (``fontsize=N``). At 100 dpi, 8 pt is 11.1 px drawn, 9.0 px shown at
w = 950 * 11.1 / 9 = 1172 px: a figure up to that wide passes, a wider one fails, and so does an 8-pt
text on any figure saved below 81 dpi."""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import pytest

from dpo_lib.plots import COURSE_STYLE, MIN_TEXT_PX, SHOWN_WIDTH_PX

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p for folder in ("notebooks", "exercises", "solutions") for p in (ROOT / folder).glob("*.ipynb"))
FONT_SIZE = re.compile(r"\b(?:fontsize|labelsize)\s*=\s*(\d+(?:\.\d+)?)")  # a font size the code asks for
STYLE_SMALLEST_PT = min(v for k, v in COURSE_STYLE.items() if k.endswith("size") and isinstance(v, (int, float)))


def png_size_and_dpi(data: bytes) -> tuple[int, int, float | None]:
    """Width and height from the IHDR chunk; dots per inch from pHYs (unit 1 = metre), None without one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    dpi, i = None, 8
    while i < len(data):
        length, kind = struct.unpack(">I", data[i:i + 4])[0], data[i + 4:i + 8]
        if kind == b"pHYs":
            per_unit, _, unit = struct.unpack(">IIB", data[i + 8:i + 17])
            dpi = per_unit * 0.0254 if unit == 1 else None
        if kind == b"IEND":
            break
        i += 12 + length
    return width, height, dpi


def shown_text_px(pt: float, dpi: float, width: int, shown_width: int = SHOWN_WIDTH_PX) -> float:
    """Height in shown pixels of ``pt``-point text in a ``width``-pixel image drawn at ``dpi``."""
    return pt * dpi / 72 * min(1.0, shown_width / width)


def stored_figures(path: Path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                yield i, base64.b64decode(png if isinstance(png, str) else "".join(png))


def test_the_arithmetic_by_hand():
    """8 pt at 100 dpi: 8 * 100 / 72 = 11.11 px drawn; in a 1172-px figure shown at 950: 11.11 * 950 / 1172 =
    9.006 px (passes); at 1200 px: 8.796 (fails); a 600-px figure is shown at its own size: 11.11 px."""
    assert shown_text_px(8, 100, 1172) == pytest.approx(9.006, abs=1e-3)
    assert shown_text_px(8, 100, 1200) == pytest.approx(8.796, abs=1e-3)
    assert shown_text_px(8, 100, 600) == pytest.approx(11.111, abs=1e-3)
    assert STYLE_SMALLEST_PT == 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stored_figures_are_readable_at_jupyterlabs_width(path):
    asked = [float(x) for x in FONT_SIZE.findall(
        "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"))]
    smallest = min([STYLE_SMALLEST_PT, *asked])
    for cell, data in stored_figures(path):
        width, height, dpi = png_size_and_dpi(data)
        assert dpi is not None, f"{path.name} cell {cell}: the PNG records no resolution (pHYs)"
        px = shown_text_px(smallest, dpi, width)
        assert px >= MIN_TEXT_PX, (
            f"{path.name} cell {cell}: a {width}x{height} figure at {dpi:.0f} dpi shows its {smallest:g}-pt text "
            f"{px:.1f} px tall at JupyterLab's {SHOWN_WIDTH_PX} px (under {MIN_TEXT_PX}): make it narrower")
