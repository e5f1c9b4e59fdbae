#!/usr/bin/python3
"""Independent float64 numpy reference for nibble's tests.

This module is deliberately NOT a port of the C++ engine: it keeps the Meta /
llama2.c conventions (interleaved RoPE pairs, weights in Meta row order) and
computes everything in float64, so that agreement with the engine (which uses
HF rotate_half order and fp32/fp16) is evidence that both are right rather
than that both share a bug.

Only the standard library and numpy are used, so it runs anywhere the CI
machine's /usr/bin/python3 runs.  See tests/reference/README.md.
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import struct
import sys
import time

import numpy as np

BOS_ID = 1
EOS_ID = 2


# ---------------------------------------------------------------------------
# Model container
# ---------------------------------------------------------------------------

class Model:
    """Weights in Meta/llama2.c layout (q/k rows interleaved), float64.

    layers is a list of dicts with keys rms_att, wq, wk, wv, wo, rms_ffn,
    w1 (gate), w2 (down), w3 (up) and optionally bq, bk, bv, bo.
    All matrices are [out, in] like nn.Linear.weight.
    """

    def __init__(self, dim, hidden_dim, n_heads, n_kv_heads, vocab_size,
                 seq_len, embedding, layers, rms_final, wcls,
                 rope_theta=10000.0, norm_eps=1e-5):
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.n_layers = len(layers)
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.embedding = embedding
        self.layers = layers
        self.rms_final = rms_final
        self.wcls = wcls
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        if dim % n_heads or n_heads % n_kv_heads or self.head_dim % 2:
            raise ValueError("inconsistent head configuration")


# ---------------------------------------------------------------------------
# 1. llama2.c legacy (v0) checkpoint
# ---------------------------------------------------------------------------

def load_llama2c(path, norm_eps=1e-5, rope_theta=10000.0):
    """Read a llama2.c v0 checkpoint into a float64 Model.

    The file has no version magic: 7 int32 header fields then raw fp32
    arrays.  A negative vocab_size flags an unshared classifier.  The size is
    checked exactly because a truncated or mis-shaped file would otherwise be
    read as garbage without any error.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 28:
        raise ValueError("%s: too small for a llama2.c header" % path)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    kv_dim = head_dim * n_kv
    L = n_layers
    # (name, shape) in file order; the trailing freq_cis tables are legacy
    # precomputed RoPE tables that we read (to keep the offsets right, and to
    # sanity-check) but do not use: the forward pass recomputes angles in f64.
    shapes = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, dim, dim)),
        ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)),
        ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    expected = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != expected:
        raise ValueError("%s: size %d, expected %d for header %r"
                         % (path, len(raw), expected,
                            (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)))
    arrays = {}
    off = 28
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = np.frombuffer(raw, dtype="<f4", count=n, offset=off).reshape(shape).astype(np.float64)
        off += 4 * n
    layers = []
    for l in range(L):
        layers.append({k: arrays[k][l] for k in
                       ("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3")})
    wcls = arrays["token_embedding"] if shared else arrays["wcls"]
    m = Model(dim, hidden, n_heads, n_kv, vocab, seq_len, arrays["token_embedding"],
              layers, arrays["rms_final"], wcls, rope_theta=rope_theta, norm_eps=norm_eps)
    m.shared_classifier = shared
    m.freq_cis_real = arrays["freq_cis_real"]
    m.freq_cis_imag = arrays["freq_cis_imag"]
    return m


# ---------------------------------------------------------------------------
# 2./3. Forward pass (float64, interleaved RoPE, whole sequence at once)
# ---------------------------------------------------------------------------

