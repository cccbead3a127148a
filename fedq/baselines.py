"""The yardsticks of ``fedq simulate``: the centralized model and each bank's local-only model.

A yardstick is only honest if it is trained to convergence: a federated model that
"beats" an under-trained centralized model has beaten nothing. So each baseline is
fitted to (near) the optimum of its objective, and :class:`Fitted` says how:

- **logreg**: full-batch L-BFGS (``torch.optim.LBFGS``, strong Wolfe line search)
  on the task's weighted log loss plus an L2 term ``||W||^2 / (2 n)`` on the
  weights (biases are not penalised). That is exactly the objective of
  scikit-learn's ``LogisticRegression(C=1.0)`` (with the positive weight as
  ``class_weight``): small for the pooled data, a sensible prior for a bank with a
  few hundred rows, and it keeps the weights finite on separable or one-class
  shards. The problem is convex, so L-BFGS reaches the optimum in tens of passes.
  It stops when the loss or the step changes by less than :data:`TOLERANCE`, or the
  gradient is below :data:`GRAD_TOLERANCE`, or after ``max_epochs`` full passes.
- **mlp**: Adam on shuffled mini-batches with early stopping on an internal
  validation split (:data:`VAL_FRACTION` of the rows, picked by ``seed``): the
  best validation epoch's weights are kept, and training stops after
  :data:`PATIENCE` epochs without improvement. L-BFGS would drive a non-convex MLP
  to a training-loss optimum that overfits a small shard (German credit gives a
  bank ~120 rows for thousands of weights); early stopping picks the model that
  generalises, which is what a fair yardstick is. The same L2 term is added.
  Dropout is not used in the fit: it draws from torch's global generator, which
  threads share, and would make the result depend on scheduling.

Fits run in float64 (the returned parameters are float32, as the wire carries)
and start from the task's version-0 model (:func:`common.models.build_task_model`).

:func:`fit_all` fits the centralized model and every bank's local one in a thread
pool. Measured on the shared 2-core box this was written on (50,000 rows x 20
features, logreg, 5 and 20 banks): all fits took 0.5-0.7 s in threads (1 or 2
workers alike: the small operations hold the GIL most of the time) against 8-12 s
in a process pool, whose workers spend seconds importing torch and receiving their
data, far longer than the fits. Every fit runs with torch's intra-op threads pinned
to 1 (see :func:`fit`): the same seeds give the same parameters bit for bit,
whatever ``workers`` is.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.models import build_task_model, model_tensors
from common.spec import TaskSpec
from common.wire import Tensors

__all__ = [
    "CENTRALIZED",
    "GRAD_TOLERANCE",
    "PATIENCE",
    "TOLERANCE",
    "VAL_FRACTION",
    "Fitted",
    "fit",
    "fit_all",
]

#: The name :func:`fit_all` passes to ``on_done`` when the centralized model is fitted.
CENTRALIZED = "centralized"
#: L-BFGS stops when the loss or a step changes by less than this.
TOLERANCE = 1e-9
#: L-BFGS stops when no gradient component is larger than this.
GRAD_TOLERANCE = 1e-7
#: The MLP's early stopping: its share of rows held out, and the epochs without a
#: better validation loss it waits.
VAL_FRACTION = 0.2
PATIENCE = 10
#: The MLP's Adam step size, its smallest mini-batch, and the most mini-batches in
#: an epoch (larger shards take larger batches, so an epoch costs the same bounded
#: number of steps whatever the rows).
MLP_LR = 3e-3
MLP_BATCH = 64
MLP_STEPS = 50
#: A shard with fewer rows than this trains the MLP on all of them, for max_epochs.
MIN_VAL_SPLIT = 20


class _OneThread:
    """Pins torch's intra-op threads to 1 while any fit runs; restores them after the last.

    torch's thread count is process-wide, so the pin is counted across threads:
    the first fit in sets it, the last one out restores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved = 1

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                torch.set_num_threads(self._saved)


_one_thread = _OneThread()


