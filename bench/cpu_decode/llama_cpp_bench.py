#!/usr/bin/env python3
"""llama.cpp's side of bench/cpu_decode: prefill and single-sequence greedy decode throughput.

    python llama_cpp_bench.py --model M [--prompt-ids FILE | --prompt-tokens N] [--gen-tokens 128]
                              [--threads T] [--repeats 5] [--flash-attn auto|on|off]

Measures what build/bin/cpu_decode measures, with the same definitions, so run.sh can put the two
side by side:
- Prefill: the whole prompt decoded into an empty KV cache (one llama_decode per --batch ids;
  with the default batch that is one call for prompts up to 512 ids), logits for the last id only.
  prefill_tok_s = n_prompt / seconds.
- Decode: after the prefill, --gen-tokens steps, each the argmax of the last logits fed back as a
  one-token llama_decode. decode_tok_s = n_gen / seconds (the argmax, ~20 us, is inside the time).
- One warm-up run, then the median over --repeats runs; the KV cache is cleared between runs.
It calls llama.cpp through llama-cpp-python's low-level bindings (llama_decode on a prepared
llama_batch), so the time is llama.cpp's compute, not Python sampling. Prints one JSON line.
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import llama_cpp
import numpy as np

# A fixed English text, repeated to the requested length when no --prompt-ids file is given.
kFallbackText = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels; later, stored programs let the same hardware run any algorithm. ")

kFlashAttn = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def read_prompt_ids(path):
  with open(path) as f:
    return [int(tok) for tok in f.read().split()]


def tokenize(vocab, text):
  data = text.encode("utf-8")
  buf = (llama_cpp.llama_token * (len(data) + 8))()
  n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), False, False)
  if n < 0:
    raise RuntimeError("llama_tokenize failed")
  return list(buf[:n])


class Batch:
  """A llama_batch of one sequence; REQUIRES: len(ids) <= capacity."""

  def __init__(self, capacity):
    self.capacity = capacity
    self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)

  def fill(self, ids, first_pos):
    assert len(ids) <= self.capacity
    b = self.raw
    b.n_tokens = len(ids)
    for i, tok in enumerate(ids):
      b.token[i] = tok
      b.pos[i] = first_pos + i
      b.n_seq_id[i] = 1
      b.seq_id[i][0] = 0
      b.logits[i] = i == len(ids) - 1

  def free(self):
    llama_cpp.llama_batch_free(self.raw)


class Runner:
  def __init__(self, args, n_ctx):
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    self.model = llama_cpp.llama_model_load_from_file(args.model.encode(), mparams)
    if not self.model:
      raise RuntimeError(f"cannot load {args.model}")
    self.vocab = llama_cpp.llama_model_get_vocab(self.model)
    self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = args.batch
    cparams.n_ubatch = args.batch
    cparams.n_seq_max = 1
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    cparams.flash_attn_type = kFlashAttn[args.flash_attn]
    cparams.no_perf = True
    self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
    if not self.ctx:
      raise RuntimeError("cannot create llama context")
    self.batch_size = args.batch
    self.type_k = int(cparams.type_k)

  def clear_cache(self):
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

  def decode(self, batch):
    rc = llama_cpp.llama_decode(self.ctx, batch.raw)
    if rc != 0:
      raise RuntimeError(f"llama_decode returned {rc}")

  def argmax_last(self):
    ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

  def close(self):
    llama_cpp.llama_free(self.ctx)
    llama_cpp.llama_model_free(self.model)


def run_once(runner, prompt_batches, step_batch, n_prompt, n_gen):
  """One prefill + n_gen decode steps; returns (prefill seconds, decode seconds, generated ids)."""
  runner.clear_cache()
  t0 = time.perf_counter()
  for batch in prompt_batches:
    runner.decode(batch)
  llama_cpp.llama_synchronize(runner.ctx)
  t1 = time.perf_counter()
  generated = []
  for g in range(n_gen):
    token = runner.argmax_last()
    generated.append(token)
    step_batch.fill([token], n_prompt + g)
    runner.decode(step_batch)
  llama_cpp.llama_synchronize(runner.ctx)
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1, generated


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=os.path.expanduser(
      "~/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
  parser.add_argument("--prompt-ids", help="file of whitespace-separated token ids")
  parser.add_argument("--prompt-tokens", type=int, default=512,
                      help="prompt length when --prompt-ids is not given")
  parser.add_argument("--gen-tokens", type=int, default=128)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=512,
                      help="n_batch = n_ubatch: prompt ids per llama_decode call")
  parser.add_argument("--flash-attn", choices=sorted(kFlashAttn), default="auto")
  parser.add_argument("--verbose", action="store_true", help="keep llama.cpp's own log")
  args = parser.parse_args()
  if args.gen_tokens < 1 or args.repeats < 1 or args.threads < 1 or args.batch < 1:
    parser.error("--gen-tokens, --repeats, --threads and --batch must be positive")

  if not args.verbose:
    # Kept referenced for the process lifetime: llama.cpp holds the pointer.
    main.quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(main.quiet, ctypes.c_void_p())

  prompt = read_prompt_ids(args.prompt_ids) if args.prompt_ids else None
  n_prompt = len(prompt) if prompt is not None else args.prompt_tokens
  if n_prompt < 1:
    parser.error("empty prompt")
  n_ctx = -(-(n_prompt + args.gen_tokens + 1) // 256) * 256
  runner = Runner(args, n_ctx)
  if prompt is None:
    chunk = tokenize(runner.vocab, kFallbackText)
    prompt = (chunk * (n_prompt // len(chunk) + 1))[:n_prompt]
  bad = [t for t in prompt if not 0 <= t < runner.n_vocab]
  if bad:
    parser.error(f"prompt ids outside [0, {runner.n_vocab}): {bad[:5]}")

  prompt_batches = []
  for start in range(0, n_prompt, args.batch):
    batch = Batch(args.batch)
    ids = prompt[start:start + args.batch]
    batch.fill(ids, start)
    batch.raw.logits[len(ids) - 1] = start + len(ids) == n_prompt
    prompt_batches.append(batch)
  step_batch = Batch(1)

  load_before = os.getloadavg()[0]
  prefill_s, decode_s = [], []
  for r in range(args.repeats + 1):
    p, d, generated = run_once(runner, prompt_batches, step_batch, n_prompt, args.gen_tokens)
    if r > 0:  # r == 0 is the warm-up
      prefill_s.append(p)
      decode_s.append(d)

  result = {
      "engine": "llama.cpp",
      "prefill_tok_s": round(n_prompt / statistics.median(prefill_s), 2),
      "decode_tok_s": round(args.gen_tokens / statistics.median(decode_s), 2),
      "n_prompt": n_prompt,
      "n_gen": args.gen_tokens,
      "threads": args.threads,
      "repeats": args.repeats,
      "llama_cpp_python": llama_cpp.__version__,
      "n_batch": args.batch,
      "flash_attn": args.flash_attn,
      "kv_type": llama_cpp.GGML_TYPE_F16 == runner.type_k and "f16" or str(runner.type_k),
      "cpu_features": llama_cpp.llama_print_system_info().decode().strip(),
      "gen_ids_head": generated[:16],
      # Other processes on the machine skew the numbers, decode most: keep the load with them.
      "loadavg_1m_before": round(load_before, 2),
  }
  for b in prompt_batches + [step_batch]:
    b.free()
  runner.close()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
