"""NibbleClient: a thin synchronous wrapper over nibbled's gRPC API (proto/nibble/v1).

Thread safety: one NibbleClient (one gRPC channel) may be shared by any number of threads; each
call is independent. A CompletionStream belongs to the thread that iterates it (cancel() may be
called from any thread).

Errors: every failed call raises NibbleError, with the gRPC status code (`.code`, a
grpc.StatusCode; `.code_name`, e.g. "INVALID_ARGUMENT") and the daemon's message, which names
the field at fault. A stream raises it from the iteration that meets the error; the chunks
before it were delivered.
"""
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from nibble_client import stubs
# The stubs module put the generated package on sys.path.
from nibble.v1 import quantization_pb2, quantization_pb2_grpc  # noqa: E402
from nibble.v1 import artifacts_pb2, artifacts_pb2_grpc  # noqa: E402

_pb = stubs.inference_pb2

# SamplingParams' fields, as keyword arguments of chat() and generate().
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens",
                   "stop", "ignore_eos")

_FINISH_REASONS = {
    _pb.FINISH_REASON_LENGTH: "length",
    _pb.FINISH_REASON_STOP: "stop",
    _pb.FINISH_REASON_STOP_STRING: "stop_string",
    _pb.FINISH_REASON_CONTEXT_FULL: "context_full",
}


class NibbleError(Exception):
    """A call that failed: the gRPC status code and the daemon's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return self.code.name

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "NibbleError":
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int          # BOS included
    cached_prompt_tokens: int   # of those, reused from the session's cache
    completion_tokens: int      # a final stop token included
    preemptions: int            # times the request lost its KV cache and recomputed it


@dataclass(frozen=True)
class Timing:
    queue_seconds: float        # arrival -> first scheduler step that ran it (daemon's clock)
    first_token_seconds: float  # arrival -> first generated token
    total_seconds: float        # arrival -> last chunk


@dataclass(frozen=True)
class Chunk:
    """One streamed message. Every chunk but the last carries new text (and token ids when
    asked for); the last carries finish_reason, usage and timing (and may carry text too)."""
    text: str
    token_ids: Tuple[int, ...]
    request_id: int
    finish_reason: Optional[str] = None  # "length", "stop", "stop_string", "context_full"
    usage: Optional[Usage] = None
    timing: Optional[Timing] = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_proto(cls, chunk) -> "Chunk":
        if chunk.finish_reason == _pb.FINISH_REASON_UNSPECIFIED:
            return cls(chunk.text, tuple(chunk.token_ids), chunk.request_id)
        u, t = chunk.usage, chunk.timing
        return cls(chunk.text, tuple(chunk.token_ids), chunk.request_id,
                   _FINISH_REASONS.get(chunk.finish_reason, str(chunk.finish_reason)),
                   Usage(u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens,
                         u.preemptions),
                   Timing(t.queue_seconds, t.first_token_seconds, t.total_seconds))


class CompletionStream:
    """A streamed chat or generate call: iterate it for Chunk objects, or call text_deltas()
    for the text alone, or text() for the whole reply. After the stream ends, `.finish_reason`,
    `.usage`, `.timing` and `.token_ids` (with return_token_ids) describe it. Leaving early:
    cancel() (or use it as a context manager), which frees the daemon's resources at once."""

    def __init__(self, call):
        self._call = call
        self._chunks = self._iterate()
        self.token_ids: List[int] = []
        self.finish_reason: Optional[str] = None
        self.usage: Optional[Usage] = None
        self.timing: Optional[Timing] = None
        self.request_id: Optional[int] = None

    def _iterate(self) -> Iterator[Chunk]:
        try:
            for message in self._call:
                chunk = Chunk.from_proto(message)
                self.request_id = chunk.request_id
                self.token_ids.extend(chunk.token_ids)
                if chunk.last:
                    self.finish_reason, self.usage, self.timing = (
                        chunk.finish_reason, chunk.usage, chunk.timing)
                yield chunk
        except grpc.RpcError as error:
            raise NibbleError.from_rpc_error(error) from None

    def __iter__(self) -> Iterator[Chunk]:
        return self._chunks

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def text_deltas(self) -> Iterator[str]:
        """The new text of each chunk, as it arrives (empty deltas skipped)."""
        for chunk in self._chunks:
            if chunk.text:
                yield chunk.text

    def text(self) -> str:
        """Reads the stream to its end; the whole reply."""
        return "".join(chunk.text for chunk in self._chunks)

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "CompletionStream":
        return self

    def __exit__(self, *exc) -> None:
        if self.finish_reason is None:
            self.cancel()


