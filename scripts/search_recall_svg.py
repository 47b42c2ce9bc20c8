#!/usr/bin/env python3
"""Recall-vs-latency chart (SVG) of `demovlp bench search --model ... --json` runs.

Reads the JSON line(s) the benchmark printed (one file per run, the last line of each is the
report) and plots, per run, the measured points only: the region first stage at each
`--rerank-sweep` depth and at the run's `--rerank`, the previous release's stage (codes) and
the global first stage — recall@10
against exhaustive scoring (y) over p50 latency of the search (x, log scale), each point
labelled with its depth. Usage:

    scripts/search_recall_svg.py OUT.svg RUN.json [RUN.json ...]
"""
import json
import math
import sys


def last_json(path):
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip().startswith("{")]
    if not lines:
        sys.exit(f"{path}: no JSON line")
    return json.loads(lines[-1])


def series(r):
    """(label, [(p50 ms, recall@10, point label)]) of one run."""
    pts = {}
    for p in r.get("sweep", []):
        if p.get("refine", 1) <= 1:
            pts[p["rerank"]] = (p["p50_ms"], p["recall_at_10_vs_exhaustive"])
    pts.setdefault(r["rerank"], (r["p50_ms"], r["recall_at_10_vs_exhaustive"]))
    region = [(ms, rc, f"N={n}") for n, (ms, rc) in sorted(pts.items())]
    name = f"{r['clips']:,} clips"
    # Runs with "codes_stage" measured the region cascade as the default; older runs' region
    # stage is today's `--first-stage codes`.
    cascade = "codes_stage" in r
    out = [(f"{name}: {'region cascade' if cascade else 'codes (previous release)'}", region)]
    if cascade:
        c = r["codes_stage"]
        out.append((f"{name}: codes (previous release)", [(c["p50_ms"], c["recall_at_10_vs_exhaustive"], f"codes, N={r['rerank']}")]))
    g = r["global_stage"]
    out.append((f"{name}: global first stage (old)", [(g["p50_ms"], g["recall_at_10_vs_exhaustive"], f"global, N={r['rerank']}")]))
    return out


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, runs = sys.argv[1], [last_json(p) for p in sys.argv[2:]]
    all_series = [s for r in runs for s in series(r)]
    xs = [p[0] for _, pts in all_series for p in pts]
    lo, hi = math.log10(min(xs) / 1.5), math.log10(max(xs) * 1.5)
    W, H, L, R, T, B = 720, 440, 70, 250, 40, 60
    pw, ph = W - L - R, H - T - B
    X = lambda ms: L + (math.log10(ms) - lo) / (hi - lo) * pw
    Y = lambda rc: T + (1.0 - rc) * ph
    colours = ["#3756d4", "#d4373c", "#2a9d5c", "#e08a1e", "#7b3fb5", "#555555"]
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="#fff"/>',
         f'<text x="{L}" y="22" font-size="14">Search recall@10 against exhaustive scoring vs p50 latency (measured points)</text>']
    for v in [0.0, 0.25, 0.5, 0.75, 0.95, 1.0]:
        y = Y(v)
        s.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="{"#e0a0a0" if v == 0.95 else "#e6e6e6"}"/>')
        s.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= math.log10(v) <= hi:
                x = X(v)
                s.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{T + ph}" stroke="#f0f0f0"/>')
                s.append(f'<text x="{x:.1f}" y="{T + ph + 16}" text-anchor="middle">{v:g}</text>')
    s.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    s.append(f'<text x="{L + pw / 2}" y="{H - 18}" text-anchor="middle">p50 latency of the search, ms (log scale; text tower not included)</text>')
    s.append(f'<text transform="translate(18 {T + ph / 2}) rotate(-90)" text-anchor="middle">recall@10 vs exhaustive</text>')
    for i, (name, pts) in enumerate(all_series):
        c = colours[i % len(colours)]
        if len(pts) > 1:
            path = " ".join(f"{X(ms):.1f},{Y(rc):.1f}" for ms, rc, _ in pts)
            s.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for ms, rc, lab in pts:
            s.append(f'<circle cx="{X(ms):.1f}" cy="{Y(rc):.1f}" r="4" fill="{c}"><title>{lab}: {ms:.1f} ms, {rc:.3f}</title></circle>')
            s.append(f'<text x="{X(ms) + 6:.1f}" y="{Y(rc) - 6:.1f}" fill="{c}" font-size="11">{lab}</text>')
        ly = T + 10 + i * 20
        s.append(f'<rect x="{L + pw + 14}" y="{ly - 9}" width="12" height="12" fill="{c}"/>')
        s.append(f'<text x="{L + pw + 32}" y="{ly + 1}" font-size="11">{name}</text>')
    s.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(s) + "\n")


if __name__ == "__main__":
    main()