def rmsnorm(x, w, eps):
    # x: [T, D]; normalise each row by its RMS, then scale per channel.
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_tables(n_pos, head_dim, base):
    """cos/sin of angle pos * base^(-2i/head_dim) for pair i, shape [T, d/2]."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    inv_freq = base ** (-2.0 * i / head_dim)
    ang = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang), np.sin(ang)


def rope_base(model, n_tokens):
    """RoPE base for a sequence of n_tokens, with HF's dynamic NTK scaling
    (LlamaDynamicNTKScalingRotaryEmbedding, as InternLM2 uses it) when the
    model's config asks for it: past max_position_embeddings M the base grows
    to base * ((factor * L / M) - (factor - 1)) ** (d / (d - 2)), L being the
    sequence length; every position of the sequence uses that base."""
    factor = getattr(model, "ntk_factor", None)
    if not factor or n_tokens <= model.seq_len:
        return model.rope_theta
    d = model.head_dim
    return model.rope_theta * ((factor * n_tokens / model.seq_len) - (factor - 1)) ** (d / (d - 2))


def apply_rope_interleaved(x, cos, sin):
    """Rotate pairs (2i, 2i+1) of every head. x: [T, H, d]; cos/sin: [T, d/2].

    This is the Meta / llama2.c convention; the HF rotate_half convention
    pairs (i, i+d/2) instead and is equivalent only after the row permutation
    that the HF loader undoes.
    """
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(model, tokens, rope=apply_rope_interleaved):
    """Logits [T, vocab] for every position of `tokens` (causal), float64.

    `rope` is only swapped by the self-check (to prove that HF-ordered
    weights with rotate_half equal Meta weights with interleaved pairs)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    if T == 0:
        return np.zeros((0, model.vocab_size))
    if tokens.min() < 0 or tokens.max() >= model.vocab_size:
        raise ValueError("token id out of range")
    H, Hkv, d = model.n_heads, model.n_kv_heads, model.head_dim
    group = H // Hkv
    eps = model.norm_eps
    cos, sin = rope_tables(T, d, rope_base(model, T))
    # Additive causal mask: position t may attend to positions <= t.
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    scale = 1.0 / math.sqrt(d)

    x = model.embedding[tokens].astype(np.float64)
    for lw in model.layers:
        xn = rmsnorm(x, lw["rms_att"], eps)
        q = xn @ lw["wq"].T
        k = xn @ lw["wk"].T
        v = xn @ lw["wv"].T
        # InternLM v1 biases are added after the projection, before RoPE.
        if "bq" in lw:
            q = q + lw["bq"]
        if "bk" in lw:
            k = k + lw["bk"]
        if "bv" in lw:
            v = v + lw["bv"]
        q = rope(q.reshape(T, H, d), cos, sin)
        k = rope(k.reshape(T, Hkv, d), cos, sin)
        v = v.reshape(T, Hkv, d)
        # GQA: query head h reads KV head h // group; repeat KV heads to match.
        k = np.repeat(k, group, axis=1)          # [T, H, d]
        v = np.repeat(v, group, axis=1)
        qh = q.transpose(1, 0, 2)                # [H, T, d]
        kh = k.transpose(1, 0, 2)
        vh = v.transpose(1, 0, 2)
        att = (qh @ kh.transpose(0, 2, 1)) * scale + mask   # [H, T, T]
        att = att - att.max(axis=-1, keepdims=True)
        att = np.exp(att)
        att /= att.sum(axis=-1, keepdims=True)
        o = (att @ vh).transpose(1, 0, 2).reshape(T, H * d)
        o = o @ lw["wo"].T
        if "bo" in lw:
            o = o + lw["bo"]
        x = x + o

        xn = rmsnorm(x, lw["rms_ffn"], eps)
        h = silu(xn @ lw["w1"].T) * (xn @ lw["w3"].T)
        x = x + h @ lw["w2"].T

    x = rmsnorm(x, model.rms_final, eps)
    return x @ model.wcls.T


def log_softmax(logits):
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------
# 4. llama2.c BPE tokenizer
# ---------------------------------------------------------------------------