@dataclass(frozen=True)
class Tokens:
    token_ids: List[int]
    pieces: List[str]  # SentencePiece pieces ("▁the", "<0x0A>")

    def text(self) -> str:
        """The pieces joined back into text (SentencePiece's rules: "▁" is a space, the one
        leading space the tokenizer adds is dropped, byte pieces are decoded, BOS/EOS skipped)."""
        out = bytearray()
        for piece in self.pieces:
            if piece in ("<s>", "</s>", "<unk>"):
                continue
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(int(piece[3:5], 16))
            else:
                out += piece.replace("\u2581", " ").encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str       # e.g. "LlamaForCausalLM"
    quantization: str       # "none" or "awq"
    bits: int
    group_size: int
    context_length: int
    session_len: int
    vocab_size: int
    chat_template: str
    device: str
    state: str              # "READY", "LOADING", "DRAINING", "FAILED"
    weight_bytes: int
    proto: object = field(repr=False, compare=False, default=None)  # the full models_pb2.ModelInfo

    @classmethod
    def from_proto(cls, m) -> "ModelInfo":
        state = stubs.models_pb2.ModelState.Name(m.state).replace("MODEL_STATE_", "")
        return cls(m.name, m.architecture, m.quantization.method, m.quantization.bits,
                   m.quantization.group_size, m.context_length, m.cache.session_len,
                   m.vocab_size, m.chat_template, m.device, state, m.weight_bytes, m)


MessagesLike = Union[str, Sequence[Union[dict, Tuple[str, str]]]]


def _messages(messages: MessagesLike):
    if isinstance(messages, str):
        return [_pb.ChatMessage(role="user", content=messages)]
    out = []
    for message in messages:
        if isinstance(message, dict):
            out.append(_pb.ChatMessage(role=message["role"], content=message["content"]))
        else:
            role, content = message
            out.append(_pb.ChatMessage(role=role, content=content))
    return out


def _sampling(kwargs: dict):
    unknown = sorted(set(kwargs) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; "
                        f"known: {', '.join(SAMPLING_FIELDS)}")
    params = {k: v for k, v in kwargs.items() if v is not None}
    stop = params.pop("stop", None)
    sampling = _pb.SamplingParams(**params)
    if stop is not None:
        sampling.stop.extend([stop] if isinstance(stop, str) else list(stop))
    return sampling


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds "authorization: Bearer <token>" to every call. Plain metadata rather than
    grpc.access_token_call_credentials, which refuses plain-text channels: a daemon on
    loopback may check tokens without TLS."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [self._metadata]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = (
            credentials, wait_for_ready, compression)


def read_token_file(path: str) -> str:
    """The token in a file of one token (blank lines and '#' comments ignored). Errors name
    the file and line, never the token."""
    token = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if token is not None or len(line.split()) != 1:
                raise ValueError(f"token file {path}: line {number}: expected one token "
                                 "(one word) in the file")
            token = line
    if token is None:
        raise ValueError(f"token file {path}: holds no token")
    return token


