"""Task specifications: the model, the features and target, the mode and its settings.

A task spec is what every party agrees on before training starts. It is plain
data (pydantic models, JSON or TOML on disk); everything is validated when it is
built, so a bad spec fails with a reason at the edge, never deep in a run.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from common.agreement import AGREEMENT_PREFIX, AgreementPublicKey
from common.errors import SpecError
from common.ids import MAX_COHORT, NAME_RE
from common.signing import KEY_PATTERN, PublicKey

Name = Annotated[str, Field(pattern=f"^{NAME_RE.pattern}$")]
#: An Ed25519 public key: ``ed25519:`` + 64 lowercase hex digits (common.signing).
KeyText = Annotated[str, Field(pattern=KEY_PATTERN)]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NumericFeature(_Spec):
    """A numeric column, standardised with statistics shared by every participant."""

    name: str = Field(min_length=1)
    kind: Literal["numeric"] = "numeric"
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)
    #: Value used for a missing cell before scaling; the mean when unset.
    fill: float | None = None


class CategoricalFeature(_Spec):
    """A categorical column, one-hot encoded over a fixed vocabulary plus 'unknown'."""

    name: str = Field(min_length=1)
    kind: Literal["categorical"] = "categorical"
    vocabulary: tuple[str, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        if len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"vocabulary of {self.name!r} has repeated values")
        return self


Feature = Annotated[NumericFeature | CategoricalFeature, Field(discriminator="kind")]


class TargetSpec(_Spec):
    """The binary target column; ``positive`` names the value of class 1 when it is not 1."""

    name: str = Field(min_length=1)
    positive: str | None = None


class ModelSpec(_Spec):
    """A binary classifier over the encoded features.

    ``logreg`` is one linear layer; ``mlp`` has the given hidden layers. Both output
    one logit; the probability is its sigmoid.
    """

    kind: Literal["logreg", "mlp"] = "logreg"
    hidden: tuple[Annotated[int, Field(gt=0, le=65536)], ...] = ()
    activation: Literal["relu", "tanh"] = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _hidden_matches_kind(self) -> Self:
        if self.kind == "logreg" and self.hidden:
            raise ValueError("logreg has no hidden layers; use kind 'mlp'")
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("mlp needs at least one hidden layer")
        return self


class StalenessSpec(_Spec):
    """Staleness weighting ``s(t - v)``, as defined in :mod:`common.staleness`."""

    kind: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = Field(default=0.5, ge=0)
    b: int = Field(default=4, ge=0)


class ServerOptimizerSpec(_Spec):
    """The server's optimizer over the aggregated delta (Reddi et al., 2021, "Adaptive
    Federated Optimization"), for FedBuff and sync rounds.

    ``sgd`` applies the aggregated delta as it is (plain FedAvg / FedBuff); ``momentum``
    is server momentum (FedAvgM); ``adam`` and ``yogi`` are FedAdam and FedYogi, with
    ``lr`` the server learning rate, ``beta1``/``beta2`` the moment decays and ``tau``
    the adaptivity (the epsilon of the paper).
    """

    kind: Literal["sgd", "momentum", "adam", "yogi"] = "sgd"
    lr: float = Field(default=1.0, gt=0, le=100)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


#: How async strategies weigh an update besides its staleness (see AsyncSettings.weighting).
Weighting = Literal["staleness", "samples", "balanced"]

#: The unit staleness is measured and bounded in (see AsyncSettings.staleness_unit).
StalenessUnit = Literal["rounds", "versions"]


class AsyncSettings(_Spec):
    """FedAsync (mix each update in), FedBuff (buffer K deltas, then step) or another
    registered async strategy, and the settings they read."""

    #: A strategy name registered in ``aggregator.strategies.STRATEGIES`` (checked
    #: when the strategy is built, as the registry is not part of the spec).
    strategy: str = Field(default="fedasync", pattern=r"^[a-z][a-z0-9_]*$", max_length=64)
    mixing: float = Field(default=0.6, gt=0, le=1)
    staleness: StalenessSpec = StalenessSpec()
    #: ``rounds``: staleness ``t - v`` is counted in rounds of the federation (one
    #: round = one update per participant, so ``(t - v) * updates per version /
    #: participants``) for both ``s(.)`` and ``max_staleness``, and does not grow
    #: with the number of banks; ``versions``: raw ``t - v``.
    staleness_unit: StalenessUnit = "rounds"
    #: The hard bound, in ``staleness_unit``: an older update is refused ``too_stale``;
    #: below it an update is down-weighted by ``s(.)``, never refused for its age.
    max_staleness: int = Field(default=20, ge=0)
    buffer_size: int = Field(default=3, ge=1)
    server_lr: float = Field(default=1.0, gt=0)
    #: ``staleness``: ``s(.)`` only (factor 1); ``samples``: also the update's sample
    #: count relative to the participants' mean, ``N * min(n, bound) / sum of declared``,
    #: bounded by ``max_boost`` (1 unless every participant declared its samples);
    #: ``balanced``: also normalised by each bank's recent update rate so that its
    #: share of weight follows its share of the data, whatever its speed (a slow bank's
    #: updates weigh more, a fast one's less). Formulas: :mod:`aggregator.weighting`.
    weighting: Weighting = "balanced"
    #: The factor weighting may multiply an update's weight by lies in
    #: ``[1 / max_boost, max_boost]`` (FedAsync's ``a_t`` stays at most 1).
    max_boost: float = Field(default=10.0, ge=1, le=1000)
    #: How many recent accepted updates (lineage entries) ``balanced`` measures update
    #: rates over, and low-weight flagging measures shares over; 0: ``20 *`` the number
    #: of participants (20 rounds).
    balance_window: int = Field(default=0, ge=0, le=1_000_000)


class SyncSettings(_Spec):
    """FedAvg rounds: aggregate at a quorum, or at the deadline with a minimum."""

    quorum: int = Field(default=0, ge=0, description="updates per round; 0 means every participant")
    deadline_s: float | None = Field(default=None, gt=0)
    min_updates: int = Field(default=1, ge=1)
    weighted: bool = True
    late: Literal["refuse", "stale"] = "refuse"
    #: With ``late = "stale"``: the staleness weighting of late updates.
    staleness: StalenessSpec = StalenessSpec()
    #: The oldest round an update may be trained on, in rounds behind the current one.
    max_staleness: int = Field(default=20, ge=0)


class TrainingSettings(_Spec):
    """Local training at each participant."""

    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=0.05, gt=0)
    prox_mu: float = Field(default=0.0, ge=0)
    #: Weight of class 1 in the local loss (``BCEWithLogitsLoss(pos_weight=...)``):
    #: rare positives (fraud) count more. Fixed in the spec so every bank trains with
    #: the same one; see :func:`positive_weight_for`.
    positive_weight: float = Field(default=1.0, gt=0, le=1e6)


class IdentitySpec(_Spec):
    """Who signs what (common/signing.py, docs/wire-format.md section 15).

    ``participant_keys`` names each participant's Ed25519 public key and
    ``aggregator_key`` the aggregator's, which signs every model it announces and every
    receipt. With ``require_signatures`` the aggregator refuses an update without a
    signature (``unsigned``) or whose signature does not verify under its
    participant's key (``bad_signature``), and participants refuse an unsigned or
    forged model. A key is rotated or revoked by registering a spec with the new key
    (or without it): the spec history records the version it applies from, and replay
    checks each update against the key in force when it was admitted.
    ``agreement_keys`` names each bank's X25519 public key (``x25519:`` + 64 hex digits,
    derived from its signing key: ``fedq keys show``), from which every pair of banks
    agrees on its masks under secure aggregation (common/agreement.py).
    """

    require_signatures: bool = False
    aggregator_key: KeyText | None = None
    participant_keys: dict[Name, KeyText] = Field(default_factory=dict)
    agreement_keys: dict[Name, str] = Field(default_factory=dict)

    @field_validator("participant_keys")
    @classmethod
    def _sorted(cls, keys: dict[str, str]) -> dict[str, str]:
        return dict(sorted(keys.items()))  # canonical: the spec hash must not depend on order

    @field_validator("agreement_keys")
    @classmethod
    def _canonical_agreement_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        # Canonical: sorted, hex in lowercase (the spec hash must not depend on either);
        # anything else is refused by _keys_needed.
        n = len(AGREEMENT_PREFIX)
        return {
            name: text[:n] + text[n:].lower() if text.startswith(AGREEMENT_PREFIX) else text
            for name, text in sorted(keys.items())
        }

    @model_validator(mode="after")
    def _keys_needed(self) -> Self:
        if self.require_signatures and self.aggregator_key is None:
            raise ValueError("require_signatures needs the aggregator_key")
        named = [*self.participant_keys.values(), *filter(None, [self.aggregator_key])]
        for text in set(named):
            try:
                PublicKey.parse(text)  # weak or non-canonical keys are refused here
            except SpecError as e:
                raise ValueError(str(e)) from None
        if len(set(named)) != len(named):
            raise ValueError("two parties share a public key: each needs its own")
        agreement = list(self.agreement_keys.values())
        for text in set(agreement):
            try:
                AgreementPublicKey.parse(text)  # weak (low-order) keys are refused here
            except SpecError as e:
                raise ValueError(str(e)) from None
        if len(set(agreement)) != len(agreement):
            raise ValueError("two parties share an agreement key: each needs its own")
        return self


class RecordPrivacy(_Spec):
    """Record-level DP at each bank: DP-SGD (Abadi et al. 2016) in local training.

    Each local step samples every training row independently with probability
    ``q = batch_size / rows`` (Poisson sampling, what the accountant assumes), clips
    each row's gradient to L2 norm ``clip``, adds Gaussian noise of standard deviation
    ``noise_multiplier * clip`` to their sum and divides by ``q * rows``. The bank's
    accountant (common/privacy.py) composes every step it took; an update whose steps
    would take the bank past ``epsilon_budget`` is not trained: the worker stops.
    """

    clip: float = Field(default=1.0, gt=0)
    noise_multiplier: float = Field(gt=0, le=1000)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(default=None, gt=0)


class LaplacePrivacy(_Spec):
    """The Laplace mechanism on each whole update, at the bank (pure epsilon-DP).

    The delta is clipped to L1 norm ``clip_l1``, so two updates differ by at most
    ``2 * clip_l1`` in L1; Laplace noise of scale ``2 * clip_l1 / epsilon`` makes each
    update ``epsilon``-DP with respect to the bank's whole data (local DP: also against
    the aggregator). Releases compose by addition up to ``epsilon_budget``.
    """

    clip_l1: float = Field(gt=0)
    epsilon: float = Field(gt=0)
    epsilon_budget: float | None = Field(default=None, gt=0)


class BankPrivacy(_Spec):
    """Bank-level DP at the aggregator (DP-FedAvg, McMahan et al. 2018; adaptive
    clipping, Andrew et al. 2021): each update's delta clipped to L2 norm ``clip``
    (adapted towards the ``target_quantile`` of update norms when ``adaptive``), and
    Gaussian noise of standard deviation ``noise_multiplier`` times the aggregate's
    sensitivity added to each version, from a seed recorded with it."""

    clip: float = Field(default=1.0, gt=0)
    noise_multiplier: float = Field(gt=0, le=1000)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    adaptive: bool = False
    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    clip_lr: float = Field(default=0.2, gt=0, le=10)


class PrivacySpec(_Spec):
    """Differential privacy: at the banks (``record`` DP-SGD or ``laplace``) and/or at
    the aggregator (``bank``). docs/privacy.md has the threat model."""

    record: RecordPrivacy | None = None
    laplace: LaplacePrivacy | None = None
    bank: BankPrivacy | None = None

    @model_validator(mode="after")
    def _one_local_mechanism(self) -> Self:
        if self.record is not None and self.laplace is not None:
            raise ValueError("privacy.record and privacy.laplace are alternatives: choose one")
        return self


class SecureAggregationSpec(_Spec):
    """Secure aggregation (Bonawitz et al. 2017): the aggregator sees only the sum of a
    cohort's updates, never one bank's.

    Each bank quantizes its delta to integers and adds pairwise masks agreed with every
    other bank of its cohort (X25519, ``identity.agreement_keys``); the masks cancel in
    the sum, and the masks of a bank that dropped out are removed with Shamir shares
    held by the others.

    - ``threshold``: t of the Shamir sharing: any t banks of a cohort can together
      remove a dropped bank's masks; fewer learn nothing. None: a majority of the
      participants, ``n // 2 + 1`` (at least 2).
    - ``min_cohort``: below this many masked updates a cohort reveals nothing (its
      updates are refused); None: the threshold.
    - ``fraction_bits``: the quantized deltas are fixed-point with scale
      ``2^fraction_bits``.
    - ``clip``: every coordinate of a bank's delta is clipped to ``[-clip, clip]`` before
      quantizing.
    - ``norm_bound``: an optional L2 bound the bank applies to its delta before the
      coordinate clip.
    - ``max_weight``: a bank's weight (its sample count in sync rounds) is capped at this,
      so the sum cannot overflow.
    - ``cohort_deadline_s``: FedBuff: a cohort closes when it has ``buffer_size`` masked
      updates, or this long after its first one once it has at least the minimum.
    """

    threshold: int | None = Field(default=None, ge=2)
    min_cohort: int | None = Field(default=None, ge=2)
    fraction_bits: int = Field(default=24, ge=8, le=40)
    clip: float = Field(default=8.0, gt=0, le=65536)
    norm_bound: float | None = Field(default=None, gt=0)
    max_weight: int = Field(default=2**20, ge=1)
    cohort_deadline_s: float = Field(default=30.0, gt=0)

    def resolved_threshold(self, participants: int) -> int:
        """``threshold``, or a majority of ``participants`` (at least 2) when unset."""
        if self.threshold is not None:
            return self.threshold
        return max(2, participants // 2 + 1)

    def resolved_min_cohort(self, participants: int) -> int:
        """The fewest masked updates a cohort needs: ``min_cohort``, at least the threshold."""
        threshold = self.resolved_threshold(participants)
        return max(threshold, self.min_cohort or threshold)


class RobustnessSpec(_Spec):
    """Bounded influence and robust aggregation: what one bank, broken or hostile, can
    do to the model (aggregator/robust.py, docs/robustness.md).

    - ``norm_bound``: every update's delta has L2 norm at most this (None: no fixed
      bound).
    - ``adaptive_norm``: the bound is ``norm_multiplier`` times the median norm of the
      last ``norm_window`` accepted updates (with ``norm_bound``, the smaller of the
      two); no adaptive bound before ``norm_window`` updates were accepted.
    - ``outlier``: an update over the bound is scaled down to it (``clip``) or refused
      ``outlier`` (``refuse``).
    - ``max_per_bank``: at most this many updates of one bank in one FedBuff buffer (a
      sync round takes one per bank already); more are refused ``over_cap``.
    - ``aggregator``: how a FedBuff buffer or a sync round is combined: the strategy's
      weighted ``mean``, the coordinate-wise ``median``, the ``trimmed_mean``
      (``trim_fraction`` cut at each end) or ``multi_krum`` (the mean of the
      ``krum_select`` updates with the best Krum scores for ``krum_byzantine``
      attackers; None: a fifth of the buffer, and the buffer minus that).
    - ``min_cosine``: FedAsync: an update whose direction has cosine below this with
      the recent aggregate direction is refused ``outlier``.
    """

    norm_bound: float | None = Field(default=None, gt=0)
    adaptive_norm: bool = False
    norm_multiplier: float = Field(default=3.0, gt=1, le=1000)
    norm_window: int = Field(default=50, ge=3, le=100_000)
    outlier: Literal["clip", "refuse"] = "clip"
    max_per_bank: int | None = Field(default=None, ge=1)
    aggregator: Literal["mean", "median", "trimmed_mean", "multi_krum"] = "mean"
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)
    krum_byzantine: int | None = Field(default=None, ge=0)
    krum_select: int | None = Field(default=None, ge=1)
    min_cosine: float | None = Field(default=None, ge=-1, le=1)

    @property
    def bounded(self) -> bool:
        """Whether updates' norms are bounded at all."""
        return self.norm_bound is not None or self.adaptive_norm


