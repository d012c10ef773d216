"""Draws the benchmark's charts from results.json: latency distributions and throughput against
concurrency. Usage: python bench/charts.py DIR (writes DIR/latency.png and DIR/throughput.png)."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks")
results = json.loads((out / "results.json").read_text())
targets = results["targets"]
title = f'{results["mode"]} mode, {results["date"]}, {results["machine"]["cores"]} cores'

# Latency: p50 and p99 per target, for each measurement (log scale: they span decades).
measures = [("ttft", "time to first token"), ("chunk_latency", "per-chunk"), ("close_to_upstream_close", "close → upstream close")]
fig, axes = plt.subplots(1, len(measures), figsize=(15, 4.5))
for ax, (key, label) in zip(axes, measures):
    names, p50, p99 = [], [], []
    for t in targets.values():
        d = t.get(key)
        if not d or not d.get("n"):
            continue
        names.append(t["name"])
        p50.append(d["p50_us"])
        p99.append(d["p99_us"])
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
    ax.set_xticks(list(xs), names, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs")
    ax.set_title(label)
    ax.legend()
fig.suptitle(f"latency ({title})")
fig.tight_layout()
fig.savefig(out / "latency.png", dpi=110)

# Throughput: chunks per second against concurrency.
fig, ax = plt.subplots(figsize=(7, 4.5))
for t in targets.values():
    levels = t["throughput"]
    ax.plot([l["concurrency"] for l in levels], [l["chunks_per_s"] for l in levels], marker="o", label=t["name"])
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("concurrent streams")
ax.set_ylabel("chunks / s")
ax.set_title(f"streaming throughput ({title})")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out / "throughput.png", dpi=110)
print(f"wrote {out / 'latency.png'} and {out / 'throughput.png'}")
