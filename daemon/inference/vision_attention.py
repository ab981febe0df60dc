"""Vision-tower attention with one SDPA call per sequence length, not one per image.

A Qwen2-VL-family vision tower packs a batch's images into one sequence and attends within
each image (Qwen2.5-VL also within windows of an image). With PyTorch's SDPA, transformers
splits that sequence on the host, reading the boundaries back from the device in every
layer, and calls attention once per image: for 16 snapshots and 32 layers, 512 small calls
and 32 device syncs per batch (for Qwen2.5-VL's windows, hundreds of calls per layer).
Snapshots from one camera share a size, so their images are sequences of one length and go
through SDPA as one batch: (images, heads, length, head_dim). Mixed lengths are grouped, one
call per distinct length.

transformers passes the boundaries (`cu_seq_lens_q`) only to attention functions whose name
names flash attention (its variable-length path), so this one is registered under such a
name and set on the vision config alone; the language model keeps SDPA.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "flash_grouped_sdpa"

#: boundaries tensor -> its length groups; a forward reuses one or two boundary tensors in
#: every layer, so the host reads them once per forward
_groups_cache: dict[int, tuple[weakref.ref[torch.Tensor], list[tuple[int, torch.Tensor]]]] = {}


def _length_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Per distinct sequence length: the positions of all its sequences' tokens."""
    cached = _groups_cache.get(id(cu_seqlens))
    if cached is not None and cached[0]() is cu_seqlens:
        return cached[1]
    bounds = cu_seqlens.tolist()
    starts: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            starts.setdefault(end - start, []).append(start)
    groups = [
        (
            length,
            (torch.tensor(firsts)[:, None] + torch.arange(length)).flatten().to(cu_seqlens.device),
        )
        for length, firsts in starts.items()
    ]
    if len(_groups_cache) >= 8:
        _groups_cache.clear()
    _groups_cache[id(cu_seqlens)] = (weakref.ref(cu_seqlens), groups)
    return groups


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, length: int, scaling: float | None
) -> torch.Tensor:
    """Attention within consecutive sequences of `length` tokens of (1, heads, n * length,
    head_dim) inputs; returns (n * length, heads, head_dim)."""
    count = query.shape[2] // length

    def batched(states: torch.Tensor) -> torch.Tensor:
        return states[0].unflatten(1, (count, length)).transpose(0, 1)

    output = F.scaled_dot_product_attention(
        batched(query), batched(key), batched(value), scale=scaling
    )
    return output.transpose(1, 2).reshape(count * length, output.shape[1], output.shape[3])


@torch.compiler.disable
def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed sequence; (1, total, heads, head_dim) like transformers'
    attention functions. Inference only: no dropout, no mask beyond the boundaries.

    Left out of torch.compile (its work is SDPA's kernels, nothing to fuse): traced, its
    branches on the boundaries would be compiled again for each new image count and mix of
    lengths."""
    if cu_seq_lens_q is None:
        # attending across the whole packed sequence would mix the images
        raise ValueError("grouped vision attention needs the sequence boundaries (cu_seq_lens_q)")
    total = query.shape[2]
    count = cu_seq_lens_q.shape[0] - 1
    if isinstance(max_length_q, int) and max_length_q * count == total:
        # every sequence is as long as the longest: no need to read the boundaries (older
        # transformers pass the longest as a tensor: the boundaries are read then)
        return _attend(query, key, value, max_length_q, scaling).unsqueeze(0), None
    output = query.new_empty(total, query.shape[1], query.shape[3])
    for length, positions in _length_groups(cu_seq_lens_q):
        picked = (states.index_select(2, positions) for states in (query, key, value))
        output.index_copy_(0, positions, _attend(*picked, length, scaling))
    return output.unsqueeze(0), None


AttentionInterface.register(NAME, grouped_sdpa)


def use_grouped_attention(model: Any) -> bool:
    """Route the model's vision tower through `grouped_sdpa` when it runs on SDPA.

    Returns whether it did: a model without a vision config, or on another attention
    implementation (eager, FlashAttention's own variable-length kernels), is left as it is.
    """
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    if vision is None or getattr(vision, "_attn_implementation", None) != "sdpa":
        return False
    vision._attn_implementation = NAME
    return True


@contextmanager
def stock_vision_attention(model: Any) -> Iterator[None]:
    """The vision tower on transformers' own per-image SDPA calls while in the block (the
    naive baseline of `secondlook bench`)."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    if vision is None or getattr(vision, "_attn_implementation", None) != NAME:
        yield
        return
    vision._attn_implementation = "sdpa"
    try:
        yield
    finally:
        vision._attn_implementation = NAME