class CompressionSpec(_Spec):
    """Lossy compression of the banks' updates (docs/wire-format.md, section 6).

    - ``codec``: ``f16`` (IEEE half), ``bf16`` (bfloat16), ``int8`` (one float32 scale
      per tensor, one byte per value), ``int8c`` (one scale per row of the first
      dimension), ``topk`` (only the ``topk_fraction`` largest-magnitude entries of
      each tensor, zeros elsewhere) or ``topk8`` (those entries as int8 levels of one
      float32 scale per tensor). Only float32 tensors are compressed.
    - ``lossless``: ``zstd`` compresses the lossy payload too (wire codec
      ``<codec>+zstd``); None: it is sent as it is.
    - ``stochastic_rounding``: ``int8``, ``int8c`` and ``topk8`` round down or up at
      random (unbiased) instead of to the nearest level; the decoding is the same.
    - ``topk_fraction``: ``topk``'s and ``topk8``'s share of each tensor's entries
      kept, in (0, 1].
    - ``error_feedback``: each bank adds what compression lost from its previous
      update (its residual: the delta plus the previous residual minus what the
      aggregator decodes) to its next delta before compressing it. The residual is
      kept in the worker's memory: a restart starts again from none.

    The aggregator accepts updates in this codec and the lossless ``raw`` and ``zstd``;
    another lossy codec is refused ``unknown_codec``. Secure aggregation needs exact
    integers: the two exclude each other.
    """

    codec: Literal["f16", "bf16", "int8", "int8c", "topk", "topk8"]
    lossless: Literal["zstd"] | None = None
    stochastic_rounding: bool = False
    topk_fraction: float | None = Field(default=None, gt=0, le=1)
    error_feedback: bool = True

    @model_validator(mode="after")
    def _options_fit(self) -> Self:
        topk = self.codec in ("topk", "topk8")
        if topk and self.topk_fraction is None:
            raise ValueError(f"compression.codec {self.codec!r} needs compression.topk_fraction")
        if not topk and self.topk_fraction is not None:
            raise ValueError(
                f"compression.topk_fraction is topk's and topk8's, not {self.codec!r}'s"
            )
        if self.stochastic_rounding and self.codec not in ("int8", "int8c", "topk8"):
            raise ValueError(
                "compression.stochastic_rounding is int8's, int8c's and topk8's, "
                f"not {self.codec!r}'s"
            )
        return self

    @property
    def wire_codec(self) -> str:
        """The codec the updates name (``c``): ``codec``, or ``codec+zstd``."""
        return self.codec + (f"+{self.lossless}" if self.lossless else "")


