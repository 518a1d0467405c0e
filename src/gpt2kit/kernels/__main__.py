"""`python -m gpt2kit.kernels`: build the CPU kernel now and say whether it works here."""

import sys

import torch

from gpt2kit import kernels

ext = kernels.load(build=True)
if ext is None:
    print(f"gpt2kit CPU kernel not in use: {kernels.failure()}")
    sys.exit(0)  # not an error: PyTorch's kernels are used instead
x, w, b = torch.randn(3, 64), torch.randn(37, 64), torch.randn(37)
ok = torch.allclose(ext.linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4)
print(f"gpt2kit CPU kernel {'ready' if ok else 'WRONG RESULTS'}: {kernels.build_dir()}")
sys.exit(0 if ok else 1)
