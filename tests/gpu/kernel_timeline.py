#!/usr/bin/env python3
"""Where a CUDA-graph step's time goes, from kernel_trace.cc's CSV.

  kernel_timeline.py TRACE.csv [--steps N] [--label TEXT]

For each CUDA graph launched at least 4 times (the decode steps: one graph per batch shape),
takes its last N launches (a launch: the kernels of one correlation id) and, for each
kernel in capture order (graph node id), its
  end+   end minus the latest end of the kernels before it in the step: what the kernel adds to
         the step's critical path (under programmatic dependent launch kernels overlap, so
         durations do not add up; these do, to the step's time from its first start);
  dur    end minus start (under PDL the start is the early launch: it includes the wait);
  lead   the previous kernel's end minus this one's start: how early it was resident.
Kernels of the same name and grid that follow the same two kernels are summed per step (the
layers' repeats: a layer's o and down products share a name and grid, but one follows the
attention and the other SiLU·mul; the norms after them share their predecessor's name too, so
the one before that tells them apart); the table lists them in the order of their first
appearance, with the two kernels before them and how many run per step. Times in µs, means
over the steps.
"""
import argparse
import collections
import csv
import statistics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    launches = collections.OrderedDict()  # graph -> launch (correlation) -> kernels
    with open(args.trace) as f:
        for row in csv.DictReader(f):
            if row["graph"] == "0":
                continue
            launches.setdefault(row["graph"], collections.OrderedDict()).setdefault(
                row["correlation"], []).append(row)
    if not launches:
        print("kernel_timeline: no graph launches in", args.trace)
        return
    for graph, by_launch in launches.items():
        if len(by_launch) >= 4:
            report(graph, list(by_launch.values())[-args.steps:], args.label)


def report(graph, steps, label):
    size = len(steps[0])
    order = []  # (name, grid, cluster, the two previous kernels' names) in first-appearance order
    per_key = collections.defaultdict(lambda: {"inc": [], "dur": [], "lead": [], "n": 0})
    step_times = []
    for i, kernels in enumerate(steps):
        kernels = sorted(kernels, key=lambda r: int(r["node"]))
        sums = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
        t0 = min(int(r["start_ns"]) for r in kernels)
        latest = t0
        prev_end = None
        before = ("", "")  # the names of the kernel before this one and of the one before that
        for r in kernels:
            s, e = int(r["start_ns"]), int(r["end_ns"])
            key = (r["name"], r["grid"], r["cluster"], before)
            before = (r["name"], before[0])
            if key not in order:
                order.append(key)
            acc = sums[key]
            acc[0] += max(0, e - latest) / 1e3
            acc[1] += (e - s) / 1e3
            acc[2] += ((prev_end - s) / 1e3) if prev_end is not None else 0.0
            acc[3] += 1
            latest = max(latest, e)
            prev_end = e
        step_times.append((latest - t0) / 1e3)
        for key, (inc, dur, lead, n) in sums.items():
            d = per_key[key]
            d["inc"].append(inc)
            d["dur"].append(dur / n)
            d["lead"].append(lead / n)
            d["n"] = n
    mean = statistics.fmean
    print(f"kernel timeline {label} (graph {graph}): {len(steps)} steps of {size} kernels, "
          f"step {mean(step_times):.1f} µs (min {min(step_times):.1f}, max {max(step_times):.1f})")
    print("| kernel | grid | cluster | after | per step | end+ µs/step | end+ µs each | dur µs each | lead µs each |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = 0.0
    for key in order:
        d = per_key[key]
        inc = mean(d["inc"])
        total += inc
        after = " ← ".join(n.split("<")[0] for n in key[3] if n)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {after} | {d['n']} | {inc:.1f} | {inc / d['n']:.2f} | "
              f"{mean(d['dur']):.2f} | {mean(d['lead']):.2f} |")
    print(f"| (sum of end+) | | | | | {total:.1f} | | | |")


if __name__ == "__main__":
    main()