class FeatureReference(_Spec):
    """One feature's distribution in the reference sample, as :func:`fedq task init`
    recorded it (``--monitoring``): what each bank's recent rows are compared with.

    Numeric: ``edges`` are the ascending inner bin edges in raw units (a value ``x``
    falls in the first bin whose upper edge is ``>= x``; above the last edge, the last
    bin); ``proportions`` has ``len(edges) + 2`` entries: the bins, then missing cells.
    Categorical: no edges; ``proportions`` has one entry per vocabulary value, in
    vocabulary order, then 'unknown' (values outside the vocabulary and missing cells,
    as the encoding puts them). Proportions are shares of the sample's rows.
    """

    name: str = Field(min_length=1)
    edges: tuple[float, ...] = ()
    proportions: tuple[Annotated[float, Field(ge=0, le=1)], ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _well_formed(self) -> Self:
        if any(not math.isfinite(e) for e in self.edges) or any(
            b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)
        ):
            raise ValueError(f"reference of {self.name!r}: edges must be finite and increasing")
        if abs(math.fsum(self.proportions) - 1.0) > 1e-6:
            raise ValueError(f"reference of {self.name!r}: proportions must sum to 1")
        return self


class MonitoringSpec(_Spec):
    """Drift monitoring at each bank and federated evaluation (docs/drift.md).

    Each bank's worker, given its recent rows, compares them with ``reference`` (one
    entry per feature, in the features' order) every ``interval_s`` seconds and
    publishes only the summary: the population stability index (PSI) of each feature
    and of its model's scores, and KS statistics; with labelled recent rows also the
    metrics of the model version it holds. A bank whose recent window holds at least
    ``min_rows`` rows and whose PSI of some feature, or of the score, is above
    ``psi_threshold`` raises a retraining signal, which the aggregator records; with
    ``on_drift = "resume"`` it also resumes training when it was paused
    (``fedq task pause``).
    """

    reference: tuple[FeatureReference, ...] = Field(min_length=1)
    psi_threshold: float = Field(default=0.25, gt=0)
    interval_s: float = Field(default=3600.0, gt=0)
    #: At least 20: a summary of a handful of rows describes those rows.
    min_rows: int = Field(default=100, ge=20)
    on_drift: Literal["record", "resume"] = "record"


