#!/usr/bin/python3
"""Artifact transfer and hot loading end to end: real nibbled processes on loopback, a real
artifact made by `nibble quantize` from stories260K, the real `nibble` CLI.

Daemon A holds the artifact in its state_dir; daemon B starts with no model and loads it from A
(Models.Load {peer, artifact}); `nibble artifacts pull` copies it, is SIGKILLed midway and
resumes. Refusals: tampered artifacts, paths that leave their roots, a model past the memory
budget, a model unloaded. Every daemon is stopped by the test's cleanup (and killed at exit as a
last resort).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

STUBS = os.environ["NIBBLE_SERVER_STUBS"]
sys.path.insert(0, STUBS)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402
from nibble.v1 import (artifacts_pb2, artifacts_pb2_grpc, inference_pb2,  # noqa: E402
                       inference_pb2_grpc, models_pb2, models_pb2_grpc)
from nibbled_process import free_port, scalar_metric, terminate, track  # noqa: E402

NIBBLED = os.environ["NIBBLED_BIN"]
NIBBLE = os.environ["NIBBLE_BIN"]
MODEL = os.path.join(os.environ["NIBBLE_TEST_MODELS"], "stories260K")
PROMPT = "Once upon a time"
ARTIFACT = "s260-rtn"

_work = None  # the module's scratch directory (setUpModule)
_artifact_dir = None  # the artifact made by `nibble quantize`, copied into daemons' state


def setUpModule():
    global _work, _artifact_dir
    _work = tempfile.mkdtemp(prefix="nibble-artifacts-test-")
    _artifact_dir = os.path.join(_work, ARTIFACT)
    run_nibble("quantize", MODEL, "--work-dir", _artifact_dir, "--method", "rtn",
               "--w-group-size", "32", "--eval-dataset", "none")


def tearDownModule():
    shutil.rmtree(_work, True)


def run_nibble(*args, check=True, timeout=300):
    result = subprocess.run([NIBBLE, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"nibble {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def tree(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


class Daemon:
    """One nibbled with a state_dir, on free loopback ports; `config` is appended to the
    listen/metrics/state_dir lines. Stopped by the test's cleanup."""

    def __init__(self, test, config="", roles="[inference]", models="", state_dir=None):
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="nibbled-", dir=_work)
        # A given state_dir: a daemon restarted on another's state (what it left is kept).
        self.state_dir = state_dir or os.path.join(self.dir, "state")
        self.artifacts_dir = os.path.join(self.state_dir, "artifacts")
        os.makedirs(self.artifacts_dir, exist_ok=True)
        self.config = os.path.join(self.dir, "nibbled.yaml")
        with open(self.config, "w") as f:
            f.write(f"listen: {self.address}\nmetrics_listen: 127.0.0.1:{self.metrics_port}\n"
                    f"state_dir: {self.state_dir}\nroles: {roles}\ndrain_grace_seconds: 5\n"
                    + models + config)
        self.log = open(os.path.join(self.dir, "nibbled.log"), "w+")
        self.process = track(subprocess.Popen([NIBBLED, "--config", self.config],
                                              stdout=self.log, stderr=subprocess.STDOUT))
        test.addCleanup(self.stop)
        # The channel is made once the daemon listens: one made earlier would sit in gRPC's
        # reconnect backoff for seconds.
        deadline = time.time() + 30
        while "nibbled: serving on" not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(f"nibbled exited:\n{self.output()}")
            if time.time() > deadline:
                raise AssertionError(f"nibbled did not start serving:\n{self.output()}")
            time.sleep(0.02)
        self.channel = grpc.insecure_channel(self.address)
        test.addCleanup(self.channel.close)
        self.artifacts = artifacts_pb2_grpc.ArtifactsStub(self.channel)
        self.models = models_pb2_grpc.ModelsStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, name, labels=""):
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as r:
            return scalar_metric(r.read().decode(), name, labels)

    def stop(self):
        terminate(self.process)
        self.log.close()

    def place(self, name=ARTIFACT, source=None):
        """Copies an artifact into this daemon's artifacts/ (as a quantizer would leave it)."""
        target = os.path.join(self.artifacts_dir, name)
        shutil.copytree(source or _artifact_dir, target)
        return target

    def chat_ids(self, model="", max_tokens=40):
        request = inference_pb2.ChatRequest(
            model=model, messages=[inference_pb2.ChatMessage(role="user", content=PROMPT)],
            sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
            return_token_ids=True)
        ids = []
        for chunk in self.inference.Chat(request, timeout=60):
            ids.extend(chunk.token_ids)
        return ids

    def load(self, timeout=120, **fields):
        return self.models.Load(models_pb2.LoadModelRequest(**fields), timeout=timeout)


