"""PyTorch peers of w4a16_bench on the same card in the same run, and the summary table.

Reads the CSV that w4a16_bench wrote (ours, cuBLAS fp16 via cublasGemmEx, copy bandwidth),
times torch.ops.aten._weight_int4pack_mm (PyTorch's int4 weight-only kernel, tinygemm; bf16
activations, which is all its CUDA kernel takes; group 128; its own packing through
_convert_weight_to_int4pack with inner_k_tiles = 8) and torch.matmul in fp16 (cuBLAS through
torch, a cross-check of the C++ number), then prints one table, last.
Timing: a CUDA graph of calls rotating over weight buffers that together exceed 200 MB (4x the
L2), its 30 replays timed with events; median per call -- the same method w4a16_bench uses for
its headline columns (ours, cuBLAS), which also carry per-launch event times for reference.
Usage: torch_int4_bench.py BENCH.csv [OUT.md [VARIANTS.csv]]
"""
import csv
import statistics
import sys

import torch

WARMUP, REPS, ROTATE_BYTES = 20, 200, 200 << 20


def median_us(fn, nbuf):
    """Median µs per call. The calls are captured in a CUDA graph (one call per weight buffer,
    at least 8) and the graph's replays timed with events, divided by the calls in it: timed
    one by one, Python's dispatch (~20 µs) would be measured instead of the kernel."""
    calls = min(max(nbuf, 8), 128)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            fn(i % nbuf)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % nbuf)
    for _ in range(3):
        graph.replay()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(30)]
    for a, b in evs:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs) * 1000.0 / calls


def main():
    rows = list(csv.DictReader(open(sys.argv[1])))
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    int4_us, fp16_us = {}, {}
    for k, n in sorted({(int(r["k"]), int(r["n"])) for r in rows}, key=lambda s: -s[0] * s[1]):
        group = 128
        nbuf4 = max(2, ROTATE_BYTES // (n * k // 2) + 1)
        nbuf16 = max(2, ROTATE_BYTES // (n * k * 2) + 1)
        try:
            packed, sz = [], []
            for _ in range(nbuf4):
                q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
                q8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
                packed.append(torch.ops.aten._convert_weight_to_int4pack(q8, 8))
                s = torch.rand(k // group, n, device=dev) * 0.02 + 0.002
                z = torch.randn(k // group, n, device=dev) * 0.01
                sz.append(torch.stack([s, z], dim=2).to(torch.bfloat16).contiguous())
        except Exception as e:  # noqa: BLE001 - report and go on without this peer
            print(f"torch int4 packing failed for k={k} n={n}: {e}")
            packed = None
        ws = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.05 for _ in range(nbuf16)]
        for m in sorted({int(r["m"]) for r in rows if int(r["k"]) == k and int(r["n"]) == n}):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xb = x.to(torch.bfloat16)
            if packed is not None:
                try:
                    int4_us[(k, n, m)] = median_us(
                        lambda b: torch.ops.aten._weight_int4pack_mm(xb, packed[b], group, sz[b]), nbuf4)
                except Exception as e:  # noqa: BLE001
                    print(f"torch int4 mm failed k={k} n={n} m={m}: {e}")
            fp16_us[(k, n, m)] = median_us(lambda b: torch.matmul(x, ws[b].t()), nbuf16)
        del ws, packed
        torch.cuda.empty_cache()

    # "engine µs" is what the engine runs (W4A16 kernels below 65 tokens, dequantize + cuBLAS
    # from 65 on); the ratios are of it. "W4A16 kernel µs" is the 4-bit kernel alone (kAuto).
    head = ("| shape | K×N | M | engine µs | W4A16 kernel µs | cuBLAS fp16 µs | torch fp16 µs "
            "| torch int4 µs | kernel GB/s | kernel % copy BW | × vs cuBLAS fp16 | × vs torch int4 "
            "| per launch: kernel / cuBLAS µs |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        k, n, m = int(r["k"]), int(r["n"]), int(r["m"])
        ours, dense = float(r["ours_us"]), float(r["cublas_fp16_us"])
        route = float(r.get("route_us") or ours)
        t4 = int4_us.get((k, n, m))
        pct = 100.0 * float(r["ours_GBps"]) / float(r["copy_GBps"])
        lines.append(
            f"| {r['shape']} | {k}×{n} | {m} | {route:.1f} | {ours:.1f} | {dense:.1f} | "
            f"{fp16_us[(k, n, m)]:.1f} | "
            + (f"{t4:.1f}" if t4 else "n/a")
            + f" | {float(r['ours_GBps']):.0f} | {pct:.0f}% | {dense / route:.2f} | "
            + (f"{t4 / route:.2f}" if t4 else "n/a")
            + f" | {float(r['ours_launch_us']):.1f} / {float(r['cublas_fp16_launch_us']):.1f} |")
    table = "\n".join(lines)
    copy = float(rows[0]["copy_GBps"])
    if len(sys.argv) > 3:  # decode variants (graph µs), one row per shape and m, one column each
        vrows = list(csv.DictReader(open(sys.argv[3])))
        names = list(dict.fromkeys(v["variant"] for v in vrows))
        keys = list(dict.fromkeys((v["shape"], v["m"]) for v in vrows))
        vt = {(v["shape"], v["m"], v["variant"]): v["graph_us"] for v in vrows}
        vl = ["| shape | M | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
        vl += [f"| {sh} | {m} | " + " | ".join(vt.get((sh, m, nm), "") for nm in names) + " |"
               for sh, m in keys]
        vtable = "\nDECODE VARIANTS (graph µs per call)\n" + "\n".join(vl)
        print(vtable)
    else:
        vtable = ""
    summary = (f"\nSUMMARY (copy ceiling {copy:.0f} GB/s read+write; ours GB/s counts the repacked "
               "weight + scales/zeros + x + y once; ours, cuBLAS, torch: CUDA-graph replays)\n"
               + table)
    if len(sys.argv) > 2:
        open(sys.argv[2], "w").write(vtable + "\n" + summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