#: ``--class-weight auto`` weighs positives only below this positive rate.
AUTO_WEIGHT_BELOW = 0.1


def positive_weight_for(positive_rate: float, class_weight: str) -> float:
    """The spec's ``training.positive_weight`` from a class-weight rule.

    ``auto``: ``(1 - p) / p`` (the two classes weigh the same in the loss) when the
    positive rate ``p`` is below :data:`AUTO_WEIGHT_BELOW`, else 1; ``none``: 1; a
    number: that weight. Raises SpecError for anything else or a rate outside (0, 1).
    """
    if class_weight == "none":
        return 1.0
    if class_weight == "auto":
        if not 0.0 < positive_rate < 1.0:
            raise SpecError(f"positive rate {positive_rate!r} is not in (0, 1)")
        if positive_rate >= AUTO_WEIGHT_BELOW:
            return 1.0
        return (1.0 - positive_rate) / positive_rate
    try:
        weight = float(class_weight)
    except ValueError:
        raise SpecError(
            f"class weight {class_weight!r} is not 'auto', 'none' or a positive number"
        ) from None
    if not 0.0 < weight <= 1e6:
        raise SpecError(f"class weight {class_weight!r} is not a positive number up to 1e6")
    return weight


class TaskSpec(_Spec):
    """Everything the parties of one federation agree on."""

    task_id: Name
    model: ModelSpec = ModelSpec()
    features: tuple[Feature, ...] = Field(min_length=1)
    target: TargetSpec
    mode: Literal["async", "sync"] = "async"
    async_: AsyncSettings = Field(default=AsyncSettings(), alias="async")
    sync: SyncSettings = SyncSettings()
    training: TrainingSettings = TrainingSettings()
    #: The server optimizer of FedBuff and sync rounds (FedAsync accepts only ``sgd``).
    server: ServerOptimizerSpec = ServerOptimizerSpec()
    participants: tuple[Name, ...] = ()
    #: Public keys and whether signatures are required.
    identity: IdentitySpec = IdentitySpec()
    #: Differential privacy at the banks and at the aggregator.
    privacy: PrivacySpec = PrivacySpec()
    #: Secure aggregation (pairwise masks): the aggregator sees only cohort sums.
    secure_aggregation: SecureAggregationSpec | None = None
    #: Bounded influence and robust aggregation (aggregator/robust.py).
    robustness: RobustnessSpec = RobustnessSpec()
    #: Lossy compression of the updates; None: the banks choose a lossless codec. Left
    #: out of the canonical JSON when None (see :meth:`_without_unset`).
    compression: CompressionSpec | None = None
    #: Drift monitoring and federated evaluation at the banks; None: off. Left out of
    #: the canonical JSON when None, as ``compression`` is.
    monitoring: MonitoringSpec | None = None
    seed: int = Field(default=0, ge=0, lt=2**63)
    #: The largest sample count (``n``) any update may claim: FedAvg weighs by it.
    max_samples: int = Field(default=1_000_000, ge=1, lt=2**63)
    #: What each participant declared it holds, when it joined: its updates may
    #: claim no more. Participants not listed are bounded by ``max_samples`` only.
    declared_samples: dict[Name, Annotated[int, Field(ge=1, lt=2**63)]] = Field(
        default_factory=dict
    )

    @field_validator("declared_samples")
    @classmethod
    def _sorted(cls, declared: dict[str, int]) -> dict[str, int]:
        return dict(sorted(declared.items()))  # canonical: see to_json

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Every field, except ``compression`` and ``monitoring`` when None: a spec that
        uses neither keeps the canonical JSON, and the spec hash, it had before it existed."""
        data: dict[str, Any] = handler(self)
        for optional in ("compression", "monitoring"):
            if getattr(self, optional) is None:
                data.pop(optional, None)
        return data

    @model_validator(mode="after")
    def _columns_unique(self) -> Self:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names repeat")
        if self.target.name in names:
            raise ValueError(f"target {self.target.name!r} is also a feature")
        if (
            self.mode == "async"
            and self.async_.strategy == "fedasync"
            and self.server.kind != "sgd"
        ):
            raise ValueError(
                f"server.kind {self.server.kind!r} needs a step over several updates "
                "(fedbuff or sync); fedasync mixes one update at a time and takes only 'sgd'"
            )
        unknown = sorted(set(self.declared_samples) - set(self.participants))
        if self.participants and unknown:
            raise ValueError(f"declared_samples names non-participants: {', '.join(unknown)}")
        if self.privacy.bank is not None and self.server.kind != "sgd":
            raise ValueError(
                "privacy.bank adds noise to the new parameters: it needs server.kind 'sgd'"
            )
        keys = self.identity.participant_keys
        strangers = sorted(set(keys) - set(self.participants))
        if strangers:
            raise ValueError(f"identity.participant_keys names non-participants: {strangers}")
        strangers = sorted(set(self.identity.agreement_keys) - set(self.participants))
        if strangers:
            raise ValueError(f"identity.agreement_keys names non-participants: {strangers}")
        if self.identity.require_signatures and not self.participants:
            raise ValueError("require_signatures needs the list of participants and their keys")
        return self

    @model_validator(mode="after")
    def _robustness_fits(self) -> Self:
        r = self.robustness
        buffered = self.mode == "sync" or self.async_.strategy != "fedasync"
        if r.aggregator != "mean" and not buffered:
            raise ValueError(
                f"robustness.aggregator {r.aggregator!r} needs a buffer or a round (fedbuff "
                "or sync); fedasync takes one update at a time: use a norm bound and "
                "min_cosine"
            )
        if r.min_cosine is not None and buffered:
            raise ValueError("robustness.min_cosine is FedAsync's check (no buffer to compare)")
        if r.aggregator != "mean" and self.privacy.bank is not None:
            raise ValueError(
                f"privacy.bank needs versions linear in the deltas; robustness.aggregator "
                f"{r.aggregator!r} is not: use 'mean' with a norm bound"
            )
        if self.secure_aggregation is not None and (
            r.aggregator != "mean" or r.bounded or r.max_per_bank is not None
        ):
            raise ValueError(
                "secure_aggregation hides each update: robustness must be the defaults "
                "(the banks bound their own updates: secure_aggregation.norm_bound and clip)"
            )
        if r.aggregator in ("median", "trimmed_mean") and self.server.kind != "sgd":
            raise ValueError(
                f"robustness.aggregator {r.aggregator!r} is its own step: it needs "
                f"server.kind 'sgd', not {self.server.kind!r}"
            )
        if r.adaptive_norm and r.norm_bound is None:
            raise ValueError(
                "robustness.adaptive_norm needs a fixed norm_bound too, as a ceiling: the "
                "adaptive bound exists only once norm_window updates were accepted"
            )
        if r.max_per_bank is not None and not buffered:
            raise ValueError("robustness.max_per_bank caps a FedBuff buffer; fedasync has none")
        if r.aggregator == "multi_krum":
            size = (
                self.async_.buffer_size
                if self.mode == "async"
                else (self.sync.quorum or len(self.participants))
            )
            f = r.krum_byzantine if r.krum_byzantine is not None else size // 5
            if f < 1 or size - f - 2 < 1:
                raise ValueError(
                    f"robustness.aggregator 'multi_krum' over {size} updates assumes {f} "
                    "attackers: it needs at least 1 and size - attackers - 2 >= 1 "
                    "(a larger buffer or quorum, or krum_byzantine)"
                )
        if r.krum_select is not None and r.aggregator != "multi_krum":
            raise ValueError("robustness.krum_select is multi_krum's")
        return self

    @model_validator(mode="after")
    def _compression_fits(self) -> Self:
        if self.compression is not None and self.secure_aggregation is not None:
            raise ValueError(
                f"compression.codec {self.compression.codec!r} is lossy and secure_aggregation "
                "masks exact integers: choose one"
            )
        return self

    @model_validator(mode="after")
    def _monitoring_fits(self) -> Self:
        monitoring = self.monitoring
        if monitoring is None:
            return self
        if [r.name for r in monitoring.reference] != [f.name for f in self.features]:
            raise ValueError("monitoring.reference must name every feature, in their order")
        for ref, feature in zip(monitoring.reference, self.features, strict=True):
            if isinstance(feature, NumericFeature):
                if len(ref.proportions) != len(ref.edges) + 2:
                    raise ValueError(
                        f"monitoring.reference of {ref.name!r}: a numeric feature needs "
                        "len(edges) + 2 proportions (the bins, then missing)"
                    )
            elif ref.edges or len(ref.proportions) != len(feature.vocabulary) + 1:
                raise ValueError(
                    f"monitoring.reference of {ref.name!r}: a categorical feature needs no "
                    "edges and one proportion per vocabulary value, then 'unknown'"
                )
        local_dp = self.privacy.record is not None or self.privacy.laplace is not None
        if local_dp or self.secure_aggregation is not None:
            raise ValueError(
                "monitoring publishes per-bank summaries of the rows that no noise or mask "
                "covers: it cannot be combined with privacy at the bank or secure_aggregation"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> Self:
        secagg = self.secure_aggregation
        if secagg is not None:
            self._secagg_setting_fits()
            self._secagg_sizes_fit(secagg)
        return self

    def _secagg_setting_fits(self) -> None:
        """Secure aggregation's needs of the rest of the spec; ValueError otherwise."""
        n = len(self.participants)
        if n < 2:
            raise ValueError(
                f"secure_aggregation needs at least 2 participants, the spec lists {n}"
            )
        identity = self.identity
        if not identity.require_signatures:
            raise ValueError(
                "secure_aggregation needs identity.require_signatures: every masked update "
                "and its key shares must be signed"
            )
        for field, keys in (
            ("participant_keys", identity.participant_keys),
            ("agreement_keys", identity.agreement_keys),
        ):
            missing = [p for p in self.participants if p not in keys]
            if missing:
                raise ValueError(
                    f"secure_aggregation needs identity.{field} for every participant; "
                    f"missing: {', '.join(missing)}"
                )
        if self.mode == "sync" and self.sync.late != "refuse":
            raise ValueError(
                "secure_aggregation needs sync.late 'refuse': a late update cannot join "
                "a closed cohort"
            )
        if self.mode == "async" and (
            self.async_.strategy != "fedbuff" or self.async_.weighting != "staleness"
        ):
            raise ValueError(
                "secure_aggregation in async mode needs async.strategy 'fedbuff' and "
                f"async.weighting 'staleness' (got {self.async_.strategy!r}, "
                f"{self.async_.weighting!r}): fedasync has no buffer to hide an update in, "
                "and other weightings need aggregator state a bank cannot know before masking"
            )
        if self.server.kind != "sgd":
            raise ValueError(
                f"secure_aggregation needs server.kind 'sgd', not {self.server.kind!r}"
            )
        if self.privacy.bank is not None and self.privacy.bank.adaptive:
            raise ValueError(
                "secure_aggregation cannot adapt privacy.bank's clip: adaptive clipping "
                "counts the updates within the bound, which the aggregator cannot see in "
                "masked updates (the banks clip to a fixed bound before masking)"
            )

    def _secagg_sizes_fit(self, secagg: SecureAggregationSpec) -> None:
        """The threshold and cohort fit the participants, the sum fits 62 bits."""
        n = len(self.participants)
        for field, value in (("threshold", secagg.threshold), ("min_cohort", secagg.min_cohort)):
            if value is not None and value > n:
                raise ValueError(
                    f"secure_aggregation.{field} {value} is more than the {n} participants"
                )
        threshold = secagg.resolved_threshold(n)
        if secagg.min_cohort is not None and secagg.min_cohort < threshold:
            raise ValueError(
                f"secure_aggregation.min_cohort {secagg.min_cohort} is below the threshold "
                f"{threshold}: a smaller cohort could not remove a dropped bank's masks"
            )
        if n > MAX_COHORT:
            raise ValueError(
                f"secure_aggregation takes at most {MAX_COHORT} participants, the spec lists "
                f"{n} (each masked update carries shares for every member)"
            )
        least = secagg.resolved_min_cohort(n)
        size, what = (
            (self.sync.quorum or n, "sync.quorum")
            if self.mode == "sync"
            else (self.async_.buffer_size, "async.buffer_size")
        )
        if size < least:
            raise ValueError(
                f"{what} {size} is below secure aggregation's minimum cohort {least}: "
                "no cohort could ever be unmasked"
            )
        # Every quantized value is an integer float64 holds exactly (each bank then
        # rounds by at most half a unit), and with at most MAX_COHORT = 2^8 members no
        # sum of 2^53-bounded values reaches 2^62: nothing overflows the ring.
        if secagg.max_weight * secagg.clip * 2**secagg.fraction_bits > 2**53:
            raise ValueError(
                f"secure_aggregation could round inexactly or overflow: max_weight "
                f"{secagg.max_weight} x clip {secagg.clip:g} x 2^{secagg.fraction_bits} is "
                "above 2^53; lower max_weight, clip or fraction_bits"
            )

    def spec_hash(self) -> bytes:
        """SHA-256 of the spec's canonical JSON (:meth:`to_json`, UTF-8): what every
        update and every model announcement names (``sh``), so that an update prepared
        under another spec is refused ``spec_mismatch``."""
        return hashlib.sha256(self.to_json().encode()).digest()

    def sample_bound(self, participant: str) -> int:
        """The largest sample count an update of ``participant`` may claim."""
        declared = self.declared_samples.get(participant)
        return self.max_samples if declared is None else min(declared, self.max_samples)

    @property
    def input_dim(self) -> int:
        """Width of the encoded feature vector: 1 per numeric, vocabulary + 1 per categorical."""
        return sum(1 if f.kind == "numeric" else len(f.vocabulary) + 1 for f in self.features)

    def to_json(self) -> str:
        """Canonical JSON: field aliases, fields in definition order, the maps
        (``declared_samples``, ``identity.participant_keys``) sorted by key, defaults
        filled in, no whitespace. Validated again first, so a spec built with
        ``model_copy`` serialises like one parsed from its JSON."""
        data = self.model_dump(mode="json", by_alias=True)
        return type(self).model_validate(data).model_dump_json(by_alias=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> TaskSpec:
        """Parse and validate; raises SpecError with pydantic's reasons."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise SpecError(f"invalid task spec: {validation_reasons(e)}") from e

    @classmethod
    def parse(cls, data: object) -> TaskSpec:
        """Validate a mapping (from TOML or JSON); raises SpecError with reasons."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(f"invalid task spec: {validation_reasons(e)}") from e


def validation_reasons(error: ValidationError) -> str:
    """pydantic's reasons on one line: ``field.path: message; ...``."""
    parts = []
    for e in error.errors(include_url=False):
        where = ".".join(str(p) for p in e["loc"])
        parts.append(f"{where}: {e['msg']}" if where else str(e["msg"]))
    return "; ".join(parts)
