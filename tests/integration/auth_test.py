#!/usr/bin/python3
"""TLS, mutual TLS and bearer tokens on nibbled's gRPC port, end to end: real daemons on
loopback with certificates made here by the `openssl` CLI (a CA, a server certificate for
localhost/127.0.0.1, a client certificate, and a client certificate from a CA the daemon does
not trust), talked to with python3-grpcio, the Python client and the `nibble` CLI.

Checks: a missing or wrong token -> UNAUTHENTICATED; an inference token on an admin method ->
PERMISSION_DENIED (and admin tokens pass); a plain-text client against the TLS port, a client
that does not trust the daemon's CA, a client without a certificate or with one from another CA
under mutual TLS -> UNAVAILABLE (the handshake fails); with everything right, chat works over
mTLS from the CLI (flags, and environment variables) and the Python client, with the same reply;
tokens without TLS on loopback; the start rules (a non-loopback address without TLS and tokens
is refused, with the reason, unless `insecure: true`, which says so); a bad tokens file is
refused naming the line; clients refuse to send a token in plain text off loopback; and no
token text ever appears in a daemon's output or in an error.

Environment (set by ctest): NIBBLED_BIN, NIBBLE_BIN, NIBBLE_TEST_MODELS, NIBBLE_CLIENT_STUBS.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "clients", "python"))

import grpc  # noqa: E402

from nibble_client import NibbleClient, NibbleError  # noqa: E402
from nibbled_process import Nibbled, free_port, track  # noqa: E402

NIBBLED = os.environ["NIBBLED_BIN"]
NIBBLE = os.environ["NIBBLE_BIN"]
MODEL = os.path.abspath(os.path.join(os.environ["NIBBLE_TEST_MODELS"], "stories260K"))

ADMIN_TOKEN = "adm-" + os.urandom(16).hex()
INFERENCE_TOKEN = "inf-" + os.urandom(16).hex()
WRONG_TOKEN = "wrong-" + os.urandom(16).hex()
ALL_TOKENS = (ADMIN_TOKEN, INFERENCE_TOKEN, WRONG_TOKEN)

# Methods of the admin scope (common.md's table). The check runs before the method is looked
# up, so these are refused to an inference token whether or not this build has the service.
ADMIN_METHODS = ("/nibble.v1.Models/Load", "/nibble.v1.Models/Unload",
                 "/nibble.v1.Quantization/SubmitJob", "/nibble.v1.Quantization/DeleteJob",
                 "/nibble.v1.Artifacts/Upload")
INFERENCE_METHODS = ("/nibble.v1.Models/List", "/grpc.health.v1.Health/Check")

OPENSSL_CONFIG = """
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = CA:FALSE
subjectAltName = DNS:localhost, IP:127.0.0.1
extendedKeyUsage = serverAuth
[client_ext]
basicConstraints = CA:FALSE
extendedKeyUsage = clientAuth
"""


class Certificates:
    """A CA, a server certificate and a client certificate it signed, and a client
    certificate signed by a second CA that no daemon trusts; PEM files in a temp dir."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="nibble-auth-certs-")
        self.config = self.path("openssl.cnf")
        with open(self.config, "w") as f:
            f.write(OPENSSL_CONFIG)
        self.make_ca("ca")
        self.make_ca("rogue-ca")
        self.make_leaf("server", "ca", "server_ext", "localhost")
        self.make_leaf("client", "ca", "client_ext", "nibble test client")
        self.make_leaf("rogue-client", "rogue-ca", "client_ext", "rogue client")

    def path(self, name):
        return os.path.join(self.dir, name)

    def openssl(self, *args):
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"

    def new_key(self, name):
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", self.path(f"{name}.key")]

    def make_ca(self, name):
        self.openssl("req", "-x509", "-config", self.config, "-extensions", "ca_ext",
                     *self.new_key(name), "-out", self.path(f"{name}.pem"), "-days", "2",
                     "-subj", f"/CN=nibble test {name}")

    def make_leaf(self, name, ca, extensions, common_name):
        self.openssl("req", "-new", "-config", self.config, *self.new_key(name),
                     "-out", self.path(f"{name}.csr"), "-subj", f"/CN={common_name}")
        self.openssl("x509", "-req", "-in", self.path(f"{name}.csr"),
                     "-CA", self.path(f"{ca}.pem"), "-CAkey", self.path(f"{ca}.key"),
                     "-CAcreateserial", "-out", self.path(f"{name}.pem"), "-days", "2",
                     "-extfile", self.config, "-extensions", extensions)

    def remove(self):
        shutil.rmtree(self.dir, True)


