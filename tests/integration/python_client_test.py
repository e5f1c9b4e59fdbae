#!/usr/bin/python3
"""The Python client (clients/python/nibble_client) against the real nibbled on loopback, with
the real stories260K model: what the wrapper streams equals what the raw generated stubs stream,
what `nibble chat --server ... --json` prints and what the engine generates locally
(`nibble generate --json`); tokenize, models, health, errors as NibbleError, cancellation, and
the example script end to end.

Environment (set by ctest): NIBBLED_BIN, NIBBLE_BIN, NIBBLE_TEST_MODELS, and
NIBBLE_CLIENT_STUBS (stubs written at build time by clients/python/generate_stubs.sh).
"""
import json
import os
import subprocess
import sys
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENT_DIR = os.path.join(REPO, "clients", "python")
sys.path.insert(0, CLIENT_DIR)

import grpc  # noqa: E402

from nibble_client import NibbleClient, NibbleError, stubs  # noqa: E402
from nibbled_process import Nibbled, free_port  # noqa: E402

NIBBLED = os.environ["NIBBLED_BIN"]
NIBBLE = os.environ["NIBBLE_BIN"]
MODEL = os.path.abspath(os.path.join(os.environ["NIBBLE_TEST_MODELS"], "stories260K"))
EXAMPLE = os.path.join(CLIENT_DIR, "example_chat.py")


class Daemon(Nibbled):
    """One nibbled on free loopback ports (nibbled_process.py), with a NibbleClient on it;
    stopped (SIGTERM, then SIGKILL) by stop()."""

    def __init__(self):
        super().__init__(NIBBLED, MODEL, grace=2, engine={"cache_block_seq_len": 16},
                         prefix="nibbled-pyclient-")
        self.client = NibbleClient(self.address, timeout=60)
        self.wait_serving(lambda: self.client.health(timeout=1) == "SERVING", NibbleError)

    def stop(self):
        self.client.close()
        super().stop()


def run(args, stdin=None, env=None):
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120,
                          env=env)


