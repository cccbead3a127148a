"""Drift monitoring and federated evaluation at a bank (docs/drift.md).

On the task's schedule (``monitoring.interval_s``) the worker reads its recent rows
again (the bank's pipeline replaces the file), compares them with the spec's
reference and scores them with the model version it holds; it publishes a signed
drift summary and, when the recent rows carry the target column, a signed evaluation
of that version. Both are a few numbers per feature: no row, no score, no label
leaves the bank.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from common.drift import EVALUATION_METRICS, published, published_rows, score_drift
from common.errors import ConfigError
from common.evaluation import predict_proba, risk_metrics
from common.signing import SigningKey
from common.spec import TaskSpec
from common.wire import (
    DriftSummary,
    Evaluation,
    FeatureDrift,
    ModelEnvelope,
    encode_drift,
    encode_evaluation,
)
from participant.data import encode_features, encode_target, load_table
from participant.drift import feature_drift


@dataclass(frozen=True, slots=True)
class Reports:
    """What one monitoring pass publishes: the signed bodies and what they say."""

    drift: DriftSummary
    drift_body: bytes
    evaluation: Evaluation | None
    evaluation_body: bytes | None


class Monitor:
    """One bank's monitoring: its recent rows against the reference and its training rows."""

    def __init__(
        self,
        spec: TaskSpec,
        participant: str,
        recent: Path,
        signing_key: SigningKey | None,
    ) -> None:
        self.spec = spec
        self.participant = participant
        self.recent = recent
        self.signing_key = signing_key
        self.spec_hash = spec.spec_hash()

    def reports(self, model: ModelEnvelope, x_train: torch.Tensor) -> Reports:
        """Read the recent rows and build this pass's summaries; the score's reference is
        ``model`` on the bank's own training rows ``x_train``. ConfigError, with the
        reason: the file cannot be read or encoded, or holds fewer rows than the task's
        ``monitoring.min_rows`` (then nothing is published)."""
        df = load_table(self.recent)
        monitoring = self.spec.monitoring
        assert monitoring is not None  # the worker builds a Monitor only then
        if len(df) < monitoring.min_rows:
            # A summary of a handful of rows describes those rows (one row: the bin of
            # each of its values, its label): nothing leaves below the task's floor.
            raise ConfigError(
                f"recent rows {self.recent}: {len(df)} rows, fewer than the task's "
                f"monitoring.min_rows {monitoring.min_rows}; nothing published"
            )
        features = feature_drift(df, self.spec)
        x = encode_features(df, self.spec)
        with torch.no_grad():
            reference = predict_proba(self.spec, model.tensors, x_train).double().numpy()
            recent = predict_proba(self.spec, model.tensors, x).double().numpy()
        reference = np.nan_to_num(reference, nan=0.5)
        recent = np.nan_to_num(recent, nan=0.5)
        score_psi, score_ks = score_drift(reference, recent)
        now = time.time()
        drift = DriftSummary(
            task=self.spec.task_id,
            participant=self.participant,
            summary_id=uuid.uuid4().hex,
            spec_hash=self.spec_hash,
            version=model.version,
            rows=published_rows(len(df)),
            features={name: _rounded(p, ks) for name, (p, ks) in features.items()},
            score=_rounded(score_psi, score_ks),
            created_at=now,
        )
        evaluation = None
        labelled = self._labelled(df)
        if labelled is not None and labelled.sum() >= monitoring.min_rows:
            # Rows whose outcome is not known yet (an empty target cell) are left out.
            y = encode_target(df[labelled], self.spec).double().numpy()
            scored = risk_metrics(y, recent[labelled])
            scored["positive_rate"] = float(y.mean())
            metrics = {k: published(scored[k]) for k in EVALUATION_METRICS if scored[k] is not None}
            evaluation = Evaluation(
                task=self.spec.task_id,
                participant=self.participant,
                evaluation_id=uuid.uuid4().hex,
                spec_hash=self.spec_hash,
                version=model.version,
                version_hash=model.version_hash,
                rows=published_rows(len(y)),
                metrics=metrics,
                created_at=now,
            )
        return Reports(
            drift=drift,
            drift_body=encode_drift(drift, self.signing_key),
            evaluation=evaluation,
            evaluation_body=None
            if evaluation is None
            else encode_evaluation(evaluation, self.signing_key),
        )

    def _labelled(self, df: pd.DataFrame) -> npt.NDArray[np.bool_] | None:
        """Which rows carry an outcome (None: the file has no target column)."""
        name = self.spec.target.name
        if name not in {str(c) for c in df.columns}:
            return None
        return np.asarray(df[name].notna().to_numpy(), dtype=bool)


def _rounded(psi: float, ks: float | None) -> FeatureDrift:
    return FeatureDrift(published(psi), None if ks is None else published(ks))