def write_tokens_file(directory):
    path = os.path.join(directory, "tokens")
    with open(path, "w") as f:
        f.write(f"# nibbled's tokens\nadmin {ADMIN_TOKEN}\n\ninference {INFERENCE_TOKEN}\n")
    os.chmod(path, 0o600)  # as it should be (nibbled warns at start otherwise)
    return path


def write_token(directory, name, token):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(token + "\n")
    return path


def read(path):
    with open(path, "rb") as f:
        return f.read()


def run(args, env_extra=None, timeout=120):
    env = dict(os.environ)
    for key in list(env):  # the test decides every security setting itself
        if key.startswith("NIBBLE_TOKEN") or key.startswith("NIBBLE_TLS"):
            del env[key]
    env.update(env_extra or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def code_of(call):
    """The status code of `call()` (OK when it returns)."""
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()
    except NibbleError as error:
        return error.code


class SecureDaemon(Nibbled):
    """One nibbled with a `security:` section (and the tokens file) in its config; with
    `quantizer`, a state_dir too (so it plays the quantizer role as well)."""

    def __init__(self, security_yaml, certs, client, quantizer=False):
        self.token_dir = tempfile.mkdtemp(prefix="nibble-auth-tokens-")
        self.tokens_file = write_tokens_file(self.token_dir)
        state = f"state_dir: {self.token_dir}/state\n" if quantizer else ""
        super().__init__(NIBBLED, MODEL, grace=2, prefix="nibbled-auth-",
                         extra_config=state + "security:\n" + security_yaml.format(
                             certs=certs.dir if certs else "", tokens=self.tokens_file))
        self.client = client(self.address)
        # The first connection only once the port is open: a channel whose first attempt was
        # refused waits out gRPC's reconnect backoff (seconds) before trying again.
        self.wait_serving(lambda: "nibbled: serving on" in self.output()
                          and self.client.health(timeout=2) == "SERVING", NibbleError)

    def stop(self):
        self.client.close()
        super().stop()
        shutil.rmtree(self.token_dir, True)


class MutualTlsTest(unittest.TestCase):
    """A daemon with TLS, mutual TLS and tokens."""

    @classmethod
    def setUpClass(cls):
        cls.certs = Certificates()
        cls.daemon = SecureDaemon(
            "  tls_cert_file: {certs}/server.pem\n"
            "  tls_key_file: {certs}/server.key\n"
            "  tls_client_ca_file: {certs}/ca.pem\n"
            "  tokens_file: {tokens}\n",
            cls.certs, cls.python_client)
        cls.token_files = {name: write_token(cls.certs.dir, name, token) for name, token in
                           (("admin.token", ADMIN_TOKEN), ("inference.token", INFERENCE_TOKEN),
                            ("wrong.token", WRONG_TOKEN))}

    @classmethod
    def tearDownClass(cls):
        output = cls.daemon.output()
        cls.daemon.stop()
        cls.certs.remove()
        for token in ALL_TOKENS:
            assert token not in output, "a token appears in the daemon's output"

    @classmethod
    def python_client(cls, address, token=INFERENCE_TOKEN, cert="client"):
        certs = cls.certs
        return NibbleClient(address, timeout=60, tls_ca=certs.path("ca.pem"),
                            tls_cert=certs.path(f"{cert}.pem") if cert else None,
                            tls_key=certs.path(f"{cert}.key") if cert else None, token=token)

    def channel(self, cert="client", ca="ca"):
        certs = self.certs
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(certs.path(f"{ca}.pem")) if ca else None,
            private_key=read(certs.path(f"{cert}.key")) if cert else None,
            certificate_chain=read(certs.path(f"{cert}.pem")) if cert else None)
        return grpc.secure_channel(self.daemon.address, credentials)

    def call(self, method, token, channel=None):
        """`method` with an empty request (the token check comes before the request is read)
        and `token` (None: no authorization metadata); its status code and details."""
        channel = channel or self.channel()
        with channel:
            metadata = [("authorization", f"Bearer {token}")] if token is not None else None
            try:
                channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
                return grpc.StatusCode.OK, ""
            except grpc.RpcError as error:
                return error.code(), error.details() or ""

    def test_missing_token_is_unauthenticated(self):
        for method in INFERENCE_METHODS + ADMIN_METHODS:
            code, details = self.call(method, None)
            self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED, (method, details))
            self.assertIn("bearer token", details)

    def test_wrong_token_is_unauthenticated(self):
        for method in INFERENCE_METHODS + ADMIN_METHODS:
            code, details = self.call(method, WRONG_TOKEN)
            self.assertEqual(code, grpc.StatusCode.UNAUTHENTICATED, (method, details))
            self.assertNotIn(WRONG_TOKEN, details)
        # Not a bearer token at all.
        with self.channel() as channel:
            with self.assertRaises(grpc.RpcError) as raised:
                channel.unary_unary(INFERENCE_METHODS[0])(
                    b"", metadata=[("authorization", f"Basic {INFERENCE_TOKEN}")], timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        self.assertNotIn(INFERENCE_TOKEN, raised.exception.details())

    def test_inference_token_on_admin_methods_is_permission_denied(self):
        for method in ADMIN_METHODS:
            code, details = self.call(method, INFERENCE_TOKEN)
            self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED, (method, details))
            self.assertIn(method, details)
            self.assertIn("admin", details)
            self.assertNotIn(INFERENCE_TOKEN, details)
        # An unknown method needs admin too (deny by default).
        code, _ = self.call("/nibble.v1.Secret/Run", INFERENCE_TOKEN)
        self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)

    def test_tokens_in_scope_pass(self):
        for method in INFERENCE_METHODS:
            for token in (INFERENCE_TOKEN, ADMIN_TOKEN):
                code, details = self.call(method, token)
                self.assertEqual(code, grpc.StatusCode.OK, (method, details))
        # An admin token gets past the check to the method itself, which answers on its own
        # terms (an empty request, or a service this daemon's roles do not include).
        for method in ADMIN_METHODS:
            code, details = self.call(method, ADMIN_TOKEN)
            self.assertNotIn(code, (grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED), (method, details))

    def test_plain_text_client_is_refused(self):
        with grpc.insecure_channel(self.daemon.address) as channel:
            with self.assertRaises(grpc.RpcError) as raised:
                channel.unary_unary(INFERENCE_METHODS[1])(
                    b"", metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAVAILABLE)

    def test_untrusted_server_certificate_is_refused(self):
        # The system's trust roots do not include the test CA.
        code, _ = self.call(INFERENCE_METHODS[1], ADMIN_TOKEN, self.channel(ca=None))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        code, _ = self.call(INFERENCE_METHODS[1], ADMIN_TOKEN, self.channel(ca="rogue-ca"))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)

    def test_client_without_certificate_is_refused(self):
        code, _ = self.call(INFERENCE_METHODS[1], ADMIN_TOKEN, self.channel(cert=None))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        with self.python_client(self.daemon.address, token=ADMIN_TOKEN, cert=None) as client:
            self.assertEqual(code_of(lambda: client.health(timeout=10)),
                             grpc.StatusCode.UNAVAILABLE)

    def test_client_certificate_from_another_ca_is_refused(self):
        code, _ = self.call(INFERENCE_METHODS[1], ADMIN_TOKEN, self.channel(cert="rogue-client"))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)

    def cli(self, *args, env_extra=None):
        return run([NIBBLE, *args], env_extra=env_extra)

    def cli_tls_flags(self, token_file):
        certs = self.certs
        return ["--tls-ca", certs.path("ca.pem"), "--tls-cert", certs.path("client.pem"),
                "--tls-key", certs.path("client.key"), "--token-file", token_file]

    def test_chat_over_mutual_tls_from_cli_and_python_client(self):
        prompt = "Once upon a time"
        with self.python_client(self.daemon.address) as client:
            expected = client.chat(prompt, max_tokens=12).text()
        self.assertTrue(expected)
        result = self.cli("chat", "--server", self.daemon.address, "--prompt", prompt,
                          "--max-tokens", "12", "--json",
                          *self.cli_tls_flags(self.token_files["inference.token"]))
        self.assertEqual(result.returncode, 0, result.stderr)
        chunks = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        self.assertEqual("".join(c["text"] for c in chunks), expected)
        # The same settings from the environment.
        certs = self.certs
        env = {"NIBBLE_TLS_CA": certs.path("ca.pem"), "NIBBLE_TLS_CERT": certs.path("client.pem"),
               "NIBBLE_TLS_KEY": certs.path("client.key"), "NIBBLE_TOKEN": INFERENCE_TOKEN}
        result = self.cli("chat", "--server", self.daemon.address, "--prompt", prompt,
                          "--max-tokens", "12", "--json", env_extra=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        chunks = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        self.assertEqual("".join(c["text"] for c in chunks), expected)
        result = self.cli("models", "list", "--server", self.daemon.address, "--json",
                          env_extra=dict(env, NIBBLE_TOKEN="",
                                         NIBBLE_TOKEN_FILE=self.token_files["admin.token"]))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([m["name"] for m in json.loads(result.stdout)], ["stories260K"])

    def test_cli_errors_name_the_code_never_the_token(self):
        result = self.cli("chat", "--server", self.daemon.address, "--prompt", "hi",
                          *self.cli_tls_flags(self.token_files["wrong.token"]))
        self.assertEqual(result.returncode, 1)
        self.assertIn("UNAUTHENTICATED", result.stderr)
        self.assertNotIn(WRONG_TOKEN, result.stderr + result.stdout)
        # No client certificate: the handshake fails.
        certs = self.certs
        result = self.cli("models", "list", "--server", self.daemon.address, "--tls-ca",
                          certs.path("ca.pem"), "--token-file", self.token_files["admin.token"],
                          "--timeout", "10")
        self.assertEqual(result.returncode, 1)
        self.assertIn("UNAVAILABLE", result.stderr)
        # Plain text against the TLS port.
        result = self.cli("models", "list", "--server", self.daemon.address, "--token-file",
                          self.token_files["admin.token"], "--timeout", "10")
        self.assertEqual(result.returncode, 1)
        self.assertIn("UNAVAILABLE", result.stderr)
        # Settings that cannot work are named before any connection.
        result = self.cli("models", "list", "--server", self.daemon.address, "--tls-cert",
                          certs.path("client.pem"))
        self.assertEqual(result.returncode, 1)
        self.assertIn("--tls-key", result.stderr)
        result = self.cli("models", "list", "--server", self.daemon.address, "--tls-ca",
                          certs.path("missing.pem"))
        self.assertEqual(result.returncode, 1)
        self.assertIn("missing.pem", result.stderr)

    def test_cli_admin_commands_need_the_admin_scope(self):
        # Admin-scope commands of `nibble` (extend as commands are added); each is refused to
        # an inference token before it reaches the daemon's service, and passes the check with
        # an admin token (this daemon has no quantizer role: the service itself answers then).
        commands = [["jobs", "list"], ["jobs", "get", "1"], ["jobs", "cancel", "1"]]
        help_text = self.cli("models", "--help").stdout
        if "unload" in help_text:
            commands.append(["models", "unload", "stories260K"])
        for command in commands:
            if self.cli(*command[:2], "--help").returncode != 0:
                continue  # not in this build
            with self.subTest(command=command):
                args = [*command, "--server", self.daemon.address, "--timeout", "20"]
                denied = self.cli(*args, *self.cli_tls_flags(self.token_files["inference.token"]))
                self.assertEqual(denied.returncode, 1, denied.stdout)
                self.assertIn("PERMISSION_DENIED", denied.stderr)
                self.assertNotIn(INFERENCE_TOKEN, denied.stderr + denied.stdout)
                if command[:2] == ["models", "unload"]:
                    continue  # would stop serving the model the other tests chat with
                allowed = self.cli(*args, *self.cli_tls_flags(self.token_files["admin.token"]))
                self.assertNotIn("PERMISSION_DENIED", allowed.stderr)
                self.assertNotIn("UNAUTHENTICATED", allowed.stderr)
        # The model is still there for everyone else.
        with self.python_client(self.daemon.address) as client:
            self.assertEqual([m.name for m in client.models()], ["stories260K"])

    def test_python_client_token_file(self):
        with NibbleClient(self.daemon.address, timeout=60, tls_ca=self.certs.path("ca.pem"),
                          tls_cert=self.certs.path("client.pem"),
                          tls_key=self.certs.path("client.key"),
                          token_file=self.token_files["inference.token"]) as client:
            self.assertEqual([m.name for m in client.models()], ["stories260K"])
        with self.python_client(self.daemon.address, token=WRONG_TOKEN) as client:
            with self.assertRaises(NibbleError) as raised:
                client.models()
            self.assertEqual(raised.exception.code, grpc.StatusCode.UNAUTHENTICATED)
            self.assertNotIn(WRONG_TOKEN, str(raised.exception))


class LoopbackTokensTest(unittest.TestCase):
    """Tokens without TLS on a loopback address (no certificate to manage on one machine)."""

    @classmethod
    def setUpClass(cls):
        cls.daemon = SecureDaemon("  tokens_file: {tokens}\n", None,
                                  lambda address: NibbleClient(address, timeout=60,
                                                               token=INFERENCE_TOKEN),
                                  quantizer=True)

    @classmethod
    def tearDownClass(cls):
        output = cls.daemon.output()
        cls.daemon.stop()
        for token in ALL_TOKENS:
            assert token not in output, "a token appears in the daemon's output"

    def test_start_line_says_what_is_checked(self):
        output = self.daemon.output()
        self.assertIn("nibbled: security: plain text (loopback), bearer tokens (1 admin, "
                      "1 inference)\n", output)
        self.assertNotIn("WARNING", output)

    def test_tokens_are_checked_over_plain_text(self):
        with NibbleClient(self.daemon.address, timeout=30) as anonymous:
            self.assertEqual(code_of(anonymous.models), grpc.StatusCode.UNAUTHENTICATED)
        self.assertEqual([m.name for m in self.daemon.client.models()], ["stories260K"])
        with grpc.insecure_channel(self.daemon.address) as channel:
            with self.assertRaises(grpc.RpcError) as raised:
                channel.unary_unary("/nibble.v1.Models/Load")(
                    b"", metadata=[("authorization", f"Bearer {INFERENCE_TOKEN}")], timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.PERMISSION_DENIED)

    def test_jobs_need_the_admin_scope(self):
        # This daemon plays the quantizer role: an admin token reaches the real service.
        args = [NIBBLE, "jobs", "list", "--server", self.daemon.address, "--json"]
        denied = run(args, env_extra={"NIBBLE_TOKEN": INFERENCE_TOKEN})
        self.assertEqual(denied.returncode, 1)
        self.assertIn("PERMISSION_DENIED", denied.stderr)
        self.assertIn("/nibble.v1.Quantization/ListJobs", denied.stderr)
        allowed = run(args, env_extra={"NIBBLE_TOKEN": ADMIN_TOKEN})
        self.assertEqual(allowed.returncode, 0, allowed.stderr)

    def test_cli_chat_with_token_from_environment(self):
        result = run([NIBBLE, "chat", "--server", self.daemon.address, "--prompt", "Hello",
                      "--max-tokens", "6"], env_extra={"NIBBLE_TOKEN": INFERENCE_TOKEN})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("generated tokens", result.stderr)
        result = run([NIBBLE, "chat", "--server", self.daemon.address, "--prompt", "Hello"])
        self.assertEqual(result.returncode, 1)
        self.assertIn("UNAUTHENTICATED", result.stderr)


class ClientRulesTest(unittest.TestCase):
    """Clients never send a token in plain text off loopback (no daemon needed: they refuse
    before connecting)."""

    def test_cli_refuses_plain_text_token_to_a_remote_address(self):
        with tempfile.TemporaryDirectory() as d:
            token_file = write_token(d, "t", ADMIN_TOKEN)
            for args in (["--token-file", token_file], []):
                result = run([NIBBLE, "models", "list", "--server", "192.0.2.1:50051", *args],
                             env_extra=None if args else {"NIBBLE_TOKEN": ADMIN_TOKEN})
                self.assertEqual(result.returncode, 1)
                self.assertIn("plain text", result.stderr)
                self.assertNotIn(ADMIN_TOKEN, result.stderr)

    def test_python_client_refuses_plain_text_token_to_a_remote_address(self):
        with self.assertRaises(ValueError) as raised:
            NibbleClient("192.0.2.1:50051", token=ADMIN_TOKEN)
        self.assertNotIn(ADMIN_TOKEN, str(raised.exception))


class StartRulesTest(unittest.TestCase):
    """What nibbled says and does at start about where it listens and how it is protected."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="nibbled-auth-start-")
        self.certs = None

    def tearDown(self):
        shutil.rmtree(self.dir, True)

    def config(self, security_yaml=""):
        path = os.path.join(self.dir, "nibbled.yaml")
        with open(path, "w") as f:
            f.write(f"listen: 127.0.0.1:{free_port()}\nmetrics_listen: ''\n"
                    f"models:\n  - name: stories260K\n    path: {MODEL}\n    cpu_threads: 1\n"
                    + (f"security:\n{security_yaml}" if security_yaml else ""))
        return path

    def start(self, config, listen):
        return run([NIBBLED, "--config", config, "--listen", listen], timeout=60)

    def test_all_interfaces_without_tls_and_tokens_is_refused(self):
        result = self.start(self.config(), f"0.0.0.0:{free_port()}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("refusing to listen on 0.0.0.0", result.stderr)
        self.assertIn("TLS", result.stderr)
        self.assertIn("security.tokens_file", result.stderr)
        self.assertIn("insecure: true", result.stderr)

    def test_tls_without_tokens_is_refused_off_loopback(self):
        certs = Certificates()
        try:
            config = self.config(f"  tls_cert_file: {certs.path('server.pem')}\n"
                                 f"  tls_key_file: {certs.path('server.key')}\n")
            result = self.start(config, f"[::]:{free_port()}")
        finally:
            certs.remove()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("refusing to listen", result.stderr)
        self.assertIn("security.tokens_file", result.stderr)
        self.assertNotIn("security.tls_cert_file", result.stderr)

    def test_tokens_without_tls_are_refused_off_loopback(self):
        tokens = write_tokens_file(self.dir)
        result = self.start(self.config(f"  tokens_file: {tokens}\n  insecure: true\n"),
                            f"0.0.0.0:{free_port()}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("plain text", result.stderr)
        for token in ALL_TOKENS:
            self.assertNotIn(token, result.stderr)

    def test_insecure_true_serves_and_says_so(self):
        port = free_port()
        config = self.config("  insecure: true\n")
        log_path = os.path.join(self.dir, "nibbled.log")
        with open(log_path, "w+") as log:
            process = track(subprocess.Popen(
                [NIBBLED, "--config", config, "--listen", f"0.0.0.0:{port}"],
                stdout=log, stderr=subprocess.STDOUT))
            try:
                deadline = time.time() + 30
                while "nibbled: serving on" not in read(log_path).decode():
                    self.assertIsNone(process.poll(), read(log_path).decode())
                    self.assertLess(time.time(), deadline, read(log_path).decode())
                    time.sleep(0.05)
                with NibbleClient(f"127.0.0.1:{port}", timeout=10) as client:
                    self.assertEqual(client.health(), "SERVING")
                    self.assertEqual([m.name for m in client.models()], ["stories260K"])
            finally:
                process.terminate()
                process.wait(timeout=30)
            output = read(log_path).decode()
        self.assertIn("WARNING: security.insecure is true", output)
        self.assertIn("every caller may call every method", output)

    def test_bad_tokens_file_is_refused_naming_the_line(self):
        tokens = os.path.join(self.dir, "tokens")
        with open(tokens, "w") as f:
            f.write(f"admin {ADMIN_TOKEN}\nsuperuser {INFERENCE_TOKEN}\n")
        result = self.start(self.config(f"  tokens_file: {tokens}\n"), f"127.0.0.1:{free_port()}")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("security.tokens_file", result.stderr)
        self.assertIn(f"{tokens}: line 2", result.stderr)
        for token in ALL_TOKENS:
            self.assertNotIn(token, result.stderr)

    def test_config_errors_name_the_key(self):
        result = self.start(self.config("  tls_cert_file: server.pem\n"), "127.0.0.1:1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("security.tls_key_file", result.stderr)
        result = self.start(self.config("  insecure: yes\n"), "127.0.0.1:1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("security.insecure", result.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
