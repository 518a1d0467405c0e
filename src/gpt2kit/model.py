"""GPT-2 as a pure nn.Module. Parameter names follow GPT-2 (wte, wpe, h.{i}.attn.c_attn, ln_f) so that
HuggingFace and OpenAI checkpoints map key for key; the only differences are listed in checkpoints/hf.py."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt2kit.config import GPTConfig
from gpt2kit.kv_cache import KVCache
from gpt2kit.ops import GPTOps, cross_entropy


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None
        # GPTOps.attention, set by GPT.use_ops: (qkv (B, T, 3C), n_head) -> (B, T, C) causal attention without
        # dropout, for the no-cache path; None: PyTorch's SDPA
        self.attend: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None,
                kv_len: int | None, rows: slice | None, start: int | None = None) -> torch.Tensor:
        qkv = self.c_attn(x)  # (B, T, 3C)
        if (self.attend is not None and (self.kv_cache is None or input_pos is None)
                and not (self.training and self.dropout)):
            y = self.attend(qkv, self.n_head)  # (B, T, C)
        else:
            y = self._attention(qkv, input_pos, mask, kv_len, rows, start)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)) if self.training else self.c_proj(y)

    def _attention(self, qkv: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None,
                   kv_len: int | None, rows: slice | None, start: int | None) -> torch.Tensor:
        """PyTorch's SDPA over c_attn's output (B, T, 3C), with or without the KV cache: (B, T, C)."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is None or input_pos is None:
            # training / no-cache scoring: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            ck, cv = self.kv_cache.update(input_pos, k, v, rows, start)  # (B, nh, S, hs)
            if kv_len is not None:  # attend only to the filled prefix (eager fast path; shapes vary)
                ck, cv = ck[:, :, :kv_len], cv[:, :, :kv_len]
            if mask is None and start == 0 and T > 1:  # a prefill from slot 0: plain causal
                y = F.scaled_dot_product_attention(q, ck, cv, is_causal=True)
            else:  # mask None here means every query sees every slot
                y = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask)
        return y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new" is the tanh approximation


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # the erf form (HF's "gelu"), which nanoGPT's nn.GELU() computes


