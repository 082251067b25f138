"""Row surgery on a transformers `DynamicCache` of left-padded rows: what continuous batching needs.

Rows are laid out [pads, prefix, prompt, generated] with one shared length L; the attention mask ([B, L], 0 on
pads) says which cache entries are real. Rows join (`merge`: the shorter cache is left-padded with zeros, masked
out), leave (`select_rows`), and columns that are padding in every remaining row are dropped (`trim_left`), so a
long request that finished does not leave its length behind. Position ids live outside the cache (each row counts
only its real positions), so none of this moves a row's positions.

Only plain full-attention layers (`DynamicLayer`) can be merged this way; a model with sliding-window or linear
attention layers gets `mergeable() == False` and the engine falls back to admitting new rows only between
batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:  # [B, H, L, D] -> [B, H, n + L, D]
    return F.pad(t, (0, 0, n, 0)) if n else t


def merge(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> tuple[object, torch.Tensor]:
    """Append the rows of (`new_cache`, `new_mask`) to (`cache`, `mask`); returns the merged (cache, mask)."""
    la, lb = mask.shape[1], new_mask.shape[1]
    width = max(la, lb)
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([_left_pad(layer.keys, width - la), _left_pad(new.keys, width - lb)], dim=0)
        layer.values = torch.cat([_left_pad(layer.values, width - la), _left_pad(new.values, width - lb)], dim=0)
    mask = torch.cat([F.pad(mask, (width - la, 0)), F.pad(new_mask, (width - lb, 0))], dim=0)
    return cache, mask


def select_rows(cache, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only the rows `keep` (in place on the cache); returns the mask of those rows."""
    cache.batch_select_indices(keep)
    return mask[keep]


def trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row; returns the trimmed mask."""
    real = mask.any(dim=0).nonzero()
    first = int(real[0]) if len(real) else mask.shape[1]
    if first == 0:
        return mask
    for layer in cache.layers:
        layer.keys = layer.keys[..., first:, :]
        layer.values = layer.values[..., first:, :]
    return mask[:, first:]
