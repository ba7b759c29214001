"""Server-rendered SVG charts: no script, no CDN, numbers printed beside them.

Only SVG presentation attributes are used (no `style`), so a strict CSP
without 'unsafe-inline' still draws them.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")
WIDTH, HEIGHT, PAD_L, PAD_B, PAD_T, PAD_R = 640, 180, 56, 22, 10, 10


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value >= 10 or value == 0:
        return f"{value:.0f}"
    return f"{value:.2g}"


def line_chart(
    *, labels: Sequence[str], series: dict[str, Sequence[float | None]], title: str
) -> SafeString:
    """Return an SVG line chart; gaps (None) break the line."""
    values = [v for s in series.values() for v in s if v is not None]
    top = max(values) if values else 1.0
    top = top * 1.1 or 1.0
    n = max(len(labels), 1)
    inner_w, inner_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def x(i: int) -> float:
        return PAD_L + (inner_w * i / (n - 1) if n > 1 else inner_w / 2)

    def y(v: float) -> float:
        return PAD_T + inner_h * (1 - v / top)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{PAD_L}" y1="{PAD_T + inner_h}" x2="{WIDTH - PAD_R}" y2="{PAD_T + inner_h}" '
        'stroke="#9ca3af"/>',
    ]
    for frac in (0, 0.5, 1):
        v = top * frac
        parts.append(
            f'<text x="{PAD_L - 4}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#6b7280">{_fmt(v)}</text>'
        )
        parts.append(
            f'<line x1="{PAD_L}" y1="{y(v):.1f}" x2="{WIDTH - PAD_R}" y2="{y(v):.1f}" '
            'stroke="#e5e7eb"/>'
        )
    if labels:
        for i in sorted({0, n // 2, n - 1}):
            parts.append(
                f'<text x="{x(i):.1f}" y="{HEIGHT - 6}" text-anchor="middle" font-size="11" '
                f'fill="#6b7280">{escape(labels[i])}</text>'
            )
    for k, (name, points) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        run: list[str] = []
        segments: list[list[str]] = []
        for i, point in enumerate(points):
            if point is None:
                if run:
                    segments.append(run)
                run = []
            else:
                run.append(f"{x(i):.1f},{y(point):.1f}")
        if run:
            segments.append(run)
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>')
            else:
                parts.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{" ".join(seg)}"><title>{escape(name)}</title></polyline>'
                )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above went through escape()


def bar_chart(*, items: Sequence[tuple[str, float]], title: str) -> SafeString:
    """Return a horizontal SVG bar chart with each value printed at its bar."""
    row = 20
    height = max(row * len(items) + 8, 28)
    top = max((v for _, v in items), default=0) or 1.0
    label_w, bar_w = 170, WIDTH - 170 - 90
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
    ]
    if not items:
        parts.append('<text x="4" y="18" font-size="12" fill="#6b7280">no data</text>')
    for i, (label, value) in enumerate(items):
        y0 = 4 + i * row
        w = max(1.0, bar_w * value / top)
        parts.append(
            f'<text x="{label_w - 6}" y="{y0 + 13}" text-anchor="end" font-size="12" '
            f'fill="#374151">{escape(label[:28])}</text>'
            f'<rect x="{label_w}" y="{y0 + 2}" width="{w:.1f}" height="{row - 6}" '
            f'fill="{PALETTE[0]}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y0 + 13}" font-size="12" '
            f'fill="#374151">{escape(_fmt(value))}</text>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308 - every text above went through escape()
