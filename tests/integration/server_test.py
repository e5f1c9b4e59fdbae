#!/usr/bin/python3
"""nibbled end to end: the real daemon on loopback ports, real gRPC clients (Debian's
python3-grpcio with stubs generated at build time), the real stories260K model.

Every daemon a test starts is stopped by the test's cleanup, also on failure (and killed at
exit as a last resort). `server_test.py PrometheusTest` runs the scrape by a real Prometheus.
"""
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request

STUBS = os.environ["NIBBLE_SERVER_STUBS"]
sys.path.insert(0, STUBS)

import grpc  # noqa: E402
from google.protobuf import descriptor_pb2  # noqa: E402
from nibble.v1 import inference_pb2, inference_pb2_grpc, models_pb2, models_pb2_grpc  # noqa: E402
from nibbled_process import Nibbled, free_port, scalar_metric, track  # noqa: E402


def _load(name, relative):
    # gRPC's health and reflection stubs live under grpc/..., which must not shadow the grpc
    # package: load the message modules by path and call the methods by name.
    spec = importlib.util.spec_from_file_location(name, os.path.join(STUBS, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


health_pb2 = _load("health_pb2", "grpc/health/v1/health_pb2.py")
reflection_pb2 = _load("reflection_pb2", "grpc/reflection/v1alpha/reflection_pb2.py")

NIBBLED = os.environ["NIBBLED_BIN"]
NIBBLE = os.environ["NIBBLE_BIN"]
MODEL = os.path.join(os.environ["NIBBLE_TEST_MODELS"], "stories260K")
PROMETHEUS = os.environ.get("NIBBLE_PROMETHEUS", "")
PROMTOOL = os.environ.get("NIBBLE_PROMTOOL", "")

class Daemon(Nibbled):
    """One nibbled on free loopback ports, with a config written for it (nibbled_process.py),
    stopped by the test's cleanup; its gRPC stubs on one channel."""

    def __init__(self, test, engine=None, grace=5.0, extra_config=""):
        super().__init__(NIBBLED, MODEL, grace=grace, engine=engine, extra_config=extra_config,
                         prefix="nibbled-test-")
        test.addCleanup(self.stop)
        self.channel = grpc.insecure_channel(self.address)
        test.addCleanup(self.channel.close)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.models = models_pb2_grpc.ModelsStub(self.channel)
        self.health_check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.health_watch = self.channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.wait_serving(lambda: self.health_check(health_pb2.HealthCheckRequest(), timeout=1)
                          .status == health_pb2.HealthCheckResponse.SERVING, grpc.RpcError)

    def wait_metric(self, name, predicate, timeout=10):
        deadline = time.time() + timeout
        while True:
            value = self.metric(name)
            if predicate(value):
                return value
            if time.time() > deadline:
                raise AssertionError(f"{name} stayed at {value}")
            time.sleep(0.05)


def sampling(**kwargs):
    return inference_pb2.SamplingParams(**kwargs)


def collect(stream):
    """Text, ids and the last chunk of a stream."""
    text, ids, last = "", [], None
    for chunk in stream:
        text += chunk.text
        ids.extend(chunk.token_ids)
        last = chunk
    return text, ids, last


def generate(daemon, prompt, **kw):
    request = inference_pb2.GenerateRequest(prompt=prompt, return_token_ids=True,
                                            sampling=sampling(**kw))
    return collect(daemon.inference.Generate(request, timeout=60))


def chat(daemon, messages, session_id="", **kw):
    request = inference_pb2.ChatRequest(
        messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        session_id=session_id, return_token_ids=True, sampling=sampling(**kw))
    return collect(daemon.inference.Chat(request, timeout=60))


def cli_generate(*args):
    result = subprocess.run([NIBBLE, "generate", "--model", MODEL, "--json", *args],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


class StreamingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.holder = unittest.TestCase()
        cls.daemon = Daemon(cls.holder, engine={"cache_block_seq_len": 16,
                                                "cpu_memory_budget": "64MiB"})

    @classmethod
    def tearDownClass(cls):
        cls.holder.doCleanups()

    def test_chat_streams_story_text(self):
        chunks = list(self.daemon.inference.Chat(inference_pb2.ChatRequest(
            messages=[inference_pb2.ChatMessage(role="user", content="Once upon a time")],
            sampling=sampling(max_tokens=40)), timeout=60))
        self.assertGreater(len(chunks), 1)
        text = "".join(c.text for c in chunks)
        self.assertGreater(len(text.split()), 5, text)
        last = chunks[-1]
        self.assertNotEqual(last.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED)
        self.assertGreater(last.usage.prompt_tokens, 1)
        self.assertGreater(last.usage.completion_tokens, 0)
        for chunk in chunks[:-1]:
            self.assertEqual(chunk.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED)
        # One origin (arrival at the daemon) for every timing.
        timing = last.timing
        self.assertGreater(timing.queue_seconds, 0)
        self.assertLessEqual(timing.queue_seconds, timing.first_token_seconds)
        self.assertLessEqual(timing.first_token_seconds, timing.total_seconds)

    def test_greedy_generate_equals_local_cli(self):
        for prompt in ["", "Once upon a time", "The little dog saw 3 big cats"]:
            expected = cli_generate("--prompt", prompt, "--max-tokens", "80")
            text, ids, last = generate(self.daemon, prompt, max_tokens=80)
            self.assertEqual(ids, expected["generated_ids"], prompt)
            self.assertEqual(text, expected["text"], prompt)
            self.assertEqual(last.usage.prompt_tokens, len(expected["prompt_ids"]))

    def test_greedy_chat_equals_local_cli_chat(self):
        expected = cli_generate("--chat", "--prompt", "Tom had a red ball.", "--max-tokens", "60")
        text, ids, _ = chat(self.daemon, [("user", "Tom had a red ball.")], max_tokens=60)
        self.assertEqual(ids, expected["generated_ids"])
        self.assertEqual(text, expected["text"])

    def test_sampled_generate_equals_local_cli(self):
        expected = cli_generate("--prompt", "A cat", "--max-tokens", "50", "--temperature", "0.9",
                                "--top-p", "0.9", "--top-k", "40", "--seed", "7")
        _, ids, _ = generate(self.daemon, "A cat", max_tokens=50, temperature=0.9, top_p=0.9,
                             top_k=40, seed=7)
        self.assertEqual(ids, expected["generated_ids"])

    def test_64_concurrent_streams_equal_their_single_stream_results(self):
        prompts = [(f"Story {i}: once", dict(max_tokens=30 + i % 7, temperature=(i % 3) * 0.5,
                                             seed=i, ignore_eos=bool(i % 2))) for i in range(64)]
        single = [generate(self.daemon, p, **kw) for p, kw in prompts]
        results = [None] * 64
        errors = []

        def run(i):
            try:
                results[i] = generate(self.daemon, prompts[i][0], **prompts[i][1])
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        for i in range(64):
            self.assertEqual(results[i][1], single[i][1], f"stream {i}")
            self.assertEqual(results[i][0], single[i][0], f"stream {i}")

    def test_token_ids_only_on_request_and_text_is_never_split(self):
        request = inference_pb2.GenerateRequest(prompt="Once", sampling=sampling(max_tokens=50))
        chunks = list(self.daemon.inference.Generate(request, timeout=60))
        self.assertTrue(all(len(c.token_ids) == 0 for c in chunks))
        for chunk in chunks:
            chunk.text.encode("utf-8")  # a str from protobuf: complete characters only

    def test_stop_string_ends_the_text_before_it(self):
        text, _, last = generate(self.daemon, "", max_tokens=200, stop=["park"])
        self.assertEqual(last.finish_reason, inference_pb2.FINISH_REASON_STOP_STRING)
        self.assertNotIn("park", text)
        expected = cli_generate("--max-tokens", "200", "--stop", "park")
        self.assertEqual(text, expected["text"])

    def test_tokenize_and_count(self):
        response = self.daemon.inference.Tokenize(
            inference_pb2.TokenizeRequest(text="Once upon a time", add_bos=True), timeout=10)
        expected = cli_generate("--prompt", "Once upon a time", "--max-tokens", "1")
        self.assertEqual(list(response.token_ids), expected["prompt_ids"])
        self.assertEqual(len(response.pieces), len(response.token_ids))
        count = self.daemon.inference.CountTokens(
            inference_pb2.TokenizeRequest(text="Once upon a time", add_bos=True), timeout=10)
        self.assertEqual(count.token_count, len(expected["prompt_ids"]))
        self.assertGreater(count.context_length, 0)

    def test_models_list_and_get(self):
        models = self.daemon.models.List(models_pb2.ListModelsRequest(), timeout=10).models
        self.assertEqual([m.name for m in models], ["stories260K"])
        model = self.daemon.models.Get(models_pb2.GetModelRequest(name="stories260K"), timeout=10)
        self.assertEqual(model.architecture, "LlamaForCausalLM")
        self.assertEqual(model.state, models_pb2.MODEL_STATE_READY)
        self.assertEqual(model.cache.cache_block_seq_len, 16)
        self.assertGreater(model.cache.kv_blocks_total, 0)
        self.assertEqual(model.quantization.method, "none")
        self.assertGreater(model.context_length, 0)

    def test_reflection_lists_the_services_and_serves_their_descriptors(self):
        call = self.daemon.channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="nibble.v1.Inference")]
        responses = list(call(iter(requests), timeout=10))
        names = {s.name for s in responses[0].list_services_response.service}
        for service in ["nibble.v1.Inference", "nibble.v1.Models", "grpc.health.v1.Health"]:
            self.assertIn(service, names)
        files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                 for b in responses[1].file_descriptor_response.file_descriptor_proto]
        services = {s.name: [m.name for m in s.method] for f in files for s in f.service}
        self.assertEqual(services["Inference"],
                         ["Chat", "Generate", "Tokenize", "CountTokens", "EndSession"])

    def test_unseeded_sampling_is_random_and_the_returned_seed_replays_it(self):
        kw = dict(max_tokens=64, temperature=1.0, ignore_eos=True)
        _, ids1, last1 = generate(self.daemon, "Once upon a time", **kw)
        _, ids2, last2 = generate(self.daemon, "Once upon a time", **kw)
        self.assertEqual(len(ids1), 64)
        self.assertNotEqual(last1.seed, last2.seed)
        self.assertNotEqual(ids1, ids2)
        _, replay, last3 = generate(self.daemon, "Once upon a time", seed=last1.seed, **kw)
        self.assertEqual(replay, ids1)
        self.assertEqual(last3.seed, last1.seed)
        _, _, seeded = generate(self.daemon, "Once", max_tokens=3, seed=7)
        self.assertEqual(seeded.seed, 7)

    def test_chat_with_ignore_eos_runs_past_the_stop_token_to_max_tokens(self):
        messages = [("user", "Tom had a red ball.")]
        _, stopped, last = chat(self.daemon, messages, max_tokens=400)
        self.assertEqual(last.finish_reason, inference_pb2.FINISH_REASON_STOP)
        self.assertLess(len(stopped), 400)
        _, ids, last = chat(self.daemon, messages, max_tokens=400, ignore_eos=True)
        self.assertEqual(last.finish_reason, inference_pb2.FINISH_REASON_LENGTH)
        self.assertEqual(len(ids), 400)
        self.assertEqual(ids[:len(stopped)], stopped)  # the stop token is generated, not obeyed
        expected = cli_generate("--chat", "--prompt", "Tom had a red ball.", "--max-tokens", "400",
                                "--ignore-eos")
        self.assertEqual(ids, expected["generated_ids"])