class Tokenizer:
    """The llama2.c tokenizer (tokenizer.bin format), encode/decode as run.c."""

    def __init__(self, path):
        with open(path, "rb") as f:
            raw = f.read()
        (self.max_token_length,) = struct.unpack_from("<i", raw, 0)
        off = 4
        self.pieces = []
        self.scores = []
        while off < len(raw):
            score, n = struct.unpack_from("<fi", raw, off)
            off += 8
            self.pieces.append(raw[off:off + n])
            self.scores.append(float(score))
            off += n
        if off != len(raw):
            raise ValueError("%s: trailing bytes" % path)
        self.vocab_size = len(self.pieces)
        # llama2.c looks pieces up by binary search in a sorted copy; with
        # duplicate pieces the id it finds is unspecified, so refuse them.
        self.lookup = {}
        for i, p in enumerate(self.pieces):
            if p in self.lookup:
                raise ValueError("duplicate piece %r" % p)
            self.lookup[p] = i
        self.scores_arr = np.array(self.scores, dtype=np.float64)

    def encode(self, text, bos=True, eos=False):
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = []
        if bos:
            ids.append(BOS_ID)
        # Dummy prefix, like SentencePiece's add_dummy_prefix, only for
        # non-empty text.  run.c pushes str_lookup(" ") without checking.
        if len(data) > 0:
            ids.append(self.lookup.get(b" ", -1))
        # Group bytes the way run.c does: a byte plus the continuation bytes
        # (10xxxxxx) that follow it, at most 4 bytes per group.  Each group is
        # looked up whole; a miss falls back to one byte token (+3) per byte.
        i = 0
        n = len(data)
        while i < n:
            j = i + 1
            while j < n and (data[j] & 0xC0) == 0x80 and (j - i) < 4:
                j += 1
            grp = data[i:j]
            tid = self.lookup.get(grp)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(b + 3 for b in grp)
            i = j
        ids = self._merge(ids)
        if eos:
            ids.append(EOS_ID)
        return ids

    def _merge(self, ids):
        """Greedy BPE: repeatedly merge the best-scoring adjacent pair.

        run.c scans all pairs each round, keeping the first pair whose score
        is strictly greater than the best so far (initially -1e10): i.e. the
        FIRST pair among those with the maximum score.  np.argmax also returns
        the first maximum, so we keep the pair scores in an array and only
        recompute the two neighbours of each merge (same result, O(n) per
        merge in C instead of O(n) Python lookups).
        Like run.c, the scan includes the BOS token (its piece never forms a
        mergeable pair in practice, but this keeps us exact).
        """
        toks = list(ids)
        if len(toks) < 2:
            return toks
        NEG = -np.inf

        def pair(a, b):
            if a < 0 or b < 0:
                return NEG, -1
            tid = self.lookup.get(self.pieces[a] + self.pieces[b])
            if tid is None:
                return NEG, -1
            s = self.scores[tid]
            # run.c's threshold: only scores > -1e10 can ever be chosen.
            return (s if s > -1e10 else NEG), tid

        sc = np.empty(len(toks) - 1)
        pid = [0] * (len(toks) - 1)
        for i in range(len(toks) - 1):
            sc[i], pid[i] = pair(toks[i], toks[i + 1])
        while len(toks) > 1:
            best = int(np.argmax(sc))
            if sc[best] == NEG:
                break
            toks[best] = pid[best]
            del toks[best + 1]
            sc = np.delete(sc, best)
            del pid[best]
            # The merged token has new neighbours on both sides.
            if best > 0:
                sc[best - 1], pid[best - 1] = pair(toks[best - 1], toks[best])
            if best < len(toks) - 1:
                sc[best], pid[best] = pair(toks[best], toks[best + 1])
        return toks

    def piece_bytes(self, prev, tid):
        """Bytes for token tid printed after token prev, as run.c's decode."""
        p = self.pieces[tid]
        # After BOS, SentencePiece strips the dummy-prefix space.
        if prev == BOS_ID and p[:1] == b" ":
            p = p[1:]
        # "<0xXX>" pieces stand for one raw byte.
        if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            try:
                return bytes([int(p[3:5], 16)])
            except ValueError:
                pass
        return p

    def decode_bytes(self, ids, prev=None):
        """Concatenate pieces.  BOS/EOS are control tokens: they print nothing
        (run.c never prints them: it stops on BOS and the prompt's BOS is not
        echoed) but a BOS still strips the next piece's leading space."""
        out = bytearray()
        for tid in ids:
            if tid not in (BOS_ID, EOS_ID):
                out += self.piece_bytes(prev, tid)
            prev = tid
        return bytes(out)

    def decode(self, ids, prev=None):
        return self.decode_bytes(ids, prev).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# 5. safetensors
# ---------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1",
}


