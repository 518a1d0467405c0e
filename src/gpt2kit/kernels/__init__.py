"""Optional compiled CPU kernels, built on first use with PyTorch's C++ extension tooling and cached.

For decoding float32 models (cpu_decode.cpp says why they are hand-written): a small-batch linear layer,
and a whole one-token step of GPT-2 built on it (blocks, KV-cache attention, ln_f, LM head). For float32
training (cpu_train.cpp says why): causal attention and GELU, forward and backward, the cross-entropy's
softmax, and the gradient norm. For sampling (cpu_sample.cpp): every row's filters and its draw, in one
pass over a batch of logits. It needs an x86-64 CPU with AVX2/FMA (it uses AVX-512 where the CPU has
it) and a C++ compiler; without them, or with GPT2KIT_CPU_KERNELS=0, everything runs on PyTorch's own
kernels with the same results (to float32 rounding). `python -m gpt2kit.kernels` builds it ahead of time
(scripts/setup.sh does), so that no later command waits for the compiler.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt2kit.errors import Gpt2kitError

HERE = Path(__file__).parent
# one extension; cpu_decode.cpp defines it
SOURCES = [HERE / "cpu_decode.cpp", HERE / "cpu_train.cpp", HERE / "cpu_sample.cpp"]
HEADERS = [HERE / "simd.h"]
MAX_ROWS = 32  # above this many input rows MKL's blocked GEMM is the better choice
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
# on CPUs with AVX-512 (PyTorch's "AVX512" capability: F, BW, VL, DQ) the training kernels and the decoding
# products use 512-bit vectors (simd.h's vec); GPT2KIT_CPU_KERNELS_AVX512=0 builds the AVX2 form there too.
# The flags are part of the build's name, so a cache shared by machines of both kinds keeps one build of each.
AVX512_CFLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]


def cflags() -> list[str]:
    wide = (torch.backends.cpu.get_cpu_capability() == "AVX512"
            and os.environ.get("GPT2KIT_CPU_KERNELS_AVX512", "1") != "0")
    return CFLAGS + (AVX512_CFLAGS if wide else [])

_ext: Any = None
_failed: str | None = None


def _module_name() -> str:
    key = (b"".join(p.read_bytes() for p in SOURCES + HEADERS) + " ".join(cflags()).encode()
           + torch.__version__.encode() + sys.version.encode())
    return "gpt2kit_cpu_kernels_" + hashlib.sha256(key).hexdigest()[:12]


def build_dir() -> Path:
    root = os.environ.get("GPT2KIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2kit"
    return Path(root) / "kernels" / _module_name()


def supported() -> str | None:
    """None when this machine can use the kernels, else the reason it cannot."""
    if os.environ.get("GPT2KIT_CPU_KERNELS", "1") == "0":
        return "disabled by GPT2KIT_CPU_KERNELS=0"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU lacks AVX2/FMA"
    if not shutil.which(os.environ.get("CXX", "c++")):
        return "no C++ compiler found (install g++)"
    return None


def _import_built(path: Path, name: str) -> Any:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(build: bool = True, quiet: bool = False) -> Any:
    """The compiled extension, or None when it cannot be had (the reason is then in `failure()`).
    A built copy is imported directly (milliseconds); otherwise, with build=True, it is compiled once
    (about 30 s) into build_dir()."""
    global _ext, _failed
    if _ext is not None or _failed is not None:
        return _ext
    reason = supported()
    if reason:
        _failed = reason
        return None
    name, where = _module_name(), build_dir()
    built = where / f"{name}.so"
    try:
        if built.exists():
            try:
                _ext = _import_built(built, name)
                return _ext
            except ImportError:  # a build cut short (killed mid-link): make it again below
                built.unlink(missing_ok=True)
        if not build:
            return None
        from torch.utils import cpp_extension  # lazy: slow to import; only a kernel build needs it

        # torch runs `ninja` from PATH; the ninja wheel and this interpreter's bin folder may not be on it
        extra = [os.path.dirname(sys.executable)]
        try:
            import ninja  # lazy: only a kernel build runs it

            extra.insert(0, ninja.BIN_DIR)
        except ImportError:
            pass
        os.environ["PATH"] = os.pathsep.join(extra + [os.environ.get("PATH", "")])
        where.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print("gpt2kit: compiling the CPU kernels once (about 30 s)...", file=sys.stderr, flush=True)
        _ext = cpp_extension.load(name, [str(p) for p in SOURCES], extra_cflags=cflags(), extra_ldflags=["-fopenmp"],
                                  build_directory=str(where), verbose=False)
    except Exception as e:  # a failed build must never stop generation: PyTorch's kernels still work
        last = (str(e).strip().splitlines() or [repr(e)])[-1][:200]
        _failed = f"could not build the CPU kernel ({type(e).__name__}: {last})"
        if not quiet:
            print(f"gpt2kit: {_failed}; using PyTorch's slower kernels", file=sys.stderr)
    return _ext


def failure() -> str | None:
    return _failed


def loaded() -> Any:
    """The extension if an earlier load() got it, else None; never builds."""
    return _ext


def _fits(t: torch.Tensor) -> bool:
    return (t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided
            and t.is_contiguous())


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _ext.gelu_forward(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return _ext.gelu_backward(dy.contiguous(), x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") (GPT-2's "gelu_new"), forward and backward through the compiled
    kernel for contiguous float32 CPU tensors once load() got it (about 4x faster; the same values to
    float32 rounding), else F.gelu itself."""
    if _ext is not None and _fits(x):
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        y, lse = _ext.causal_attention_forward(qkv, n_head)  # (B, T, C), (B, nh, T)
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head = n_head
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        qkv, y, lse = ctx.saved_tensors
        return _ext.causal_attention_backward(dy.contiguous(), qkv, y, lse, ctx.n_head), None


def causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal self-attention (no dropout, scale 1/sqrt(head size)) straight from c_attn's output qkv
    (B, T, 3C) to (B, T, C), heads side by side: through the compiled kernel, forward and backward, for
    contiguous float32 CPU tensors with a head size that is a multiple of 16 once load() got it (half the
    time of PyTorch's flash attention on a 124M training step), else F.scaled_dot_product_attention."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    if _ext is not None and _fits(qkv) and (C // n_head) % 16 == 0:
        return _CausalAttention.apply(qkv, n_head)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, nh, T, hs)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)


def gelu_tanh_float32(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh of x taken up to float32 (for bfloat16/float16 autocast on CPUs): a float32 result."""
    return gelu_tanh(x.float())


def causal_attention_float32(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """causal_attention of qkv taken up to float32 (for bfloat16/float16 autocast on CPUs): a float32
    result, computed from the rounded inputs more precisely than in the low-precision type."""
    return causal_attention(qkv.float(), n_head)


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all the tensors together (torch.nn.utils.get_total_norm's default), in one pass on
    both cores, summed in float64, when the kernel is loaded and every tensor is contiguous float32 on the
    CPU; else get_total_norm."""
    if _ext is not None and tensors and all(_fits(t) for t in tensors):
        return torch.tensor(_ext.sum_squares(tensors) ** 0.5, dtype=torch.float32)
    return torch.nn.utils.get_total_norm(tensors)


def squared_norm(t: torch.Tensor) -> float | None:
    """sum(t^2) in float64 through the kernel, or None when it is not loaded or t is not a contiguous float32
    CPU tensor."""
    return _ext.sum_squares([t]) if _ext is not None and _fits(t) else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the compiled kernel when it applies: float32 CPU tensors, at most MAX_ROWS input
    rows, a row-major weight, no autograd. Otherwise F.linear itself."""
    *lead, K = x.shape
    M = x.numel() // K if K else 0
    if (_ext is not None and 0 < M <= MAX_ROWS and K % 8 == 0 and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.is_contiguous() and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return _ext.linear(x.reshape(M, K), weight, bias).view(*lead, weight.shape[0])
    return F.linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 weight-only quantisation: w (N, K) ~ q * scale[:, None], q in [-127, 127]."""
    with torch.no_grad():
        scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
        q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class DecodeStep:
    """GPT.decode_step through the compiled kernel: one call runs every block, ln_f and the LM head of a
    one-token step (the products at the bandwidth limit, the small operations between them as plain loops
    instead of ~150 PyTorch operations and their Python). Holds the model's weights in the order the
    kernel takes them; `for_model` says whether a model fits (plain float32 nn.Linear/nn.LayerNorm layers,
    sizes the AVX2 loops handle)."""

    def __init__(self, model: nn.Module):
        t = model.transformer
        self.blocks = list(t.h)
        self.weights = [p for b in self.blocks
                        for m in (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj)
                        for p in (m.weight, m.bias)] + [t.ln_f.weight, t.ln_f.bias, model.lm_head.weight]
        self.eps = model.config.layer_norm_epsilon
        self.qweights: list[torch.Tensor] = []  # int8 (weight, scale) pairs once quantize_int8() ran

    def quantize_int8(self) -> None:
        """Use int8 copies of the weights of every product from now on (the model's own float32 weights are
        kept for prefills and everything else)."""
        # c_attn, attn.c_proj, c_fc and mlp.c_proj of each block (12 weights a block), then the LM head
        products = [self.weights[12 * b + i] for b in range(len(self.blocks)) for i in (2, 4, 8, 10)]
        products.append(self.weights[-1])
        self.qweights = [t for w in products for t in quantize_int8(w)]

    @staticmethod
    def for_model(model: nn.Module) -> bool:
        cfg = model.config
        if cfg.n_embd % 8 or cfg.head_dim % 8 or cfg.n_inner % 8 or model.lm_head.bias is not None:
            return False
        if getattr(cfg, "activation", "gelu_new") != "gelu_new":  # the kernel's GELU is the tanh form only
            return False
        layers = [model.transformer.ln_f] + [m for b in model.transformer.h
                                             for m in (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc,
                                                       b.mlp.c_proj)]
        return all(type(m) in (nn.Linear, nn.LayerNorm) and m.bias is not None and m.weight.dtype == torch.float32
                   and m.weight.device.type == "cpu" for m in layers)

    def __call__(self, x: torch.Tensor, rows: slice | None, pos: int) -> torch.Tensor | None:
        w = self.weights[0]  # a model moved or cast after this was installed keeps its ordinary path
        if x.dtype != torch.float32 or x.device.type != "cpu" or w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        caches = [t for b in self.blocks for t in b.attn.kv_cache.rows(rows)]
        if (caches[0].dtype != torch.float32 or not caches[0].is_contiguous()
                or torch.is_grad_enabled() and any(w.requires_grad for w in self.weights)):
            return None
        return _ext.decode_step(x.contiguous(), self.weights, caches, self.qweights, pos, self.eps)


def accelerate_(model: nn.Module, build: bool = True) -> bool:
    """Route every float32 CPU nn.Linear of `model` (the tied LM head included) through `linear`, and its
    one-token decoding steps through `DecodeStep`. Returns
    False, changing nothing, when the kernel is unavailable. The kernel reads weights row-major, so any
    stored otherwise (HuggingFace's Conv1D layout arrives transposed) are copied into that layout once."""
    if load(build=build) is None:
        return False
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if type(module) is nn.Linear and w.dtype == torch.float32 and w.device.type == "cpu":
                if not module.weight.is_contiguous():
                    module.weight.data = module.weight.data.contiguous()
                module.forward = types.MethodType(_forward, module)
        # a gpt2kit.model.GPT; one already installed (perhaps quantised) is kept
        if (hasattr(model, "decode_step") and not isinstance(model.decode_step, DecodeStep)
                and DecodeStep.for_model(model)):
            model.decode_step = DecodeStep(model)
    return True


QUANTIZE = ("int8",)


def prepare_cpu_decoding_(model: nn.Module, quantize: str | None = None) -> str:
    """Make a float32 model on the CPU decode fast, with the same numerics: the compiled kernel when it is
    available, else GPT.column_major_ (MKL's matrix-vector product prefers that layout). Returns which
    ("kernel", "column-major" or "none": another device or dtype). quantize="int8" has the kernel's decoding
    steps read int8 copies of the weights (a quarter of the bytes; ~1.7x the tokens/s at batch 1; the
    outputs drift a little from float32's: bench/RESULTS.md) and returns "kernel-int8"; it is an error
    (Gpt2kitError) where the kernel cannot be used."""
    if quantize is not None and quantize not in QUANTIZE:
        raise Gpt2kitError(f"unknown quantisation {quantize!r}: the choice is {', '.join(QUANTIZE)}")
    path = "none"
    if model.device.type == "cpu" and model.dtype == torch.float32:
        path = "kernel" if accelerate_(model) else "column-major"
        if path == "column-major":
            model.column_major_()
    if quantize is None:
        return path
    step = getattr(model, "decode_step", None)
    if not isinstance(step, DecodeStep):
        why = failure() or ("it needs a float32 model on the CPU" if path == "none"
                             else "this model's layers do not fit it")
        raise Gpt2kitError(f"--quantize {quantize} runs on gpt2kit's CPU decoding kernel, which cannot be used here "
                           f"({why}); leave out --quantize")
    if not step.qweights:
        step.quantize_int8()
    return "kernel-int8"
