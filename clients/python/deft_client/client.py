"""DeftClient: a thin, typed wrapper over deft.v1's TreeService and ModelService.

Every method is one RPC. Text arguments are str (sent as UTF-8) or bytes (sent as is, so a
caller can send exactly what it has; the server answers INVALID_ARGUMENT naming the field when
it is not UTF-8). Every failure raises DeftError with the gRPC status code and the server's
message. generate() returns a GenerateStream: iterate it for Token and Finish events; cancel()
ends it early (the server frees the branches' work).

Thread safety: a DeftClient may be shared by threads (gRPC channels and stubs are thread-safe);
a GenerateStream belongs to the thread that iterates it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from deft_client.proto import model_service_pb2 as mpb
from deft_client.proto import model_service_pb2_grpc as mgrpc
from deft_client.proto import tree_service_pb2 as pb
from deft_client.proto import tree_service_pb2_grpc as tgrpc

Text = Union[str, bytes]

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


class DeftError(Exception):
    """A failed call: `code` is a grpc.StatusCode, `message` the server's (or gRPC's) text."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> "DeftError":
        return cls(e.code(), e.details() or "")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """deft.v1.SamplingParams; None keeps the server's default."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: Optional[float] = None
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    stop: Sequence[Text] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0

    def to_proto(self) -> pb.SamplingParams:
        p = pb.SamplingParams(
            temperature=self.temperature, top_k=self.top_k, min_p=self.min_p,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            seed=self.seed, max_tokens=self.max_tokens, stop=[_utf8(s) for s in self.stop],
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
            top_logprobs=self.top_logprobs)
        if self.top_p is not None:
            p.top_p = self.top_p
        if self.repetition_penalty is not None:
            p.repetition_penalty = self.repetition_penalty
        return p


@dataclasses.dataclass(frozen=True)
class Branch:
    """One branch of generate(): a leaf and its sampling (the call's default when None)."""

    node_id: int
    sampling: Optional[Sampling] = None


@dataclasses.dataclass(frozen=True)
class Token:
    node_id: int
    token_id: int  # -1 for a text-only event (held-back text flushed at the end)
    text: str
    logprob: float
    top_logprobs: Tuple[Tuple[int, float, str], ...] = ()  # (token id, logprob, text)


@dataclasses.dataclass(frozen=True)
class Finish:
    node_id: int
    reason: str  # "length", "stop_token", "stop_string", "context_full", "cancelled",
    #              "deadline_exceeded" or "kv_quota"
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_seconds: float


@dataclasses.dataclass(frozen=True)
class CreatedTree:
    tree_id: str
    root_node_id: int
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Forked:
    node_ids: Tuple[int, ...]
    parent_node_id: int


@dataclasses.dataclass(frozen=True)
class Verified:
    accepted_indices: Tuple[int, ...]
    tokens: Tuple[int, ...]
    logprobs: Tuple[float, ...]
    text: str


@dataclasses.dataclass(frozen=True)
class Beam:
    node_id: int
    tokens: Tuple[int, ...]
    text: str
    logprob: float
    score: float
    finished: bool


@dataclasses.dataclass(frozen=True)
class Node:
    node_id: int
    parent_node_id: int  # -1 for the root
    children: Tuple[int, ...]
    start_position: int
    num_tokens: int
    num_computed: int
    text: str
    tokens: Tuple[int, ...]
    generating: bool


@dataclasses.dataclass(frozen=True)
class Tree:
    tree_id: str
    root_node_id: int
    nodes: Tuple[Node, ...]  # parents before children
    kv_blocks: int
    unique_tokens: int
    sequence_layout_tokens: int

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)


@dataclasses.dataclass(frozen=True)
class TreeSummary:
    tree_id: str
    nodes: int
    unique_tokens: int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    context_length: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    attention_mode: str
    backend: str
    kv_pool_blocks: int
    kv_block_tokens: int
    end_of_generation_token_ids: Tuple[int, ...]


def _utf8(text: Text) -> bytes:
    if isinstance(text, bytes):
        return text
    if isinstance(text, str):
        return text.encode("utf-8")
    raise TypeError(f"expected str or bytes, got {type(text).__name__}")


def _finish_reason(value: int) -> str:
    name = pb.FinishReason.Name(value)
    return name[len("FINISH_REASON_"):].lower()


def _event(e: pb.GenerateEvent) -> Union[Token, Finish]:
    if e.HasField("token"):
        t = e.token
        return Token(t.node_id, t.token_id, t.text, t.logprob,
                     tuple((a.token_id, a.logprob, a.text) for a in t.top_logprobs))
    f = e.finish
    return Finish(f.node_id, _finish_reason(f.reason), f.usage.prompt_tokens,
                  f.usage.completion_tokens, f.usage.time_to_first_token_seconds)


