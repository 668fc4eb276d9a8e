#!/usr/bin/env python3
"""Draws bench/chart.svg from bench/results.json: calls/s and proxy CPU per 1,000 calls, by
target, one bar per workload. Plain SVG text, so no plotting library has to be installed.

Usage: chart.py results.json chart.svg
"""

import json
import sys
from html import escape

WORKLOADS = ["1x1", "1x32", "16x4"]
COLORS = {"1x1": "#9ecae1", "1x32": "#4292c6", "16x4": "#08519c"}
BAR, GAP, LABEL_W, PANEL_W, PAD = 10, 10, 130, 360, 20
PANELS = [("rps", "calls/s (higher is better)", 0),
          ("cpu", "proxy CPU ms per 1,000 calls (lower is better)", 1)]


def nice(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 1 else f"{v:,.2f}"


def main(src, dst):
    with open(src) as f:
        data = json.load(f)
    rows = data["rows"]
    sets = []
    for r in rows:
        if r["set"] not in sets:
            sets.append(r["set"])
    out = []
    y = 88
    width = LABEL_W + len(PANELS) * (PANEL_W + PAD) + PAD
    for set_name in sets:
        set_rows = [r for r in rows if r["set"] == set_name]
        targets = []
        for r in set_rows:
            if r["target"] not in targets:
                targets.append(r["target"])
        value = {(r["target"], r["workload"], key): r.get(key)
                 for r in set_rows for key, _, _ in PANELS}
        count = data.get("info", {}).get("set_backends", {}).get(set_name, 4)
        kind = "python" if set_name.startswith("python") else set_name
        out.append(f'<text x="{PAD}" y="{y}" class="h">backends: {count} x {escape(kind)}</text>')
        y += 12
        group_h = len(WORKLOADS) * BAR + GAP
        for key, title, col in PANELS:
            x0 = LABEL_W + col * (PANEL_W + PAD)
            out.append(f'<text x="{x0}" y="{y + 10}" class="t">{escape(title)}</text>')
        y += 18
        for key, title, col in PANELS:
            x0 = LABEL_W + col * (PANEL_W + PAD)
            # Each panel has its own scale; leave room for the value labels.
            top = max([v for (t, w, k), v in value.items() if k == key and v] or [1])
            scale = (PANEL_W - 60) / top
            out.append(f'<line x1="{x0}" y1="{y - 2}" x2="{x0}" '
                       f'y2="{y + len(targets) * group_h - GAP + 2}" class="axis"/>')
            for i, t in enumerate(targets):
                gy = y + i * group_h
                if col == 0:
                    out.append(f'<text x="{LABEL_W - 8}" y="{gy + 1.5 * BAR + 4}" '
                               f'class="l">{escape(t)}</text>')
                for j, w in enumerate(WORKLOADS):
                    v = value.get((t, w, key))
                    by = gy + j * BAR
                    if v is None:
                        if key == "cpu" and j == 1:
                            out.append(f'<text x="{x0 + 4}" y="{by + 8}" class="v">'
                                       f'no proxy process</text>')
                        continue
                    bw = max(v * scale, 1)
                    out.append(f'<rect x="{x0}" y="{by}" width="{bw:.1f}" height="{BAR - 1}" '
                               f'fill="{COLORS[w]}"><title>{escape(t)} {w}: {nice(v)}'
                               f'</title></rect>')
                    out.append(f'<text x="{x0 + bw + 3:.1f}" y="{by + 8}" class="v">'
                               f'{nice(v)}</text>')
        y += len(targets) * group_h + 30
    legend = []
    lx = LABEL_W
    for w in WORKLOADS:
        legend.append(f'<rect x="{lx}" y="50" width="12" height="10" fill="{COLORS[w]}"/>'
                      f'<text x="{lx + 16}" y="59" class="v">{w} (connections x streams)</text>')
        lx += 190
    info = data.get("info", {}).get("machine", {})
    subtitle = (f"{data.get('date', '')}, nproc {info.get('nproc', '?')}, "
                f"{info.get('kernel', '')}; medians of {data.get('info', {}).get('rounds')} "
                f"round(s)")
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" \
viewBox="0 0 {width} {y}" font-family="sans-serif">
<style>
.h {{ font-size: 15px; font-weight: bold; }}
.t {{ font-size: 12px; font-weight: bold; }}
.l {{ font-size: 12px; text-anchor: end; }}
.v {{ font-size: 10px; fill: #333; }}
.axis {{ stroke: #555; stroke-width: 1; }}
</style>
<rect width="100%" height="100%" fill="white"/>
<text x="{PAD}" y="22" class="h">portshare benchmark: gRPC unary calls through each target</text>
<text x="{PAD}" y="40" class="v">{escape(subtitle)}</text>
{''.join(legend)}
{chr(10).join(out)}
</svg>
"""
    with open(dst, "w") as f:
        f.write(svg)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
