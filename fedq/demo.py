"""A small demo of the wire format and the model store.

Three simulated banks train a logistic regression on synthetic credit-like data.
Each update crosses the wire format (encode, decode with the task's shapes and
hard limits), the weighted mean of each round is committed to the store with its
lineage, and the hash chain is verified at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from aggregator.store import RedisModelStore, StoreConfig, connect_redis
from aggregator.strategies import AcceptedUpdate, weighted_step
from common.models import build_task_model, model_tensors, tensor_specs
from common.spec import NumericFeature, TargetSpec, TaskSpec, TrainingSettings
from common.wire import UpdateEnvelope, decode_update, encode_update


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """Settings of ``fedq demo``."""

    redis_url: str = "memory://"
    versions: int = 5
    banks: int = 3
    seed: int = 0
    prefix: str = "fedq-demo"


def _bank_data(bank: int, n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + bank)
    true_w = torch.linspace(-1.0, 1.0, dim)
    x = torch.randn(n, dim, generator=gen) + 0.3 * bank
    y = (torch.sigmoid(x @ true_w) > torch.rand(n, generator=gen)).float()
    return x, y


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: TrainingSettings) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    loss = torch.zeros(())
    for _ in range(settings.epochs):
        for i in range(0, len(x), settings.batch_size):
            opt.zero_grad()
            loss = loss_fn(
                model(x[i : i + settings.batch_size]).squeeze(1), y[i : i + settings.batch_size]
            )
            loss.backward()
            opt.step()
    return float(loss.detach())


async def run_demo(config: DemoConfig, console: Console) -> bool:
    """Run the demo; True when the store's hash chain verifies."""
    spec = TaskSpec(
        task_id=f"demo-{uuid.uuid4().hex[:8]}",
        features=tuple(NumericFeature(name=f"x{i}") for i in range(6)),
        target=TargetSpec(name="default"),
        training=TrainingSettings(epochs=2, lr=0.1),
        seed=config.seed,
    )
    store = RedisModelStore(connect_redis(config.redis_url), StoreConfig(prefix=config.prefix))
    try:
        await store.register_task(spec)
        global_params = model_tensors(build_task_model(spec))
        await store.create_genesis(spec.task_id, global_params, info={"strategy": "demo-fedavg"})
        expected = tensor_specs(global_params)
        data = [
            _bank_data(b, 200 + 100 * b, spec.input_dim, config.seed) for b in range(config.banks)
        ]
        wire_bytes = 0
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("training", total=config.versions)
            for version in range(config.versions):
                updates: list[AcceptedUpdate] = []
                for bank, (x, y) in enumerate(data):
                    model = build_task_model(spec)
                    model.load_state_dict(global_params)
                    _train(model, x, y, spec.training)
                    delta = {k: v - global_params[k] for k, v in model_tensors(model).items()}
                    message, _ = encode_update(
                        UpdateEnvelope(
                            task=spec.task_id,
                            participant=f"bank-{chr(ord('a') + bank)}",
                            update_id=uuid.uuid4().hex,
                            base_version=version,
                            num_samples=len(x),
                            tensors=delta,
                            created_at=time.time(),
                        )
                    )
                    wire_bytes += len(message)
                    env = decode_update(message, expected=expected)
                    updates.append(
                        AcceptedUpdate(
                            env.update_id,
                            env.participant,
                            env.base_version,
                            version - env.base_version,
                            env.num_samples,
                            env.tensors,
                            env.content_hash,
                        )
                    )
                total = sum(u.num_samples for u in updates)
                step = weighted_step(
                    global_params, updates, [u.num_samples / total for u in updates]
                )
                global_params = step.params
                result = await store.commit(
                    spec.task_id, parent=version, params=global_params, lineage=step.lineage
                )
                if not result.committed:
                    raise RuntimeError(f"demo commit refused: {result.outcome.value}")
                progress.advance(bar)

        table = Table(title=f"task {spec.task_id}: versions in the store")
        for column in ("version", "parent", "updates", "weights", "version hash"):
            table.add_column(column)
        for v in range(config.versions + 1):
            rec = await store.get_version(spec.task_id, v)
            table.add_row(
                str(v),
                "-" if rec.parent is None else str(rec.parent),
                str(len(rec.lineage)),
                " ".join(f"{e.weight:g}" for e in rec.lineage) or "-",
                rec.version_hash.hex()[:16],
            )
        console.print(table)
        report = await store.verify_chain(spec.task_id)
        console.print(
            f"{config.banks} banks, {config.versions * config.banks} updates, "
            f"{wire_bytes / 1024:.1f} KiB on the wire; store: {config.redis_url}"
        )
        if report.ok:
            console.print(f"[green]hash chain verified[/] over {report.checked} versions")
        else:
            console.print(
                f"[red]hash chain broken at version {report.first_bad_version}: {report.reason}"
            )
        return report.ok
    finally:
        await store.close()


def main(config: DemoConfig, console: Console) -> bool:
    """Entry point for the CLI."""
    return asyncio.run(run_demo(config, console))