def generate_ids(model_dir, max_tokens=40):
    out = run_nibble("generate", "--model", model_dir, "--prompt", PROMPT, "--chat",
                     "--max-tokens", str(max_tokens), "--json")
    return json.loads(out.stdout)["generated_ids"]


class EdgePullTest(unittest.TestCase):
    def assertCode(self, code, call, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as caught:
            call(*args, **kwargs)
        self.assertEqual(caught.exception.code(), code, caught.exception.details())
        return caught.exception.details()

    def test_edge_daemon_loads_from_peer_and_chats_like_generate(self):
        quantizer = Daemon(self)
        quantizer.place()
        edge = Daemon(self, f"artifacts:\n  peers:\n    - address: {quantizer.address}\n")
        self.assertEqual(list(edge.models.List(models_pb2.ListModelsRequest()).models), [])
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, edge.chat_ids)  # no model yet

        info = edge.load(peer=models_pb2.PeerArtifact(address=quantizer.address,
                                                      artifact=ARTIFACT))
        self.assertEqual(info.name, ARTIFACT)
        self.assertEqual(info.state, models_pb2.MODEL_STATE_READY)
        self.assertEqual(info.path, os.path.join(edge.artifacts_dir, ARTIFACT))
        # The copy is the artifact, byte for byte, and is now one of the edge's artifacts.
        self.assertEqual(tree(info.path), tree(_artifact_dir))
        listed = edge.artifacts.List(artifacts_pb2.ListArtifactsRequest()).artifacts
        self.assertEqual([(a.name, a.state) for a in listed],
                         [(ARTIFACT, artifacts_pb2.ARTIFACT_STATE_PRESENT)])
        self.assertEqual(os.listdir(os.path.join(edge.state_dir, "transfers")), [])

        # Greedy chat on the edge equals `nibble generate` on the artifact.
        expected = generate_ids(_artifact_dir)
        self.assertGreater(len(expected), 5)
        self.assertEqual(edge.chat_ids(model=ARTIFACT), expected)

        # Transfer metrics on both sides: every byte of the files once.
        total = sum(os.path.getsize(os.path.join(_artifact_dir, p))
                    for p in tree(_artifact_dir) if p != "nibble_manifest.json")
        self.assertEqual(edge.metric("nibble_artifact_transfer_bytes_total",
                                     'direction="received"'), total)
        self.assertEqual(quantizer.metric("nibble_artifact_transfer_bytes_total",
                                          'direction="sent"'), total)
        self.assertEqual(edge.metric("nibble_artifact_transfer_failures_total",
                                     'direction="received"'), 0)

        # The same name again: refused; a peer the config does not name: refused.
        self.assertCode(grpc.StatusCode.ALREADY_EXISTS, edge.load, artifact=ARTIFACT)
        details = self.assertCode(grpc.StatusCode.PERMISSION_DENIED, edge.load,
                                  peer=models_pb2.PeerArtifact(address="127.0.0.1:1",
                                                               artifact="other"))
        self.assertIn(quantizer.address, details)

        # Unload (drain), then the model is gone.
        edge.models.Unload(models_pb2.UnloadModelRequest(name=ARTIFACT), timeout=30)
        self.assertCode(grpc.StatusCode.NOT_FOUND, edge.chat_ids, model=ARTIFACT)
        self.assertEqual(list(edge.models.List(models_pb2.ListModelsRequest()).models), [])
        self.assertCode(grpc.StatusCode.NOT_FOUND, edge.models.Unload,
                        models_pb2.UnloadModelRequest(name=ARTIFACT))
        # Loaded again from the local copy (no second transfer), under another name, by CLI.
        out = run_nibble("models", "load", "--server", edge.address, "--artifact", ARTIFACT,
                         "--name", "again", "--json")
        self.assertEqual(json.loads(out.stdout)["state"], "MODEL_STATE_READY")
        self.assertEqual(edge.chat_ids(model="again"), expected)
        self.assertEqual(edge.metric("nibble_artifact_transfer_bytes_total",
                                     'direction="received"'), total)
        out = run_nibble("models", "unload", "again", "--server", edge.address, "--cancel")
        self.assertIn("unloaded", out.stdout)
        self.assertCode(grpc.StatusCode.NOT_FOUND, edge.chat_ids, model="again")

    def test_edge_pulls_from_a_daemon_that_checks_tokens(self):
        tokens = os.path.join(_work, "tokens")
        with open(tokens, "w") as f:
            f.write("inference inference-token-0123456789\nadmin admin-token-0123456789ab\n")
        os.chmod(tokens, 0o600)
        good = os.path.join(_work, "good.token")
        with open(good, "w") as f:
            f.write("inference-token-0123456789\n")
        bad = os.path.join(_work, "bad.token")
        with open(bad, "w") as f:
            f.write("wrong-token-0123456789abcdef\n")
        quantizer = Daemon(self, f"security:\n  tokens_file: {tokens}\n")
        quantizer.place()
        edge = Daemon(self, f"artifacts:\n  peers:\n    - address: {quantizer.address}\n"
                            f"      token_file: {good}\n")
        refused = Daemon(self, f"artifacts:\n  peers:\n    - address: {quantizer.address}\n"
                               f"      token_file: {bad}\n")
        peer = models_pb2.PeerArtifact(address=quantizer.address, artifact=ARTIFACT)
        # The peer refusing this daemon's token is not the caller's fault: FAILED_PRECONDITION.
        details = self.assertCode(grpc.StatusCode.FAILED_PRECONDITION, refused.load, peer=peer)
        self.assertIn("UNAUTHENTICATED", details)
        self.assertNotIn("wrong-token", details + refused.output())
        self.assertEqual(edge.load(peer=peer).state, models_pb2.MODEL_STATE_READY)
        self.assertEqual(edge.chat_ids(), generate_ids(_artifact_dir))

    def test_daemon_killed_mid_pull_resumes_after_restart(self):
        quantizer = Daemon(self)
        quantizer.place()
        # Slowed down so that the pull is still running when the edge is killed.
        config = (f"artifacts:\n  pull_max_bytes_per_second: 100000\n"
                  f"  peers:\n    - address: {quantizer.address}\n")
        edge = Daemon(self, config)
        load = edge.models.Load.future(models_pb2.LoadModelRequest(
            peer=models_pb2.PeerArtifact(address=quantizer.address, artifact=ARTIFACT)),
            timeout=60)
        weights = os.path.join(edge.state_dir, "transfers", ARTIFACT, "model.safetensors")
        size = os.path.getsize(os.path.join(_artifact_dir, "model.safetensors"))
        deadline = time.time() + 30
        while not (os.path.exists(weights) and os.path.getsize(weights) >= size // 4):
            self.assertLess(time.time(), deadline, edge.output())
            time.sleep(0.02)
        # LOADING while it pulls.
        self.assertEqual([(m.name, m.state) for m in
                          edge.models.List(models_pb2.ListModelsRequest()).models],
                         [(ARTIFACT, models_pb2.MODEL_STATE_LOADING)])
        edge.process.send_signal(signal.SIGKILL)
        edge.process.wait()
        with self.assertRaises(grpc.RpcError):
            load.result()
        kept = os.path.getsize(weights)
        self.assertLess(kept, size)
        self.assertEqual(os.listdir(edge.artifacts_dir), [])  # nothing half-made there
        total = sum(os.path.getsize(os.path.join(_artifact_dir, p))
                    for p in tree(_artifact_dir) if p != "nibble_manifest.json")
        sent_before = quantizer.metric("nibble_artifact_transfer_bytes_total", 'direction="sent"')

        restarted = Daemon(self, f"artifacts:\n  peers:\n    - address: {quantizer.address}\n",
                           state_dir=edge.state_dir)
        info = restarted.load(peer=models_pb2.PeerArtifact(address=quantizer.address,
                                                           artifact=ARTIFACT))
        self.assertEqual(tree(info.path), tree(_artifact_dir))
        received = restarted.metric("nibble_artifact_transfer_bytes_total",
                                    'direction="received"')
        self.assertLessEqual(received, total - kept)  # the rest only
        self.assertEqual(quantizer.metric("nibble_artifact_transfer_bytes_total",
                                          'direction="sent"') - sent_before, received)
        self.assertIn("resumed from an earlier pull", restarted.output())
        self.assertEqual(restarted.chat_ids(), generate_ids(_artifact_dir))
        self.assertEqual(os.listdir(os.path.join(edge.state_dir, "transfers")), [])

    def test_killed_cli_pull_resumes_and_verifies(self):
        daemon = Daemon(self)
        daemon.place()
        out_dir = os.path.join(daemon.dir, "copy")
        partial = out_dir + ".partial"
        weights = os.path.join(partial, "model.safetensors")
        size = os.path.getsize(os.path.join(_artifact_dir, "model.safetensors"))
        # Slowed down (4 KiB chunks at 100 KB/s) so that it is still running when killed.
        pull = track(subprocess.Popen(
            [NIBBLE, "artifacts", "pull", ARTIFACT, "--server", daemon.address, "--out", out_dir,
             "--chunk-size", "4096", "--limit-rate", "100000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        deadline = time.time() + 30
        while not (os.path.exists(weights) and os.path.getsize(weights) >= size // 4):
            self.assertIsNone(pull.poll(), "the pull ended before it could be killed")
            self.assertLess(time.time(), deadline)
            time.sleep(0.02)
        pull.send_signal(signal.SIGKILL)
        pull.wait()
        pull.stdout.close()
        pull.stderr.close()
        kept = os.path.getsize(weights)
        self.assertLess(kept, size)
        # A twin of the broken pull, its prefix corrupted (checked below).
        bad_dir = os.path.join(daemon.dir, "bad")
        shutil.copytree(partial, bad_dir + ".partial")
        shutil.copytree(partial + ".manifest", bad_dir + ".partial.manifest")
        with open(os.path.join(bad_dir + ".partial", "model.safetensors"), "r+b") as f:
            f.seek(100)
            f.write(b"\xff\xfe\xfd")
        self.assertFalse(os.path.exists(out_dir))  # never a partial artifact at the destination
        sent_before = daemon.metric("nibble_artifact_transfer_bytes_total", 'direction="sent"')

        resumed = json.loads(run_nibble("artifacts", "pull", ARTIFACT, "--server",
                                        daemon.address, "--out", out_dir, "--json").stdout)
        total = resumed["bytes_total"]
        self.assertGreaterEqual(resumed["bytes_resumed"], kept)
        self.assertEqual(resumed["bytes_resumed"] + resumed["bytes_transferred"], total)
        self.assertLess(resumed["bytes_transferred"], total)
        # The daemon sent exactly what the second pull received: the rest, not the whole.
        self.assertEqual(daemon.metric("nibble_artifact_transfer_bytes_total", 'direction="sent"')
                         - sent_before, resumed["bytes_transferred"])
        self.assertEqual(tree(out_dir), tree(_artifact_dir))
        self.assertFalse(os.path.exists(partial))
        self.assertFalse(os.path.exists(partial + ".manifest"))
        self.assertFalse(os.path.exists(partial + ".lock"))
        # A second pull into the same place is refused: the copy exists.
        again = run_nibble("artifacts", "pull", ARTIFACT, "--server", daemon.address, "--out",
                           out_dir, check=False)
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("exists", again.stderr)

        # A corrupted prefix left by an earlier pull is caught by the sha256, deleted, and the
        # next pull fetches the file afresh.
        failed = run_nibble("artifacts", "pull", ARTIFACT, "--server", daemon.address, "--out",
                            bad_dir, check=False)
        self.assertNotEqual(failed.returncode, 0)
        self.assertIn("sha256", failed.stderr)
        self.assertFalse(os.path.exists(bad_dir))
        run_nibble("artifacts", "pull", ARTIFACT, "--server", daemon.address, "--out", bad_dir)
        self.assertEqual(tree(bad_dir), tree(_artifact_dir))

        # list and stat as a person reads them.
        listed = run_nibble("artifacts", "list", "--server", daemon.address).stdout
        self.assertIn(ARTIFACT, listed)
        stat = json.loads(run_nibble("artifacts", "stat", ARTIFACT, "--server", daemon.address,
                                     "--json").stdout)
        self.assertEqual(stat["quantization"]["method"], "rtn")
        self.assertEqual({f["path"]: f["sha256"] for f in stat["files"]},
                         {p: h for p, h in tree(_artifact_dir).items()
                          if p != "nibble_manifest.json"})

    def test_tampered_artifact_is_refused_everywhere(self):
        source = Daemon(self)
        good = source.place()
        tampered = source.place("tampered")
        with open(os.path.join(tampered, "model.safetensors"), "r+b") as f:
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 0xFF]))  # same size, other bytes
        listed = {a.name: a for a in source.artifacts.List(artifacts_pb2.ListArtifactsRequest())
                  .artifacts}
        self.assertEqual(listed[ARTIFACT].state, artifacts_pb2.ARTIFACT_STATE_PRESENT)
        self.assertEqual(listed["tampered"].state, artifacts_pb2.ARTIFACT_STATE_INVALID)
        self.assertIn("model.safetensors", listed["tampered"].problem)
        self.assertIn("sha256", listed["tampered"].problem)
        self.assertCode(grpc.StatusCode.DATA_LOSS, source.artifacts.Stat,
                        artifacts_pb2.StatArtifactRequest(name="tampered"))
        self.assertCode(grpc.StatusCode.DATA_LOSS, lambda: list(source.artifacts.Download(
            artifacts_pb2.DownloadRequest(artifact="tampered", path="config.json"))))
        self.assertCode(grpc.StatusCode.DATA_LOSS, source.load, artifact="tampered")
        # An edge pulling it gets DATA_LOSS and keeps nothing of it.
        edge = Daemon(self, f"artifacts:\n  peers:\n    - address: {source.address}\n")
        self.assertCode(grpc.StatusCode.DATA_LOSS, edge.load,
                        peer=models_pb2.PeerArtifact(address=source.address, artifact="tampered"))
        self.assertEqual(os.listdir(edge.artifacts_dir), [])
        self.assertEqual(list(edge.models.List(models_pb2.ListModelsRequest()).models), [])
        # Changed after it was verified once: the next look-up sees it.
        source.load(artifact=ARTIFACT)
        source.models.Unload(models_pb2.UnloadModelRequest(name=ARTIFACT), timeout=30)
        with open(os.path.join(good, "config.json"), "a") as f:
            f.write(" ")
        self.assertCode(grpc.StatusCode.DATA_LOSS, source.load, artifact=ARTIFACT)

    def test_paths_out_of_bounds_are_refused(self):
        outside = os.path.join(_work, "outside")
        if not os.path.exists(outside):
            shutil.copytree(_artifact_dir, outside)
        roots = os.path.join(_work, "roots")
        os.makedirs(roots, exist_ok=True)
        if not os.path.lexists(os.path.join(roots, "link-out")):
            os.symlink(outside, os.path.join(roots, "link-out"))
        daemon = Daemon(self, f"artifacts:\n  model_roots: [{roots}]\n")
        daemon.place()
        os.symlink(outside, os.path.join(daemon.artifacts_dir, "linked"))
        # An artifact whose file is a link out of it.
        linking = daemon.place("linking")
        os.remove(os.path.join(linking, "tokenizer.model"))
        os.symlink(os.path.join(outside, "tokenizer.model"),
                   os.path.join(linking, "tokenizer.model"))

        def download(path, artifact=ARTIFACT):
            return list(daemon.artifacts.Download(
                artifacts_pb2.DownloadRequest(artifact=artifact, path=path)))

        for path in ["../../nibbled.yaml", "/etc/passwd", os.path.join(_artifact_dir, "config.json"),
                     "nibble_manifest.json"]:
            self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, download, path)
        self.assertCode(grpc.StatusCode.NOT_FOUND, download, "not-listed.bin")
        self.assertCode(grpc.StatusCode.OUT_OF_RANGE, lambda: list(daemon.artifacts.Download(
            artifacts_pb2.DownloadRequest(artifact=ARTIFACT, path="config.json", offset=10**9))))
        for name in ["..", "../state", "/etc", ".hidden", "a/b"]:
            self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, daemon.artifacts.Stat,
                            artifacts_pb2.StatArtifactRequest(name=name))
            self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, download, "config.json", name)
            self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, daemon.load, artifact=name)
        for name in ["linked", "linking"]:
            self.assertCode(grpc.StatusCode.DATA_LOSS, daemon.artifacts.Stat,
                            artifacts_pb2.StatArtifactRequest(name=name))
            self.assertCode(grpc.StatusCode.DATA_LOSS, daemon.load, artifact=name)
        self.assertCode(grpc.StatusCode.DATA_LOSS, download, "config.json", "linked")
        # Load by path: inside the roots only, no "..", no link out.
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, daemon.load, path="../outside")
        self.assertCode(grpc.StatusCode.PERMISSION_DENIED, daemon.load, path=outside)
        self.assertCode(grpc.StatusCode.PERMISSION_DENIED, daemon.load, path="link-out")
        self.assertCode(grpc.StatusCode.NOT_FOUND, daemon.load, path="missing")
        shutil.copytree(_artifact_dir, os.path.join(roots, "inside"), dirs_exist_ok=True)
        self.assertEqual(daemon.load(path="inside").state, models_pb2.MODEL_STATE_READY)
        self.assertEqual(daemon.chat_ids(model="inside"), generate_ids(_artifact_dir))

    def test_model_past_the_memory_budget_is_refused_and_the_other_keeps_serving(self):
        # stories260K in fp32 (~1 MiB of weights) plus a 2 MiB KV cache pool fits 4 MiB; the
        # artifact's own ~0.4 MiB plus its 2 MiB pool does not fit what is left.
        daemon = Daemon(self, "engine:\n  cpu_memory_budget: 4MiB\n  cache_max_entry_count: 0.5\n"
                        "memory_budget: 4MiB\n",
                        models=f"models:\n  - name: base\n    path: {MODEL}\n    cpu_threads: 1\n")
        daemon.place()
        before = daemon.chat_ids(model="base")
        details = self.assertCode(grpc.StatusCode.RESOURCE_EXHAUSTED, daemon.load,
                                  artifact=ARTIFACT)
        self.assertIn("memory_budget", details)
        self.assertEqual([m.name for m in daemon.models.List(models_pb2.ListModelsRequest()).models],
                         ["base"])
        self.assertEqual(daemon.chat_ids(model="base"), before)
        # Room made by unloading the first: now it fits.
        daemon.models.Unload(models_pb2.UnloadModelRequest(name="base"), timeout=30)
        self.assertEqual(daemon.load(artifact=ARTIFACT).state, models_pb2.MODEL_STATE_READY)

    def test_upload_is_verified_before_it_counts(self):
        daemon = Daemon(self, "artifacts:\n  max_upload_bytes: 1MiB\n")
        with open(os.path.join(_artifact_dir, "nibble_manifest.json"), "rb") as f:
            manifest = f.read()
        files = sorted(p for p in tree(_artifact_dir) if p != "nibble_manifest.json")

        def messages(name, corrupt=None, stop_after=None):
            yield artifacts_pb2.UploadRequest(header=artifacts_pb2.UploadHeader(
                artifact=name, manifest_json=manifest))
            sent = 0
            for path in files:
                with open(os.path.join(_artifact_dir, path), "rb") as f:
                    data = f.read()
                if path == corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 1])
                for offset in range(0, len(data), 65536):
                    if stop_after is not None and sent >= stop_after:
                        return
                    piece = data[offset:offset + 65536]
                    sent += len(piece)
                    yield artifacts_pb2.UploadRequest(chunk=artifacts_pb2.UploadChunk(
                        path=path, offset=offset, data=piece))

        def listed():
            return {a.name: a.state for a in
                    daemon.artifacts.List(artifacts_pb2.ListArtifactsRequest()).artifacts}

        self.assertCode(grpc.StatusCode.DATA_LOSS, daemon.artifacts.Upload,
                        messages("corrupt", corrupt="model.safetensors"), timeout=60)
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, daemon.artifacts.Upload,
                        messages("partial", stop_after=100000), timeout=60)
        self.assertEqual(listed(), {})
        self.assertEqual(os.listdir(daemon.artifacts_dir), [])
        self.assertEqual(os.listdir(os.path.join(daemon.state_dir, "transfers")), [])
        info = daemon.artifacts.Upload(messages("uploaded"), timeout=60)
        self.assertEqual(info.state, artifacts_pb2.ARTIFACT_STATE_PRESENT)
        self.assertEqual(tree(os.path.join(daemon.artifacts_dir, "uploaded")), tree(_artifact_dir))
        self.assertCode(grpc.StatusCode.ALREADY_EXISTS, daemon.artifacts.Upload,
                        messages("uploaded"), timeout=60)
        small = Daemon(self, "artifacts:\n  max_upload_bytes: 100KiB\n")
        details = self.assertCode(grpc.StatusCode.RESOURCE_EXHAUSTED, small.artifacts.Upload,
                                  messages("big"), timeout=60)
        self.assertIn("max_upload_bytes", details)
        self.assertEqual(os.listdir(small.artifacts_dir), [])


