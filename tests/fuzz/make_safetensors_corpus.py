#!/usr/bin/python3
"""Writes the seed corpus for safetensors_fuzz: a few tiny valid files and typical broken ones.

Run from anywhere: /usr/bin/python3 tests/fuzz/make_safetensors_corpus.py
The files are committed; rerun only to change the seeds. Written from the format description
(8-byte little-endian header length, JSON header, data), not by the code under test.
"""
import json
import pathlib
import struct

OUT = pathlib.Path(__file__).resolve().parent / "corpus" / "safetensors"


def image(header, data=b"", pad=True, length=None):
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    n = len(text) if length is None else length
    return struct.pack("<Q", n) + text + data


def tensor(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


SEEDS = {
    # Valid.
    "valid_empty": image({}),
    "valid_one_f32": image({"w": tensor("F32", [2], 0, 8)}, struct.pack("<2f", 1.0, -2.0)),
    "valid_mixed": image(
        {
            "__metadata__": {"format": "pt", "note": "tiny"},
            "a": tensor("F16", [2, 2], 0, 8),
            "b": tensor("BF16", [3], 8, 14),
            "s": tensor("I32", [], 14, 18),
            "e": tensor("F32", [0, 4], 18, 18),
            "f": tensor("BOOL", [2], 18, 20),
        },
        bytes(range(20)),
    ),
    "valid_unpadded_unsorted": image(
        {"y": tensor("I8", [1], 4, 5), "x": tensor("U8", [4], 0, 4)}, b"abcde", pad=False),
    # Invalid.
    "invalid_short": b"\x10\x00\x00",
    "invalid_length_past_end": image({"w": tensor("F32", [2], 0, 8)}, length=1 << 40),
    "invalid_bad_json": image(b'{"w":{"dtype":"F32","shape":[2]', pad=False),
    "invalid_not_object": image(b"[1,2,3]"),
    "invalid_overlap": image(
        {"a": tensor("F32", [2], 0, 8), "b": tensor("F32", [2], 4, 12)}, bytes(12)),
    "invalid_duplicate_key": image(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)),
    "invalid_negative_dim": image({"a": tensor("F32", [-1], 0, 4)}, bytes(4)),
    "invalid_overflow": image({"a": tensor("F32", [1 << 62, 1 << 62], 0, 4)}, bytes(4)),
    "invalid_unknown_dtype": image({"a": tensor("F8_E4M3", [4], 0, 4)}, bytes(4)),
    "invalid_size_mismatch": image({"a": tensor("F32", [3], 0, 8)}, bytes(8)),
    "invalid_metadata_value": image({"__metadata__": {"step": 3}}),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {len(SEEDS)} seeds to {OUT}")


if __name__ == "__main__":
    main()
