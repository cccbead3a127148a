"""A counterfactual model: the chain rebuilt without one participant, beside the real one.

:func:`aggregator.audit.replay.replay` with ``exclude`` rebuilds the parameters; this
module says how they differ from the real version's, scores both models on an
evaluation set given as already-encoded tensors (the caller encodes its table with
the task's feature schema), and writes the counterfactual model.

A version made by secure aggregation has no counterfactual without one of its
survivors: the aggregator only ever saw that cohort's masked sum, never the bank's
update on its own, so replay refuses (ReplayError, one line:
:func:`aggregator.audit.replay.refuse_secure_exclusion`); only the bank's own records,
or retraining without it, could say what it contributed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aggregator.audit.export import save_model
from aggregator.audit.replay import ReplayReport
from common.evaluation import evaluate
from common.spec import TaskSpec
from common.wire import Tensors, tensors_hash


@dataclass(frozen=True, slots=True)
class Counterfactual:
    """The rebuilt chain of ``report`` (made with ``exclude``) and the real head it ends at."""

    task: str
    report: ReplayReport
    #: The real parameters of ``report.to_version``.
    real: Tensors

    @property
    def excluded(self) -> str:
        return self.report.excluded or ""

    def summary(self) -> dict[str, Any]:
        """Who was left out, how many updates, and both parameter hashes."""
        real_hash = tensors_hash(self.real)
        return {
            "excluded": self.excluded,
            "updates_left_out": self.report.left_out,
            "counterfactual_param_hash": self.report.param_hash.hex(),
            "real_param_hash": real_hash.hex(),
            "differs": self.report.param_hash != real_hash,
        }

    def evaluate(
        self, spec: TaskSpec, x: torch.Tensor, y: torch.Tensor
    ) -> dict[str, dict[str, float]]:
        """Scores (AUC and the rest of :func:`common.evaluation.evaluate`) of both models."""
        return {
            "with_all": evaluate(spec, self.real, x, y),
            f"without_{self.excluded}": evaluate(spec, self.report.params, x, y),
        }

    def save(self, path: Path) -> None:
        """Write the counterfactual model (safetensors), its provenance in the metadata."""
        save_model(
            path,
            self.report.params,
            {
                "task": self.task,
                "counterfactual_without": self.excluded,
                "param_hash": self.report.param_hash.hex(),
            },
        )