class UnloadTest(unittest.TestCase):
    """Unload with drain waits for the running stream, with cancel ends it. A model of real
    shapes with random weights (`nibble synth`, ~6 ms a token on one thread) makes a stream
    last long enough to be caught running."""

    @classmethod
    def setUpClass(cls):
        with open(os.path.join(MODEL, "config.json")) as f:
            config = json.load(f)
        config.update(hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                      num_key_value_heads=8, num_hidden_layers=8, max_position_embeddings=2048)
        cls.slow = os.path.join(_work, "slow")
        if not os.path.exists(cls.slow):
            config_path = os.path.join(_work, "slow-config.json")
            with open(config_path, "w") as f:
                json.dump(config, f)
            run_nibble("synth", "--config", config_path, "--tokenizer",
                       os.path.join(MODEL, "tokenizer.model"), "--out", cls.slow)

    def start(self, daemon, max_tokens):
        """A Generate stream on `slow`, read in a thread; returns (first_chunk_seen, result)
        where result gets "ok", or the gRPC code it ended with, and the tokens."""
        import threading
        first = threading.Event()
        result = {}
        request = inference_pb2.GenerateRequest(
            model="slow", prompt="Hi", return_token_ids=True,
            sampling=inference_pb2.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                  ignore_eos=True))

        def read():
            tokens = 0
            try:
                for chunk in daemon.inference.Generate(request, timeout=120):
                    tokens += len(chunk.token_ids)
                    first.set()
                result["end"] = "ok"
            except grpc.RpcError as error:
                result["end"] = error.code()
            result["tokens"] = tokens
            first.set()

        thread = threading.Thread(target=read)
        thread.start()
        self.addCleanup(thread.join)
        self.assertTrue(first.wait(60))
        return thread, result

    def daemon(self):
        return Daemon(self, models=f"models:\n  - name: slow\n    path: {self.slow}\n"
                                   f"    cpu_threads: 1\n")

    def test_drain_waits_for_the_running_stream_and_refuses_new_ones(self):
        import threading
        daemon = self.daemon()
        thread, result = self.start(daemon, max_tokens=300)  # ~2 s
        unloaded = {}
        unload = threading.Thread(target=lambda: unloaded.setdefault(
            "response", daemon.models.Unload(models_pb2.UnloadModelRequest(
                name="slow", mode=models_pb2.UNLOAD_MODE_DRAIN, timeout_seconds=60),
            timeout=90)))
        unload.start()
        self.addCleanup(unload.join)
        # While it drains: listed DRAINING, new calls refused with UNAVAILABLE.
        deadline = time.time() + 10
        while daemon.models.Get(models_pb2.GetModelRequest(name="slow")).state != \
                models_pb2.MODEL_STATE_DRAINING:
            self.assertLess(time.time(), deadline)
            time.sleep(0.01)
        with self.assertRaises(grpc.RpcError) as caught:
            list(daemon.inference.Generate(inference_pb2.GenerateRequest(model="slow",
                                                                          prompt="Hi")))
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        self.assertIn("unloaded", caught.exception.details())
        unload.join()
        thread.join()
        self.assertEqual(result["end"], "ok")  # it ran to its end
        self.assertEqual(result["tokens"], 300)
        self.assertEqual(unloaded["response"].requests_ended, 0)
        self.assertEqual(list(daemon.models.List(models_pb2.ListModelsRequest()).models), [])

    def test_cancel_ends_the_running_stream(self):
        daemon = self.daemon()
        thread, result = self.start(daemon, max_tokens=1900)  # ~12 s if left alone
        began = time.time()
        response = daemon.models.Unload(models_pb2.UnloadModelRequest(
            name="slow", mode=models_pb2.UNLOAD_MODE_CANCEL), timeout=60)
        thread.join()
        self.assertLess(time.time() - began, 8)
        self.assertEqual(response.requests_ended, 1)
        self.assertEqual(result["end"], grpc.StatusCode.UNAVAILABLE)
        self.assertLess(result["tokens"], 1900)
        with self.assertRaises(grpc.RpcError) as caught:
            list(daemon.inference.Generate(inference_pb2.GenerateRequest(model="slow",
                                                                          prompt="Hi")))
        self.assertEqual(caught.exception.code(), grpc.StatusCode.NOT_FOUND)


