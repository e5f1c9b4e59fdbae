#!/usr/bin/python3
"""Serving benchmark for nibbled (not a test): N concurrent client loops per level, each issuing
one streamed request after another, with a fixed prompt length and a fixed output length.

    tests/bench/serve_bench.py --nibbled build/bin/nibbled --model build/test-models/stories260K
    tests/bench/serve_bench.py --server HOST:PORT --metrics http://HOST:9464/metrics

Per level it reports, from client-side timestamps taken as each streamed chunk arrives:
  out tok/s   generated tokens that arrived inside the measuring window / the window's length
  req/s       requests that ended inside the window / the window's length
  TTFT        send -> the first chunk carrying a token, p50 and p99
  ITL         inter-token latency, per token: a chunk that carries k tokens, arriving g seconds
              after the previous chunk, counts k tokens of g/k each (the daemon coalesces the
              engine steps a slow reader missed into one chunk; token counts come from the
              returned token ids); the extra tokens of the first chunk have no gap and are not
              counted. p50 and p99.
  TPOT        per request (e2e - TTFT) / (tokens - 1), p50: the same figure without chunking
  e2e         send -> last chunk, p50
  tok/chunk   mean generated tokens per streamed chunk (1.0: no coalescing)
and from the daemon's Prometheus endpoint, scraped before and after each level: generation and
prompt token counters, preemptions, and the mean TTFT/ITL of the daemon's own histograms. CPU
seconds of nibbled (when this script started it) and of this client process show who used the
two cores. The client is asyncio gRPC (grpc.aio) over one channel, on the generated stubs of
clients/python (nibble_client.stubs).
"""
import argparse
import asyncio
import datetime
import json
import os
import resource
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
# Starting and stopping nibbled: tests/integration/nibbled_process.py, shared with the
# integration tests (standard library only).
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

import grpc  # noqa: E402

from nibble_client import NibbleClient, NibbleError, Tokens, stubs  # noqa: E402
from nibbled_process import Nibbled  # noqa: E402