class GenerateStream:
    """Events of one Generate call, in the server's order: Token events tagged by node, then one
    Finish per branch. Iterating raises DeftError if the call fails (after the events that came
    before). cancel() ends the call; iteration then stops with no error."""

    def __init__(self, call):
        self._call = call
        self._cancelled = False

    def __iter__(self) -> Iterator[Union[Token, Finish]]:
        try:
            for e in self._call:
                yield _event(e)
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise DeftError.from_rpc_error(e) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class DeftClient:
    """A connection to deft-server at `address` ("host:port").

    api_key: sent as "authorization: Bearer <key>" on every call (servers run with --api_keys).
    credentials: grpc.ssl_channel_credentials(...) for a TLS server; plaintext when None.
    timeout: default deadline in seconds of every call (None: no deadline).
    """

    def __init__(self, address: str, api_key: Optional[str] = None, *,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 timeout: Optional[float] = None):
        self._channel = (grpc.secure_channel(address, credentials) if credentials is not None
                         else grpc.insecure_channel(address))
        self._trees = tgrpc.TreeServiceStub(self._channel)
        self._models = mgrpc.ModelServiceStub(self._channel)
        self._health = self._channel.unary_unary(
            _HEALTH_CHECK, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "DeftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: Optional[float] = None):
        try:
            return method(request, metadata=self._metadata,
                          timeout=timeout if timeout is not None else self._timeout)
        except grpc.RpcError as e:
            raise DeftError.from_rpc_error(e) from None

    # --- health and model -------------------------------------------------------------------

    def health(self, service: str = "", timeout: Optional[float] = None) -> str:
        """grpc.health.v1 status of `service` ("" = the server): "SERVING", "NOT_SERVING", ..."""
        request = b"\x0a" + bytes([len(service)]) + service.encode() if service else b""
        raw = self._call(self._health, request, timeout)
        # HealthCheckResponse: field 1 (status, varint); absent means 0 (UNKNOWN).
        status = raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0
        return _HEALTH_STATUS.get(status, str(status))

    def model_info(self) -> ModelInfo:
        r = self._call(self._models.GetModelInfo, mpb.GetModelInfoRequest())
        return ModelInfo(r.name, r.architecture, r.vocab_size, r.context_length, r.num_layers,
                         r.hidden_size, r.num_heads, r.num_kv_heads, r.attention_mode, r.backend,
                         r.kv_pool_blocks, r.kv_block_tokens,
                         tuple(r.end_of_generation_token_ids))

    def tokenize(self, text: Text, *, parse_special: bool = False,
                 add_bos: bool = False) -> List[int]:
        r = self._call(self._models.Tokenize, mpb.TokenizeRequest(
            text=_utf8(text), parse_special=parse_special, add_bos=add_bos))
        return list(r.token_ids)

    def detokenize(self, token_ids: Iterable[int], *, skip_special: bool = False) -> str:
        r = self._call(self._models.Detokenize, mpb.DetokenizeRequest(
            token_ids=list(token_ids), skip_special=skip_special))
        return r.text

    # --- trees -------------------------------------------------------------------------------

    def create_tree(self, text: Optional[Text] = None, *, tokens: Optional[Sequence[int]] = None,
                    messages: Optional[Sequence[Tuple[Text, Text]]] = None,
                    add_generation_prompt: Optional[bool] = None) -> CreatedTree:
        """A tree from exactly one of: raw `text`, token ids, or chat `messages` as
        (role, content) pairs (rendered with the model's chat template)."""
        given = [x is not None for x in (text, tokens, messages)]
        if sum(given) != 1:
            raise ValueError("create_tree: give exactly one of text, tokens or messages")
        req = pb.CreateTreeRequest()
        if text is not None:
            req.text = _utf8(text)
        elif tokens is not None:
            req.tokens.ids.extend(tokens)
        else:
            for role, content in messages:
                req.messages.messages.add(role=_utf8(role), content=_utf8(content))
        if add_generation_prompt is not None:
            req.add_generation_prompt = add_generation_prompt
        r = self._call(self._trees.CreateTree, req)
        return CreatedTree(r.tree_id, r.root_node_id, r.prompt_tokens)

    def fork(self, tree_id: str, node_id: int, offset: int, count: int = 1) -> Forked:
        r = self._call(self._trees.Fork, pb.ForkRequest(
            tree_id=tree_id, node_id=node_id, offset=offset, count=count))
        return Forked(tuple(r.node_ids), r.parent_node_id)

    def extend(self, tree_id: str, node_id: int, text: Optional[Text] = None, *,
               tokens: Optional[Sequence[int]] = None) -> int:
        """Appends text or token ids to a leaf; returns the node's length afterwards."""
        if (text is None) == (tokens is None):
            raise ValueError("extend: give exactly one of text or tokens")
        req = pb.ExtendRequest(tree_id=tree_id, node_id=node_id)
        if text is not None:
            req.text = _utf8(text)
        else:
            req.tokens.ids.extend(tokens)
        return self._call(self._trees.Extend, req).node_tokens

    def generate(self, tree_id: str, branches: Iterable[Union[int, Branch]],
                 sampling: Optional[Sampling] = None, *, timeout: Optional[float] = None,
                 **sampling_fields) -> GenerateStream:
        """Generates on leaves `branches` (node ids, or Branch with its own sampling); the
        default sampling is `sampling` (fields overridden by `sampling_fields`) or
        Sampling(**sampling_fields). The call starts now; iterate the returned stream for its
        events."""
        if sampling is None:
            sampling = Sampling(**sampling_fields)
        elif sampling_fields:
            sampling = dataclasses.replace(sampling, **sampling_fields)
        req = pb.GenerateRequest(tree_id=tree_id)
        for b in branches:
            if not isinstance(b, Branch):
                b = Branch(int(b))
            req.branches.add(node_id=b.node_id,
                             sampling=(b.sampling or sampling).to_proto())
        call = self._trees.Generate(req, metadata=self._metadata,
                                    timeout=timeout if timeout is not None else self._timeout)
        return GenerateStream(call)

    def verify(self, tree_id: str, node_id: int, draft_tokens: Sequence[int],
               draft_parents: Optional[Sequence[int]] = None,
               sampling: Optional[Sampling] = None) -> Verified:
        """Verifies a draft token tree under a leaf; `draft_parents` defaults to a chain."""
        if draft_parents is None:
            draft_parents = list(range(-1, len(draft_tokens) - 1))
        req = pb.VerifyRequest(tree_id=tree_id, node_id=node_id, draft_tokens=list(draft_tokens),
                               draft_parents=list(draft_parents))
        if sampling is not None:
            req.sampling.CopyFrom(sampling.to_proto())
        r = self._call(self._trees.Verify, req)
        return Verified(tuple(r.accepted_indices), tuple(r.tokens), tuple(r.logprobs), r.text)

    def beam_search(self, tree_id: str, node_id: int, width: int, max_tokens: int, *,
                    length_penalty: Optional[float] = None,
                    stop_at_eos: Optional[bool] = None) -> List[Beam]:
        """Beam search from a leaf; the beams, best first, stay in the tree as leaves."""
        req = pb.BeamSearchRequest(tree_id=tree_id, node_id=node_id, width=width,
                                   max_tokens=max_tokens)
        if length_penalty is not None:
            req.length_penalty = length_penalty
        if stop_at_eos is not None:
            req.stop_at_eos = stop_at_eos
        r = self._call(self._trees.BeamSearch, req)
        return [Beam(b.node_id, tuple(b.tokens), b.text, b.logprob, b.score, b.finished)
                for b in r.beams]

    def prune(self, tree_id: str, node_id: int) -> None:
        self._call(self._trees.Prune, pb.PruneRequest(tree_id=tree_id, node_id=node_id))

    def get_tree(self, tree_id: str, *, include_text: bool = False,
                 include_tokens: bool = False) -> Tree:
        r = self._call(self._trees.GetTree, pb.GetTreeRequest(
            tree_id=tree_id, include_text=include_text, include_tokens=include_tokens))
        nodes = tuple(Node(n.node_id, n.parent_node_id, tuple(n.children), n.start_position,
                           n.num_tokens, n.num_computed, n.text, tuple(n.tokens), n.generating)
                      for n in r.nodes)
        return Tree(r.tree_id, r.root_node_id, nodes, r.kv_blocks, r.unique_tokens,
                    r.sequence_layout_tokens)

    def delete_tree(self, tree_id: str) -> None:
        self._call(self._trees.DeleteTree, pb.DeleteTreeRequest(tree_id=tree_id))

    def list_trees(self) -> List[TreeSummary]:
        r = self._call(self._trees.ListTrees, pb.ListTreesRequest())
        return [TreeSummary(t.tree_id, t.nodes, t.unique_tokens) for t in r.trees]
