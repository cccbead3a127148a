"""Secure aggregation at a bank: mask each update, answer each unmask request once.

:class:`Masker` turns a delta into the masked update of a cohort (common/secagg.py):
clipped, weighted, quantized, masked, with every member's encrypted shares.
:class:`Revealer` answers the aggregator's unmask requests: it checks the request is
signed by the task's aggregator and names this bank a survivor, and it answers each
cohort once: a second request for the same cohort with other survivors or dropped
banks is refused, since shares of both kinds for one bank would unmask that bank's
update. The same request again gets the same answer (a restarted aggregator asks
again). No row and no unmasked value leaves the bank.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch

from common.agreement import AgreementKey
from common.errors import ConfigError, DecodeError, SecAggError
from common.secagg import (
    Cohort,
    agreement_keys,
    element_bytes,
    mask,
    norm_bound,
    quantize,
    reveal,
    weight_of,
)
from common.signing import PublicKey, SigningKey
from common.spec import TaskSpec
from common.wire import (
    MaskedBlock,
    Tensors,
    UnmaskAnswer,
    UnmaskRequest,
    decode_unmask_request,
    encode_unmask_answer,
)

#: Cohorts whose answer a bank remembers (older ones are long committed, and refused).
REMEMBER = 1024

#: What an unmask request asks: its survivors, its dropped banks, the digest of the
#: encrypted shares it carries.
Question = tuple[tuple[str, ...], tuple[str, ...], str]


class Masker:
    """Masks one bank's updates for the task's cohorts."""

    def __init__(self, spec: TaskSpec, participant: str, signing_key: SigningKey | None) -> None:
        if spec.secure_aggregation is None:
            raise ConfigError(f"task {spec.task_id!r} does not use secure aggregation")
        if signing_key is None:
            raise ConfigError(
                "secure aggregation needs the bank's signing key: its agreement key is "
                "derived from it (fedq keys show)"
            )
        self.spec = spec
        self.sa = spec.secure_aggregation
        self.participant = participant
        self.key = AgreementKey.from_signing_key(signing_key)
        self.keys = agreement_keys(spec)
        named = self.keys.get(participant)
        if named is None or named != self.key.public:
            raise ConfigError(
                f"the task spec's agreement key for {participant!r} is not the one derived "
                f"from this signing key ({self.key.public.text})"
            )

    def masked(
        self, delta: Tensors, cohort: int, base_version: int, num_samples: int
    ) -> tuple[Tensors, MaskedBlock]:
        """The masked tensors (``i64``, the delta's names and shapes) and the ``sa`` block."""
        weight = weight_of(self.spec, num_samples, cohort - base_version)
        x = quantize(delta, weight, self.sa, norm_bound(self.spec))
        out = mask(Cohort.of(self.spec, cohort), self.participant, self.key, self.keys, x)
        ring = torch.from_numpy(out.masked.view("<i8").copy())
        tensors: Tensors = {}
        at = 0
        for name in sorted(delta):
            n = delta[name].numel()
            tensors[name] = ring[at : at + n].reshape(delta[name].shape).clone()
            at += n
        ordered = {name: tensors[name] for name in delta}
        return ordered, MaskedBlock(cohort=cohort, weight=weight, shares=out.shares)


class Revealer:
    """Answers unmask requests, once per cohort, and remembers what it masked for.

    A cohort is answered for one question only: its survivors, its dropped banks and
    the encrypted shares it was sent. The same question again gets the same answer (a
    restarted aggregator asks again); any other is refused, and so is a question about
    a cohort older than those it still remembers (the last :data:`REMEMBER`). It also
    records the newest cohort its bank masked an update for, so that a restarted worker
    never masks twice for one cohort (two updates under the same pair masks would give
    their difference away). With ``state`` (a file) all of this survives restarts: the
    file is written (atomically, fsynced) before an answer or a masked update leaves.
    """

    def __init__(
        self,
        spec: TaskSpec,
        participant: str,
        signing_key: SigningKey,
        aggregator_key: PublicKey | None,
        state: Path | None = None,
    ) -> None:
        self.spec = spec
        self.participant = participant
        self.signing_key = signing_key
        self.aggregator_key = aggregator_key
        self.key = AgreementKey.from_signing_key(signing_key)
        self.keys = agreement_keys(spec)
        self.spec_hash = spec.spec_hash()
        #: cohort -> (survivors, dropped, digest of the shares sent) answered.
        self.answered: OrderedDict[int, Question] = OrderedDict()
        #: Every cohort up to this one is forgotten: requests for them are refused.
        self.forgotten = -1
        #: The newest cohort this bank masked an update for (-1: none).
        self.masked = -1
        self.state = state
        if state is not None and state.exists():
            self._load(state)

    def answer_id(self, cohort: int) -> str:
        """The answer's id: the same for every answer of this bank to one cohort."""
        raw = f"{self.spec.task_id}\x00{cohort}\x00{self.participant}".encode()
        return "ua-" + hashlib.sha256(raw).hexdigest()[:40]

    def note_masked(self, cohort: int) -> None:
        """Record (in the state file first) that this bank masks an update for ``cohort``;
        refuses a cohort it already masked for."""
        if cohort <= self.masked:
            raise SecAggError(f"already masked an update for cohort {self.masked}")
        self.masked = cohort
        if self.state is not None:
            self._save(self.state)

    def answer(self, body: bytes) -> tuple[str, int, bytes]:
        """The answer to one request: (answer id, cohort, encoded answer).

        Raises SecAggError (with the reason) for a request this bank must not answer.
        """
        try:
            request = decode_unmask_request(body)
        except DecodeError as e:
            raise SecAggError(f"unreadable unmask request ({e.reason}: {e.detail})") from None
        if request.task != self.spec.task_id or request.recipient != self.participant:
            raise SecAggError(f"a request for {request.task}/{request.recipient}")
        if self.aggregator_key is not None and (
            request.signature is None
            or not self.aggregator_key.verify(request.signature, request.signing_message())
        ):
            raise SecAggError("the unmask request is not signed by the task's aggregator")
        question = self._question(request)
        earlier = self.answered.get(request.cohort)
        if earlier is not None and earlier != question:
            raise SecAggError(
                f"cohort {request.cohort} was answered for survivors {list(earlier[0])}; "
                f"a second request names {list(request.survivors)} (or other shares): "
                "refused, it could unmask a bank"
            )
        if earlier is None and request.cohort <= self.forgotten:
            raise SecAggError(
                f"cohort {request.cohort} is older than the cohorts this bank remembers "
                f"(up to {self.forgotten} forgotten): refused, it may have been answered"
            )
        cohort = Cohort.of(self.spec, request.cohort)
        shares = reveal(
            cohort, self.participant, self.key, self.keys, request.ciphertexts, request.dropped
        )
        answer = UnmaskAnswer(
            task=self.spec.task_id,
            participant=self.participant,
            answer_id=self.answer_id(request.cohort),
            cohort=request.cohort,
            spec_hash=self.spec_hash,
            x=shares.x,
            b={k: element_bytes(v) for k, v in shares.b.items()},
            s={k: {j: element_bytes(v) for j, v in m.items()} for k, m in shares.s.items()},
            created_at=time.time(),
        )
        if earlier is None:
            self.answered[request.cohort] = question
            while len(self.answered) > REMEMBER:
                old, _ = self.answered.popitem(last=False)
                self.forgotten = max(self.forgotten, old)
            if self.state is not None:
                self._save(self.state)
        return answer.answer_id, request.cohort, encode_unmask_answer(answer, self.signing_key)

    def _question(self, request: UnmaskRequest) -> Question:
        """What a request asks, checked: survivors and dropped are the members."""
        sa = self.spec.secure_aggregation
        assert sa is not None
        members = sorted(self.spec.participants)
        if sorted([*request.survivors, *request.dropped]) != members:
            raise SecAggError(
                f"cohort {request.cohort}: survivors and dropped are not exactly the members"
            )
        least = sa.resolved_min_cohort(len(members))
        if len(request.survivors) < least:
            raise SecAggError(
                f"cohort {request.cohort}: {len(request.survivors)} survivors, below the "
                f"minimum cohort {least}: refused, a sum that small says too much"
            )
        h = hashlib.sha256()
        for name in sorted(request.ciphertexts):
            h.update(name.encode() + b"\x00" + request.ciphertexts[name])
        return request.survivors, request.dropped, h.hexdigest()

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            if doc["task"] != self.spec.task_id or doc["participant"] != self.participant:
                raise ValueError(f"it belongs to {doc['participant']} in task {doc['task']}")
            for cohort, survivors, dropped, digest in doc["answered"]:
                self.answered[int(cohort)] = (
                    tuple(str(n) for n in survivors),
                    tuple(str(n) for n in dropped),
                    str(digest),
                )
            self.forgotten = int(doc["forgotten"])
            self.masked = int(doc["masked"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"secure aggregation state {path}: cannot read it ({e})") from None

    def _save(self, path: Path) -> None:
        doc = {
            "task": self.spec.task_id,
            "participant": self.participant,
            "answered": [[c, list(u), list(d), h] for c, (u, d, h) in self.answered.items()],
            "forgotten": self.forgotten,
            "masked": self.masked,
        }
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise SecAggError(f"cannot write {path}: {e.strerror or e}") from None
