"""Helpers shared by tests that build tiny checkpoints (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


def fine_tune(model, seed: int) -> None:
    """Stand-in for training: change a random 3% of the elements of every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            mask = torch.rand(p.shape, generator=gen) < 0.03
            noise = torch.randn(p.shape, generator=gen) * 0.05
            p.copy_(torch.where(mask, (p.float() + noise).to(p.dtype), p))