def _is_loopback(address: str) -> bool:
    """localhost, 127.0.0.0/8, [::1] (with a port) or a unix: socket; no name is resolved."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    if address.startswith("["):
        host = address[1:address.find("]")]
    elif address.count(":") > 1:
        host = address  # a bare IPv6 address
    else:
        host = address.rsplit(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_bytes(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class NibbleClient:
    """A connection to one nibbled. `address` is host:port; `timeout` (seconds) is the
    default deadline of every call, None for none (a stream's deadline covers all of it).

    Security (as `nibble`'s --tls/--tls-ca/--tls-cert/--tls-key/--token-file): `tls=True`
    connects with TLS, trusting `tls_ca` (a PEM file; None: the system's roots); `tls_cert` and
    `tls_key` (PEM files) present a client certificate to a daemon that requires mutual TLS;
    any of the three implies TLS. `token` (or `token_file`, a file holding it) is sent as
    "authorization: Bearer <token>" with every call; in plain text only to a loopback address
    (ValueError otherwise)."""

    def __init__(self, address: str, timeout: Optional[float] = None,
                 options: Optional[Iterable[Tuple[str, object]]] = None, *,
                 tls: bool = False, tls_ca: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 token: Optional[str] = None, token_file: Optional[str] = None):
        self.address = address
        self.timeout = timeout
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if token_file is not None:
            token = read_token_file(token_file)
        options = list(options or [])
        if tls or tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_bytes(tls_ca), private_key=_read_bytes(tls_key),
                certificate_chain=_read_bytes(tls_cert))
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            if token and not _is_loopback(address):
                raise ValueError(f"refusing to send a bearer token in plain text to {address}, "
                                 "which is not a loopback address: connect with TLS (tls=True "
                                 "or tls_ca=...)")
            channel = grpc.insecure_channel(address, options=options)
        self._channel = grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
        self._inference = stubs.inference_pb2_grpc.InferenceStub(self._channel)
        self._models = stubs.models_pb2_grpc.ModelsStub(self._channel)
        self._quantization = quantization_pb2_grpc.QuantizationStub(self._channel)
        self._artifacts = artifacts_pb2_grpc.ArtifactsStub(self._channel)
        self._health = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=stubs.health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=stubs.health_pb2.HealthCheckResponse.FromString)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "NibbleClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout):
        return self.timeout if timeout is None else timeout

    def chat(self, messages: MessagesLike, model: str = "", session_id: Optional[str] = None,
             *, return_token_ids: bool = False, timeout: Optional[float] = None,
             **sampling) -> CompletionStream:
        """A chat completion, streamed. `messages`: a string (one user message), or a list of
        {"role", "content"} dicts or (role, content) pairs, the whole conversation so far.
        `session_id` keeps the conversation's KV cache in the daemon for its next turn.
        Sampling keywords: temperature (0: greedy, the default), top_p, top_k,
        repetition_penalty, seed, max_tokens (default 256), stop (a string or a list),
        ignore_eos. Returns a CompletionStream of Chunk objects."""
        request = _pb.ChatRequest(model=model, messages=_messages(messages),
                                  sampling=_sampling(sampling), session_id=session_id or "",
                                  return_token_ids=return_token_ids)
        return CompletionStream(self._inference.Chat(request, timeout=self._timeout(timeout)))

    def generate(self, prompt: str, model: str = "", session_id: Optional[str] = None,
                 *, return_token_ids: bool = False, timeout: Optional[float] = None,
                 **sampling) -> CompletionStream:
        """A raw prompt (BOS, then the prompt's tokens; no chat template), streamed. The same
        keywords as chat()."""
        request = _pb.GenerateRequest(model=model, prompt=prompt, sampling=_sampling(sampling),
                                      session_id=session_id or "",
                                      return_token_ids=return_token_ids)
        return CompletionStream(self._inference.Generate(request, timeout=self._timeout(timeout)))

    def tokenize(self, text: Optional[str] = None, *, messages: Optional[MessagesLike] = None,
                 add_bos: bool = False, model: str = "",
                 timeout: Optional[float] = None) -> Tokens:
        """The token ids and pieces of a text, or of a conversation rendered with the model's
        chat template (exactly one of the two)."""
        request = self._tokenize_request(text, messages, add_bos, model)
        response = self._unary(self._inference.Tokenize, request, timeout)
        return Tokens(list(response.token_ids), list(response.pieces))

    def count_tokens(self, text: Optional[str] = None, *,
                     messages: Optional[MessagesLike] = None, add_bos: bool = False,
                     model: str = "", timeout: Optional[float] = None) -> int:
        request = self._tokenize_request(text, messages, add_bos, model)
        return self._unary(self._inference.CountTokens, request, timeout).token_count

    def models(self, timeout: Optional[float] = None) -> List[ModelInfo]:
        response = self._unary(self._models.List, stubs.models_pb2.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in response.models]

    def model(self, name: str, timeout: Optional[float] = None) -> ModelInfo:
        return ModelInfo.from_proto(
            self._unary(self._models.Get, stubs.models_pb2.GetModelRequest(name=name), timeout))

    def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        """grpc.health.v1: "SERVING", or "NOT_SERVING" while the daemon drains."""
        response = self._unary(self._health,
                               stubs.health_pb2.HealthCheckRequest(service=service), timeout)
        return stubs.health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # Quantization jobs, on a daemon with the quantizer role. Jobs come back as
    # quantization_pb2.Job messages (id, state, progress, error, artifact, ...).

    def submit_job(self, model_path: Optional[str] = None, *, artifact: Optional[str] = None,
                   output_artifact: str = "", timeout: Optional[float] = None,
                   **options) -> "quantization_pb2.Job":
        """Queues a job quantizing `model_path` (a directory on the daemon, under its
        quantizer.model_roots) or `artifact` (one of the daemon's artifacts) into the artifact
        `output_artifact` (default job-<id>). Options as `nibble quantize`'s flags: method,
        w_bits, w_group_size, calib_dataset, calib_samples, calib_seqlen, calib_seed,
        eval_dataset, eval_windows (unset: that command's defaults)."""
        request = quantization_pb2.SubmitJobRequest(
            output_artifact=output_artifact,
            options=quantization_pb2.QuantizationOptions(**options))
        if model_path is not None:
            request.model_path = model_path
        if artifact is not None:
            request.artifact = artifact
        return self._unary(self._quantization.SubmitJob, request, timeout)

    def get_job(self, job_id: str, timeout: Optional[float] = None) -> "quantization_pb2.Job":
        return self._unary(self._quantization.GetJob,
                           quantization_pb2.GetJobRequest(id=job_id), timeout)

    def watch_job(self, job_id: str,
                  timeout: Optional[float] = None) -> Iterator["quantization_pb2.Job"]:
        """The job now, then at each change, until it has ended (the last one yielded is
        SUCCEEDED, FAILED or CANCELLED). Raises NibbleError from the iteration that meets an
        error."""
        call = self._quantization.WatchJob(quantization_pb2.WatchJobRequest(id=job_id),
                                           timeout=self._timeout(timeout))
        try:
            for event in call:
                yield event.job
        except grpc.RpcError as error:
            raise NibbleError.from_rpc_error(error) from None
        finally:
            call.cancel()

    def list_jobs(self, timeout: Optional[float] = None) -> List["quantization_pb2.Job"]:
        return list(self._unary(self._quantization.ListJobs,
                                quantization_pb2.ListJobsRequest(), timeout).jobs)

    def cancel_job(self, job_id: str, timeout: Optional[float] = None) -> "quantization_pb2.Job":
        return self._unary(self._quantization.CancelJob,
                           quantization_pb2.CancelJobRequest(id=job_id), timeout)

    def delete_job(self, job_id: str, delete_artifact: bool = False,
                   timeout: Optional[float] = None) -> None:
        self._unary(self._quantization.DeleteJob,
                    quantization_pb2.DeleteJobRequest(id=job_id, delete_artifact=delete_artifact),
                    timeout)

    # Artifacts (quantized model directories the daemon holds) and hot loading. Artifacts come
    # back as artifacts_pb2.ArtifactInfo messages (name, state, problem, files, quantization,
    # report, ...).

    def list_artifacts(self, timeout: Optional[float] = None) -> List["artifacts_pb2.ArtifactInfo"]:
        """Every artifact of the daemon, those that do not match their manifest included
        (state ARTIFACT_STATE_INVALID, with the reason in `problem`)."""
        return list(self._unary(self._artifacts.List, artifacts_pb2.ListArtifactsRequest(),
                                timeout).artifacts)

    def stat_artifact(self, name: str,
                      timeout: Optional[float] = None) -> "artifacts_pb2.ArtifactInfo":
        """An artifact's manifest (files with sizes and sha256, quantization, quality report).
        DATA_LOSS for one whose files do not match it."""
        return self._unary(self._artifacts.Stat, artifacts_pb2.StatArtifactRequest(name=name),
                           timeout)

    def pull_artifact(self, name: str, out_dir: str, *, chunk_size: int = 0,
                      progress=None, timeout: Optional[float] = None) -> dict:
        """Copies the artifact `name` into the new directory `out_dir`, as `nibble artifacts
        pull` does and with the same files beside it while it runs (OUT.partial/, the manifest
        in OUT.partial.manifest/, the lock OUT.partial.lock): an interrupted pull resumes where
        it stopped when called again, every file's sha256 is checked (a file that does not
        match is deleted and NibbleError DATA_LOSS raised), the manifest is written last and
        `out_dir` appears, whole, with one rename. `progress(bytes_done, bytes_total)` is called
        after every chunk. Returns {"bytes_total", "bytes_resumed", "bytes_transferred"}."""
        return _pull_artifact(self, name, out_dir, chunk_size, progress, timeout)

    def load_model(self, *, artifact: Optional[str] = None, path: Optional[str] = None,
                   peer: Optional[str] = None, name: str = "", dtype: str = "",
                   cpu_threads: int = 0, timeout: Optional[float] = None) -> ModelInfo:
        """Loads a model on the daemon and returns it once it serves: `artifact` (one of the
        daemon's), `path` (a directory under its artifacts.model_roots), or `peer` (host:port of
        another daemon, one of its artifacts.peers) with `artifact` to pull first. RESOURCE_
        EXHAUSTED when it does not fit the daemon's memory_budget."""
        request = stubs.models_pb2.LoadModelRequest(name=name, dtype=dtype,
                                                    cpu_threads=cpu_threads)
        if peer is not None:
            if artifact is None:
                raise ValueError("peer needs artifact")
            request.peer.address = peer
            request.peer.artifact = artifact
        elif path is not None:
            request.path = path
        elif artifact is not None:
            request.artifact = artifact
        else:
            raise ValueError("name what to load: artifact, path, or peer with artifact")
        return ModelInfo.from_proto(self._unary(self._models.Load, request, timeout))

    def unload_model(self, name: str, *, cancel: bool = False, drain_seconds: float = 0,
                     timeout: Optional[float] = None) -> int:
        """Stops serving `name`: waits for its running requests (at most `drain_seconds`, 0:
        the daemon's drain_grace_seconds) or, with `cancel`, ends them (UNAVAILABLE). Returns
        how many requests the unload ended."""
        mode = (stubs.models_pb2.UNLOAD_MODE_CANCEL if cancel
                else stubs.models_pb2.UNLOAD_MODE_DRAIN)
        request = stubs.models_pb2.UnloadModelRequest(name=name, mode=mode,
                                                      timeout_seconds=drain_seconds)
        return self._unary(self._models.Unload, request, timeout).requests_ended

    def _tokenize_request(self, text, messages, add_bos, model):
        request = _pb.TokenizeRequest(model=model, add_bos=add_bos)
        if text is not None:
            request.text = text
        if messages is not None:
            request.messages.extend(_messages(messages))
        return request

    def _unary(self, method, request, timeout):
        try:
            return method(request, timeout=self._timeout(timeout))
        except grpc.RpcError as error:
            raise NibbleError.from_rpc_error(error) from None


def _pull_artifact(client, name, out_dir, chunk_size, progress, timeout):
    import fcntl
    import hashlib
    import json
    import os
    import shutil

    partial = out_dir + ".partial"
    manifest_dir = partial + ".manifest"
    if os.path.lexists(out_dir):
        raise NibbleError(grpc.StatusCode.ALREADY_EXISTS, f"{out_dir} exists already")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    lock = os.open(partial + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise NibbleError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"another pull is writing there ({partial}.lock is locked)") from None
        info = client.stat_artifact(name, timeout)
        manifest_json = info.manifest_json
        saved = os.path.join(manifest_dir, "nibble_manifest.json")
        previous = None
        if os.path.isfile(saved):
            with open(saved, "rb") as f:
                previous = f.read()
        if previous != manifest_json:
            # The source's artifact changed since the broken pull: start over.
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(manifest_dir, ignore_errors=True)
            os.makedirs(manifest_dir)
            _write_atomically(saved, manifest_json)
        files = json.loads(manifest_json)["files"]
        for path in files:
            if path.startswith("/") or ".." in path.split("/") or "" in path.split("/"):
                raise NibbleError(grpc.StatusCode.DATA_LOSS,
                                  f"the manifest of {name} names an unsafe path {path!r}")
        os.makedirs(partial, exist_ok=True)
        # Keep only prefixes of listed files.
        for root, _, names in os.walk(partial):
            for entry in names:
                local = os.path.join(root, entry)
                relative = os.path.relpath(local, partial)
                listed = files.get(relative)
                if (os.path.islink(local) or not os.path.isfile(local) or listed is None
                        or os.path.getsize(local) > listed["size"]):
                    os.remove(local)
        total = sum(f["size"] for f in files.values())
        resumed = sum(os.path.getsize(os.path.join(partial, p)) for p in files
                      if os.path.isfile(os.path.join(partial, p)))
        done, transferred = resumed, 0
        for path, expected in sorted(files.items()):
            local = os.path.join(partial, path)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            offset = os.path.getsize(local) if os.path.isfile(local) else 0
            if offset < expected["size"]:
                request = artifacts_pb2.DownloadRequest(artifact=name, path=path, offset=offset,
                                                        max_chunk_bytes=chunk_size)
                try:
                    with open(local, "ab") as f:
                        for chunk in client._artifacts.Download(
                                request, timeout=client._timeout(timeout)):
                            if (chunk.path != path or chunk.offset != offset
                                    or offset + len(chunk.data) > expected["size"]):
                                raise NibbleError(grpc.StatusCode.DATA_LOSS,
                                                  f"{name}/{path}: the daemon sent bytes at "
                                                  f"offset {chunk.offset} where {offset} was due")
                            f.write(chunk.data)
                            offset += len(chunk.data)
                            done += len(chunk.data)
                            transferred += len(chunk.data)
                            if progress:
                                progress(done, total)
                        f.flush()
                        os.fsync(f.fileno())
                except grpc.RpcError as error:
                    raise NibbleError.from_rpc_error(error) from None
            digest = hashlib.sha256()
            with open(local, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != expected["sha256"]:
                os.remove(local)
                raise NibbleError(grpc.StatusCode.DATA_LOSS,
                                  f"{name}/{path}: sha256 {digest.hexdigest()} but the manifest "
                                  f"says {expected['sha256']} (deleted; pull again)")
        _write_atomically(os.path.join(partial, "nibble_manifest.json"), manifest_json)
        os.rename(partial, out_dir)
        directory = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        shutil.rmtree(manifest_dir, ignore_errors=True)
        os.remove(partial + ".lock")
        return {"bytes_total": total, "bytes_resumed": resumed, "bytes_transferred": transferred}
    finally:
        os.close(lock)


def _write_atomically(path, data):
    import os
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temporary, path)
