#!/usr/bin/env python3
"""Per-kernel medians of an ncu --csv run (gpu__time_duration.sum): one line per kernel name.

Usage: ncu --csv --metrics gpu__time_duration.sum ... > ncu.csv; ncu_kernels.py ncu.csv [N]
Kernel names are cut at the first '(' (template arguments kept), times in microseconds.
With N, the first N kernels are also listed in launch order (one decode step's sequence).
"""
import csv
import statistics
import sys
from collections import defaultdict


def main(path, sequence=0):
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # skip ncu's own log lines
    times = defaultdict(list)
    order = []
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        us = value / 1e3 if unit in ("ns", "nsecond") else value if unit == "us" else value * 1e3
        times[row["Kernel Name"].split("(")[0]].append(us)
        order.append((row["Kernel Name"].split("(")[0], us))
    print("| kernel | launches | median us | min us |\n|---|---|---|---|")
    for name, values in sorted(times.items(), key=lambda kv: -statistics.median(kv[1]) * len(kv[1])):
        print(f"| {name[:90]} | {len(values)} | {statistics.median(values):.1f} | {min(values):.1f} |")
    if sequence:
        print("\nlaunch order: " + ", ".join(f"{name.split('::')[-1][:34]} {us:.1f}" for name, us in order[:sequence]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
