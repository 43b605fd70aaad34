#!/usr/bin/env python3
"""Writes the model-correctness reference data that the engine's end-to-end tests compare against.

Regenerate (from the repository root; takes about a minute on 2 CPU cores):

    python3 -m venv ~/.cache/deft/venv-ref
    ~/.cache/deft/venv-ref/bin/pip install torch transformers gguf numpy accelerate
    ~/.cache/deft/venv-ref/bin/python tests/reference/make_model_reference.py \
        --model ~/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/data/model

What it promises (the tests rely on each point):
- The reference is Hugging Face transformers on CPU, loading the SAME GGUF file the engine loads
  (transformers dequantizes every tensor to float32), running float32 math with eager attention.
  Before trusting it, the script checks that transformers' weights equal gguf-py's own
  dequantization of the file, with the Q/K rows un-permuted (llama.cpp's converter permutes
  attn_q/attn_k rows for its rope layout; transformers reverses that on load).
  If transformers cannot load the file, or with --backend llama_cpp, llama-cpp-python
  (logits_all=True) is the reference instead; reference.json says which under "backend".
- Token ids are what the reference tokenizer gives by default (reference.json's
  tokenizer.adds_bos says whether a BOS id was prepended; for this model it is not), with one
  repair: transformers' GGUF tokenizer converter drops the model's digit pre-split (GGUF
  tokenizer.ggml.pre "smollm": every digit is its own pre-token before the GPT-2 split), which
  changes the ids of whitespace runs before digits ("  12", "\t\t0"). The script restores
  Sequence[Digits(individual), ByteLevel]; the result matches llama.cpp's tokenizer on every
  prompt here. Where transformers' unrepaired ids differ, a prompt also lists them under
  hf_gguf_default_ids. tokenizer_cases holds extra tokenizer-only strings and their ids.
- Logits: for each prompt, the full next-token logits (vocab_size float32) after a single forward
  pass over the whole prompt, at prompt positions [0, n // 2, n - 1] (deduplicated, ascending).
  "Logits at position p" are the scores for the token that follows ids[p]. They are stored
  back to back in logits.bin as raw little-endian float32; each entry's offset_bytes says where.
- Continuation: 64 greedily generated token ids (argmax, no sampling, no repetition penalty, no
  logits processors), generation does NOT stop at EOS and EOS is not suppressed: if the argmax is
  EOS it is recorded and generation goes on. continuation_top1_gap[i] is the logit gap between the
  best and second-best token at step i (small gaps mark steps where a correct engine may
  legitimately pick the other token).

Measured against llama.cpp (llama-cpp-python 0.3.36 via --backend llama_cpp; Q8 activations, f16
KV cache) on these prompts: same ids everywhere, same argmax at every recorded position, logits
max |diff| 0.91 and NMSE at most 3.2e-3; its greedy continuations leave this one only at steps
whose reference top-1 gap is 0.26 or less. An engine with llama.cpp-style quantized math should
expect differences of that size; compare continuations up to the first small-gap step.
"""

import argparse
import hashlib
import json
import os
import platform
import sys

import numpy as np

# 7 prompts x at most 3 positions x 49152 float32: logits.bin stays under 4 MB.
kContinuationTokens = 64
kTopK = 5


def long_prompt_text():
  """A deterministic English text of well over 500 tokens: one paragraph, varied per round."""
  towns = ["Ashford", "Bellmere", "Corrin", "Dunmore", "Elsby", "Farrow", "Glenhaven", "Harwick"]
  goods = ["wool", "salt", "timber", "copper", "barley", "linen", "honey", "slate"]
  seasons = ["spring", "summer", "autumn", "winter"]
  parts = ["The old road ran along the river for many miles before it turned toward the hills."]
  for i, town in enumerate(towns):
    good = goods[(i * 3) % len(goods)]
    season = seasons[i % len(seasons)]
    parts.append(
        f"In {season}, the carters of {town} brought {good} down to the market at the ford, "
        f"where traders weighed each load twice and wrote the numbers in a ledger that was kept "
        f"for {i + 3} generations. The children of {town} learned to read from those ledgers, "
        f"and many of them could recite the price of {good} in every year since the bridge was "
        f"built. When the river flooded, as it did in the {i + 2}th year of the old king, the "
        f"people of {town} carried their books up to the chapel on the hill and waited there "
        f"until the water went down.")
  parts.append("Nobody now remembers who first walked that road, but everyone still uses it.")
  return " ".join(parts)


