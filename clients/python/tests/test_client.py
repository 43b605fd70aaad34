"""deft-client against a live deft-server with the real model: every wrapper method, streamed
generation, cancellation, verify, beam search, and errors as DeftError with exact codes and
messages (unknown tree, bad arguments, invalid UTF-8, API keys, quotas)."""
import time

import grpc
import pytest

from deft_client import Branch, DeftClient, DeftError, Finish, Sampling, Token
from conftest import READONLY_KEY

PROMPT = "The oldest trees in the forest"


def collect(stream):
    """(tokens per node, text per node, finishes per node) of a generate stream."""
    tokens, text, finish = {}, {}, {}
    for e in stream:
        if isinstance(e, Token):
            if e.token_id >= 0:
                tokens.setdefault(e.node_id, []).append(e.token_id)
            text[e.node_id] = text.get(e.node_id, "") + e.text
        else:
            assert isinstance(e, Finish)
            assert e.node_id not in finish, "two finish events for one branch"
            finish[e.node_id] = e
    return tokens, text, finish


def expect_error(code, message, fn, *args, **kwargs):
    with pytest.raises(DeftError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    assert info.value.message == message


def test_health_and_model_info(client):
    assert client.health() == "SERVING"
    info = client.model_info()
    assert info.vocab_size == 49152
    assert info.backend == "cpu"
    assert info.kv_block_tokens == 16
    assert info.context_length == 8192
    assert info.end_of_generation_token_ids


def test_tokenize_round_trip(client):
    ids = client.tokenize("Hello, trees! 12 \u00e9\u4e16")
    assert len(ids) > 5
    assert client.detokenize(ids) == "Hello, trees! 12 \u00e9\u4e16"
    special = client.tokenize("<|im_start|>user", parse_special=True)
    assert special[0] == client.tokenize("<|im_start|>", parse_special=True)[0]
    assert len(special) < len(client.tokenize("<|im_start|>user"))


def test_tree_lifecycle(client):
    tree = client.create_tree(PROMPT)
    assert tree.prompt_tokens == len(client.tokenize(PROMPT))
    t = client.get_tree(tree.tree_id, include_text=True, include_tokens=True)
    assert [n.node_id for n in t.nodes] == [tree.root_node_id]
    assert t.nodes[0].num_tokens == tree.prompt_tokens
    assert t.nodes[0].text == PROMPT

    forked = client.fork(tree.tree_id, tree.root_node_id, tree.prompt_tokens, count=2)
    assert len(forked.node_ids) == 2
    assert forked.parent_node_id == tree.root_node_id
    a, b = forked.node_ids
    assert client.extend(tree.tree_id, a, " stand") == len(client.tokenize(" stand"))
    assert client.extend(tree.tree_id, b, tokens=[28, 29, 30]) == 3
    t = client.get_tree(tree.tree_id, include_tokens=True)
    assert len(t.nodes) == 3
    assert t.node(b).tokens == (28, 29, 30)
    assert t.node(a).parent_node_id == tree.root_node_id
    assert t.unique_tokens == tree.prompt_tokens + t.node(a).num_tokens + 3
    assert [(s.tree_id, s.nodes) for s in client.list_trees()] == [(tree.tree_id, 3)]

    client.prune(tree.tree_id, b)
    assert len(client.get_tree(tree.tree_id).nodes) == 2
    client.delete_tree(tree.tree_id)
    assert client.list_trees() == []
    expect_error(grpc.StatusCode.NOT_FOUND, f'tree "{tree.tree_id}" not found',
                 client.get_tree, tree.tree_id)


def test_chat_messages_use_the_template(client):
    tree = client.create_tree(messages=[("system", "Be brief."), ("user", "Name a tree.")])
    t = client.get_tree(tree.tree_id, include_text=True)
    assert t.nodes[0].text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert t.nodes[0].text.endswith("<|im_start|>assistant\n")


def test_generate_streams_tokens_then_one_finish_per_branch(client):
    tree = client.create_tree(PROMPT)
    kids = client.fork(tree.tree_id, tree.root_node_id, tree.prompt_tokens, count=2).node_ids
    tokens, text, finish = collect(
        client.generate(tree.tree_id, kids, max_tokens=8, ignore_eos=True))
    assert set(finish) == set(kids)
    for k in kids:
        assert len(tokens[k]) == 8
        assert finish[k].reason == "length"
        assert finish[k].completion_tokens == 8
        assert finish[k].prompt_tokens == tree.prompt_tokens
        assert text[k] == client.detokenize(tokens[k])
    # Greedy branches from the same point produce the same tokens, and the tree holds them.
    assert tokens[kids[0]] == tokens[kids[1]]
    t = client.get_tree(tree.tree_id, include_tokens=True)
    assert list(t.node(kids[0]).tokens) == tokens[kids[0]]
    assert not any(n.generating for n in t.nodes)


def test_per_branch_sampling_same_seed_same_tokens(client):
    tree = client.create_tree(PROMPT)
    kids = client.fork(tree.tree_id, tree.root_node_id, tree.prompt_tokens, count=3).node_ids
    hot = Sampling(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True, top_logprobs=2)
    branches = [Branch(kids[0], hot), Branch(kids[1], hot), kids[2]]
    events = list(client.generate(tree.tree_id, branches, max_tokens=3, ignore_eos=True))
    tokens, _, finish = collect(iter(events))
    assert tokens[kids[0]] == tokens[kids[1]]
    assert len(tokens[kids[0]]) == 6 and len(tokens[kids[2]]) == 3
    tops = [e.top_logprobs for e in events if isinstance(e, Token) and e.node_id == kids[0]]
    assert all(len(t) == 2 for t in tops)
    assert all(f.reason == "length" for f in finish.values())


def test_cancel_ends_the_stream_and_frees_the_branch(client):
    tree = client.create_tree(PROMPT)
    stream = client.generate(tree.tree_id, [tree.root_node_id], max_tokens=200, ignore_eos=True)
    seen = 0
    for e in stream:
        if isinstance(e, Token):
            seen += 1
            if seen == 2:
                stream.cancel()
    assert seen >= 2
    for _ in range(500):
        if not client.get_tree(tree.tree_id).nodes[0].generating:
            break
        time.sleep(0.01)
    assert not client.get_tree(tree.tree_id).nodes[0].generating
    # The leaf can generate again.
    _, _, finish = collect(client.generate(tree.tree_id, [tree.root_node_id], max_tokens=2))
    assert finish[tree.root_node_id].completion_tokens >= 1


def test_verify_accepts_the_greedy_continuation(client):
    tree = client.create_tree(PROMPT)
    a, b = client.fork(tree.tree_id, tree.root_node_id, tree.prompt_tokens, count=2).node_ids
    tokens, _, _ = collect(client.generate(tree.tree_id, [a], max_tokens=4, ignore_eos=True))
    greedy = tokens[a]
    v = client.verify(tree.tree_id, b, greedy)
    assert v.accepted_indices == (0, 1, 2, 3)
    assert v.tokens[:4] == tuple(greedy)
    assert len(v.tokens) == 5 and len(v.logprobs) == 5
    assert v.text == client.detokenize(v.tokens)
    # A wrong first draft token: nothing accepted, the model's token is the bonus.
    wrong = (greedy[0] + 1) % 49152
    tree2 = client.create_tree(PROMPT)
    v = client.verify(tree2.tree_id, tree2.root_node_id, [wrong])
    assert v.accepted_indices == ()
    assert v.tokens == (greedy[0],)


def test_beam_search_keeps_the_beams_as_leaves(client):
    tree = client.create_tree(PROMPT)
    beams = client.beam_search(tree.tree_id, tree.root_node_id, width=3, max_tokens=4,
                               stop_at_eos=False)
    assert len(beams) == 3
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    t = client.get_tree(tree.tree_id)
    for b in beams:
        assert len(b.tokens) == 4
        assert t.node(b.node_id).children == ()


def test_errors_carry_exact_codes_and_messages(server, client):
    unknown = "0" * 32
    expect_error(grpc.StatusCode.NOT_FOUND, f'tree "{unknown}" not found',
                 client.fork, unknown, 0, 0, 1)
    tree = client.create_tree(PROMPT)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "count must be in [1, 4096], got 0",
                 client.fork, tree.tree_id, tree.root_node_id, 1, count=0)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "text is not valid UTF-8",
                 client.create_tree, b"ok \xff\xfe")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "text is not valid UTF-8",
                 client.extend, tree.tree_id, tree.root_node_id, b"caf\xc3")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "text is not valid UTF-8",
                 client.tokenize, b"\xc0\x80")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                 "branches[0].sampling.max_tokens must be in [1, 256], got 0",
                 lambda: list(client.generate(tree.tree_id, [tree.root_node_id], max_tokens=0)))
    expect_error(grpc.StatusCode.INVALID_ARGUMENT,
                 "branches[0].sampling.stop[0] is not valid UTF-8",
                 lambda: list(client.generate(tree.tree_id, [tree.root_node_id],
                                              stop=[b"\xff"])))
    # The tree is untouched by all of that.
    assert client.get_tree(tree.tree_id).nodes[0].num_tokens == tree.prompt_tokens
    with pytest.raises(ValueError):
        client.create_tree()
    with pytest.raises(ValueError):
        client.extend(tree.tree_id, tree.root_node_id, "a", tokens=[1])

    with DeftClient(server) as anonymous:
        expect_error(grpc.StatusCode.UNAUTHENTICATED,
                     'missing authorization metadata (expected "authorization: Bearer '
                     '<api key>")', anonymous.list_trees)
    with DeftClient(server, api_key="not-a-key-0123456789") as stranger:
        expect_error(grpc.StatusCode.UNAUTHENTICATED, "invalid API key", stranger.list_trees)
    with DeftClient(server, api_key=READONLY_KEY) as reader:
        expect_error(grpc.StatusCode.PERMISSION_DENIED,
                     'API key "reader" is read-only and may not call CreateTree',
                     reader.create_tree, PROMPT)
        # Another key's tree does not exist for it.
        expect_error(grpc.StatusCode.NOT_FOUND, f'tree "{tree.tree_id}" not found',
                     reader.get_tree, tree.tree_id)


def test_quotas_surface_as_errors_and_finish_reasons(small_client):
    tree = small_client.create_tree(tokens=[100 + i for i in range(20)])  # 2 of 4 KV blocks
    tokens, _, finish = collect(
        small_client.generate(tree.tree_id, [tree.root_node_id], max_tokens=100, ignore_eos=True))
    assert len(tokens[tree.root_node_id]) == 4 * 16 - 20
    assert finish[tree.root_node_id].reason == "kv_quota"
    assert small_client.get_tree(tree.tree_id).kv_blocks <= 4
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                 'API key "small" would exceed its kv_blocks quota (4 + 1 > 4)',
                 lambda: list(small_client.generate(tree.tree_id, [tree.root_node_id])))
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED,
                 'API key "small" would exceed its nodes quota (1 + 3 > 3)',
                 small_client.fork, tree.tree_id, tree.root_node_id, 64, 3)
