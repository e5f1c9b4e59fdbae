#!/usr/bin/python3
"""Chat with a model served by nibbled: one reply streamed to stdout as it is generated.

    clients/python/generate_stubs.sh            # once: the gRPC stubs
    clients/python/example_chat.py --server localhost:50051 --prompt "Tell me a story"

Without --prompt, reads one user message per line from stdin and keeps the conversation (and
the daemon's KV cache for it, through a session id) until end of input.
"""
import argparse
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nibble_client import NibbleClient, NibbleError  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="localhost:50051", help="nibbled's host:port")
    parser.add_argument("--model", default="", help="model name (default: the daemon's only one)")
    parser.add_argument("--prompt", help="one user message (default: read lines from stdin)")
    parser.add_argument("--system", help="a system message first")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per reply")
    args = parser.parse_args()

    messages = [{"role": "system", "content": args.system}] if args.system else []
    session_id = f"example-{uuid.uuid4().hex[:16]}"
    lines = [args.prompt] if args.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    with NibbleClient(args.server, timeout=args.timeout) as client:
        try:
            for line in lines:
                if not line:
                    continue
                messages.append({"role": "user", "content": line})
                stream = client.chat(messages, model=args.model, session_id=session_id,
                                     max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed)
                reply = []
                for delta in stream.text_deltas():
                    reply.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                usage = stream.usage
                print(f"[{usage.prompt_tokens} prompt ({usage.cached_prompt_tokens} cached) + "
                      f"{usage.completion_tokens} generated tokens, finish: "
                      f"{stream.finish_reason}]", file=sys.stderr)
                messages.append({"role": "assistant", "content": "".join(reply)})
        except NibbleError as error:
            print(f"example_chat.py: {error.code_name}: {error.message}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
