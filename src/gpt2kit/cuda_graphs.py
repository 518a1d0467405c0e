"""One-token decoding steps replayed as CUDA graphs.

A GPT-2 decoding step on a GPU is ~15 small kernels a layer (~190 for 124M) whose launches, and the Python
that issues them, take far longer than the GPU needs to run them: at batch 1 the step is bound by the CPU,
not by the weights' bytes. A CUDA graph records the step's kernels once and replays them with a single
launch. PyTorch's torch.cuda.CUDAGraph does the recording; what is written here is what makes the step
recordable: fixed shapes (GPT.decode_masked attends over a fixed number of cache slots, masked per row)
and no host synchronisation inside it. The graph reads its token ids and positions from buffers it owns,
so each step copies them in, replays, and copies the logits out.

One graph per attention length, for steps that cover every row of the cache; the attention length is
rounded up to a multiple of SPAN, so that a long generation uses a few graphs, each attending over at most
SPAN slots more than the tokens so far. A new cache (another batch size or length) drops the graphs
recorded on the old one. Weights changed in place (a load_state_dict) are seen; weights replaced by new
tensors are not: call `reset()` after that (the installer below does it for a model prepared again)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

SPAN = 256  # attention-length granularity of the graphs (slots)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    idx: torch.Tensor  # (B, 1) token ids, read by the graph
    pos: torch.Tensor  # (B, 1) positions, read by the graph
    out: torch.Tensor  # (B, 1, vocab) logits, written by the graph


class GraphStep:
    """GPT.graph_step for a model on a CUDA device."""

    def __init__(self, model: nn.Module, compile: bool = False):
        self.model = model
        # compile=True: the step through torch.compile first (fuses the small operations between the
        # products; slow to start, once per graph shape), then recorded as a graph like the plain one
        self.step = torch.compile(model.decode_masked, dynamic=False) if compile else model.decode_masked
        self.graphs: dict[int, _Graph] = {}  # attention length -> graph, all on the cache `where` names
        self.where: tuple | None = None  # the cache the graphs write into (addresses, shape, dtype, device)
        self.captures = 0  # graphs recorded so far (tests and benchmarks read it)

    def reset(self) -> None:
        self.graphs.clear()
        self.where = None

    def _caches(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for b in self.model.transformer.h for t in (b.attn.kv_cache.k, b.attn.kv_cache.v))

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None,
                 rows: slice | None) -> torch.Tensor | None:
        m = self.model
        cache = m.transformer.h[0].attn.kv_cache
        if idx.device.type != "cuda" or cache is None or torch.is_grad_enabled() or m.training:
            return None
        if idx.shape[0] != cache.k.shape[0]:
            return None  # steps of some rows only (a one-token prefill into one row): ordinary path, few graphs
        S = cache.max_len
        if kv_len is None:
            kv_len = S
        span = min(S, -(-kv_len // SPAN) * SPAN)  # attention length: kv_len rounded up to SPAN slots
        caches = self._caches()
        where = (tuple(t.data_ptr() for t in caches), caches[0].shape, caches[0].dtype, idx.device)
        if where != self.where:
            # a new cache (setup_caches made one for another batch size or length): graphs write into the
            # cache they were recorded with, so the old ones go
            self.graphs.clear()
            self.where = where
        g = self.graphs.get(span)
        if g is None:
            g = self.graphs[span] = self._capture(idx, input_pos, span, rows)
        g.idx.copy_(idx, non_blocking=True)
        g.pos.copy_(input_pos, non_blocking=True)
        g.graph.replay()
        # a copy: the graph's own output is overwritten by its next replay, and a caller may keep these
        return g.out.clone()

    def _capture(self, idx: torch.Tensor, input_pos: torch.Tensor, span: int, rows: slice | None) -> _Graph:
        static_idx, static_pos = idx.clone(), input_pos.clone()
        # warm-up runs on a side stream (CUDA graphs need the libraries' handles and workspaces made before
        # recording); they write this step's own keys and values, which the replay writes again
        side = torch.cuda.Stream(idx.device)
        side.wait_stream(torch.cuda.current_stream(idx.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(static_idx, static_pos, span, rows)
        torch.cuda.current_stream(idx.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(static_idx, static_pos, span, rows)  # (B, 1, vocab)
        self.captures += 1
        return _Graph(graph, static_idx, static_pos, out)


def enabled() -> bool:
    return os.environ.get("GPT2KIT_CUDA_GRAPHS", "1") != "0"


def prepare_cuda_decoding_(model: nn.Module) -> str:
    """Install CUDA-graph decoding steps on a model on a CUDA device (the same numbers as its ordinary
    steps, up to the order of additions inside attention). Returns "cuda-graphs", or "none": another device,
    or GPT2KIT_CUDA_GRAPHS=0 in the environment."""
    if not hasattr(model, "graph_step") or model.device.type != "cuda" or not enabled():
        return "none"
    if isinstance(model.graph_step, GraphStep):
        model.graph_step.reset()  # the weights may have been replaced since it recorded
    else:
        model.graph_step = GraphStep(model)
    return "cuda-graphs"
