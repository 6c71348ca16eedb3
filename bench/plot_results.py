"""Turn a pytest-benchmark results JSON into a PNG bar chart: for every benchmark, the kernel beside
the baseline measured in the same run.

    python bench/plot_results.py gemm.json gemm.png [--title "H100, torch 2.11, triton 3.6"]

Each row is one benchmark (its test id, e.g. `test_gemm[fp8-32760x5120x5120]`): a blue bar for the
kernel and a grey bar for the baseline, in TFLOP/s where the benchmark reported `tflops` (the
baseline's rate is tflops / ratio, as `ratio` = baseline ms / kernel ms), else in milliseconds; the
ratio is printed at the end of the row. Benchmarks without a baseline (smoke runs on CPU) get the
kernel bar only.

Dependencies: numpy only (a project dependency). The script draws into a numpy RGB array with a
built-in 5 x 7 pixel font and writes the PNG itself (zlib + CRC, both in the standard library), so
the project needs no plotting library for one chart; matplotlib would add a large dependency
(and its own font and backend set-up on headless GPU machines) for a few rectangles and labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import zlib

import numpy as np

KERNEL_COLOR = (47, 111, 191)
BASELINE_COLOR = (150, 150, 150)
TEXT_COLOR = (20, 20, 20)
BACKGROUND = (255, 255, 255)
GRID_COLOR = (225, 225, 225)

# 5 x 7 glyphs: 7 rows of 5 bits (bit 4 = leftmost column), two hex digits per row.
_FONT_HEX = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F", "3": "1F02040201110E",
    "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808",
    "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E1111111F1111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E", "P": "1E11111E101010",
    "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "1111110A040404", "Z": "1F01020408101F",
    " ": "00000000000000", ".": "00000000000C0C", ",": "000000000C0408", ":": "000C0C000C0C00",
    "/": "00010204081000", "(": "02040808080402", ")": "08040202020408", "-": "0000001F000000",
    "_": "0000000000001F", "+": "0004041F040400", "%": "18190204081303", "=": "00001F001F0000",
    "[": "0E08080808080E", "]": "0E02020202020E", "<": "02040810080402", ">": "08040201020408",
    "?": "0E110102040004", "'": "04040800000000", "*": "00150E1F0E1500",
}
FONT = {ch: [int(code[2 * i:2 * i + 2], 16) for i in range(7)] for ch, code in _FONT_HEX.items()}
SCALE = 2  # pixels per font pixel
CHAR_W = 6 * SCALE  # 5 columns + 1 of spacing


def text_width(text: str) -> int:
    return len(text) * CHAR_W


def draw_text(img: np.ndarray, x: int, y: int, text: str, color=TEXT_COLOR) -> None:
    """Draw upper-cased `text` with its top-left corner at (x, y); clipped to the image."""
    h, w, _ = img.shape
    for i, ch in enumerate(text.upper()):
        rows = FONT.get(ch, FONT["?"])
        for r, bits in enumerate(rows):
            for c in range(5):
                if bits & (0x10 >> c):
                    y0, x0 = y + r * SCALE, x + i * CHAR_W + c * SCALE
                    if 0 <= y0 and y0 + SCALE <= h and 0 <= x0 and x0 + SCALE <= w:
                        img[y0:y0 + SCALE, x0:x0 + SCALE] = color


def fill(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    img[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = color


def write_png(path: str, img: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG (filter 0 on every row)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def _number(value: object) -> float | None:
    """`value` as a finite float, or None (missing, null, not a number, NaN or infinite)."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _info(bench: dict) -> dict:
    info = bench.get("extra_info")
    return info if isinstance(info, dict) else {}


def rows_of(results: dict) -> list[dict]:
    """One row per benchmark that reported a finite `ms`: label, kernel value, baseline value (or None),
    ratio (or None)."""
    rows = []
    for bench in results.get("benchmarks", []):
        info = _info(bench)
        ms, ratio, tflops = _number(info.get("ms")), _number(info.get("ratio")), _number(info.get("tflops"))
        if ms is None:
            continue
        if tflops is not None:
            unit, kernel = "TFLOP/s", tflops
            baseline = kernel / ratio if ratio else None
        else:
            unit, kernel, baseline = "ms", ms, _number(info.get("baseline_ms"))
        rows.append(dict(label=str(bench.get("name", "?")), unit=unit, kernel=kernel, baseline=baseline, ratio=ratio))
    return rows


