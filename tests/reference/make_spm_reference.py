#!/usr/bin/env python3
"""Builds an independent check for the SentencePiece-style (Llama 2) tokenizer path, for which no
real Llama 2 GGUF is at hand:
  1. trains a tiny SentencePiece BPE model (sentencepiece package, byte_fallback=True, Llama 2's
     normalization: identity, no whitespace collapsing, dummy-prefix space) on generated text;
  2. writes its vocabulary as a tokenizer-only GGUF, tests/data/tokenizer/spm_tiny.gguf
     (tokenizer.ggml.model = "llama", tokens, scores, token_type, bos/eos/unk ids, Llama 2's chat
     template, no tensors);
  3. records SentencePiece's own encodings of a corpus in tests/data/tokenizer/spm_reference.json.

Conventions recorded (llama.cpp's): "ids" is sp.encode(text) -- SentencePiece adds the "\u2581"
dummy prefix, as llama.cpp and HF do for Llama 2. "ids_special" parses <s> and </s> in the text:
each piece of text between special tokens is encoded on its own (so it gets its own dummy prefix,
as llama.cpp does after a special token). "decoded" is sp.decode(ids) (which drops the dummy
prefix space).

Regenerate:
  /root/.cache/deft/venv-ref/bin/python tests/reference/make_spm_reference.py
"""
import io
import json
import os
import random
import sys

import gguf
import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tokenizer_reference import LLAMA2_TEMPLATE  # noqa: E402
from tokenizer_corpus import STRINGS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "../data/tokenizer")

WORDS = ("the of and to in is was for that with as on by at from his her it an were are which "
         "this be or has had not but first one their its new after who they have two been other "
         "when there all during into school time may years more most only over city some world "
         "would where later up such used many can state about national out known university "
         "united then made system between however including well also team number game music "
         "don't it's you're I'm we'll they've hello world tokenizer language model piece byte "
         "Llama Sentence Piece café naïve über résumé").split()
EXTRA = ["x = f(y) + 42;", "if (a < b) { return c; }", "  two spaces", "tab\there", "1999 2024 3.14",
         "email: someone@example.org", "Hello, World!", "Mr. Smith's dog.", "(parenthesised)"]


def training_text(seed=1234, n=3000):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 99999)))
        line = " ".join(words)
        if rng.random() < 0.2:
            line = line.capitalize() + "."
        lines.append(line)
    lines.extend(EXTRA * 20)
    return lines


def main():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=model, model_type="bpe",
        vocab_size=600, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)

    gguf_path = os.path.join(DATA, "spm_tiny.gguf")
    w = gguf.GGUFWriter(gguf_path, arch="llama")
    w.add_name("spm-tiny (test vocabulary from tests/reference/make_spm_reference.py)")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_chat_template(LLAMA2_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    corpus = list(STRINGS) + [
        "<s>", "</s>", "<unk>", "<s>hello</s>", "a</s>b", "</s> x", "hello<s> world",
        "  two spaces", "the  model   has    spaces", " leading", "trailing ", "café naïve",
        "unseen: 你好 👋 ∑ ∫", "Ω", "\n", "don't it's you're", "x = f(y) + 42;",
        # equal-score pairs ("ll" + "l"): the leftmost merges first
        "lll", "lllll", "a llll b",
    ]
    special = {"<s>": sp.bos_id(), "</s>": sp.eos_id()}

    def encode_special(text):
        out, start, i = [], 0, 0
        while i < len(text):
            hit = next((t for t in special if text.startswith(t, i)), None)
            if hit is None:
                i += 1
                continue
            if i > start:
                out += sp.encode(text[start:i])
            out.append(special[hit])
            i += len(hit)
            start = i
        if start < len(text):
            out += sp.encode(text[start:])
        return out

    cases = []
    for s in corpus:
        ids = sp.encode(s)
        cases.append({"text": s, "ids": ids, "ids_special": encode_special(s),
                      "pieces": [sp.id_to_piece(i) for i in ids], "decoded": sp.decode(ids)})
    out = {
        "generator": "tests/reference/make_spm_reference.py",
        "sentencepiece": spm.__version__,
        "vocab_size": sp.get_piece_size(),
        "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(),
        "cases": cases,
    }
    json_path = os.path.join(DATA, "spm_reference.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {gguf_path} ({os.path.getsize(gguf_path)} bytes) and {json_path}: "
          f"{len(cases)} strings")


if __name__ == "__main__":
    main()
