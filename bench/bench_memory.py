"""Measure one training step's memory against gpt2kit.train.estimate, on the CPU (random weights).

    PYTHONPATH=src python bench/bench_memory.py --config gpt2 --batch-size 1 --block-size 1024 [--grad-checkpointing]

One process, float32, PyTorch's own ops (the unfused LM head and loss, SDPA: what a GPU runs). Prints, for
each part, the estimate and the measurement: the weights, gradients and AdamW moments counted tensor by tensor,
the activations as the bytes autograd saves (saved_tensors_hooks, each storage once), and the step's peak
resident memory (ru_maxrss, over two steps) above the process's before the model was built, which also holds
the transients (logits, the loss's gradients, per-block gradients), the allocator's slack and the batch. The
estimate's total adds its parts, an upper bound: the gradients grow during backward as the activations are
freed, so the two never peak together. With --grad-checkpointing the saved activations are the blocks' inputs
and the head's; the estimate adds the one block recomputed in backward."""

from __future__ import annotations

import argparse
import resource

import torch

from gpt2kit.config import GPTConfig
from gpt2kit.model import GPT
from gpt2kit.ops import GPTOps
from gpt2kit.train.estimate import estimate_memory


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="gpt2")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--grad-checkpointing", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig.from_name(a.config)
    x = torch.randint(0, cfg.vocab_size, (a.batch_size, a.block_size))
    y = torch.randint(0, cfg.vocab_size, (a.batch_size, a.block_size))
    before = rss()
    model = GPT(cfg, GPTOps()).train()
    model.gradient_checkpointing = a.grad_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t
    for _ in range(2):  # the second step is the steady state, with AdamW's moments there from the start
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, targets=y)
        saved = sum(seen.values())
        seen.clear()
        loss.backward()
        grads = sum(p.grad.nbytes for p in model.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = rss() - before
    moments = sum(v.nbytes for st in opt.state.values() for k, v in st.items() if k != "step")
    weights = sum(p.nbytes for p in model.parameters())
    est = estimate_memory(cfg, batch_size=a.batch_size, block_size=a.block_size,
                          grad_checkpointing=a.grad_checkpointing)
    gib = 2**30
    print(f"{a.config}, {a.batch_size} x {a.block_size} tokens, float32"
          f"{', gradient checkpointing' if a.grad_checkpointing else ''}, CPU ({torch.__version__})")
    print(f"{'':<22}{'estimate':>10}{'measured':>10}")
    for name, e, m in (("weights", est.weights, weights), ("gradients", est.gradients, grads),
                       ("AdamW moments", est.optimizer, moments),
                       ("activations (saved)", est.activations, saved), ("step peak (RSS)", est.total, peak)):
        print(f"{name:<22}{e / gib:>9.2f}G{m / gib:>9.2f}G")


if __name__ == "__main__":
    main()
