"""A fake CUDA device on a CPU-only machine, for device-placement tests.

Inside `FakeAccelerator()`, a tensor moved to (or created on) "cuda" becomes a torch FakeTensor:
it has a device, a dtype and a shape, but no data, and every operation on it goes through torch's
FakeTensorMode, which checks device propagation as the real device would: mixing a "cuda" tensor
with a CPU tensor raises FakeTensorDeviceMismatchError. Operations on ordinary CPU tensors run as
usual, so Python code around the model (schedulers, tokenizers) still works.

Modules whose tensors are already fake are moved by replacing their tensors (torch's own
`Module.to` would swap them in place, which fake tensors refuse), so a part can go to the fake
device and back. What it cannot show: numbers (fake tensors have none, so nothing data-dependent can run, such as
`.item()` or a branch on a tensor's value), autograd (backward wants a real CUDA context), and
memory. Tests say which calls they run under it.
"""

from __future__ import annotations

import itertools

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

DEVICE = torch.device("cuda", 0)


def _targets_fake(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    return isinstance(value, FakeTensor)


class FakeAccelerator(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)

    def __enter__(self):
        original = self.original_to = torch.nn.Module.to

        def to(module, *args, **kwargs):
            if not any(isinstance(t, FakeTensor) for t in itertools.chain(module.parameters(), module.buffers())):
                return original(module, *args, **kwargs)
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            for sub in module.modules():
                for table in (sub._parameters, sub._buffers):
                    for name, tensor in list(table.items()):
                        if tensor is None:
                            continue
                        # as Module.to does: only floating-point tensors change dtype
                        moved = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
                        if table is sub._parameters:
                            moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                        table[name] = moved
            return module

        torch.nn.Module.to = to
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Module.to = self.original_to
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(_targets_fake(leaf) for leaf in tree_leaves((args, kwargs))):
            with self.fake:
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