class PipelineTest(unittest.TestCase):
    """The whole pipeline across two daemons: a job on the quantizer daemon, watched to its
    end; the edge daemon pulls the artifact it made, loads it and chats with it."""

    def test_quantize_on_one_daemon_serve_on_another(self):
        from nibble.v1 import quantization_pb2, quantization_pb2_grpc
        datasets = os.path.join(os.environ["NIBBLE_SHARED_DIR"], "datasets")
        quantizer = Daemon(self, roles="[inference, quantizer]",
                           config=f"quantizer:\n  model_roots: [{os.path.dirname(MODEL)}]\n"
                                  f"  datasets_dir: {datasets}\n")
        edge = Daemon(self, f"artifacts:\n  peers:\n    - address: {quantizer.address}\n")
        jobs = quantization_pb2_grpc.QuantizationStub(quantizer.channel)
        job = jobs.SubmitJob(quantization_pb2.SubmitJobRequest(
            model_path=os.path.basename(MODEL), output_artifact="s260-awq",
            options=quantization_pb2.QuantizationOptions(
                method="awq", w_group_size=32, calib_dataset="tinystories", calib_samples=8,
                calib_seqlen=128, eval_dataset="none")), timeout=30)
        states = [event.job.state for event in
                  jobs.WatchJob(quantization_pb2.WatchJobRequest(id=job.id), timeout=300)]
        self.assertEqual(states[-1], quantization_pb2.JOB_STATE_SUCCEEDED,
                         jobs.GetJob(quantization_pb2.GetJobRequest(id=job.id)).error)
        made = os.path.join(quantizer.artifacts_dir, "s260-awq")
        self.assertTrue(os.path.isfile(os.path.join(made, "nibble_manifest.json")))

        info = edge.load(peer=models_pb2.PeerArtifact(address=quantizer.address,
                                                      artifact="s260-awq"))
        self.assertEqual(info.quantization.method, "awq")
        self.assertEqual(tree(info.path), tree(made))
        self.assertEqual(edge.chat_ids(model="s260-awq"), generate_ids(made))