def activation(config: GPTConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    return gelu_tanh if config.activation == "gelu_new" else gelu_exact


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        # the activation: GPTOps.gelu, set by GPT.use_ops, or the config's
        self.act: Callable[[torch.Tensor], torch.Tensor] = activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_proj(self.act(self.c_fc(x)))
        return self.dropout(x) if self.training else x


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, input_pos=None, mask=None, kv_len=None, rows=None, start=None):
        x = x + self.attn(self.ln_1(x), input_pos, mask, kv_len, rows, start)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2. `ops` (gpt2kit.ops.GPTOps) names the implementations of the operations that have several:
    attention, the activation, the embedding lookup, and the LM head with its loss; GPTOps() is PyTorch's own
    everywhere."""

    def __init__(self, config: GPTConfig, ops: GPTOps | None = None):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "wpe": nn.Embedding(config.n_positions, config.n_embd),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            "ln_f": nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.gradient_checkpointing = False
        # optional faster one-token step, (x (B, C) embeddings, rows, pos) -> logits (B, vocab), or None
        # when it does not apply: every block, ln_f and the LM head for rows that all write cache slot pos.
        # gpt2kit.kernels installs one on CPUs; it must give what the modules below give.
        self.decode_step: Callable[..., torch.Tensor | None] | None = None
        # optional one-token step for any rows' positions, (idx (B, 1), input_pos (B, 1), kv_len, rows) ->
        # logits (B, 1, vocab), or None when it does not apply; gpt2kit.cuda_graphs installs one on GPUs that
        # replays decode_masked as a CUDA graph. It must give what decode_masked gives.
        self.graph_step: Callable[..., torch.Tensor | None] | None = None
        self.use_ops(ops or GPTOps())
        self.apply(self._init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def use_ops(self, ops: GPTOps) -> GPT:
        """Run the forward pass with `ops` from now on: attention and the activation go to every block."""
        self.ops = ops
        for block in self.transformer.h:
            block.attn.attend = ops.attention
            block.mlp.act = ops.gelu or activation(self.config)
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def column_major_(self) -> GPT:
        """Store every weight matrix column-major (the same values, shapes and names; only the strides
        change). On CPUs, MKL's matrix-vector product reads a (in, out)-ordered matrix about 1.7x faster
        than an (out, in) one, and one-token decoding is nothing but such products, the 50257-row LM head
        above all. Costs no extra memory; matrix-matrix products (prefill, training) run as before.
        Applies to float32 weights only."""
        with torch.no_grad():
            for module in self.modules():
                w = module.weight if isinstance(module, (nn.Linear, nn.Embedding)) else None
                # float32 only: bfloat16/float16 products are far slower column-major on CPUs
                if w is not None and w.dim() == 2 and w.dtype == torch.float32 and w.is_contiguous():
                    if module is self.lm_head:
                        continue  # tied to wte, converted with it
                    module.weight.data = module.weight.data.t().contiguous().t()
        self.lm_head.weight = self.transformer.wte.weight
        return self

    # ---- KV cache -------------------------------------------------------------------------------
    def setup_caches(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache for `batch_size` rows of up to `max_len` positions (<= n_positions)."""
        max_len = min(max_len, self.config.n_positions)
        for block in self.transformer.h:
            c = block.attn.kv_cache
            if c is not None and c.k.shape[0] == batch_size and c.max_len == max_len and c.k.device == self.device:
                continue
            block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, self.config.head_dim,
                                          dtype or self.dtype, self.device)

    def clear_caches(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def select_cache_rows_(self, index: torch.Tensor, upto: int | None = None) -> None:
        """Every layer's cache row i becomes its row index[i] (index (B,) over the cache's B rows), in the
        first `upto` slots (default all)."""
        for block in self.transformer.h:
            block.attn.kv_cache.select_rows_(index, upto)

    @property
    def cache_len(self) -> int:
        c = self.transformer.h[0].attn.kv_cache
        return 0 if c is None else c.max_len

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                kv_len: int | None = None, rows: slice | None = None,
                last_only: bool = False, logits_at: torch.Tensor | None = None,
                return_hidden: bool = False, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, 1, vocab) with last_only.

        Without input_pos: plain causal forward over positions 0..T-1 (training, scoring).
        With input_pos (B, T) or (T,): absolute positions; keys/values go into the KV cache at those
        positions and each query sees cache slots <= its own position. kv_len (a Python int) limits
        attention to the first kv_len slots; rows selects a contiguous slice of cache rows.
        logits_at (B,) computes logits only at one position per row, (B, 1, vocab): the LM head is the
        costliest layer, and a prefill needs it only at each prompt's last token.
        return_hidden gives ln_f's output (B, T, C) instead of logits, for a caller that applies the LM head
        itself. targets (B, T) (-100: ignored) gives the cross-entropy loss instead, through ops.head_loss
        (training), with `reduction` "mean" over the targets or "sum"."""
        B, T = idx.shape
        if (T == 1 and input_pos is not None and self.graph_step is not None and not self.training
                and not return_hidden and not torch.is_grad_enabled()):
            pos = input_pos.view(1, 1).expand(B, 1) if input_pos.numel() == 1 else input_pos.view(B, 1)
            if (logits := self.graph_step(idx, pos, kv_len, rows)) is not None:
                return logits  # (B, 1, vocab)
        if input_pos is None:
            if T > self.config.n_positions:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.n_positions}")
            pos = torch.arange(T, device=idx.device)
            x = self.embed(idx) + self.transformer.wpe(pos)  # (B, T, C)
            mask = start = None
        else:
            if input_pos.dim() == 1:
                input_pos = input_pos.unsqueeze(0).expand(B, T)
            x = self.embed(idx) + self.transformer.wpe(input_pos)
            S = kv_len if kv_len is not None else self.cache_len
            slots = torch.arange(S, device=idx.device)
            # the common case, every row writing the same slots S-T..S-1 (decoding a batch in step, or a
            # prefill from 0), takes cheaper paths: a slice copy into the cache, and no mask (T == 1) or
            # SDPA's own causal one (a prefill from slot 0)
            start = S - T if S >= T and bool((input_pos == slots[S - T:]).all()) else None
            if start is not None and (T == 1 or start == 0):
                mask = None
            else:
                mask = slots.view(1, 1, 1, S) <= input_pos.view(B, 1, T, 1)  # (B, 1, T, S)
        if (T == 1 and mask is None and start is not None and self.decode_step is not None and not self.training
                and not return_hidden):
            if (logits := self.decode_step(x.view(B, -1), rows, start)) is not None:
                return logits.view(B, 1, -1)  # (B, 1, vocab)
        x = self.transformer.drop(x) if self.training else x
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and input_pos is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, input_pos, mask, kv_len, rows, start)
        if last_only:
            x = x[:, -1:, :]
        elif logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)  # (B, 1, C)
        x = self.transformer.ln_f(x)
        if targets is not None:
            return self.head_loss(x, targets, reduction)
        return x if return_hidden else self.lm_head(x)  # (B, T, vocab)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C) of idx (B, T), through ops.embedding when set."""
        wte = self.transformer.wte
        return wte(idx) if self.ops.embedding is None else self.ops.embedding(wte, idx)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The LM head over ln_f's output h (B, T, C) and its cross-entropy against targets (B, T), through
        ops.head_loss when set."""
        if self.ops.head_loss is not None:
            return self.ops.head_loss(h, self.lm_head.weight, targets, reduction)
        return cross_entropy(self.lm_head(h), targets, reduction)

    def decode_masked(self, idx: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                      rows: slice | None = None) -> torch.Tensor:
        """One token per row, idx (B, 1) at positions input_pos (B, 1), each written into its row's cache
        slot -> logits (B, 1, vocab). Attends over the first kv_len cache slots (> every position), masked
        per row: shapes depend only on B and kv_len, and nothing waits for the GPU, which is what a CUDA
        graph can capture (forward's own T == 1 path picks cheaper shapes by looking at the positions)."""
        B = idx.shape[0]
        x = self.transformer.wte(idx) + self.transformer.wpe(input_pos)  # (B, 1, C)
        slots = torch.arange(kv_len, device=idx.device)
        mask = slots.view(1, 1, 1, kv_len) <= input_pos.view(B, 1, 1, 1)  # (B, 1, 1, kv_len)
        for block in self.transformer.h:
            x = block(x, input_pos, mask, kv_len, rows, None)
        return self.lm_head(self.transformer.ln_f(x))  # (B, 1, vocab)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=ignore_index)