BAD = "@@BADUTF8@@"  # replaced by as many invalid UTF-8 bytes in the serialized request


def raw(message):
    data = message.SerializeToString()
    return data.replace(BAD.encode(), b"\xff" * len(BAD))


class BadInputTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.holder = unittest.TestCase()
        cls.daemon = Daemon(cls.holder)

    @classmethod
    def tearDownClass(cls):
        cls.holder.doCleanups()

    def call(self, method, data, streaming):
        channel = self.daemon.channel
        if streaming:
            stub = channel.unary_stream(method, request_serializer=None,
                                        response_deserializer=inference_pb2.ChatChunk.FromString)
            return list(stub(data, timeout=30))
        stub = channel.unary_unary(method, request_serializer=None,
                                   response_deserializer=lambda b: b)
        return stub(data, timeout=30)

    def expect(self, code, method, message, streaming=True, words=None):
        data = message if isinstance(message, bytes) else raw(message)
        with self.assertRaises(grpc.RpcError, msg=f"{method} {message!r:.200}") as caught:
            self.call(method, data, streaming)
        self.assertEqual(caught.exception.code(), code,
                         f"{method} {message!r:.200}: {caught.exception.details()}")
        self.assertTrue(caught.exception.details(), "the status has no message")
        if words:
            self.assertIn(words, caught.exception.details())

    def test_every_field_of_every_request(self):
        IA, NF, RE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                      grpc.StatusCode.RESOURCE_EXHAUSTED)
        M = inference_pb2.ChatMessage
        user = [M(role="user", content="hi")]

        def chat_request(messages=user, **kw):
            return inference_pb2.ChatRequest(messages=messages, **kw)

        bad_sampling = [
            (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
            (dict(temperature=-1.0), "temperature"), (dict(temperature=1e9), "temperature"),
            (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
            (dict(top_p=float("-inf")), "top_p"), (dict(top_k=-1), "top_k"),
            (dict(top_k=-2**31), "top_k"),
            (dict(repetition_penalty=0.0), "repetition_penalty"),
            (dict(repetition_penalty=-1.0), "repetition_penalty"),
            (dict(repetition_penalty=float("nan")), "repetition_penalty"),
            (dict(repetition_penalty=float("inf")), "repetition_penalty"),
            (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=2**31 - 1), "max_tokens"),
            (dict(max_tokens=-2**31), "max_tokens"),
            (dict(stop=["x"] * 17), "stop"), (dict(stop=[""]), "stop"), (dict(stop=["y" * 257]), "stop"),
            (dict(stop=[BAD]), "SamplingParams.stop"),
        ]
        for method in ["Chat", "Generate"]:
            path = f"/nibble.v1.Inference/{method}"
            make = chat_request if method == "Chat" else (
                lambda **kw: inference_pb2.GenerateRequest(prompt="hi", **kw))
            for fields, word in bad_sampling:
                self.expect(IA, path, make(sampling=sampling(**fields)), words=word)
            self.expect(NF, path, make(model="no-such-model"), words="no-such-model")
            self.expect(NF, path, make(model="x" * 100000))
            self.expect(IA, path, make(model=BAD), words=".model")
            self.expect(IA, path, make(session_id="s" * 129), words="session_id")
            self.expect(IA, path, make(session_id=BAD), words="session_id")
            self.expect(IA, path, b"\xff\xff\xff\xff", words="not a valid")
            self.expect(IA, path, b"\x0a\x05ab", words="not a valid")  # truncated field
        chat_path = "/nibble.v1.Inference/Chat"
        self.expect(IA, chat_path, chat_request(messages=[]), words="messages")
        self.expect(IA, chat_path, chat_request(messages=[M(role="robot", content="hi")]), words="role")
        self.expect(IA, chat_path, chat_request(messages=[M(role="", content="hi")]), words="role")
        self.expect(IA, chat_path, chat_request(messages=[M(role=BAD, content="hi")]), words="role")
        self.expect(IA, chat_path, chat_request(messages=[M(role="user", content=BAD)]),
                    words="content")
        self.expect(IA, chat_path, chat_request(messages=[M(role="user", content="a"),
                                                          M(role="system", content="b")]))
        self.expect(IA, chat_path, chat_request(messages=[M(role="user", content="a"),
                                                          M(role="assistant", content="b")]))
        self.expect(IA, chat_path, chat_request(messages=[M(role="user", content="a")] * 5000),
                    words="messages")
        huge = "Once upon a time " * 20000  # 340 KB: tokens far past session_len
        self.expect(RE, chat_path, chat_request(messages=[M(role="user", content=huge)]),
                    words="session_len")
        self.expect(RE, "/nibble.v1.Inference/Generate", inference_pb2.GenerateRequest(prompt=huge),
                    words="session_len")
        self.expect(IA, "/nibble.v1.Inference/Generate", inference_pb2.GenerateRequest(prompt=BAD),
                    words="prompt")
        # Past max_request_bytes (1 MiB by default): refused by gRPC itself.
        for size in [(1 << 20) + 1000, 5 << 20]:
            self.expect(RE, "/nibble.v1.Inference/Generate",
                        inference_pb2.GenerateRequest(prompt="a" * size))
        # Past session_len in tokens while under the byte bound: refused after tokenizing.
        self.expect(RE, "/nibble.v1.Inference/Generate",
                    inference_pb2.GenerateRequest(prompt="a " * 1000), words="tokens, more than")
        for method in ["Tokenize", "CountTokens"]:
            path = f"/nibble.v1.Inference/{method}"
            T = inference_pb2.TokenizeRequest
            self.expect(IA, path, T(text=BAD), streaming=False, words="text")
            self.expect(IA, path, T(text="a", messages=user), streaming=False, words="either")
            self.expect(IA, path, T(messages=[M(role="bot", content="a")]), streaming=False)
            self.expect(NF, path, T(model="nope", text="a"), streaming=False)
            self.expect(IA, path, b"\xff", streaming=False)
            self.expect(RE, path, T(text=huge), streaming=False, words="session_len")
        end = "/nibble.v1.Inference/EndSession"
        E = inference_pb2.EndSessionRequest
        self.expect(IA, end, E(session_id=""), streaming=False, words="session_id")
        self.expect(IA, end, E(session_id="s" * 129), streaming=False, words="session_id")
        self.expect(NF, end, E(model="nope", session_id="s"), streaming=False)
        self.daemon.inference.EndSession(E(session_id="never-used"), timeout=10)  # not an error
        get = "/nibble.v1.Models/Get"
        self.expect(IA, get, models_pb2.GetModelRequest(name=""), streaming=False)
        self.expect(NF, get, models_pb2.GetModelRequest(name="nope"), streaming=False)
        self.expect(IA, get, models_pb2.GetModelRequest(name=BAD), streaming=False, words="name")
        # Extreme but valid values are served.
        _, ids, _ = generate(self.daemon, "hi", max_tokens=0)
        self.assertEqual(ids, [])
        _, ids, _ = generate(self.daemon, "hi", max_tokens=5, seed=2**64 - 1, temperature=100.0,
                             top_k=2**31 - 1, top_p=1e-30, repetition_penalty=100.0)
        self.assertLessEqual(len(ids), 5)
        # And the daemon keeps serving.
        self.assertEqual(generate(self.daemon, "Once", max_tokens=10)[1],
                         cli_generate("--prompt", "Once", "--max-tokens", "10")["generated_ids"])
        self.assertIsNone(self.daemon.process.poll())


class OverloadTest(unittest.TestCase):
    """Huge prompts are refused by their size, fast, without starving other requests."""

    def setUp(self):
        self.daemon = Daemon(self)

    def test_huge_prompt_is_refused_fast(self):
        near_limit = "Once upon a time " * 60000  # 1.02 MB: under max_request_bytes
        cases = [
            ("Generate", inference_pb2.GenerateRequest(prompt=near_limit)),
            ("Chat", inference_pb2.ChatRequest(
                messages=[inference_pb2.ChatMessage(role="user", content=near_limit)])),
            ("Generate", inference_pb2.GenerateRequest(prompt="a" * 3_900_000)),  # past it
        ]
        for method, request in cases:
            start = time.time()
            with self.assertRaises(grpc.RpcError) as caught:
                list(getattr(self.daemon.inference, method)(request, timeout=30))
            self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertLess(time.time() - start, 1.0, method)
        start = time.time()
        with self.assertRaises(grpc.RpcError) as caught:
            self.daemon.inference.CountTokens(inference_pb2.TokenizeRequest(text=near_limit),
                                              timeout=30)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertLess(time.time() - start, 1.0)

    def test_small_request_is_not_delayed_by_concurrent_huge_ones(self):
        huge = [inference_pb2.GenerateRequest(prompt="Once upon a time " * 60000),
                inference_pb2.GenerateRequest(prompt="a" * 3_900_000)]
        stop = threading.Event()
        sent = []

        def flood(i):
            while not stop.is_set():
                try:
                    list(self.daemon.inference.Generate(huge[i % 2], timeout=60))
                except grpc.RpcError:
                    pass
                sent.append(i)

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        try:
            while len(sent) < 16:  # the flood is running
                time.sleep(0.01)
            start = time.time()
            _, ids, _ = generate(self.daemon, "Once", max_tokens=5)
            elapsed = time.time() - start
        finally:
            stop.set()
            for t in threads:
                t.join()
        self.assertEqual(len(ids), 5)
        self.assertLess(elapsed, 5.0)


class CancellationTest(unittest.TestCase):
    """Streams that end early free their KV blocks; the daemon keeps serving."""

    def setUp(self):
        self.daemon = Daemon(self, engine={"cache_block_seq_len": 16})

    def long_request(self):
        return inference_pb2.GenerateRequest(
            prompt="Once upon a time", sampling=sampling(max_tokens=480, ignore_eos=True))

    def assert_freed_and_serving(self):
        self.daemon.wait_metric("nibble_kv_cache_usage_perc", lambda v: v == 0)
        self.daemon.wait_metric("nibble_num_requests_running", lambda v: v == 0)
        _, ids, _ = generate(self.daemon, "Once", max_tokens=5)
        self.assertEqual(len(ids), 5)

    def test_client_cancels_mid_stream(self):
        stream = self.daemon.inference.Generate(self.long_request(), timeout=60)
        next(stream)
        stream.cancel()
        with self.assertRaises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        self.assertEqual(caught.exception.code(), grpc.StatusCode.CANCELLED)
        self.assert_freed_and_serving()

    def test_client_process_killed_mid_stream(self):
        script = (
            "import sys; sys.path.insert(0, sys.argv[1]); import grpc, time\n"
            "from nibble.v1 import inference_pb2 as p, inference_pb2_grpc as g\n"
            "stub = g.InferenceStub(grpc.insecure_channel(sys.argv[2]))\n"
            "s = stub.Generate(p.GenerateRequest(prompt='Once', sampling=p.SamplingParams("
            "max_tokens=480, ignore_eos=True)))\n"
            "next(s); print('streaming', flush=True); time.sleep(60)\n")
        client = subprocess.Popen([sys.executable, "-c", script, STUBS,
                                   f"127.0.0.1:{self.daemon.port}"], stdout=subprocess.PIPE,
                                  text=True)
        track(client)
        self.addCleanup(lambda: client.poll() is None and client.kill())
        self.assertEqual(client.stdout.readline().strip(), "streaming")
        client.kill()
        client.wait()
        self.assert_freed_and_serving()

    def generated_tokens(self):
        return scalar_metric(self.daemon.metrics(), "nibble_generation_tokens_total")

    def test_deadline_passes_mid_stream(self):
        # 32 long streams share the batch, so the one under test takes seconds; its deadline
        # passes after it has streamed (the server saw the request run and cut it).
        background = [self.daemon.inference.Generate(self.long_request(), timeout=120)
                      for _ in range(32)]
        for stream in background:
            next(stream)
        before = self.generated_tokens()
        chunks = 0
        with self.assertRaises(grpc.RpcError) as caught:
            for _ in self.daemon.inference.Generate(self.long_request(), timeout=0.5):
                chunks += 1
        self.assertEqual(caught.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertGreater(chunks, 0, "the deadline passed before the stream started")
        for stream in background:
            for _ in stream:
                pass
        self.daemon.wait_metric("nibble_num_requests_running", lambda v: v == 0)
        # The background streams finished (at most 32 x 480 tokens since `before`); the stream
        # under test was cut short of its 480.
        self.assertLess(self.generated_tokens() - before, 33 * 480)
        self.assert_freed_and_serving()

    def test_many_cancelled_streams(self):
        before = self.generated_tokens()
        streams = [self.daemon.inference.Generate(self.long_request(), timeout=60)
                   for _ in range(32)]
        for s in streams:
            next(s)  # running: it has streamed a chunk
        self.assertGreater(scalar_metric(self.daemon.metrics(), "nibble_kv_cache_usage_perc"), 0)
        cancelled = sum(1 for s in streams if s.cancel())
        self.assertEqual(cancelled, 32, "streams ended before they were cancelled")
        self.assert_freed_and_serving()
        # Cut short: far fewer than the 32 x 480 tokens they asked for.
        self.assertLess(self.generated_tokens() - before, 32 * 480 // 2)


class SessionTest(unittest.TestCase):
    def setUp(self):
        self.daemon = Daemon(self, engine={"cache_block_seq_len": 16})

    def test_second_turn_reuses_the_first_turns_cache(self):
        first = [("user", "Lily went to the park.")]
        text1, _, last1 = chat(self.daemon, first, session_id="conv-1", max_tokens=40)
        self.assertEqual(last1.usage.cached_prompt_tokens, 0)
        second = first + [("assistant", text1), ("user", "Then she saw a dog.")]
        text2, ids2, last2 = chat(self.daemon, second, session_id="conv-1", max_tokens=40)
        fresh_text, fresh_ids, fresh_last = chat(self.daemon, second, max_tokens=40)
        self.assertEqual(ids2, fresh_ids)
        self.assertEqual(text2, fresh_text)
        self.assertEqual(last2.usage.prompt_tokens, fresh_last.usage.prompt_tokens)
        # Most of the second prompt (the first turn's prompt and reply) came from the cache.
        self.assertGreaterEqual(last2.usage.cached_prompt_tokens, last1.usage.prompt_tokens)
        self.assertEqual(fresh_last.usage.cached_prompt_tokens, 0)
        # Metrics: reused tokens counted apart; the kept session's blocks are memory in use.
        metrics = self.daemon.metrics()
        self.assertEqual(scalar_metric(metrics, "nibble_prompt_tokens_cached_total"),
                         last2.usage.cached_prompt_tokens)
        used = scalar_metric(metrics, "nibble_device_memory_used_bytes", 'use="kv_cache"')
        capacity = scalar_metric(metrics, "nibble_kv_cache_capacity_bytes")
        self.assertGreater(used, 0)
        self.assertLess(used, capacity)

    def test_end_session_frees_its_cache(self):
        chat(self.daemon, [("user", "Lily went to the park.")], session_id="conv-2", max_tokens=20)
        self.daemon.wait_metric("nibble_sessions", lambda v: v == 1)
        self.daemon.inference.EndSession(inference_pb2.EndSessionRequest(session_id="conv-2"),
                                         timeout=10)
        self.daemon.wait_metric("nibble_sessions", lambda v: v == 0)
        self.daemon.wait_metric("nibble_kv_cache_usage_perc", lambda v: v == 0)
        self.assertEqual(scalar_metric(self.daemon.metrics(), "nibble_device_memory_used_bytes",
                                       'use="kv_cache"'), 0)


class LifecycleTest(unittest.TestCase):
    def test_sigterm_turns_health_not_serving_and_exits_zero_within_grace(self):
        daemon = Daemon(self, grace=0.5)
        watch = daemon.health_watch(health_pb2.HealthCheckRequest(), timeout=30)
        self.assertEqual(next(watch).status, health_pb2.HealthCheckResponse.SERVING)
        streams = [daemon.inference.Generate(inference_pb2.GenerateRequest(
            prompt="Once", sampling=sampling(max_tokens=480, ignore_eos=True)), timeout=60)
            for _ in range(64)]
        for stream in streams:
            next(stream)  # every stream is running before the drain starts
        start = time.time()
        daemon.process.send_signal(signal.SIGTERM)
        self.assertEqual(next(watch).status, health_pb2.HealthCheckResponse.NOT_SERVING)
        with self.assertRaises(grpc.RpcError) as caught:
            generate(daemon, "Once", max_tokens=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertEqual(daemon.process.wait(timeout=15), 0, daemon.output())
        self.assertLess(time.time() - start, 0.5 + 8)
        cut = 0
        for stream in streams:
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as e:  # ended by the grace period, with a clear status
                self.assertEqual(e.code(), grpc.StatusCode.UNAVAILABLE, e.details())
                self.assertIn("grace period", e.details())
                cut += 1
        # 64 x 480 tokens take seconds: the 0.5 s grace period cut streams off.
        self.assertGreater(cut, 0)

    def test_idle_daemon_exits_zero_on_sigint(self):
        daemon = Daemon(self)
        daemon.process.send_signal(signal.SIGINT)
        self.assertEqual(daemon.process.wait(timeout=15), 0, daemon.output())

    def run_bad_config(self, text, *args):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bad.yaml")
            with open(path, "w") as f:
                f.write(text)
            result = subprocess.run([NIBBLED, "--config", path, *args], capture_output=True,
                                    text=True, timeout=30)
        self.assertNotEqual(result.returncode, 0)
        return result.stderr

    def test_config_errors_name_the_key(self):
        model = f"models:\n  - name: m\n    path: {MODEL}\n"
        cases = [
            (model + "engine:\n  max_batch_size: lots\n", "engine.max_batch_size"),
            (model + "engine:\n  cache_max_entry_count: 2\n", "engine.cache_max_entry_count"),
            (model + "engine:\n  cpu_memory_budget: 1 bucket\n", "engine.cpu_memory_budget"),
            (model + "listn: 1\n", "'listn'"),
            ("models:\n  - name: m\n", "models[0].path"),
            ("models:\n  - name: m\n    path: /nonexistent/model\n", "/nonexistent/model"),
            ("models: [\n", "not valid YAML"),
        ]
        for text, words in cases:
            stderr = self.run_bad_config(text)
            self.assertIn(words, stderr, text)
            self.assertTrue(stderr.startswith("nibbled: "), stderr)
        missing = subprocess.run([NIBBLED, "--config", "/nonexistent/nibbled.yaml"],
                                 capture_output=True, text=True, timeout=30)
        self.assertNotEqual(missing.returncode, 0)
        self.assertIn("/nonexistent/nibbled.yaml: cannot open", missing.stderr)

    def test_listen_address_in_use_is_named(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            stderr = self.run_bad_config(f"models:\n  - name: m\n    path: {MODEL}\n",
                                         "--listen", f"127.0.0.1:{port}", "--metrics-listen", "")
        self.assertIn(f"127.0.0.1:{port}", stderr)


class CliClientTest(unittest.TestCase):
    """`nibble chat`, `nibble models list` and `nibble generate --server` against the daemon."""

    def setUp(self):
        self.daemon = Daemon(self)
        self.server = f"127.0.0.1:{self.daemon.port}"

    def nibble(self, *args, stdin=None, check=True):
        result = subprocess.run([NIBBLE, *args], input=stdin, capture_output=True, text=True,
                                timeout=120)
        if check:
            self.assertEqual(result.returncode, 0, result.stderr)
        return result

    def test_remote_generate_equals_local(self):
        for extra in [[], ["--chat"], ["--temperature", "0.8", "--seed", "3", "--top-p", "0.9"]]:
            args = ["--prompt", "Once upon a time", "--max-tokens", "50", "--json", *extra]
            local = cli_generate(*args)
            remote = json.loads(self.nibble("generate", "--server", self.server, *args).stdout)
            for key in ["prompt_ids", "generated_ids", "text", "finish_reason"]:
                self.assertEqual(remote[key], local[key], f"{key} {extra}")
        streamed = self.nibble("generate", "--server", self.server, "--prompt", "Once upon a time",
                               "--max-tokens", "30")
        self.assertEqual(streamed.stdout.strip(),
                         "Once upon a time" + cli_generate("--prompt", "Once upon a time",
                                                           "--max-tokens", "30")["text"])

    def test_chat_one_shot_json_and_interactive_session(self):
        # Interactive: a session from turn to turn, ended (its cache freed) at EOF.
        out = self.nibble("chat", "--server", self.server, "--json", "--max-tokens", "20",
                          stdin="Lily had a cat.\nThe cat was happy.\n")
        finals = [c for c in map(json.loads, out.stdout.splitlines()) if "finish_reason" in c]
        self.assertEqual(len(finals), 2)
        self.assertGreater(finals[1]["usage"]["cached_prompt_tokens"], 0)
        self.daemon.wait_metric("nibble_sessions", lambda v: v == 0)
        self.daemon.wait_metric("nibble_kv_cache_usage_perc", lambda v: v == 0)
        # One shot: no session kept.
        out = self.nibble("chat", "--server", self.server, "--prompt", "Hi", "--json",
                          "--max-tokens", "20")
        chunks = [json.loads(line) for line in out.stdout.splitlines()]
        self.assertIn(chunks[-1]["finish_reason"], ["length", "stop", "stop_string"])
        self.assertEqual(chunks[-1]["usage"]["cached_prompt_tokens"], 0)
        self.assertIn("seed", chunks[-1])
        # ... unless one is named: then exactly that one is kept (so the gauge is current and
        # the run before kept none).
        self.nibble("chat", "--server", self.server, "--prompt", "Hi", "--max-tokens", "5",
                    "--session-id", "kept")
        self.daemon.wait_metric("nibble_sessions", lambda v: v == 1)
        plain = self.nibble("chat", "--server", self.server, "--prompt", "Hi", "--max-tokens", "10")
        self.assertIn("generated tokens", plain.stderr)
        time.sleep(0.2)
        self.assertEqual(scalar_metric(self.daemon.metrics(), "nibble_sessions"), 1)

    def test_timeout_flag_ends_a_stream(self):
        slow = self.nibble("generate", "--server", self.server, "--prompt", "Once",
                           "--max-tokens", "480", "--ignore-eos", "--timeout", "0.000001",
                           check=False)
        self.assertEqual(slow.returncode, 1)
        self.assertIn("DEADLINE_EXCEEDED", slow.stderr)
        ok = self.nibble("models", "list", "--server", self.server, "--timeout", "30")
        self.assertIn("stories260K", ok.stdout)

    def test_models_list_and_errors(self):
        out = self.nibble("models", "list", "--server", self.server)
        self.assertIn("stories260K", out.stdout)
        self.assertIn("LlamaForCausalLM", out.stdout)
        bad = self.nibble("chat", "--server", self.server, "--prompt", "Hi", "--top-p", "2",
                          check=False)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("nibble chat: ", bad.stderr)
        self.assertIn("INVALID_ARGUMENT", bad.stderr)
        self.assertIn("top_p", bad.stderr)
        gone = self.nibble("models", "list", "--server", f"127.0.0.1:{free_port()}", check=False)
        self.assertEqual(gone.returncode, 1)
        self.assertIn("UNAVAILABLE", gone.stderr)


class PrometheusTest(unittest.TestCase):
    """A real Prometheus scrapes nibbled; promtool accepts the exposition."""

    def test_prometheus_scrapes_generation_tokens(self):
        self.assertTrue(PROMETHEUS and PROMTOOL, "prometheus and promtool are needed")
        daemon = Daemon(self)
        generate(daemon, "Once upon a time", max_tokens=20)
        port = free_port()
        d = tempfile.mkdtemp(prefix="nibble-prometheus-")
        self.addCleanup(shutil.rmtree, d, True)
        with open(os.path.join(d, "prometheus.yml"), "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: nibbled\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{daemon.metrics_port}']\n")
        log = open(os.path.join(d, "prometheus.log"), "w+")
        self.addCleanup(log.close)
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={d}/prometheus.yml", f"--storage.tsdb.path={d}/data",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        track(prometheus)

        def stop_prometheus():
            if prometheus.poll() is None:
                prometheus.terminate()
                try:
                    prometheus.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    prometheus.kill()

        self.addCleanup(stop_prometheus)
        query = urllib.parse.urlencode({"query": "nibble_generation_tokens_total"})
        deadline = time.time() + 60
        value = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}",
                                            timeout=5) as r:
                    result = json.load(r)["data"]["result"]
                if result and float(result[0]["value"][1]) > 0:
                    value = float(result[0]["value"][1])
                    self.assertEqual(result[0]["metric"]["model_name"], "stories260K")
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        log.seek(0)
        self.assertIsNotNone(value, f"Prometheus never saw tokens:\n{log.read()[-3000:]}")
        text = daemon.metrics()
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                               text=True, timeout=30)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        for name in ["nibble_num_requests_running", "nibble_num_requests_waiting",
                     "nibble_kv_cache_usage_perc", "nibble_prompt_tokens_total",
                     "nibble_generation_tokens_total", "nibble_num_preemptions_total",
                     "nibble_time_to_first_token_seconds_bucket",
                     "nibble_inter_token_latency_seconds_bucket",
                     "nibble_e2e_request_latency_seconds_bucket",
                     "nibble_request_queue_time_seconds_bucket", "nibble_build_info",
                     "nibble_device_memory_used_bytes", "nibble_kv_cache_capacity_bytes",
                     "nibble_prompt_tokens_cached_total"]:
            self.assertIn(name + "{", text)
        self.assertGreater(scalar_metric(text, "nibble_time_to_first_token_seconds_count"), 0)


if __name__ == "__main__":
    unittest.main()
