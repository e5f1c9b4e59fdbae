"""nibble_client: talk to nibbled (nibble's gRPC daemon) from Python.

    from nibble_client import NibbleClient
    with NibbleClient("localhost:50051", timeout=60) as client:
        for delta in client.chat("Tell me a story", max_tokens=100).text_deltas():
            print(delta, end="", flush=True)

The generated stubs are found as nibble_client.stubs describes (generate_stubs.sh).
"""
from nibble_client.client import (SAMPLING_FIELDS, Chunk, CompletionStream, ModelInfo,
                                  NibbleClient, NibbleError, Timing, Tokens, Usage)

__all__ = ["NibbleClient", "NibbleError", "CompletionStream", "Chunk", "Usage", "Timing",
           "Tokens", "ModelInfo", "SAMPLING_FIELDS"]