def prompt_specs():
  """(name, kind, text or chat messages). Kinds are what the prompt exercises."""
  code = ('def fibonacci(n: int) -> list[int]:\n'
          '    """Return the first n Fibonacci numbers."""\n'
          '    result = [0, 1]\n'
          '    while len(result) < n:\n'
          '        result.append(result[-1] + result[-2])\n'
          '    return result[:n]\n'
          '\n'
          '\n'
          'if __name__ == "__main__":\n'
          '    print(fibonacci(10))\n')
  return [
      ("short_english", "text", "The capital of France is"),
      ("long_english", "text", long_prompt_text()),
      ("unicode", "text",
       "Café, naïve façade, Ærøskøbing and São Paulo. 東京で寿司を食べました。我爱编程！"
       " 한국어도 조금 합니다. Emoji: 🚀🎉👍🏽 and ∑∫√∞ ≠ ≈."),
      ("python_code", "text", code),
      ("chat", "chat", [{"role": "user",
                          "content": "What is the capital of France? Answer in one sentence."}]),
      ("digits_whitespace", "text",
       "Invoice 2024-0042\n\nItem      Qty    Price\nBolts      12     3.50\nNuts      144\t\t0.07\n"
       "\n\nTotal:"),
      ("single_token", "text", "Hello"),
  ]


