#!/usr/bin/env python3
"""Writes the dequantization test vectors read by tests/engine/dequant_test.cc.

The expected values come from an implementation independent of ours: the `gguf` Python package
(gguf.quants.dequantize, numpy), applied to random block bytes. Two types gguf-python cannot
dequantize get a reference built from pieces it does have, or from the format's one-line formula:
  Q8_1: the Q8_0 layout plus an extra fp16 `s` field after `d`; we drop `s` and dequantize as Q8_0.
  Q8_K: gguf-python has no dequantizer; y = d (fp32) * qs (int8), computed here with numpy.
  (gguf-python's size table still lists the old 40-byte Q8_1; ggml-common.h's block_q8_1 is 36
  bytes: two fp16 and 32 int8.)

Regenerate (deterministic; the output only changes if this script or gguf-python changes):
  /root/.cache/deft/venv-ref/bin/python tests/reference/make_dequant_vectors.py \
      [--model ~/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf] [--out tests/data/dequant]
(any venv with `pip install gguf numpy` works).

Files (all little-endian):
  <TYPE>.bin        b"DQV1" | u32 type id | u32 n_elements | u32 n_bytes | n_bytes block bytes
                    | n_elements f32 expected values
  model_rows.bin    b"DQR1" | u64 model file size | u32 n_rows, then per row:
                    u32 name length | name | u32 type id | u32 row index | u32 row length
                    | row length f32 expected values
"""

import argparse
import os
import struct

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

SEED = 20250207

# type -> (block elements, block bytes, byte offsets of fp16 scale fields, number of blocks)
BLOCK_TYPES = {
    T.Q4_0: (32, 18, [0], 8),
    T.Q4_1: (32, 20, [0, 2], 8),
    T.Q5_0: (32, 22, [0], 8),
    T.Q5_1: (32, 24, [0, 2], 8),
    T.Q8_0: (32, 34, [0], 8),
    T.Q8_1: (32, 36, [0, 2], 8),
    T.Q2_K: (256, 84, [80, 82], 3),
    T.Q3_K: (256, 110, [108], 3),
    T.Q4_K: (256, 144, [0, 2], 3),
    T.Q5_K: (256, 176, [0, 2], 3),
    T.Q6_K: (256, 210, [208], 3),
    T.Q8_K: (256, 292, [], 3),  # its scale is an fp32 at offset 0, set below
}

# Values kept in the model-row file: (tensor name, row indices).
MODEL_ROWS = [
    ("token_embd.weight", [0, 1, 30000, 49151]),
    ("blk.0.attn_q.weight", [0, 1, 575]),
    ("blk.29.ffn_down.weight", [575]),
    ("blk.0.attn_norm.weight", [0]),
    ("output_norm.weight", [0]),
]


def random_scales(rng, n):
    """Finite fp16 values of moderate size, both signs, including a few exact small ones."""
    mags = np.exp2(rng.uniform(-12.0, 2.0, size=n))
    vals = (mags * rng.choice([-1.0, 1.0], size=n)).astype(np.float16)
    vals[rng.random(n) < 0.1] = np.float16(0.0)
    return vals


def make_blocks(rng, qtype):
    elems, nbytes, half_offsets, nblocks = BLOCK_TYPES[qtype]
    blocks = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    for off in half_offsets:
        blocks[:, off:off + 2] = random_scales(rng, nblocks).view(np.uint8).reshape(nblocks, 2)
    if qtype == T.Q8_K:
        d = (rng.uniform(-1.0, 1.0, size=nblocks) * 1e-2).astype(np.float32)
        blocks[:, 0:4] = d.view(np.uint8).reshape(nblocks, 4)
    return blocks


def reference(qtype, blocks):
    if qtype == T.Q8_1:
        as_q8_0 = np.concatenate([blocks[:, 0:2], blocks[:, 4:]], axis=1)
        return dequantize(as_q8_0.reshape(-1), T.Q8_0)
    if qtype == T.Q8_K:
        d = blocks[:, 0:4].copy().view(np.float32)  # (nblocks, 1)
        qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
        return (d * qs).reshape(-1)
    return dequantize(blocks.reshape(-1), qtype)


