"""torch.compile for the scoring pass: each block of the model's stacks, not the whole model.

A Qwen2-VL-family model is two stacks of identical blocks (the vision tower's, the language
model's decoder layers) joined by host-side steps (image positions, sequence boundaries read
back). Compiled whole, every such step breaks the graph; compiled block by block, one
block's code serves its whole stack, and the element-wise work between the matrix products
is fused (the README has the figures).

Left eager, because traced they would compile again for each new batch after the warm-up:
- attention over the vision tower's packed images (see `leave_vision_attention_eager`);
- generation (extraction rules): its key-value cache differs per layer and per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: variants dynamo keeps per code before it runs new ones eagerly. The blocks of both stacks
#: share their wrapper's code, and so this count: per stack, a batch of one, of several,
#: padded, and each again for each LoRA adapter in use. Process-wide (`cache_size_limit`:
#: the name torch 2.6 knows, still an alias of `recompile_limit` since)
RECOMPILE_LIMIT = 64


def compile_repeated_blocks(model: torch.nn.Module) -> int:
    """Compile each block of every stack (a ModuleList of two or more modules of one class)
    outside an already compiled block. Returns how many blocks were compiled; a model with no
    such stack is compiled whole (0)."""
    torch._dynamo.config.cache_size_limit = max(
        torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT
    )
    compiled: list[str] = []
    for name, stack in model.named_modules():
        if not isinstance(stack, torch.nn.ModuleList) or len(stack) < 2:
            continue
        if len({type(block) for block in stack}) != 1:
            continue
        if any(name.startswith(f"{outer}.") for outer in compiled):
            continue
        for index, block in enumerate(stack):
            block.compile(dynamic=True)
            compiled.append(f"{name}.{index}")
    if not compiled:
        model.compile(dynamic=True)
    return len(compiled)


def leave_vision_attention_eager(model: Any) -> None:
    """Run the vision blocks' attention modules outside the compiled graphs. For any
    attention but secondlook's grouped SDPA (which is left out of them by itself), they
    split the packed images on the host, and a traced split compiles again for each new
    count of images in a batch."""
    inner = getattr(model, "model", model)
    for block in getattr(getattr(inner, "visual", None), "blocks", None) or []:
        attention = getattr(block, "attn", None)
        if isinstance(attention, torch.nn.Module):
            attention.forward = torch.compiler.disable(attention.forward)


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules as plain PyTorch while in the block. The setting is the
    process's, not the thread's: this relies on one model thread per process (the daemon's
    model thread, or the model process), so that no compiled pass runs meanwhile."""
    with torch.compiler.set_stance("force_eager"):
        yield