def sha256_of(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def gguf_summary(path):
  """The file's tensor types and the header fields the checks need; (None, {}) without gguf-py."""
  try:
    import gguf
  except ImportError:  # The llama-cpp-python fallback can run without gguf-py.
    return None, {}
  reader = gguf.GGUFReader(path)
  types = {}
  for t in reader.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
  def field(name):
    f = reader.fields.get(name)
    return None if f is None else f.contents()
  return reader, {
      "tensor_types": types,
      "n_tensors": len(reader.tensors),
      "has_output_weight": any(t.name == "output.weight" for t in reader.tensors),
      "tokenizer.ggml.add_bos_token": field("tokenizer.ggml.add_bos_token"),
      "tokenizer.ggml.pre": field("tokenizer.ggml.pre"),
      "n_head": field("llama.attention.head_count"),
      "n_head_kv": field("llama.attention.head_count_kv"),
  }


def llama_cpp_rope_permute(w, n_head):
  """The row permutation llama.cpp's converter applies to attn_q/attn_k (HF layout -> GGUF).

  w: [n_head * head_dim, in]. HF rotates pairs (i, i + head_dim/2); GGUF rotates (2i, 2i + 1).
  """
  rows, cols = w.shape
  return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def check_hf_weights(model, reader, info):
  """Compares transformers' fp32 weights with gguf-py's dequantization of the same tensors."""
  from gguf.quants import dequantize
  tensors = {t.name: t for t in reader.tensors}
  layer = model.model.layers[0]
  cases = [
      ("token_embd.weight", model.model.embed_tokens.weight, None),
      ("blk.0.attn_q.weight", layer.self_attn.q_proj.weight, info["n_head"]),
      ("blk.0.attn_k.weight", layer.self_attn.k_proj.weight, info["n_head_kv"]),
      ("blk.0.attn_v.weight", layer.self_attn.v_proj.weight, None),
      ("blk.0.ffn_down.weight", layer.mlp.down_proj.weight, None),
      ("blk.0.attn_norm.weight", layer.input_layernorm.weight, None),
  ]
  results = {}
  for name, param, permute_heads in cases:
    t = tensors[name]
    ours = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(param.shape)
    hf = param.detach().numpy()
    if permute_heads is not None:
      hf_as_gguf = llama_cpp_rope_permute(hf, permute_heads)
      results[name] = {
          "type": t.tensor_type.name,
          "max_abs_diff_unpermuted": float(np.abs(hf_as_gguf - ours).max()),
          "max_abs_diff_without_unpermute": float(np.abs(hf - ours).max()),
      }
      ok = results[name]["max_abs_diff_unpermuted"] == 0.0
    else:
      results[name] = {"type": t.tensor_type.name, "max_abs_diff": float(np.abs(hf - ours).max())}
      ok = results[name]["max_abs_diff"] == 0.0
    if not ok:
      raise RuntimeError(f"transformers' {name} differs from gguf-py dequantization: "
                         f"{results[name]}")
  results["lm_head_tied_to_embed_tokens"] = bool(
      model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
  return results


def repair_pre_tokenizer(tokenizer, gguf_pre):
  """Restores the digit pre-split that transformers' GGUF converter leaves out; returns a note."""
  from tokenizers import pre_tokenizers
  current = json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]
  if gguf_pre != "smollm" or current.get("type") != "ByteLevel":
    return None
  tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  return ("transformers built pre_tokenizer ByteLevel(use_regex) for GGUF pre 'smollm'; replaced "
          "with Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, "
          "use_regex=True)], as in the model's original tokenizer and llama.cpp")


# Tokenizer-only strings: whitespace runs around digits, specials, mixed scripts.
kTokenizerCases = [
    "Hello world", "  leading spaces", "trailing   ", "a\n\n\nb", "x = 1_000_000 + 3.5e-7",
    "   123   456\t\t789\n\n  0", "I'm you're we'll they'd IT'S", "naïve café 東京 🚀👍🏽",
    "def f(x):\n\treturn x**2\n", "<|im_start|>user\nhi<|im_end|>\n", "ΑΒΓ абв ÆØÅ",
    "\r\n\r\n", "2024-11-23T22:10:07Z", "  \t \n  x", "hello<|endoftext|>world",
]


class HfReference:
  """transformers on CPU, float32, eager attention."""

  def __init__(self, model_path, reader, info, threads):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(threads)
    self.torch = torch
    directory, fname = os.path.split(os.path.abspath(model_path))
    self.tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    self.default_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    self.pre_tokenizer_repair = repair_pre_tokenizer(self.tokenizer, info.get("tokenizer.ggml.pre"))
    self.model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=fname, dtype=torch.float32, attn_implementation="eager")
    self.model.eval()
    dtypes = sorted({str(p.dtype) for p in self.model.parameters()})
    if dtypes != ["torch.float32"]:
      raise RuntimeError(f"expected float32 parameters only, got {dtypes}")
    self.weight_check = check_hf_weights(self.model, reader, info)
    self.vocab_size = self.model.config.vocab_size
    probe = self.tokenizer("Hello").input_ids
    self.adds_bos = bool(probe and probe[0] == self.tokenizer.bos_token_id)
    self.details = {
        "backend": "transformers",
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "hf_load": {
            "loader": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., "
                      "dtype=torch.float32, attn_implementation='eager')",
            "param_dtypes": dtypes,
            "attn_implementation": self.model.config._attn_implementation,
            "torch_num_threads": torch.get_num_threads(),
            "tie_word_embeddings": bool(self.model.config.tie_word_embeddings),
            "rope_theta": self.model.config.rope_parameters.get("rope_theta")
                          if hasattr(self.model.config, "rope_parameters") else None,
            "rms_norm_eps": self.model.config.rms_norm_eps,
            "weights_vs_gguf_dequantize": self.weight_check,
        },
    }

  def tokenize(self, text):
    return list(self.tokenizer(text).input_ids)

  def default_tokenize(self, text):
    """transformers' own ids, without repair_pre_tokenizer."""
    return list(self.default_tokenizer(text).input_ids)

  def render_chat(self, messages):
    return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

  def token_text(self, token_id):
    return self.tokenizer.convert_ids_to_tokens(int(token_id))

  def decode(self, ids):
    return self.tokenizer.decode(ids)

  def prompt_logits(self, ids):
    """[len(ids), vocab] float32 from one forward pass over the whole prompt."""
    with self.torch.no_grad():
      out = self.model(self.torch.tensor([ids]))
    return out.logits[0].float().numpy()

  def greedy(self, ids, n_new):
    """n_new greedy ids (no EOS stopping, no EOS suppression) and each step's raw logits."""
    # generate() fills unset (None) fields from model.generation_config, so EOS stopping is
    # switched off there; min_new_tokens=0 keeps EOS from being masked out.
    self.model.generation_config.eos_token_id = None
    with self.torch.no_grad():
      out = self.model.generate(
          self.torch.tensor([ids]), attention_mask=self.torch.ones(1, len(ids),
                                                                   dtype=self.torch.long),
          do_sample=False, num_beams=1, max_new_tokens=n_new, min_new_tokens=0,
          pad_token_id=self.tokenizer.eos_token_id, return_dict_in_generate=True,
          output_logits=True)
    new_ids = out.sequences[0, len(ids):].tolist()
    step_logits = np.stack([l[0].float().numpy() for l in out.logits])
    return new_ids, step_logits


