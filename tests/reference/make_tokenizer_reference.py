#!/usr/bin/env python3
"""Writes tests/data/tokenizer/smollm2_reference.json: Hugging Face's tokenization of a tricky
corpus (tokenizer_corpus.py) with the tokenizer transformers builds FROM THE SAME GGUF the engine
loads, plus pre-tokenizer splits and rendered chat templates. tests/engine/tokenizer_test.cc
checks the C++ tokenizer against it.

Regenerate (needs transformers, tokenizers, gguf; the venv at /root/.cache/deft/venv-ref has them):
  /root/.cache/deft/venv-ref/bin/python tests/reference/make_tokenizer_reference.py \
      --model /root/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf

Digits. SmolLM2's own tokenizer.json pre-tokenizes with Sequence[Digits(individual_digits=True),
ByteLevel], and llama.cpp does the same for tokenizer.ggml.pre = "smollm" (each \\p{N} split off
first). transformers' GGUF loader does not know "smollm" and falls back to plain ByteLevel, which
differs where a space or space run precedes a number (" 1", "  42", " ²"). "ids" below use the
GGUF-loaded tokenizer with SmolLM2's pre-tokenizer restored -- the tokenization the model was
trained with; "ids_transformers_gguf" records the loader's own output wherever it differs.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import tokenizers
import transformers
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_corpus import CONVERSATIONS, STRINGS  # noqa: E402

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Chat templates of other model families (from their tokenizer_config.json), rendered with HF's
# Jinja environment for tests of the C++ renderer.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
LLAMA2_TEMPLATE = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    r"{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    r"{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    r"{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    r"{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    r"{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    r"{% endif %}{% endfor %}")

OTHER_TEMPLATES = [
    ("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    ("llama3.1", LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    ("llama2", LLAMA2_TEMPLATE, "<s>", "</s>"),
]


def render(template, messages, add_generation_prompt, bos, eos):
    if not messages:  # as transformers' apply_chat_template
        return {"error": "Cannot apply chat template to an empty conversation."}
    try:
        out = render_jinja_template(conversations=[messages], chat_template=template,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=bos, eos_token=eos)
    except Exception as e:  # the template rejects the conversation
        return {"error": str(e)}
    if isinstance(out, tuple):
        out = out[0]
    if isinstance(out, list):
        out = out[0]
    return {"text": out}


def byte_decoder():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/root/.cache/deft/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                  "../data/tokenizer/smollm2_reference.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        name = os.path.basename(args.model)
        os.symlink(os.path.abspath(args.model), os.path.join(d, name))
        loader_tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])

    def encode(t, text, parse_special):
        return t.encode(text, add_special_tokens=False, split_special_tokens=not parse_special)

    dec = byte_decoder()

    def unbyte(piece):
        return bytes(dec[c] for c in piece).decode("utf-8")

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    llama3 = pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated")

    cases = []
    n_loader_diff = 0
    for s in STRINGS:
        ids = encode(tok, s, False)
        ids_special = encode(tok, s, True)
        case = {
            "text": s,
            "ids": ids,
            "ids_special": ids_special,
            # False where the vocabulary has no token for some byte (SmolLM2 lacks e.g. 0x04 and
            # the 0xF1/0xF2 lead bytes): HF drops such bytes.
            "round_trip": tok.decode(ids, skip_special_tokens=False) == s,
            "pre_gpt2": [unbyte(p) for p, _ in gpt2.pre_tokenize_str(s)],
            "pre_smollm": [unbyte(p) for p, _ in smollm.pre_tokenize_str(s)],
            "pre_llama3": [p for p, _ in llama3.pre_tokenize_str(s)],
        }
        loader_ids = encode(loader_tok, s, False)
        if loader_ids != ids:
            case["ids_transformers_gguf"] = loader_ids
            n_loader_diff += 1
        cases.append(case)

    chats = []
    for messages, gen in CONVERSATIONS:
        chat = {"messages": messages, "add_generation_prompt": gen}
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            chat.update({"text": text, "ids": encode(tok, text, True)})
        except ValueError as e:  # an empty conversation
            chat["error"] = str(e)
        chats.append(chat)

    others = []
    for kind, template, bos, eos in OTHER_TEMPLATES:
        renders = []
        for messages, gen in CONVERSATIONS:
            r = render(template, messages, gen, bos, eos)
            r.update({"messages": messages, "add_generation_prompt": gen})
            renders.append(r)
        others.append({"kind": kind, "template": template, "bos_token": bos, "eos_token": eos,
                       "renders": renders})

    out = {
        "generator": "tests/reference/make_tokenizer_reference.py",
        "model": os.path.basename(args.model),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "hf_adds_bos": tok("a")["input_ids"][0] == tok.bos_token_id,
        "special_ids": sorted(tok.all_special_ids),
        "cases": cases,
        "chat": chats,
        "other_chat_templates": others,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} strings ({n_loader_diff} where transformers' GGUF "
          f"loader splits digits differently), {len(chats)} conversations")


if __name__ == "__main__":
    main()