def read_safetensors(path):
    """Return ({name: ndarray}, metadata).  F16 and BF16 are widened to float32
    (BF16 is the top 16 bits of an fp32, so widening is exact)."""
    with open(path, "rb") as f:
        raw = f.read()
    (hlen,) = struct.unpack_from("<Q", raw, 0)
    if 8 + hlen > len(raw):
        raise ValueError("%s: header length past end of file" % path)
    header = json.loads(raw[8:8 + hlen].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError("%s: unsupported dtype %s" % (name, dt))
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        if base + end > len(raw) or start > end:
            raise ValueError("%s: bad data_offsets" % name)
        npdt = np.dtype(_ST_DTYPES[dt])
        n = int(np.prod(shape)) if shape else 1
        if (end - start) != n * npdt.itemsize:
            raise ValueError("%s: data size does not match shape" % name)
        a = np.frombuffer(raw, dtype=npdt, count=n, offset=base + start).reshape(shape)
        if dt == "BF16":
            a = (a.reshape(-1).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        elif dt == "F16":
            a = a.astype(np.float32)
        elif dt == "BOOL":
            a = a.astype(bool)
        else:
            a = a.copy()
        out[name] = a
    return out, meta


def _to_bf16_bits(a):
    # Round-to-nearest-even fp32 -> bf16 (NaN kept as quiet NaN).
    f = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[np.isnan(f)] = 0x7FC0
    return r.reshape(np.shape(a))


def write_safetensors(path, tensors, metadata=None, dtype="F32"):
    """Write {name: array} as safetensors.  dtype F32 (default), F16 or BF16
    applies to every floating tensor; tensors are laid out in sorted name
    order, header padded with spaces to a multiple of 8 bytes."""
    header = {}
    blobs = []
    off = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if dtype == "F32":
            b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        elif dtype == "F16":
            b = np.ascontiguousarray(a, dtype="<f2").tobytes()
        elif dtype == "BF16":
            b = _to_bf16_bits(a).astype("<u2").tobytes()
        else:
            raise ValueError("unsupported write dtype %s" % dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((-len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ---------------------------------------------------------------------------
# 6./7. Hugging Face layouts
# ---------------------------------------------------------------------------

def meta_to_hf(w, n_heads):
    """Meta interleaved rows -> HF rotate_half rows (per head).

    HF[h*d + c*d/2 + i] = Meta[h*d + 2i + c].  Works on weights [out, in] and
    biases [out].
    """
    rest = w.shape[1:]
    d = w.shape[0] // n_heads
    return w.reshape((n_heads, d // 2, 2) + rest).swapaxes(1, 2).reshape(w.shape)


def hf_to_meta(w, n_heads):
    """Inverse of meta_to_hf: Meta[h*d + 2i + c] = HF[h*d + c*d/2 + i]."""
    rest = w.shape[1:]
    d = w.shape[0] // n_heads
    return w.reshape((n_heads, 2, d // 2) + rest).swapaxes(1, 2).reshape(w.shape)


ARCHS = {
    "llama": "LlamaForCausalLM",
    "internlm": "InternLMForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}


def _load_hf_tensors(model_dir):
    files = sorted(fn for fn in os.listdir(model_dir) if fn.endswith(".safetensors"))
    if not files:
        raise ValueError("%s: no *.safetensors" % model_dir)
    tensors = {}
    for fn in files:
        t, _ = read_safetensors(os.path.join(model_dir, fn))
        for k, v in t.items():
            if k in tensors:
                raise ValueError("tensor %s appears in more than one file" % k)
            tensors[k] = v
    return tensors


# AWQ GEMM (MODELS.md section 5): column 8c+j of a packed int32 row is nibble REVERSE[j].
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def unpack_awq_int32(packed):
    """[R, C] int32 -> [R, 8C] unsigned 4-bit values in column order."""
    u = packed.astype(np.int64) & 0xFFFFFFFF
    out = np.empty((packed.shape[0], packed.shape[1] * 8), dtype=np.int64)
    for j, nib in enumerate(AWQ_REVERSE_ORDER):
        out[:, j::8] = (u >> (4 * nib)) & 15
    return out


def dequantize_awq_gemm(qweight, qzeros, scales, group_size):
    """W [out, in] in float64 from AWQ GEMM tensors ([in, ...] layout):
    W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], then transposed to
    nn.Linear's [out, in]. in need not be a multiple of g (a partial last group)."""
    q = unpack_awq_int32(qweight)                # [in, out]
    z = unpack_awq_int32(qzeros)                 # [groups, out]
    s = scales.astype(np.float64)                # [groups, out]
    rows = np.arange(q.shape[0]) // group_size
    w = (q - z[rows]).astype(np.float64) * s[rows]
    return w.T.copy()


def quantize_rtn(w, group_size):
    """AutoAWQ's round-to-nearest W4 of w [out, in] (float32 arithmetic, scale rounded
    to fp16 first, ties to even as torch.round), returned dequantized as float64."""
    w = np.asarray(w, dtype=np.float32)
    out = np.empty(w.shape, dtype=np.float64)
    for b in range(0, w.shape[1], group_size):
        g = w[:, b:b + group_size]
        lo = g.min(axis=1, keepdims=True)
        hi = g.max(axis=1, keepdims=True)
        s = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(15)).astype(np.float16)
        s = s.astype(np.float32)
        z = np.clip(np.rint(-lo / s), 0, 15)
        q = np.clip(np.rint(g / s) + z, 0, 15)
        out[:, b:b + group_size] = (q - z).astype(np.float64) * s.astype(np.float64)
    return out


def _dequantize_awq_tensors(t, cfg):
    """Replace each AWQ module's qweight/qzeros/scales by its dequantized .weight."""
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "awq":
        return t
    g = int(qc.get("group_size", qc.get("q_group_size", 128)))
    for key in [k for k in t if k.endswith(".qweight")]:
        m = key[: -len(".qweight")]
        t[m + ".weight"] = dequantize_awq_gemm(t.pop(m + ".qweight"), t.pop(m + ".qzeros"),
                                               t.pop(m + ".scales"), g)
    return t


def load_hf(model_dir):
    """Load an HF directory (LLaMA, InternLM v1, InternLM2) into a Model in
    Meta layout: q/k rows (and q/k biases) get the inverse rotate_half
    permutation so the interleaved forward pass applies unchanged."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHS.values():
        raise ValueError("unsupported architecture %r" % arch)
    t = _dequantize_awq_tensors(_load_hf_tensors(model_dir), cfg)
    used = set()

    def get(name):
        used.add(name)
        return t[name].astype(np.float64)

    dim = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads") or H
    L = cfg["num_hidden_layers"]
    d = dim // H
    G = H // Hkv
    layers = []
    for i in range(L):
        p = "model.layers.%d." % i
        lw = {}
        if arch == "InternLM2ForCausalLM":
            wqkv = get(p + "attention.wqkv.weight")
            # Rows are (g, s, t): KV group g holds [q_0..q_{G-1}, k, v].
            g = wqkv.reshape(Hkv, G + 2, d, dim)
            wq = g[:, :G].reshape(H * d, dim)
            wk = g[:, G].reshape(Hkv * d, dim)
            wv = g[:, G + 1].reshape(Hkv * d, dim)
            wo = get(p + "attention.wo.weight")
            lw["rms_att"] = get(p + "attention_norm.weight")
            lw["rms_ffn"] = get(p + "ffn_norm.weight")
            lw["w1"] = get(p + "feed_forward.w1.weight")
            lw["w3"] = get(p + "feed_forward.w3.weight")
            lw["w2"] = get(p + "feed_forward.w2.weight")
        else:
            a = p + "self_attn."
            wq = get(a + "q_proj.weight")
            wk = get(a + "k_proj.weight")
            wv = get(a + "v_proj.weight")
            wo = get(a + "o_proj.weight")
            lw["rms_att"] = get(p + "input_layernorm.weight")
            lw["rms_ffn"] = get(p + "post_attention_layernorm.weight")
            lw["w1"] = get(p + "mlp.gate_proj.weight")
            lw["w3"] = get(p + "mlp.up_proj.weight")
            lw["w2"] = get(p + "mlp.down_proj.weight")
            if arch == "InternLMForCausalLM" and cfg.get("bias", False):
                lw["bq"] = hf_to_meta(get(a + "q_proj.bias"), H)
                lw["bk"] = hf_to_meta(get(a + "k_proj.bias"), Hkv)
                lw["bv"] = get(a + "v_proj.bias")
                lw["bo"] = get(a + "o_proj.bias")
        lw["wq"] = hf_to_meta(wq, H)
        lw["wk"] = hf_to_meta(wk, Hkv)
        lw["wv"] = wv
        lw["wo"] = wo
        layers.append(lw)
    if arch == "InternLM2ForCausalLM":
        emb = get("model.tok_embeddings.weight")
        head_name = "output.weight"
    else:
        emb = get("model.embed_tokens.weight")
        head_name = "lm_head.weight"
    if head_name in t:
        wcls = get(head_name)
    elif cfg.get("tie_word_embeddings", False):
        wcls = emb
    else:
        raise ValueError("missing %s" % head_name)
    rms_final = get("model.norm.weight")
    unused = sorted(set(t) - used)
    if unused:
        raise ValueError("unused tensors: %s" % unused[:5])
    m = Model(dim, cfg["intermediate_size"], H, Hkv, cfg["vocab_size"],
              cfg.get("max_position_embeddings", 2048), emb, layers, rms_final, wcls,
              rope_theta=float(cfg.get("rope_theta", 10000.0)),
              norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))
    m.config = cfg
    scaling = cfg.get("rope_scaling")
    if scaling:
        if scaling.get("type") != "dynamic":
            raise ValueError("unsupported rope_scaling %r" % scaling)
        m.ntk_factor = float(scaling.get("factor", 1.0))
    return m


def write_hf(model, layout, out_dir, tokenizer_model=None, bias_seed=None,
             bias_scale=0.1, expand_kv=False, dtype="F32", max_position=512,
             ntk_factor=None):
    """Write `model` (Meta layout) as an HF directory in one of three layouts.

    q/k rows get the Meta->HF rotate_half permutation.  For layout
    "internlm", bias_seed adds non-zero random q/k/v/o biases (the returned
    Model carries them, in Meta order, so callers can compare).  expand_kv
    repeats KV heads so num_key_value_heads == num_attention_heads (InternLM
    v1's real code has no GQA).  Returns the Model the directory represents.
    """
    if layout not in ARCHS:
        raise ValueError("layout must be one of %s" % sorted(ARCHS))
    if bias_seed is not None and layout != "internlm":
        raise ValueError("biases exist only in the internlm layout")
    os.makedirs(out_dir, exist_ok=True)
    H, d, dim = model.n_heads, model.head_dim, model.dim
    Hkv = model.n_kv_heads
    G = H // Hkv
    rng = np.random.default_rng(bias_seed) if bias_seed is not None else None
    out_layers = []
    tensors = {}
    for i, lw in enumerate(model.layers):
        lw = dict(lw)
        if expand_kv and Hkv != H:
            # KV head j serves query heads j*G..j*G+G-1: repeat its rows.
            for key in ("wk", "wv", "bk", "bv"):
                if key in lw:
                    a = lw[key]
                    lw[key] = np.repeat(a.reshape((Hkv, d) + a.shape[1:]), G, axis=0).reshape((H * d,) + a.shape[1:])
        kvh = H if expand_kv else Hkv
        if rng is not None:
            # Biases drawn in Meta order; rounded to fp32 so the file and the
            # returned Model agree exactly.
            for key, n in (("bq", H * d), ("bk", kvh * d), ("bv", kvh * d), ("bo", dim)):
                lw[key] = (rng.standard_normal(n) * bias_scale).astype(np.float32).astype(np.float64)
        out_layers.append(lw)
        wq = meta_to_hf(lw["wq"], H)
        wk = meta_to_hf(lw["wk"], kvh)
        p = "model.layers.%d." % i
        if layout == "internlm2":
            gq = G if not expand_kv else 1
            groups = np.concatenate([
                wq.reshape(kvh, gq, d, dim),
                wk.reshape(kvh, 1, d, dim),
                lw["wv"].reshape(kvh, 1, d, dim)], axis=1)
            tensors[p + "attention.wqkv.weight"] = groups.reshape(-1, dim)
            tensors[p + "attention.wo.weight"] = lw["wo"]
            tensors[p + "attention_norm.weight"] = lw["rms_att"]
            tensors[p + "ffn_norm.weight"] = lw["rms_ffn"]
            tensors[p + "feed_forward.w1.weight"] = lw["w1"]
            tensors[p + "feed_forward.w3.weight"] = lw["w3"]
            tensors[p + "feed_forward.w2.weight"] = lw["w2"]
        else:
            a = p + "self_attn."
            tensors[a + "q_proj.weight"] = wq
            tensors[a + "k_proj.weight"] = wk
            tensors[a + "v_proj.weight"] = lw["wv"]
            tensors[a + "o_proj.weight"] = lw["wo"]
            if "bq" in lw:
                tensors[a + "q_proj.bias"] = meta_to_hf(lw["bq"], H)
                tensors[a + "k_proj.bias"] = meta_to_hf(lw["bk"], kvh)
                tensors[a + "v_proj.bias"] = lw["bv"]
                tensors[a + "o_proj.bias"] = lw["bo"]
            tensors[p + "input_layernorm.weight"] = lw["rms_att"]
            tensors[p + "post_attention_layernorm.weight"] = lw["rms_ffn"]
            tensors[p + "mlp.gate_proj.weight"] = lw["w1"]
            tensors[p + "mlp.up_proj.weight"] = lw["w3"]
            tensors[p + "mlp.down_proj.weight"] = lw["w2"]
    if layout == "internlm2":
        tensors["model.tok_embeddings.weight"] = model.embedding
        tensors["output.weight"] = model.wcls
    else:
        tensors["model.embed_tokens.weight"] = model.embedding
        tensors["lm_head.weight"] = model.wcls
    tensors["model.norm.weight"] = model.rms_final
    has_bias = any("bq" in lw for lw in out_layers)
    cfg = {
        "architectures": [ARCHS[layout]],
        "model_type": layout,
        "hidden_size": dim,
        "intermediate_size": model.hidden_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": H,
        "num_key_value_heads": H if expand_kv else Hkv,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": max_position,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": float(model.rope_theta),
        "hidden_act": "silu",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype],
    }
    if layout in ("internlm", "internlm2"):
        cfg["bias"] = bool(has_bias)
    if layout == "internlm2":
        cfg["rope_scaling"] = ({"type": "dynamic", "factor": ntk_factor}
                               if ntk_factor else None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors,
                      metadata={"format": "pt"}, dtype=dtype)
    if tokenizer_model:
        shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
    out = Model(dim, model.hidden_dim, H, H if expand_kv else Hkv, model.vocab_size,
                512, model.embedding, out_layers, model.rms_final, model.wcls,
                rope_theta=model.rope_theta, norm_eps=model.norm_eps)
    return out


# ---------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------

def greedy(model, steps, prompt=(BOS_ID,), stop_on_bos=False):
    """Greedy decoding; re-runs the whole sequence each step (no KV cache:
    slower, but there is no cache to get wrong).  Returns (generated ids,
    logits at position 0, top-1 minus top-2 logit gap at every step).  The
    gaps tell a lower-precision engine where an argmax flip is plausible."""
    toks = list(prompt)
    gen = []
    first = None
    gaps = []
    for _ in range(steps):
        if len(toks) > model.seq_len:
            break
        last = forward(model, toks)[-1]
        if first is None:
            first = last  # logits at position 0 (the prompt is BOS alone)
        top2 = np.partition(last, -2)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        nxt = int(np.argmax(last))
        if stop_on_bos and nxt == BOS_ID:
            break
        gen.append(nxt)
        toks.append(nxt)
    return gen, first, gaps


def perplexity(model, ids, seqlen):
    """Consecutive windows of `seqlen` tokens (last partial window dropped),
    each evaluated from scratch; NLL of tokens 1..seqlen-1 of every window."""
    if seqlen < 2:
        raise ValueError("seqlen must be >= 2")
    k = len(ids) // seqlen
    if k == 0:
        raise ValueError("text has %d tokens, fewer than one window of %d" % (len(ids), seqlen))
    total = 0.0
    count = 0
    per_window = []
    for w in range(k):
        win = np.asarray(ids[w * seqlen:(w + 1) * seqlen])
        lp = log_softmax(forward(model, win))
        nll = -lp[np.arange(seqlen - 1), win[1:]]
        per_window.append(float(nll.mean()))
        total += float(nll.sum())
        count += seqlen - 1
    mean = total / count
    return {"windows": k, "mean_nll": mean, "perplexity": math.exp(mean),
            "per_window_mean_nll": per_window, "predicted_tokens": count}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _emit(obj, out_path):
    # One top-level key per line, each value on one line: readable diffs
    # without putting every token id on its own line.
    lines = ["  %s: %s" % (json.dumps(k), json.dumps(v)) for k, v in obj.items()]
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _file_digests(*paths):
    # sha256 of each input, keyed by base name, so a stale golden is evident.
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[os.path.basename(p)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _command_string(argv):
    # Record how a golden was produced, minus the --out destination.
    args = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--out="):
            continue
        args.append(a)
    return "python3 tests/reference/reference.py " + " ".join(shlex.quote(a) for a in args)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("greedy", help="greedy decoding from BOS")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--tokenizer", required=True)
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--stop-on-bos", action="store_true",
                   help="stop when BOS is generated (llama2.c's run.c does)")
    g.add_argument("--eps", type=float, default=1e-5)
    g.add_argument("--out")

    p = sub.add_parser("perplexity", help="windowed perplexity of a text file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--seqlen", type=int, required=True)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--out")

    t = sub.add_parser("tokenize", help="token ids (with BOS) of a text file")
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--text-file", required=True)
    t.add_argument("--no-bos", action="store_true")
    t.add_argument("--out")

    w = sub.add_parser("write-hf", help="write a llama2.c checkpoint as an HF directory")
    w.add_argument("--checkpoint", required=True)
    w.add_argument("--layout", required=True, choices=sorted(ARCHS))
    w.add_argument("--bias-seed", type=int)
    w.add_argument("--bias-scale", type=float, default=0.1)
    w.add_argument("--expand-kv", action="store_true",
                   help="repeat KV heads so the model is plain MHA")
    w.add_argument("--dtype", default="F32", choices=["F32", "F16", "BF16"])
    w.add_argument("--tokenizer-model")
    w.add_argument("--eps", type=float, default=1e-5)
    w.add_argument("--max-position", type=int, default=512,
                   help="max_position_embeddings written to config.json")
    w.add_argument("--ntk-factor", type=float,
                   help="internlm2 only: rope_scaling {type: dynamic, factor: F}")
    w.add_argument("--out", required=True)

    rc = sub.add_parser("check-rtn", help="compare an RTN artifact with this module's RTN")
    rc.add_argument("--source", required=True, help="the HF directory that was quantized")
    rc.add_argument("--quantized", required=True, help="the AWQ GEMM artifact")
    rc.add_argument("--out")

    lg = sub.add_parser("logits", help="float64 logits of an HF directory")
    lg.add_argument("--model-dir", required=True)
    lg.add_argument("--tokens", required=True, help="comma-separated ids")
    lg.add_argument("--out")

    a = ap.parse_args(argv)
    t0 = time.time()
    if a.cmd == "greedy":
        m = load_llama2c(a.checkpoint, norm_eps=a.eps)
        tok = Tokenizer(a.tokenizer)
        ids, first, gaps = greedy(m, a.steps, stop_on_bos=a.stop_on_bos)
        res = {"command": _command_string(argv),
               "inputs": _file_digests(a.checkpoint, a.tokenizer),
               "steps": a.steps, "prompt": [BOS_ID],
               "ids": ids, "text": tok.decode(ids, prev=BOS_ID),
               "min_top2_logit_gap": min(gaps) if gaps else None,
               "argmin_top2_logit_gap_step": int(np.argmin(gaps)) if gaps else None,
               "top2_logit_gaps": [round(g, 6) for g in gaps],
               "first_logits": [float(v) for v in first]}
    elif a.cmd == "perplexity":
        m = load_llama2c(a.checkpoint, norm_eps=a.eps)
        tok = Tokenizer(a.tokenizer)
        with open(a.dataset, "r", encoding="utf-8") as f:
            text = f.read()
        ids = tok.encode(text, bos=True)
        r = perplexity(m, ids, a.seqlen)
        res = {"command": _command_string(argv),
               "inputs": _file_digests(a.checkpoint, a.tokenizer, a.dataset),
               "seqlen": a.seqlen, "tokens": len(ids),
               "windows": r["windows"], "predicted_tokens": r["predicted_tokens"],
               "mean_nll": r["mean_nll"], "perplexity": r["perplexity"],
               "per_window_mean_nll": r["per_window_mean_nll"]}
    elif a.cmd == "tokenize":
        tok = Tokenizer(a.tokenizer)
        with open(a.text_file, "r", encoding="utf-8") as f:
            text = f.read()
        ids = tok.encode(text, bos=not a.no_bos)
        res = {"command": _command_string(argv),
               "inputs": _file_digests(a.tokenizer, a.text_file),
               "bos": not a.no_bos, "count": len(ids), "ids": ids}
    elif a.cmd == "write-hf":
        m = load_llama2c(a.checkpoint, norm_eps=a.eps)
        write_hf(m, a.layout, a.out, tokenizer_model=a.tokenizer_model,
                 bias_seed=a.bias_seed, bias_scale=a.bias_scale,
                 expand_kv=a.expand_kv, dtype=a.dtype, max_position=a.max_position,
                 ntk_factor=a.ntk_factor)
        res = {"command": _command_string(argv), "out": a.out,
               "architecture": ARCHS[a.layout]}
        a.out = None  # the directory is the output; report goes to stdout
    elif a.cmd == "check-rtn":
        with open(os.path.join(a.quantized, "config.json")) as f:
            qcfg = json.load(f)
        g = int(qcfg["quantization_config"]["group_size"])
        src = _load_hf_tensors(a.source)
        got = _dequantize_awq_tensors(_load_hf_tensors(a.quantized), qcfg)
        layers, mismatched, worst = 0, 0, 0.0
        for name, w in sorted(got.items()):
            if not (name.startswith("model.layers.") and name.endswith(".weight")
                    and w.ndim == 2):
                continue
            expected = (quantize_rtn(src[name], g) if w.dtype == np.float64
                        else src[name].astype(np.float16).astype(np.float64))
            diff = float(np.max(np.abs(w.astype(np.float64) - expected)))
            worst = max(worst, diff)
            layers += 1
            mismatched += diff != 0.0
        res = {"layers": layers, "mismatched_layers": mismatched, "max_abs_diff": worst}
        if mismatched:
            print(json.dumps(res))
            sys.exit(1)
    elif a.cmd == "logits":
        m = load_hf(a.model_dir)
        toks = [int(s) for s in a.tokens.split(",") if s.strip()]
        lo = forward(m, toks)
        res = {"tokens": toks, "logits": [[float(v) for v in row] for row in lo]}
    else:
        ap.error("unknown command")
    print("%s: %.2f s" % (a.cmd, time.time() - t0), file=sys.stderr)
    _emit(res, getattr(a, "out", None))


if __name__ == "__main__":
    main()