class LlamaCppReference:
  """llama-cpp-python with logits_all=True: the fallback when transformers cannot load the file."""

  def __init__(self, model_path, threads):
    import llama_cpp
    self.llm = llama_cpp.Llama(model_path=model_path, n_ctx=2048, n_batch=2048,
                               n_threads=threads, n_threads_batch=threads, logits_all=True,
                               verbose=False)
    self.vocab_size = self.llm.n_vocab()
    self.adds_bos = bool(self.llm.tokenize(b"Hello", add_bos=True)[0] == self.llm.token_bos())
    self.details = {
        "backend": "llama_cpp_python",
        "versions": {"llama_cpp_python": llama_cpp.__version__},
        "llama_cpp": {"logits_all": True, "n_ctx": 2048, "n_threads": threads},
    }

  def tokenize(self, text):
    return self.llm.tokenize(text.encode("utf-8"), add_bos=self.adds_bos, special=True)

  def render_chat(self, messages):
    import jinja2
    template = self.llm.metadata["tokenizer.chat_template"]
    return jinja2.Environment().from_string(template).render(messages=messages,
                                                             add_generation_prompt=True)

  def token_text(self, token_id):
    return self.llm.detokenize([int(token_id)], special=True).decode("utf-8", "replace")

  def decode(self, ids):
    return self.llm.detokenize(ids, special=True).decode("utf-8", "replace")

  def prompt_logits(self, ids):
    self.llm.reset()
    self.llm.eval(ids)
    return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

  def greedy(self, ids, n_new):
    self.llm.reset()
    self.llm.eval(ids)
    new_ids, steps = [], []
    for _ in range(n_new):
      logits = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
      steps.append(logits)
      new_ids.append(int(np.argmax(logits)))
      self.llm.eval([new_ids[-1]])
    return new_ids, np.stack(steps)