def cli_generate(*args):
    result = run([NIBBLE, "generate", "--model", MODEL, "--json", *args])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon()
        cls.client = cls.daemon.client

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()

    def raw_chat(self, prompt, **sampling):
        """The same request through the generated stubs alone."""
        pb = stubs.inference_pb2
        with grpc.insecure_channel(self.daemon.address) as channel:
            stub = stubs.inference_pb2_grpc.InferenceStub(channel)
            chunks = list(stub.Chat(pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content=prompt)], return_token_ids=True,
                sampling=pb.SamplingParams(**sampling)), timeout=60))
        return "".join(c.text for c in chunks), [i for c in chunks for i in c.token_ids]

    def cli_remote_chat(self, prompt, *args):
        result = run([NIBBLE, "chat", "--server", self.daemon.address, "--prompt", prompt,
                      "--json", *args])
        self.assertEqual(result.returncode, 0, result.stderr)
        chunks = [json.loads(line) for line in result.stdout.splitlines()]
        return "".join(c["text"] for c in chunks), [i for c in chunks for i in c["token_ids"]]

    def test_greedy_chat_equals_raw_stubs_remote_cli_and_local_engine(self):
        for prompt in ["Tom had a red ball.", "Once upon a time"]:
            stream = self.client.chat(prompt, max_tokens=60, return_token_ids=True)
            deltas = list(stream.text_deltas())
            text = "".join(deltas)
            self.assertGreater(len(deltas), 0)
            self.assertIn(stream.finish_reason, ["length", "stop"])
            self.assertEqual(stream.usage.completion_tokens, len(stream.token_ids))
            self.assertEqual((text, stream.token_ids), self.raw_chat(prompt, max_tokens=60))
            self.assertEqual((text, stream.token_ids),
                             self.cli_remote_chat(prompt, "--max-tokens", "60"))
            local = cli_generate("--chat", "--prompt", prompt, "--max-tokens", "60")
            self.assertEqual(text, local["text"])
            self.assertEqual(stream.token_ids, local["generated_ids"])
            self.assertEqual(stream.usage.prompt_tokens, len(local["prompt_ids"]))

    def test_chunk_objects_and_generate_equal_local_engine(self):
        for extra in [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}]:
            args = ["--prompt", "The little dog", "--max-tokens", "50"]
            for key, value in extra.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
            local = cli_generate(*args)
            chunks = list(self.client.generate("The little dog", max_tokens=50,
                                               return_token_ids=True, **extra))
            self.assertTrue(chunks[-1].last)
            self.assertFalse(any(c.last for c in chunks[:-1]))
            self.assertEqual(len({c.request_id for c in chunks}), 1)
            self.assertEqual("".join(c.text for c in chunks), local["text"], extra)
            self.assertEqual([i for c in chunks for i in c.token_ids], local["generated_ids"])
            self.assertEqual(chunks[-1].usage.prompt_tokens, len(local["prompt_ids"]))
            self.assertGreater(chunks[-1].timing.total_seconds, 0)

    def test_tokenize_round_trip_and_count(self):
        for text in ["Once upon a time", "A girl\nsaid \"hi\" to the café, 3 times."]:
            tokens = self.client.tokenize(text, add_bos=True)
            local = cli_generate("--prompt", text, "--max-tokens", "0")
            self.assertEqual(tokens.token_ids, local["prompt_ids"], text)
            self.assertEqual(len(tokens.pieces), len(tokens.token_ids))
            self.assertEqual(tokens.text(), text)
            self.assertEqual(self.client.count_tokens(text, add_bos=True), len(tokens.token_ids))
        without_bos = self.client.tokenize("Once upon a time")
        self.assertEqual(without_bos.token_ids, self.client.tokenize(
            "Once upon a time", add_bos=True).token_ids[1:])
        rendered = self.client.tokenize(messages=[("user", "Hi")], add_bos=True)
        stream = self.client.chat([{"role": "user", "content": "Hi"}], max_tokens=1)
        stream.text()
        self.assertEqual(len(rendered.token_ids), stream.usage.prompt_tokens)

    def test_models_and_health(self):
        models = self.client.models()
        self.assertEqual([m.name for m in models], ["stories260K"])
        model = models[0]
        self.assertEqual(model.architecture, "LlamaForCausalLM")
        self.assertEqual(model.quantization, "none")
        self.assertEqual(model.state, "READY")
        self.assertEqual(model.device, "cpu")
        self.assertGreater(model.context_length, 0)
        self.assertGreater(model.session_len, 0)
        self.assertEqual(self.client.model("stories260K"), model)
        self.assertEqual(model.proto.cache.cache_block_seq_len, 16)
        self.assertEqual(self.client.health(), "SERVING")

    def test_errors_are_nibble_errors_with_the_grpc_code(self):
        with self.assertRaises(NibbleError) as caught:
            self.client.chat("Hi", top_p=2.0).text()
        self.assertEqual(caught.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(caught.exception.code_name, "INVALID_ARGUMENT")
        self.assertIn("top_p", caught.exception.message)
        self.assertIn("INVALID_ARGUMENT", str(caught.exception))
        for call, code, words in [
                (lambda: list(self.client.chat([])), "INVALID_ARGUMENT", "messages"),
                (lambda: list(self.client.chat([("robot", "hi")])), "INVALID_ARGUMENT", "role"),
                (lambda: list(self.client.generate("hi", max_tokens=-1)), "INVALID_ARGUMENT",
                 "max_tokens"),
                (lambda: list(self.client.generate("hi", model="nope")), "NOT_FOUND", "nope"),
                (lambda: self.client.model("nope"), "NOT_FOUND", "nope"),
                (lambda: self.client.tokenize("a", messages="b"), "INVALID_ARGUMENT", "either"),
                (lambda: list(self.client.generate("Once", max_tokens=480, ignore_eos=True,
                                                   timeout=0.001)), "DEADLINE_EXCEEDED", "")]:
            with self.assertRaises(NibbleError) as caught:
                call()
            self.assertEqual(caught.exception.code_name, code, caught.exception)
            self.assertIn(words, caught.exception.message)
        with NibbleClient(f"127.0.0.1:{free_port()}", timeout=5) as nobody:
            with self.assertRaises(NibbleError) as caught:
                nobody.models()
            self.assertEqual(caught.exception.code, grpc.StatusCode.UNAVAILABLE)
        with self.assertRaises(TypeError):
            self.client.chat("Hi", temprature=0.5)
        self.assertEqual(self.client.health(), "SERVING")

    def test_leaving_a_stream_early_cancels_it(self):
        with self.client.generate("Once", max_tokens=480, ignore_eos=True) as stream:
            next(iter(stream))
        deadline = time.time() + 10
        while self.daemon.metric("nibble_num_requests_running") != 0:
            self.assertLess(time.time(), deadline, "the cancelled request kept running")
            time.sleep(0.05)
        with self.assertRaises(NibbleError) as caught:
            stream.text()
        self.assertEqual(caught.exception.code_name, "CANCELLED")
        stream = self.client.generate("Once", max_tokens=5, return_token_ids=True)
        stream.text()
        self.assertEqual(len(stream.token_ids), 5)

    def test_session_reuses_the_cache_and_threads_share_a_client(self):
        first = [("user", "Lily went to the park.")]
        stream = self.client.chat(first, session_id="py-1", max_tokens=30)
        reply = stream.text()
        self.assertEqual(stream.usage.cached_prompt_tokens, 0)
        second = first + [("assistant", reply), ("user", "Then she saw a dog.")]
        again = self.client.chat(second, session_id="py-1", max_tokens=30)
        fresh = self.client.chat(second, max_tokens=30)
        self.assertEqual(again.text(), fresh.text())
        self.assertGreaterEqual(again.usage.cached_prompt_tokens, stream.usage.prompt_tokens)
        prompts = [f"Story {i}: once" for i in range(8)]
        expected = [self.client.generate(p, max_tokens=40).text() for p in prompts]
        results = [None] * len(prompts)

        def worker(i):
            results[i] = self.client.generate(prompts[i], max_tokens=40).text()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(results, expected)

    def test_example_script_end_to_end(self):
        prompt = "Tom had a red ball."
        expected = cli_generate("--chat", "--prompt", prompt, "--max-tokens", "40")["text"]
        out = run([sys.executable, EXAMPLE, "--server", self.daemon.address, "--prompt", prompt,
                   "--max-tokens", "40"])
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout, expected + "\n")
        self.assertIn("generated tokens, finish:", out.stderr)
        out = run([sys.executable, EXAMPLE, "--server", self.daemon.address, "--max-tokens", "20"],
                  stdin="Lily had a cat.\nThe cat was happy.\n")
        self.assertEqual(out.returncode, 0, out.stderr)
        turns = [line for line in out.stderr.splitlines() if line.startswith("[")]
        self.assertEqual(len(turns), 2, out.stderr)
        self.assertIn("(0 cached)", turns[0])
        self.assertNotIn("(0 cached)", turns[1])
        bad = run([sys.executable, EXAMPLE, "--server", self.daemon.address, "--prompt", "Hi",
                   "--top-p", "3"])
        self.assertEqual(bad.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", bad.stderr)
        self.assertIn("top_p", bad.stderr)


if __name__ == "__main__":
    unittest.main()