def render(rows: list[dict], title: str) -> np.ndarray:
    label_w = max([text_width(r["label"]) for r in rows] + [text_width("BENCHMARK")]) + 20
    plot_w, right_w = 520, text_width(" 00.00X") + 20
    bar_h, gap, top = 16, 14, 70
    height = top + len(rows) * (2 * bar_h + gap) + 20
    width = label_w + plot_w + right_w + 20
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    draw_text(img, 10, 10, title)
    # Legend.
    fill(img, 10, 36, 24, 48, KERNEL_COLOR)
    draw_text(img, 30, 35, "kernel")
    fill(img, 130, 36, 144, 48, BASELINE_COLOR)
    draw_text(img, 150, 35, "baseline (same run)")
    units = sorted({r["unit"] for r in rows})
    draw_text(img, 420, 35, "units: " + ", ".join(units))
    # Each unit has its own scale (TFLOP/s rows and ms rows are not comparable).
    vmax = {u: max([r["kernel"] for r in rows if r["unit"] == u] +
                   [r["baseline"] for r in rows if r["unit"] == u and r["baseline"]]) or 1.0 for u in units}
    x0 = label_w
    for frac in (0.25, 0.5, 0.75, 1.0):
        gx = x0 + int(frac * (plot_w - text_width("00000") - 8))
        fill(img, gx, top - 6, gx + 1, height - 20, GRID_COLOR)
    y = top
    bar_w = plot_w - text_width("00000") - 8  # the longest bar leaves room for its value
    for r in rows:
        draw_text(img, 10, y + bar_h // 2, r["label"])
        scale = bar_w / vmax[r["unit"]]
        for value, color, dy in ((r["kernel"], KERNEL_COLOR, 0), (r["baseline"], BASELINE_COLOR, bar_h)):
            if value is None:
                continue
            length = max(1, int(value * scale))
            fill(img, x0, y + dy, x0 + length, y + dy + bar_h - 2, color)
            draw_text(img, x0 + length + 4, y + dy, f"{value:.4g}")
        if r["ratio"]:
            draw_text(img, x0 + plot_w + 20, y + bar_h // 2, f"{r['ratio']:.2f}x")
        y += 2 * bar_h + gap
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("png", help="output PNG path")
    parser.add_argument("--title", default=None,
                        help="chart title (default: the rows' devices and the run's date)")
    args = parser.parse_args(argv)
    try:
        with open(args.results) as f:
            results = json.load(f)
    except (OSError, ValueError) as err:  # a suite stopped before pytest-benchmark wrote its JSON
        print(f"{args.results}: cannot read the benchmark results: {err}", file=sys.stderr)
        return 1
    # (A `dit8 bench dit --json` file, say, is a JSON object too, without the list.)
    benchmarks = results.get("benchmarks") if isinstance(results, dict) else None
    if not isinstance(benchmarks, list) or not all(isinstance(b, dict) for b in benchmarks):
        print(f"{args.results}: not pytest-benchmark results (a JSON object with a 'benchmarks' list, as "
              f"--benchmark-json writes)", file=sys.stderr)
        return 1
    if os.path.isdir(args.png):
        print(f"{args.png}: a folder; name the PNG file to write", file=sys.stderr)
        return 1
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.png))):
        print(f"{args.png}: its folder does not exist", file=sys.stderr)
        return 1
    rows = rows_of(results)
    if not rows:
        print(f"{args.results}: no benchmark reported extra_info['ms']", file=sys.stderr)
        return 1
    devices = {str(_info(b).get("device")) for b in results.get("benchmarks", []) if _info(b).get("device")}
    title = args.title or " ".join([", ".join(sorted(devices)), str(results.get("datetime") or "")[:10]]).strip()
    try:
        write_png(args.png, render(rows, title or "benchmark results"))
    except OSError as err:
        print(f"{args.png}: cannot write: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {args.png} ({len(rows)} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