@dataclass(frozen=True)
class Fitted:
    """A fitted baseline.

    ``how`` says how it was fitted (JSON-able): ``method`` ("lbfgs" or "adam"),
    ``epochs`` (full passes over the data; for L-BFGS, loss-and-gradient
    evaluations), ``converged`` (stopped by its tolerance or early stopping, not by
    ``max_epochs``), ``train_loss`` (the final training objective, L2 included),
    ``seconds``, ``l2``, ``rows`` and method details (``iterations``; ``val_loss``,
    ``best_epoch``).
    """

    params: Tensors
    how: dict[str, Any]


def _loss_fn(spec: TaskSpec) -> nn.BCEWithLogitsLoss:
    weight = spec.training.positive_weight
    return nn.BCEWithLogitsLoss(
        pos_weight=None if weight == 1.0 else torch.tensor([weight], dtype=torch.float64)
    )


def _penalty(model: nn.Module) -> torch.Tensor:
    """Half the squared norm of the weight matrices (not the biases)."""
    return sum(
        (0.5 * (p**2).sum() for name, p in model.named_parameters() if name.endswith("weight")),
        torch.zeros((), dtype=torch.float64),
    )


def fit(spec: TaskSpec, x: torch.Tensor, y: torch.Tensor, *, max_epochs: int, seed: int) -> Fitted:
    """The task's model fitted on ``(x, y)`` alone, from version 0 (see the module doc).

    The positive class's weight is ``spec.training.positive_weight``. ``seed`` picks
    the MLP's validation split and batch order (the logistic fit uses no randomness).
    Never raises for a small or one-class sample; with no rows it returns the
    version-0 model, ``converged`` False.

    While it runs, torch's intra-op threads are set to 1 (process-wide; restored
    when the last running fit ends): the reductions then run in one fixed order, so
    the result is the same bit for bit however many fits run at once, and on a busy
    machine it is many times faster than torch's default threads fighting over each
    small operation (measured: 7x for a small MLP on 2 loaded cores).
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, not {max_epochs}")
    with _one_thread:
        return _fit(spec, x, y, max_epochs=max_epochs, seed=seed)


def _fit(spec: TaskSpec, x: torch.Tensor, y: torch.Tensor, *, max_epochs: int, seed: int) -> Fitted:
    start = time.perf_counter()
    model = build_task_model(spec).double()
    model.eval()  # no dropout: see the module doc
    xd, yd = x.detach().double(), y.detach().double().reshape(-1)
    n = len(yd)
    if n == 0:
        how: dict[str, Any] = {"method": "none", "epochs": 0, "converged": False}
        how.update(train_loss=None, reason="no rows")
    elif spec.model.kind == "logreg":
        how = _lbfgs(model, _loss_fn(spec), xd, yd, max_epochs)
    else:
        how = _adam(model, _loss_fn(spec), xd, yd, max_epochs, seed)
    how.update(l2=1.0 / n if n else 0.0, rows=n, seconds=time.perf_counter() - start)
    params = model_tensors(model.float())
    if not all(bool(torch.isfinite(t).all()) for t in params.values()):
        # Cannot happen with the L2 term; kept so a report never holds NaN weights.
        how.update(converged=False, reason="non-finite weights; version 0 kept")
        params = model_tensors(build_task_model(spec))
    return Fitted(params=params, how=how)


def _lbfgs(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, max_epochs: int
) -> dict[str, Any]:
    l2 = 1.0 / len(y)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_epochs,
        max_eval=max_epochs,
        tolerance_grad=GRAD_TOLERANCE,
        tolerance_change=TOLERANCE,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x).squeeze(1), y) + l2 * _penalty(model)
        loss.backward()
        return loss  # type: ignore[no-any-return]

    opt.step(closure)  # type: ignore[no-untyped-call]
    state = opt.state[next(iter(model.parameters()))]
    evals, iters = int(state["func_evals"]), int(state["n_iter"])
    with torch.no_grad():
        final = float(loss_fn(model(x).squeeze(1), y) + l2 * _penalty(model))
    return {
        "method": "lbfgs",
        "epochs": evals,
        "iterations": iters,
        "converged": evals < max_epochs and iters < max_epochs,
        "train_loss": final if math.isfinite(final) else None,
    }


def _adam(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    max_epochs: int,
    seed: int,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    order = torch.randperm(n, generator=gen)
    n_val = round(VAL_FRACTION * n) if n >= MIN_VAL_SPLIT else 0
    val, train = order[:n_val], order[n_val:]
    l2 = 1.0 / len(train)
    batch = max(MLP_BATCH, math.ceil(len(train) / MLP_STEPS))
    # Adam's (coupled) weight_decay adds l2 * w to the gradient: the gradient of the
    # L2 term, on the weights only, without building it into every step's graph.
    named = list(model.named_parameters())
    opt = torch.optim.Adam(
        [
            {"params": [p for k, p in named if k.endswith("weight")], "weight_decay": l2},
            {"params": [p for k, p in named if not k.endswith("weight")], "weight_decay": 0.0},
        ],
        lr=MLP_LR,
        foreach=True,
    )
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        for idx in torch.split(train[torch.randperm(len(train), generator=gen)], batch):
            opt.zero_grad()
            loss = loss_fn(model(x[idx]).squeeze(1), y[idx])
            loss.backward()
            opt.step()
        if n_val:
            with torch.no_grad():
                v = float(loss_fn(model(x[val]).squeeze(1), y[val]))
            if best is None or v < best[0]:
                best = (v, epoch, {k: t.clone() for k, t in model.state_dict().items()})
            elif epoch - best[1] >= PATIENCE:
                break
    how: dict[str, Any] = {"method": "adam", "epochs": epoch, "val_rows": n_val, "batch": batch}
    if best is not None:
        model.load_state_dict(best[2])
        how.update(val_loss=best[0], best_epoch=best[1], converged=epoch - best[1] >= PATIENCE)
    else:
        how["converged"] = False
    with torch.no_grad():
        final = float(loss_fn(model(x[train]).squeeze(1), y[train]) + l2 * _penalty(model))
    how["train_loss"] = final if math.isfinite(final) else None
    return how


def fit_all(
    spec: TaskSpec,
    pooled: tuple[torch.Tensor, torch.Tensor],
    banks: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    max_epochs: int,
    seed: int,
    workers: int,
    on_done: Callable[[str], None] | None = None,
) -> tuple[Fitted, dict[str, Fitted]]:
    """The centralized model (fitted on ``pooled``) and each bank's local-only model.

    Up to ``workers`` fits run at once in a thread pool (1: one after the other, in
    this thread). ``on_done(name)`` is called in *this* thread as each fit finishes,
    with :data:`CENTRALIZED` for the pooled fit and the bank's name for the others.
    The banks' dict keeps the order of ``banks``. Like :func:`fit`, it runs with
    torch's intra-op threads at 1 (restored after), so the results do not depend on
    ``workers``.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    jobs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {CENTRALIZED: pooled}
    if CENTRALIZED in banks:
        raise ValueError(f"a bank may not be named {CENTRALIZED!r}")
    jobs.update(banks)
    done: dict[str, Fitted] = {}
    with _one_thread:
        if workers == 1:
            for name, (x, y) in jobs.items():
                done[name] = fit(spec, x, y, max_epochs=max_epochs, seed=seed)
                if on_done is not None:
                    on_done(name)
        else:
            _in_pool(spec, jobs, done, max_epochs, seed, workers, on_done)
    return done[CENTRALIZED], {name: done[name] for name in banks}


def _in_pool(
    spec: TaskSpec,
    jobs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    done: dict[str, Fitted],
    max_epochs: int,
    seed: int,
    workers: int,
    on_done: Callable[[str], None] | None,
) -> None:
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedq-baseline") as pool:
        pending: dict[Future[Fitted], str] = {
            pool.submit(fit, spec, x, y, max_epochs=max_epochs, seed=seed): name
            for name, (x, y) in jobs.items()
        }
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = pending.pop(future)
                    done[name] = future.result()
                    if on_done is not None:
                        on_done(name)
        finally:
            for future in pending:
                future.cancel()