def special_half_bits():
    # zeros, smallest/largest subnormal, smallest normal, one, max finite, inf, quiet and
    # signalling nans with payloads, for both signs.
    base = [0x0000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0x7E00, 0x7C01, 0x7FFF]
    return np.array(base + [b | 0x8000 for b in base], dtype=np.uint16)


def special_bf16_bits():
    base = [0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0x7F80, 0x7FC0, 0x7F81, 0x7FFF]
    return np.array(base + [b | 0x8000 for b in base], dtype=np.uint16)


def write_vector(path, type_id, raw, expected):
    expected = np.ascontiguousarray(expected, dtype=np.float32).reshape(-1)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    with open(path, "wb") as f:
        f.write(b"DQV1")
        f.write(struct.pack("<III", type_id, expected.size, raw.size))
        f.write(raw.tobytes())
        f.write(expected.astype("<f4").tobytes())


def write_type_vectors(rng, out_dir):
    written = []
    # F32: random finite values; the reference is the bytes themselves.
    f32 = rng.standard_normal(64).astype(np.float32)
    write_vector(os.path.join(out_dir, "F32.bin"), int(T.F32), f32.view(np.uint8),
                 dequantize(f32.view(np.uint8), T.F32))
    written.append("F32")
    # F16 / BF16: random bit patterns (every class shows up: subnormals, nan, inf) + specials.
    for qtype, specials in ((T.F16, special_half_bits()), (T.BF16, special_bf16_bits())):
        bits = np.concatenate([specials, rng.integers(0, 1 << 16, size=492, dtype=np.uint16)])
        raw = bits.astype("<u2").view(np.uint8)
        write_vector(os.path.join(out_dir, f"{qtype.name}.bin"), int(qtype), raw,
                     dequantize(raw, qtype))
        written.append(qtype.name)
    for qtype in BLOCK_TYPES:
        blocks = make_blocks(rng, qtype)
        expected = reference(qtype, blocks)
        assert np.all(np.isfinite(expected)), qtype.name
        write_vector(os.path.join(out_dir, f"{qtype.name}.bin"), int(qtype), blocks, expected)
        written.append(qtype.name)
    return written


def write_model_rows(model_path, out_dir):
    reader = GGUFReader(model_path)
    tensors = {t.name: t for t in reader.tensors}
    entries = []
    for name, rows in MODEL_ROWS:
        t = tensors[name]
        row_len = int(t.shape[0])
        data = np.asarray(t.data)
        n_rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        data = data.reshape(n_rows, -1)
        for r in rows:
            # The reader types F32/F16 rows as floats and block rows as bytes; hand over bytes.
            row = dequantize(np.ascontiguousarray(data[r]).view(np.uint8), t.tensor_type)
            assert row.size == row_len, (name, row.size, row_len)
            entries.append((name, int(t.tensor_type), r, row.astype(np.float32)))
    path = os.path.join(out_dir, "model_rows.bin")
    with open(path, "wb") as f:
        f.write(b"DQR1")
        f.write(struct.pack("<QI", os.path.getsize(model_path), len(entries)))
        for name, type_id, r, row in entries:
            encoded = name.encode()
            f.write(struct.pack("<I", len(encoded)))
            f.write(encoded)
            f.write(struct.pack("<III", type_id, r, row.size))
            f.write(row.astype("<f4").tobytes())
    return [f"{name}[{r}] ({T(type_id).name})" for name, type_id, r, _ in entries]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "data", "dequant"))
    parser.add_argument("--model", default=os.path.expanduser(
        "~/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    print("types:", ", ".join(write_type_vectors(rng, args.out)))
    print("model rows:", ", ".join(write_model_rows(args.model, args.out)))


if __name__ == "__main__":
    main()
