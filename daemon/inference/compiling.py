"""torch.compile for the scoring pass: each block of the model's stacks, not the whole model.

A Qwen2-VL-family model is two stacks of identical blocks (the vision tower's, the language
model's decoder layers) joined by host-side steps (image positions, sequence boundaries read
back). Compiled whole, every such step breaks the graph, and a first pass on an H200 did not
finish in 200 s; compiled block by block, one block's code serves its whole stack: 10.7 s to
compile there, 2.7 s for a new shape, and a pass over 16 verdicts at 1920x1080 took 80.9 ms
instead of 116.1 (the element-wise work between the matrix products is fused).

Generation (extraction rules) runs eagerly: its key-value cache differs per layer and per
step, so each decoder layer would compile again for each, up to dynamo's limit, for steps
that are bound by dispatch anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def compile_repeated_blocks(model: torch.nn.Module) -> int:
    """Compile each block of every stack (a ModuleList of two or more modules of one class)
    outside an already compiled block. Returns how many blocks were compiled; a model with no
    such stack is compiled whole (0)."""
    # the stacks' blocks share their wrapper's code, and so dynamo's count of variants per
    # code: a batch of one, of several, padded, for each stack (and for LoRA adapters on)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
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
        model.compile()
    return len(compiled)


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules as plain PyTorch while in the block."""
    with torch.compiler.set_stance("force_eager"):
        yield