def top_gap(logits):
  top2 = np.sort(logits)[-2:]
  return float(top2[1] - top2[0])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=os.path.expanduser(
      "~/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data",
                                                    "model"))
  parser.add_argument("--backend", choices=["auto", "transformers", "llama_cpp"], default="auto",
                      help="auto: transformers, falling back to llama-cpp-python if it fails")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()

  reader, info = gguf_summary(args.model)
  ref, fallback_reason = None, None
  if args.backend in ("auto", "transformers"):
    try:
      ref = HfReference(args.model, reader, info, args.threads)
    except Exception as e:  # Any failure to load or verify means transformers is not usable.
      if args.backend == "transformers":
        raise
      fallback_reason = f"{type(e).__name__}: {e}"
      print(f"transformers could not serve as reference ({fallback_reason}); "
            f"falling back to llama-cpp-python", file=sys.stderr)
  if ref is None:
    ref = LlamaCppReference(args.model, args.threads)

  os.makedirs(args.out, exist_ok=True)
  row_bytes = ref.vocab_size * 4
  prompts = []
  with open(os.path.join(args.out, "logits.bin"), "wb") as logits_file:
    offset = 0
    for name, kind, content in prompt_specs():
      entry = {"name": name, "kind": kind}
      if kind == "chat":
        entry["chat_messages"] = content
        text = ref.render_chat(content)
      else:
        text = content
      ids = ref.tokenize(text)
      n = len(ids)
      if name == "single_token" and n != 1:
        raise RuntimeError(f"single_token prompt tokenizes to {n} ids: {ids}")
      if name == "long_english" and n <= 500:
        raise RuntimeError(f"long prompt has only {n} tokens")
      entry.update({"text": text, "ids": ids, "n_tokens": n})
      if hasattr(ref, "default_tokenize") and ref.default_tokenize(text) != ids:
        entry["hf_gguf_default_ids"] = ref.default_tokenize(text)

      all_logits = ref.prompt_logits(ids)
      entry["logits"] = []
      for pos in sorted({0, n // 2, n - 1}):
        row = np.ascontiguousarray(all_logits[pos], dtype="<f4")
        assert row.shape == (ref.vocab_size,)
        logits_file.write(row.tobytes())
        top = np.argsort(-row, kind="stable")[:kTopK]
        entry["logits"].append({
            "position": pos, "offset_bytes": offset,
            "top5": [{"id": int(t), "token": ref.token_text(t), "logit": float(row[t])}
                     for t in top]})
        offset += row_bytes

      new_ids, step_logits = ref.greedy(ids, kContinuationTokens)
      if len(new_ids) != kContinuationTokens:
        raise RuntimeError(f"{name}: generated {len(new_ids)} tokens, wanted "
                           f"{kContinuationTokens}")
      if [int(np.argmax(s)) for s in step_logits] != new_ids:
        raise RuntimeError(f"{name}: generated ids are not the argmax of their step logits")
      # The first generated token must also be the argmax of the full-prompt forward pass.
      if int(np.argmax(all_logits[-1])) != new_ids[0]:
        raise RuntimeError(f"{name}: first generated id differs from the prompt pass's argmax")
      eos = getattr(getattr(ref, "tokenizer", None), "eos_token_id", None)
      if eos is None:
        eos = ref.llm.token_eos()
      entry.update({
          "continuation_ids": new_ids,
          "continuation_text": ref.decode(new_ids),
          "continuation_top1_gap": [round(top_gap(s), 5) for s in step_logits],
          "continuation_contains_eos": eos in new_ids,
      })
      prompts.append(entry)
      print(f"{name:18s} n={n:4d} next={ref.token_text(new_ids[0])!r} "
            f"min_gap={min(entry['continuation_top1_gap']):.4f} first_gap_under_0.1_at_step="
            f"{next((i for i, g in enumerate(entry['continuation_top1_gap']) if g < 0.1), None)}",
            file=sys.stderr)

  from importlib.metadata import PackageNotFoundError, version
  versions = dict(ref.details["versions"], python=platform.python_version(),
                  numpy=np.__version__)
  for package in ("gguf", "tokenizers"):
    try:
      versions[package] = version(package)
    except PackageNotFoundError:
      versions[package] = None
  details = dict(ref.details)
  details.pop("versions")
  reference = {
      "format_version": 1,
      "generator": "tests/reference/make_model_reference.py",
      "backend": ref.details["backend"],
      "fallback_reason": fallback_reason,
      "model": dict({"file": os.path.basename(args.model), "sha256": sha256_of(args.model),
                     "size_bytes": os.path.getsize(args.model)}, **info),
      "versions": versions,
      **details,
      "tokenizer": {
          "adds_bos": ref.adds_bos,
          "pre_tokenizer_repair": getattr(ref, "pre_tokenizer_repair", None),
          "note": "no BOS is prepended; special tokens in the text (<|im_start|>, <|im_end|>) "
                  "map to their single ids; the chat prompt's leading id 1 is <|im_start|> "
                  "from the template, not an added BOS",
      },
      "tokenizer_cases": [{"text": t, "ids": ref.tokenize(t)} for t in kTokenizerCases],
      "vocab_size": ref.vocab_size,
      "logits_file": "logits.bin",
      "logits_format": "raw little-endian float32, vocab_size values per recorded position, in "
                       "the order positions are listed (prompt by prompt); offset_bytes locates "
                       "each; logits at position p are computed from one forward pass over the "
                       "whole prompt and score the token after ids[p]",
      "logits_row_bytes": row_bytes,
      "generation": {
          "n_new_tokens": kContinuationTokens,
          "method": "greedy argmax (transformers generate: do_sample=False, num_beams=1, "
                    "eos_token_id=None, min_new_tokens=0, no logits processors) with KV cache",
          "eos": "not a stop condition and not suppressed; an argmax EOS is recorded and "
                 "generation continues",
          "continuation_top1_gap": "best minus second-best raw logit at each generation step",
      },
      "prompts": prompts,
  }
  with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as f:
    json.dump(reference, f, indent=1, ensure_ascii=False)
    f.write("\n")
  print(f"wrote {len(prompts)} prompts, {offset} bytes of logits to {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
