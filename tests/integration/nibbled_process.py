"""A nibbled started for a test or a benchmark: free loopback ports, a config written into a
fresh temporary directory, the daemon's output in a log there, waiting until it serves, and
stopping it (SIGTERM, then SIGKILL after 20 s) with the directory removed.

Shared by server_test.py and python_client_test.py (imported from this directory) and by
tests/bench/serve_bench.py (which puts tests/integration on sys.path). Standard library only:
each caller brings its own gRPC health probe. Every process given to track() (each Nibbled's
daemon is) is killed at exit if it still runs, as a last resort after a failure.
"""
import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

_processes = []


def track(process):
    """Kills `process` at exit if it still runs then; returns it."""
    _processes.append(process)
    return process


@atexit.register
def _kill_leftovers():
    for process in _processes:
        if process.poll() is None:
            process.kill()


def terminate(process, timeout=20):
    """Stops a daemon that still runs: SIGTERM (its drain), then SIGKILL after `timeout` s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ephemeral_low():
    """The first port of the kernel's ephemeral range (where bind(0) and outgoing connections
    take theirs), 32768 where it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A loopback port that nothing holds now, for a daemon about to be started on it. Taken
    below the ephemeral range where there is room: a port from bind(0) lies in that range, where
    any outgoing connection (another test's gRPC client, under ctest -j) may take it as its
    source port before the daemon binds it ("Address already in use", seen in CI)."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scalar_metric(text, name, labels=""):
    """The value of the first sample of `name` (with `labels` in its line) in a Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + "{") and (not labels or labels in line):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics:\n{text}")


class Nibbled:
    """One nibbled serving one model on free loopback ports, with a config written for it.

    engine: the config's engine: keys; extra_config: appended to the config as is; env_extra:
    variables set for the daemon (None: removed from its environment). Start it serving with
    wait_serving(); stop() is safe to call more than once.
    """

    def __init__(self, nibbled, model, *, model_name="stories260K", cpu_threads=1, grace=5.0,
                 engine=None, extra_config="", env_extra=None, prefix="nibbled-test-"):
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.log = None
        try:
            engine_yaml = "".join(f"  {k}: {v}\n" for k, v in (engine or {}).items())
            self.config = os.path.join(self.dir, "nibbled.yaml")
            with open(self.config, "w") as f:
                f.write(f"listen: {self.address}\n"
                        f"metrics_listen: 127.0.0.1:{self.metrics_port}\n"
                        f"drain_grace_seconds: {grace}\n"
                        f"models:\n  - name: {model_name}\n    path: {model}\n"
                        f"    cpu_threads: {cpu_threads}\n"
                        + ("engine:\n" + engine_yaml if engine_yaml else "") + extra_config)
            env = None
            if env_extra:
                env = dict(os.environ)
                for key, value in env_extra.items():
                    if value is None:
                        env.pop(key, None)
                    else:
                        env[key] = value
            self.log = open(os.path.join(self.dir, "nibbled.log"), "w+")
            self.process = track(subprocess.Popen([nibbled, "--config", self.config],
                                                  stdout=self.log, stderr=subprocess.STDOUT,
                                                  env=env))
        except BaseException:
            if self.log:
                self.log.close()
            shutil.rmtree(self.dir, True)
            raise

    def output(self):
        """What the daemon has written so far (stdout and stderr)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_serving(self, serving, unavailable, timeout=30, failure=AssertionError):
        """Polls serving() (true once the daemon serves; `unavailable` exceptions from it: not
        yet) every 50 ms. The daemon exiting or `timeout` seconds passing stop it (stop()) and
        raise `failure` with its output."""
        deadline = time.time() + timeout
        while True:
            if self.process.poll() is not None:
                message = f"nibbled exited ({self.process.returncode}):\n{self.output()}"
                break
            try:
                if serving():
                    return
            except unavailable:
                pass
            if time.time() > deadline:
                message = f"nibbled did not start serving:\n{self.output()}"
                break
            time.sleep(0.05)
        self.stop()
        raise failure(message)

    def metrics(self):
        """The text of the daemon's /metrics."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def metric(self, name, labels=""):
        return scalar_metric(self.metrics(), name, labels)

    def stop(self):
        terminate(self.process)
        self.log.close()
        shutil.rmtree(self.dir, True)
