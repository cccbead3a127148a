"""Local training at a participant: pure and synchronous (runs in a worker thread)."""

from __future__ import annotations

import torch
from torch import nn

from common.models import build_task_model
from common.spec import TaskSpec
from common.wire import Tensors


def train_local(
    spec: TaskSpec, params: Tensors, x: torch.Tensor, y: torch.Tensor, *, seed: int
) -> tuple[Tensors, dict[str, float]]:
    """Train from ``params`` on ``(x, y)``; returns the delta (local - params) and metrics.

    Settings come from ``spec.training``: epochs, batch size, SGD learning rate, the
    weight of class 1 in the loss (``positive_weight``, for rare positives), and the
    FedProx proximal term ``mu/2 * ||w - params||^2`` when ``prox_mu > 0``.
    Shuffling uses a private generator seeded by ``seed``.
    """
    settings = spec.training
    model = build_task_model(spec)
    model.load_state_dict(params)
    model.train()
    anchors = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    weight = settings.positive_weight
    loss_fn = nn.BCEWithLogitsLoss(
        pos_weight=None if weight == 1.0 else torch.tensor([weight], dtype=torch.float32)
    )
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    total, batches = 0.0, 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, settings.batch_size):
            idx = order[i : i + settings.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]).squeeze(1), y[idx])
            if settings.prox_mu > 0:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True)
                )
                loss = loss + 0.5 * settings.prox_mu * prox
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
    local = model.state_dict()
    delta = {k: (local[k].detach() - v).contiguous() for k, v in params.items()}
    return delta, {"train_loss": total / max(batches, 1)}
