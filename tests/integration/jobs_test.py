#!/usr/bin/python3
"""Quantization jobs (nibble.v1.Quantization) on real nibbled daemons on loopback, over the real
stories260K model and the TinyStories calibration text: submit and watch to completion (with
`nibble jobs` and the Python client), the artifact complete and byte-identical to a local
`nibble quantize` with the same options, late watchers, cancel, delete, refused requests, a
full queue, SIGKILL during a job and the resume after a restart, and the jobs' metrics.

Environment (set by ctest): NIBBLED_BIN, NIBBLE_BIN, NIBBLE_TEST_MODELS, NIBBLE_SHARED_DIR and
NIBBLE_CLIENT_STUBS (stubs written by clients/python/generate_stubs.sh).
"""
import hashlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import grpc  # noqa: E402

from nibble_client import NibbleClient, NibbleError  # noqa: E402
from nibble_client.client import quantization_pb2 as qpb  # noqa: E402
from nibbled_process import Nibbled  # noqa: E402

NIBBLED = os.environ["NIBBLED_BIN"]
NIBBLE = os.environ["NIBBLE_BIN"]
SHARED = os.environ["NIBBLE_SHARED_DIR"]
DATASETS = os.path.join(SHARED, "datasets")
MODEL = os.path.abspath(os.path.join(os.environ["NIBBLE_TEST_MODELS"], "stories260K"))

# Tiny calibration: a job takes a second or two (half a minute under ASan). SLOW: time to kill
# the daemon between layers; SLOWER: time to act on a running job before cancelling it.
QUICK = dict(method="awq", w_group_size=32, calib_dataset="tinystories", calib_samples=8,
             calib_seqlen=128)
SLOW = dict(QUICK, calib_samples=16, eval_dataset="none")
SLOWER = dict(QUICK, calib_samples=32, calib_seqlen=256)

ENDED = (qpb.JOB_STATE_SUCCEEDED, qpb.JOB_STATE_FAILED, qpb.JOB_STATE_CANCELLED)


def cli_flags(options):
    """`nibble quantize` / `nibble jobs submit` flags for a QUICK-style options dict."""
    names = {"method": "--method", "w_group_size": "--w-group-size",
             "calib_dataset": "--calib-dataset", "calib_samples": "--calib-samples",
             "calib_seqlen": "--calib-seqlen", "eval_dataset": "--eval-dataset"}
    out = []
    for key, value in options.items():
        out += [names[key], str(value)]
    return out