class PythonClientTest(unittest.TestCase):
    """clients/python's list_artifacts, stat_artifact, pull_artifact, load_model,
    unload_model against the real daemons."""

    def test_python_client_pulls_loads_and_unloads(self):
        os.environ.setdefault("NIBBLE_CLIENT_STUBS", STUBS)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                        "clients", "python"))
        from nibble_client.client import NibbleClient, NibbleError
        source = Daemon(self)
        source.place()
        edge = Daemon(self, f"artifacts:\n  peers:\n    - address: {source.address}\n")
        with NibbleClient(source.address, timeout=60) as client:
            self.assertEqual([a.name for a in client.list_artifacts()], [ARTIFACT])
            stat = client.stat_artifact(ARTIFACT)
            self.assertEqual(stat.quantization.method, "rtn")
            with self.assertRaises(NibbleError) as caught:
                client.stat_artifact("absent")
            self.assertEqual(caught.exception.code_name, "NOT_FOUND")
            # A pull that stopped midway (its first chunk only, by the progress callback).
            out_dir = os.path.join(source.dir, "py-copy")

            class Stop(Exception):
                pass

            def stop_early(done, total):
                raise Stop()

            with self.assertRaises(Stop):
                client.pull_artifact(ARTIFACT, out_dir, chunk_size=4096, progress=stop_early)
            self.assertFalse(os.path.exists(out_dir))
            seen = []
            result = client.pull_artifact(ARTIFACT, out_dir, chunk_size=65536,
                                          progress=lambda d, t: seen.append((d, t)))
            self.assertGreater(result["bytes_resumed"], 0)
            self.assertEqual(result["bytes_resumed"] + result["bytes_transferred"],
                             result["bytes_total"])
            self.assertEqual(seen[-1], (result["bytes_total"], result["bytes_total"]))
            self.assertEqual(tree(out_dir), tree(_artifact_dir))
        with NibbleClient(edge.address, timeout=60) as client:
            info = client.load_model(peer=source.address, artifact=ARTIFACT, name="edge")
            self.assertEqual(info.name, "edge")
            text = client.chat(PROMPT, model="edge", max_tokens=20).text()
            self.assertTrue(text)
            self.assertEqual(client.unload_model("edge"), 0)
            with self.assertRaises(NibbleError) as caught:
                client.chat(PROMPT, model="edge", max_tokens=5).text()
            self.assertEqual(caught.exception.code_name, "NOT_FOUND")


if __name__ == "__main__":
    unittest.main(verbosity=2)
