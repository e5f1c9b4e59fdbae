"""NibbleClient: a thin synchronous wrapper over nibbled's gRPC API (proto/nibble/v1).

Thread safety: one NibbleClient (one gRPC channel) may be shared by any number of threads; each
call is independent. A CompletionStream belongs to the thread that iterates it (cancel() may be
called from any thread).

Errors: every failed call raises NibbleError, with the gRPC status code (`.code`, a
grpc.StatusCode; `.code_name`, e.g. "INVALID_ARGUMENT") and the daemon's message, which names
the field at fault. A stream raises it from the iteration that meets the error; the chunks
before it were delivered.
"""
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from nibble_client import stubs

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


class NibbleClient:
    """A connection to one nibbled. `address` is host:port; `timeout` (seconds) is the
    default deadline of every call, None for none (a stream's deadline covers all of it)."""

    def __init__(self, address: str, timeout: Optional[float] = None,
                 options: Optional[Iterable[Tuple[str, object]]] = None):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=list(options or []))
        self._inference = stubs.inference_pb2_grpc.InferenceStub(self._channel)
        self._models = stubs.models_pb2_grpc.ModelsStub(self._channel)
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