def local_quantize(out_dir, options):
    result = subprocess.run([NIBBLE, "quantize", MODEL, "--work-dir", out_dir,
                             "--datasets-dir", DATASETS, *cli_flags(options)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out_dir


def verify_artifact(test, directory):
    """Every file the manifest lists has its size and sha256, and nothing else is there
    (quant::VerifyArtifact's rules, checked independently)."""
    with open(os.path.join(directory, "nibble_manifest.json")) as f:
        manifest = json.load(f)
    present = set()
    for root, dirs, files in os.walk(directory):
        for name in files:
            present.add(os.path.relpath(os.path.join(root, name), directory))
    present.discard("nibble_manifest.json")
    test.assertEqual(present, set(manifest["files"]), directory)
    for name, entry in manifest["files"].items():
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        test.assertEqual(len(data), entry["size"], name)
        test.assertEqual(hashlib.sha256(data).hexdigest(), entry["sha256"], name)
    return manifest


def assert_same_artifact(test, a, b):
    """Byte-identical files; the manifests differ only in their timings (report.seconds)."""
    names = sorted(os.listdir(a))
    test.assertEqual(names, sorted(os.listdir(b)))
    for name in names:
        with open(os.path.join(a, name), "rb") as f, open(os.path.join(b, name), "rb") as g:
            x, y = f.read(), g.read()
        if name == "nibble_manifest.json":
            x, y = json.loads(x), json.loads(y)
            x["report"].pop("seconds")
            y["report"].pop("seconds")
        test.assertEqual(x, y, name)


class QuantizerDaemon(Nibbled):
    """A nibbled with both roles: the model served, jobs in `state_dir`, `roots` allowed."""

    def __init__(self, state_dir, roots, max_queued=1, max_concurrent=1):
        quantizer = (f"state_dir: {state_dir}\n"
                     "quantizer:\n"
                     f"  model_roots: [{', '.join(roots)}]\n"
                     f"  max_concurrent_jobs: {max_concurrent}\n"
                     f"  max_queued_jobs: {max_queued}\n"
                     "  device: cpu\n"
                     f"  datasets_dir: {DATASETS}\n")
        super().__init__(NIBBLED, MODEL, grace=2, extra_config=quantizer,
                         prefix="nibbled-jobs-")
        self.state_dir = state_dir
        self.client = NibbleClient(self.address, timeout=60)
        self.wait_serving(lambda: self.client.health(timeout=1) == "SERVING", NibbleError)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.stop()

    def stop(self):
        self.client.close()
        super().stop()

    def nibble(self, *args, check=True):
        result = subprocess.run([NIBBLE, *args[:2], "--server", self.address, *args[2:]],
                                capture_output=True, text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"nibble {' '.join(args)}: {result.returncode}\n{result.stderr}")
        return result


def sample(metrics, name):
    """The value of the unlabelled sample `name` in a Prometheus text."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics:\n{metrics}")


def wait_ended(client, job_id):
    last = None
    for last in client.watch_job(job_id, timeout=600):
        pass
    return last


def wait_until(predicate, timeout=300, interval=0.002):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class TerminalWatch:
    """`nibble jobs watch ID` with a pseudo-terminal as its stdout, read as it writes."""

    def __init__(self, address, job_id):
        master, slave = pty.openpty()
        self.process = subprocess.Popen([NIBBLE, "jobs", "watch", "--server", address, job_id],
                                        stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        self.chunks = []
        self.lock = threading.Lock()

        def read():
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                with self.lock:
                    self.chunks.append(data)
            os.close(master)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def text(self):
        with self.lock:
            return b"".join(self.chunks).decode(errors="replace")

    def finish(self):
        code = self.process.wait(timeout=300)
        self.process.stderr.close()
        self.reader.join(timeout=30)
        return self.text(), code


class Fixture:
    """A root holding a copy of the model (links out of a root are refused, so the model lives
    inside it), a state directory, and local `nibble quantize` artifacts to compare with."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="nibble-jobs-test-")
        self.root = os.path.join(self.tmp, "models")
        shutil.copytree(MODEL, os.path.join(self.root, "stories260K"))
        self.state = os.path.join(self.tmp, "state")

    def close(self):
        shutil.rmtree(self.tmp, True)


class JobsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fixture = Fixture()
        cls.local_quick = local_quantize(os.path.join(cls.fixture.tmp, "local-quick"), QUICK)
        cls.daemon = QuantizerDaemon(cls.fixture.state, [cls.fixture.root])
        cls.client = cls.daemon.client

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()
        cls.fixture.close()

    def artifact_dir(self, name):
        return os.path.join(self.fixture.state, "artifacts", name)

    def test_cli_submit_watch_list_and_the_artifact_equals_a_local_run(self):
        out = self.daemon.nibble("jobs", "submit", "stories260K", "--output", "cli-quick",
                                 *cli_flags(QUICK), "--watch")
        lines = out.stdout.splitlines()
        job_id = lines[0]
        self.assertRegex(job_id, r"^[0-9a-f]{16}$")
        # Not a terminal: plain lines, with the phase, the layer and the estimate.
        self.assertTrue(any("search layer" in line and "/5" in line for line in lines), lines)
        self.assertTrue(any("left ~" in line for line in lines), lines)
        self.assertTrue(any("quantize" in line for line in lines), lines)
        self.assertEqual(lines[-1], f"job {job_id}: succeeded -> artifact cli-quick")
        self.assertNotIn("\r", out.stdout)

        listed = self.daemon.nibble("jobs", "list").stdout
        self.assertIn(job_id, listed)
        self.assertIn("succeeded", listed)
        job = json.loads(self.daemon.nibble("jobs", "get", job_id, "--json").stdout)
        self.assertEqual(job["state"], "JOB_STATE_SUCCEEDED")
        self.assertEqual(job["artifact"], "cli-quick")
        self.assertEqual(job["options"]["calib_samples"], "8")  # int64: a string in JSON

        manifest = verify_artifact(self, self.artifact_dir("cli-quick"))
        self.assertEqual(manifest["quantization"]["method"], "awq")
        self.assertIn("perplexity_after", manifest["report"])  # the evaluate phase ran
        assert_same_artifact(self, self.artifact_dir("cli-quick"), self.local_quick)
        # Nothing in progress is left: the work directory moved whole into artifacts/.
        self.assertEqual(os.listdir(os.path.join(self.fixture.state, "jobs", job_id)),
                         ["job.json"])

    def test_python_client_job_a_late_watcher_and_delete(self):
        job = self.client.submit_job("stories260K", output_artifact="py-quick", **QUICK)
        self.assertEqual(job.state, qpb.JOB_STATE_QUEUED)
        self.assertEqual(job.options.w_group_size, 32)
        self.assertEqual(job.options.eval_windows, 32)  # defaults filled in
        events = list(self.client.watch_job(job.id))
        self.assertEqual(events[-1].state, qpb.JOB_STATE_SUCCEEDED, events[-1])
        phases = [e.progress.phase for e in events if e.state == qpb.JOB_STATE_RUNNING]
        for phase in ("calibrate", "search", "quantize", "evaluate", "write"):
            self.assertIn(phase, phases)
        done = [e.progress.layers_done for e in events]
        self.assertEqual(done, sorted(done))  # never goes back
        self.assertEqual(events[-1].progress.layers, 5)
        self.assertEqual(events[-1].progress.layers_done, 5)
        # A watcher that joins after the end gets the job as it is, then the stream ends.
        late = list(self.client.watch_job(job.id))
        self.assertEqual(len(late), 1)
        self.assertEqual(late[0].state, qpb.JOB_STATE_SUCCEEDED)
        self.assertEqual(late[0].artifact, "py-quick")
        assert_same_artifact(self, self.artifact_dir("py-quick"), self.local_quick)

        # The same name again is refused; deleting the job with its artifact frees it.
        with self.assertRaises(NibbleError) as e:
            self.client.submit_job("stories260K", output_artifact="py-quick", **QUICK)
        self.assertEqual(e.exception.code, grpc.StatusCode.ALREADY_EXISTS)
        self.client.delete_job(job.id, delete_artifact=True)
        self.assertFalse(os.path.exists(self.artifact_dir("py-quick")))
        self.assertFalse(os.path.exists(os.path.join(self.fixture.state, "jobs", job.id)))
        with self.assertRaises(NibbleError) as e:
            self.client.get_job(job.id)
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)

    def test_a_job_from_an_artifact_is_refused_when_already_quantized(self):
        # An artifact on the daemon (as an upload or a pull puts it there) resolves as a
        # source; the quantized model in it is not quantized again.
        shutil.copytree(self.local_quick, self.artifact_dir("src-art"))
        with self.assertRaises(NibbleError) as e:
            self.client.submit_job(artifact="src-art", **QUICK)
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("already AWQ", e.exception.message)

    def test_bad_requests_are_refused_and_write_nothing(self):
        outside = os.path.join(self.fixture.tmp, "outside")
        shutil.copytree(MODEL, outside, dirs_exist_ok=True)
        link = os.path.join(self.fixture.root, "link-out")
        if not os.path.islink(link):
            os.symlink(outside, link)
        jobs_before = sorted(os.listdir(os.path.join(self.fixture.state, "jobs")))
        cases = [
            (dict(model_path=outside), grpc.StatusCode.PERMISSION_DENIED, "outside"),
            (dict(model_path="/etc"), grpc.StatusCode.PERMISSION_DENIED, "/etc"),
            (dict(model_path="link-out"), grpc.StatusCode.PERMISSION_DENIED, "link-out"),
            (dict(model_path="../outside"), grpc.StatusCode.INVALID_ARGUMENT, ".."),
            (dict(model_path="stories260K/../stories260K"), grpc.StatusCode.INVALID_ARGUMENT, ".."),
            (dict(model_path="nosuchmodel"), grpc.StatusCode.NOT_FOUND, "nosuchmodel"),
            (dict(artifact="nosuchartifact"), grpc.StatusCode.NOT_FOUND, "nosuchartifact"),
            (dict(artifact="../state"), grpc.StatusCode.INVALID_ARGUMENT, "artifact"),
            (dict(), grpc.StatusCode.INVALID_ARGUMENT, "source"),
            (dict(model_path="stories260K", method="gptq"), grpc.StatusCode.INVALID_ARGUMENT,
             "method"),
            (dict(model_path="stories260K", w_bits=8), grpc.StatusCode.INVALID_ARGUMENT,
             "w_bits"),
            (dict(model_path="stories260K", w_group_size=33), grpc.StatusCode.INVALID_ARGUMENT,
             "w_group_size"),
            (dict(model_path="stories260K", calib_seqlen=4096), grpc.StatusCode.INVALID_ARGUMENT,
             "calib_seqlen"),
            (dict(model_path="stories260K", calib_samples=-1), grpc.StatusCode.INVALID_ARGUMENT,
             "calib_samples"),
            (dict(model_path="stories260K", calib_dataset="nosuchset", calib_seqlen=128),
             grpc.StatusCode.NOT_FOUND, "calib_dataset"),
            (dict(model_path="stories260K", calib_dataset="/etc/passwd", calib_seqlen=128),
             grpc.StatusCode.PERMISSION_DENIED, "calib_dataset"),
            (dict(model_path="stories260K", eval_dataset="../x", calib_seqlen=128),
             grpc.StatusCode.INVALID_ARGUMENT, "eval_dataset"),
            (dict(model_path="stories260K", output_artifact="../evil"),
             grpc.StatusCode.INVALID_ARGUMENT, "output_artifact"),
            (dict(model_path="stories260K", output_artifact=".hidden"),
             grpc.StatusCode.INVALID_ARGUMENT, "output_artifact"),
        ]
        for request, code, word in cases:
            model_path = request.pop("model_path", None)
            artifact = request.pop("artifact", None)
            output = request.pop("output_artifact", "")
            with self.assertRaises(NibbleError, msg=str(request)) as e:
                self.client.submit_job(model_path, artifact=artifact, output_artifact=output,
                                       **request)
            self.assertEqual(e.exception.code, code, (model_path, artifact, request,
                                                      e.exception.message))
            self.assertIn(word, e.exception.message)
        for call in (self.client.get_job, self.client.cancel_job, self.client.delete_job):
            with self.assertRaises(NibbleError) as e:
                call("0123456789abcdef")
            self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
            with self.assertRaises(NibbleError) as e:
                call("../../etc")
            self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(NibbleError) as e:
            list(self.client.watch_job("0123456789abcdef"))
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(sorted(os.listdir(os.path.join(self.fixture.state, "jobs"))), jobs_before)
        self.assertFalse(os.path.exists(os.path.join(self.fixture.state, "evil")))
        # The daemon keeps serving.
        self.assertEqual(self.client.health(), "SERVING")

    def test_full_queue_cancel_delete_running_and_metrics(self):
        running = self.client.submit_job("stories260K", **SLOWER)
        self.assertTrue(wait_until(
            lambda: self.client.get_job(running.id).state == qpb.JOB_STATE_RUNNING), "not running")
        # A watcher that joins mid-run gets the current state first.
        watch = self.client.watch_job(running.id)
        first = next(watch)
        self.assertEqual(first.state, qpb.JOB_STATE_RUNNING)
        queued = self.client.submit_job("stories260K", **QUICK)  # fills the queue (1)
        self.assertEqual(self.client.get_job(queued.id).state, qpb.JOB_STATE_QUEUED)
        with self.assertRaises(NibbleError) as e:
            self.client.submit_job("stories260K", **QUICK)
        self.assertEqual(e.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("max_queued_jobs", e.exception.message)
        with self.assertRaises(NibbleError) as e:
            self.client.delete_job(running.id)
        self.assertEqual(e.exception.code, grpc.StatusCode.FAILED_PRECONDITION)

        self.assertTrue(wait_until(lambda: self.client.get_job(running.id).progress.layers > 0))
        metrics = self.daemon.metrics()
        self.assertIn(f'nibble_quantization_job_layers{{job_id="{running.id}",state="total"}} 5',
                      metrics)
        self.assertIn('nibble_quantization_jobs{state="running"} 1', metrics)
        self.assertIn('nibble_quantization_jobs{state="queued"} 1', metrics)

        # `nibble jobs watch` on a terminal draws a progress bar, redrawn in place.
        terminal = TerminalWatch(self.daemon.address, running.id)
        self.assertTrue(wait_until(lambda: "search layer" in terminal.text() or
                                   "calibrate layer" in terminal.text(), timeout=300),
                        terminal.text())

        # Cancelled while queued: at once. While running: at its next check.
        self.assertEqual(self.client.cancel_job(queued.id).state, qpb.JOB_STATE_CANCELLED)
        cancelling = self.client.cancel_job(running.id)
        self.assertTrue(cancelling.cancel_requested)
        output, code = terminal.finish()
        self.assertEqual(code, 1, output)  # the job did not succeed
        self.assertIn("\r\x1b[K[", output)
        self.assertRegex(output, r"\[#*\.*\] (calibrate|search) layer \d/5")
        self.assertIn(f"job {running.id}: cancelled", output)
        rest = list(watch)
        self.assertEqual(rest[-1].state, qpb.JOB_STATE_CANCELLED)
        self.assertLess(rest[-1].progress.layers_done, 5)
        self.assertFalse(os.path.exists(self.artifact_dir(running.output_artifact)))
        metrics = self.daemon.metrics()
        self.assertGreaterEqual(sample(metrics, "nibble_quantization_jobs_cancelled_total"), 2)
        self.assertNotIn(f'job_id="{running.id}"', metrics)  # gone with the job's run
        self.assertIn('nibble_quantization_job_duration_seconds_count{result="cancelled"}',
                      metrics)
        self.client.delete_job(running.id)
        self.client.delete_job(queued.id)
        self.assertFalse(os.path.exists(os.path.join(self.fixture.state, "jobs", running.id)))


class RestartTest(unittest.TestCase):
    def setUp(self):
        self.fixture = Fixture()
        self.daemons = []

    def tearDown(self):
        for daemon in self.daemons:
            daemon.stop()
        self.fixture.close()

    def start(self):
        daemon = QuantizerDaemon(self.fixture.state, [self.fixture.root])
        self.daemons.append(daemon)
        return daemon

    def test_sigkill_during_a_job_resumes_to_an_identical_artifact(self):
        whole = local_quantize(os.path.join(self.fixture.tmp, "whole"), SLOW)
        daemon = self.start()
        job = daemon.client.submit_job("stories260K", output_artifact="resumed", **SLOW)
        progress = os.path.join(self.fixture.state, "jobs", job.id, "work", ".nibble-job",
                                "progress.json")
        for event in daemon.client.watch_job(job.id, timeout=600):
            if event.progress.layers_done >= 1:  # the first layer-finished event
                break
        self.assertEqual(event.state, qpb.JOB_STATE_RUNNING)
        daemon.kill()
        with open(progress) as f:
            done = json.load(f)["completed_layers"]
        self.assertTrue(1 <= done < 5, done)
        with open(os.path.join(self.fixture.state, "jobs", job.id, "job.json")) as f:
            self.assertEqual(json.load(f)["state"], "running")

        daemon = self.start()  # resumes the job at start
        events = list(daemon.client.watch_job(job.id, timeout=600))
        final = events[-1]
        self.assertEqual(final.state, qpb.JOB_STATE_SUCCEEDED, final.error)
        self.assertEqual(final.runs, 2)
        self.assertTrue(final.progress.resumed)  # it went on from the checkpoint
        running = [e for e in events if e.state == qpb.JOB_STATE_RUNNING and e.progress.phase]
        if running:  # (the job may have ended before the watcher came)
            self.assertGreaterEqual(running[0].progress.layers_done, done)
        verify_artifact(self, os.path.join(self.fixture.state, "artifacts", "resumed"))
        assert_same_artifact(self, os.path.join(self.fixture.state, "artifacts", "resumed"), whole)
        self.assertIn("resumed", daemon.nibble("jobs", "list").stdout)

        # Finished jobs outlive a clean restart too, with their artifacts.
        daemon.stop()
        daemon = self.start()
        [listed] = daemon.client.list_jobs()
        self.assertEqual(listed.id, job.id)
        self.assertEqual(listed.state, qpb.JOB_STATE_SUCCEEDED)
        self.assertEqual(listed.artifact, "resumed")
        late = list(daemon.client.watch_job(job.id))
        self.assertEqual([e.state for e in late], [qpb.JOB_STATE_SUCCEEDED])
        metrics = daemon.metrics()
        self.assertIn('nibble_quantization_jobs{state="queued"} 0', metrics)
        self.assertEqual(sample(metrics, "nibble_quantization_jobs_finished_total"), 0)

    def test_sigterm_during_a_job_leaves_it_queued_to_resume(self):
        daemon = self.start()
        job = daemon.client.submit_job("stories260K", output_artifact="drained", **QUICK)
        progress = os.path.join(self.fixture.state, "jobs", job.id, "work", ".nibble-job",
                                "progress.json")
        self.assertTrue(wait_until(lambda: os.path.exists(progress)), "no layer finished")
        daemon.stop()  # SIGTERM: the job stops at its next check
        with open(os.path.join(self.fixture.state, "jobs", job.id, "job.json")) as f:
            record = json.load(f)
        if record["state"] != "succeeded":  # (unless it was already writing its last files)
            self.assertEqual(record["state"], "queued")
            daemon = self.start()
            self.assertEqual(wait_ended(daemon.client, job.id).state, qpb.JOB_STATE_SUCCEEDED)
        verify_artifact(self, os.path.join(self.fixture.state, "artifacts", "drained"))


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0]] + sys.argv[1:], verbosity=2)