pb = stubs.inference_pb2
SEED_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
             "the park with her friends. One day, she saw a big red ball under a tree. ")


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Daemon(Nibbled):
    """A nibbled this script starts on free loopback ports (nibbled_process.py; stopped by
    stop(), killed at exit if still running)."""

    def __init__(self, nibbled, model, cpu_threads, engine, env_extra):
        super().__init__(nibbled, os.path.abspath(model), model_name="bench",
                         cpu_threads=cpu_threads, grace=1, engine=engine, env_extra=env_extra,
                         prefix="serve-bench-")
        with NibbleClient(self.address, timeout=1) as client:
            self.wait_serving(lambda: client.health() == "SERVING", NibbleError, timeout=60,
                              failure=SystemExit)

    def cpu_seconds(self):
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(url):
    """{name: value} of the daemon's counters and histogram sums/counts (labels dropped,
    summed over models)."""
    if not url:
        return {}
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.endswith("_bucket"):
            continue
        out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def fixed_prompt(client, tokens, model):
    """A text whose tokenization, with BOS, is exactly `tokens` ids long."""
    text = SEED_TEXT * (tokens // 20 + 2)
    ids = client.tokenize(text, add_bos=True, model=model)
    want = tokens
    for _ in range(20):
        prompt = Tokens(ids.token_ids[:want], ids.pieces[:want]).text()
        got = client.count_tokens(prompt, add_bos=True, model=model)
        if got == tokens:
            return prompt
        want += tokens - got
    raise SystemExit(f"could not build a prompt of {tokens} tokens")


class Level:
    def __init__(self, concurrency):
        self.concurrency = concurrency
        self.ttft, self.itl, self.chunk_gaps, self.tpot, self.e2e = [], [], [], [], []
        self.tokens_in_window = 0
        self.requests_in_window = 0
        self.chunks = 0
        self.chunk_tokens = 0
        self.errors = {}
        self.requests_started = 0


async def client_loop(stub, args, prompt, level, window, loop_index):
    start, end = window
    request_index = 0
    while time.perf_counter() < end:
        sampling = pb.SamplingParams(max_tokens=args.max_tokens, ignore_eos=args.ignore_eos,
                                     temperature=args.temperature)
        if args.temperature > 0:
            sampling.seed = args.seed + loop_index * 100003 + request_index
        if args.api == "chat":
            call = stub.Chat(pb.ChatRequest(
                model=args.model_name, messages=[pb.ChatMessage(role="user", content=prompt)],
                sampling=sampling, return_token_ids=True), timeout=args.request_timeout)
        else:
            call = stub.Generate(pb.GenerateRequest(
                model=args.model_name, prompt=prompt, sampling=sampling, return_token_ids=True),
                timeout=args.request_timeout)
        request_index += 1
        sent = time.perf_counter()
        measured = sent >= start
        if measured:
            level.requests_started += 1
        first = previous = None
        tokens = 0
        try:
            async for chunk in call:
                now = time.perf_counter()
                k = len(chunk.token_ids)
                if k == 0:
                    continue
                if start <= now < end:
                    level.tokens_in_window += k
                if measured:
                    level.chunks += 1
                    level.chunk_tokens += k
                    if first is None:
                        level.ttft.append(now - sent)
                    else:
                        gap = now - previous
                        level.chunk_gaps.append(gap)
                        level.itl.extend([gap / k] * k)
                if first is None:
                    first = now
                previous = now
                tokens += k
        except grpc.aio.AioRpcError as error:
            if measured:
                name = error.code().name
                level.errors[name] = level.errors.get(name, 0) + 1
            continue
        done = time.perf_counter()
        if start <= done < end:
            level.requests_in_window += 1
        if measured and first is not None:
            level.e2e.append(done - sent)
            if tokens > 1:
                level.tpot.append((previous - first) / (tokens - 1))


async def run_level(address, args, prompt, concurrency):
    level = Level(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stubs.inference_pb2_grpc.InferenceStub(channel)
        now = time.perf_counter()
        window = (now + args.warmup, now + args.warmup + args.duration)
        await asyncio.gather(*(client_loop(stub, args, prompt, level, window, i)
                               for i in range(concurrency)))
    return level


def measure(address, metrics_url, daemon, args, prompt, concurrency):
    before = scrape(metrics_url)
    cpu_server0 = daemon.cpu_seconds() if daemon else None
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    level = asyncio.run(run_level(address, args, prompt, concurrency))
    wall = time.perf_counter() - wall0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    after = scrape(metrics_url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0) if after else float("nan")

    def mean_of(histogram):
        count = delta(histogram + "_count")
        return delta(histogram + "_sum") / count if count else float("nan")

    row = {
        "concurrency": concurrency,
        "out_tok_s": level.tokens_in_window / args.duration,
        "req_s": level.requests_in_window / args.duration,
        "ttft_p50_ms": 1e3 * percentile(level.ttft, 50),
        "ttft_p99_ms": 1e3 * percentile(level.ttft, 99),
        "itl_p50_ms": 1e3 * percentile(level.itl, 50),
        "itl_p99_ms": 1e3 * percentile(level.itl, 99),
        "chunk_gap_p50_ms": 1e3 * percentile(level.chunk_gaps, 50),
        "tpot_p50_ms": 1e3 * percentile(level.tpot, 50),
        "e2e_p50_ms": 1e3 * percentile(level.e2e, 50),
        "tokens_per_chunk": level.chunk_tokens / level.chunks if level.chunks else float("nan"),
        "requests_measured": len(level.e2e),
        "errors": level.errors,
        "server_generation_tokens": delta("nibble_generation_tokens_total"),
        "server_prompt_tokens": delta("nibble_prompt_tokens_total"),
        "server_preemptions": delta("nibble_num_preemptions_total"),
        "server_requests_finished": delta("nibble_requests_finished_total"),
        "server_ttft_mean_ms": 1e3 * mean_of("nibble_time_to_first_token_seconds"),
        "server_itl_mean_ms": 1e3 * mean_of("nibble_inter_token_latency_seconds"),
        "level_wall_s": wall,
        "client_cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
        "server_cpu_s": daemon.cpu_seconds() - cpu_server0 if daemon else float("nan"),
    }
    return row


COLUMNS = [
    ("conc", "concurrency", "{:d}"), ("out tok/s", "out_tok_s", "{:.0f}"),
    ("req/s", "req_s", "{:.2f}"), ("TTFT p50", "ttft_p50_ms", "{:.1f}"),
    ("TTFT p99", "ttft_p99_ms", "{:.1f}"), ("ITL p50", "itl_p50_ms", "{:.2f}"),
    ("ITL p99", "itl_p99_ms", "{:.2f}"), ("TPOT p50", "tpot_p50_ms", "{:.2f}"),
    ("e2e p50", "e2e_p50_ms", "{:.0f}"), ("tok/chunk", "tokens_per_chunk", "{:.1f}"),
    ("srv gen tok", "server_generation_tokens", "{:.0f}"),
    ("srv preempt", "server_preemptions", "{:.0f}"),
    ("srv TTFT mean", "server_ttft_mean_ms", "{:.1f}"),
    ("srv ITL mean", "server_itl_mean_ms", "{:.2f}"),
    ("srv CPU", "server_cpu_s", "{:.1f}"), ("client CPU", "client_cpu_s", "{:.1f}"),
    ("errors", "errors", "{}"),
]


def table(rows):
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            value = row[key]
            if key == "errors":
                cells.append(", ".join(f"{k} {v}" for k, v in value.items()) or "0")
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_engine(pairs):
    engine = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        engine[key] = value
    return engine


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="model or W4 artifact directory: start nibbled on it")
    where.add_argument("--server", help="an existing nibbled's host:port")
    parser.add_argument("--nibbled", default=os.path.join(REPO, "build", "bin", "nibbled"))
    parser.add_argument("--metrics", default="", help="with --server: its /metrics URL")
    parser.add_argument("--model-name", default="", help="with --server: the model to ask for")
    parser.add_argument("--cpu-threads", type=int, default=0, help="nibbled's cpu_threads")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine: key of the started nibbled's config (repeatable)")
    parser.add_argument("--omp-wait-policy", choices=["default", "passive", "active"],
                        default="default", help="OMP_WAIT_POLICY of the started nibbled")
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--api", choices=["generate", "chat"], default="generate")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="BOS included")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="every request generates exactly --max-tokens (default on)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=1, help="sampled runs: seed of the first")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()

    daemon = None
    if args.model:
        env = {"OMP_WAIT_POLICY": None if args.omp_wait_policy == "default"
               else args.omp_wait_policy.upper()}
        daemon = Daemon(args.nibbled, args.model, args.cpu_threads, parse_engine(args.engine),
                        env)
        address, metrics_url = daemon.address, daemon.metrics_url
        args.model_name = "bench"
    else:
        address, metrics_url = args.server, args.metrics
    try:
        with NibbleClient(address, timeout=30) as client:
            info = next(m for m in client.models()
                        if not args.model_name or m.name == args.model_name)
            prompt = fixed_prompt(client, args.prompt_tokens, args.model_name)
        print(f"# {info.name}: {info.architecture}, quantization {info.quantization}"
              f" (bits {info.bits}, group {info.group_size}), max_batch_size "
              f"{info.proto.cache.max_batch_size}, session_len {info.session_len}; {args.api}, "
              f"prompt {args.prompt_tokens} tokens, max_tokens {args.max_tokens}, ignore_eos "
              f"{args.ignore_eos}, temperature {args.temperature}; {args.duration:g} s per level"
              f" after {args.warmup:g} s warm-up; OMP_WAIT_POLICY {args.omp_wait_policy}",
              flush=True)
        rows = []
        for concurrency in [int(c) for c in args.levels.split(",")]:
            row = measure(address, metrics_url, daemon, args, prompt, concurrency)
            rows.append(row)
            print(f"concurrency {concurrency}: {row['out_tok_s']:.0f} tok/s, "
                  f"{row['req_s']:.2f} req/s, TTFT p50 {row['ttft_p50_ms']:.1f} ms",
                  flush=True)
    finally:
        if daemon:
            daemon.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "args": vars(args), "model": info.name, "rows": rows}, f, indent=1)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
