"""What the ``fedq`` commands share: their options, the task-spec options, and the way they fail.

Each option that more than one command takes is defined here once. Importing this
module imports no server client and no ML library: ``fedq --help`` and the
participant's commands stay light (see tests/test_cli_imports.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from common.errors import FedqError

AMQP_DEFAULT = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"

F = TypeVar("F", bound=Callable[..., Any])


def fail(e: FedqError) -> NoReturn:
    """Print the error's reason on stderr, on one line, and exit with status 2."""
    message = " ".join(str(e).split())  # one line, whatever the reason's text holds
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"[red]error:[/] {message}", markup=True
    )
    sys.exit(2)


class FedqGroup(click.Group):
    """The ``fedq`` group: a FedqError from any command below it goes to :func:`fail`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FedqError as e:
            fail(e)


def one_line(e: Exception) -> str:
    """A pydantic ValidationError (several lines) as one line; others as they are."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError):
        return str(e)
    parts = [
        f"{'.'.join(str(x) for x in err['loc']) or e.title}: {err['msg']}" for err in e.errors()
    ]
    return f"invalid {e.title}: " + "; ".join(parts)


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a placeholder password or TLS settings fedq must not use (common/tls.py)."""
    if value is not None:
        from common.tls import check_url

        check_url(value, param.opts[0] if param.opts else "URL")
    return value


def _url_option(flag: str, envvar: str, help: str, default: str | None) -> Callable[[F], F]:
    shown = default is not None
    return click.option(
        flag, default=default, show_default=shown, envvar=envvar, help=help, callback=_check_url
    )


def amqp_option(help: str, default: str | None = AMQP_DEFAULT) -> Callable[[F], F]:
    """``--amqp-url`` (``FEDQ_AMQP_URL``); ``help`` says which broker it is to this command."""
    return _url_option("--amqp-url", "FEDQ_AMQP_URL", help, default)


def redis_option(help: str, default: str | None = REDIS_DEFAULT) -> Callable[[F], F]:
    """``--redis-url`` (``FEDQ_REDIS_URL``); ``help`` says what this command does with it."""
    return _url_option("--redis-url", "FEDQ_REDIS_URL", help, default)


def log_options(f: F) -> F:
    """``--log-level`` and ``--log-format`` (``FEDQ_LOG_LEVEL``, ``FEDQ_LOG_FORMAT``)."""
    level = click.option(
        "--log-level",
        default="info",
        show_default=True,
        envvar="FEDQ_LOG_LEVEL",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    )
    form = click.option(
        "--log-format",
        default="auto",
        show_default=True,
        envvar="FEDQ_LOG_FORMAT",
        type=click.Choice(["auto", "console", "json"]),
        help="auto: console on a terminal, JSON lines otherwise.",
    )
    return level(form(f))


FILE = click.Path(path_type=Path, dir_okay=False)


def file_option(*decls: str, help: str, **attrs: Any) -> Callable[[F], F]:
    """An option naming a file (CSV, Parquet, JSON, safetensors, PNG)."""
    return click.option(*decls, type=FILE, help=help, **attrs)


def seconds_option(*decls: str, default: float, minimum: float, help: str) -> Callable[[F], F]:
    """A duration in seconds, at least ``minimum``."""
    kind = click.FloatRange(min=minimum)
    return click.option(*decls, default=default, show_default=True, type=kind, help=help)


def limit_option(*decls: str, help: str) -> Callable[[F], F]:
    """A positive count that is unbounded unless given."""
    return click.option(*decls, default=None, type=click.IntRange(min=1), help=help)


def _load_key(_ctx: click.Context, _param: click.Parameter, value: Path | None) -> Any:
    from common.signing import SigningKey

    return None if value is None else SigningKey.load(value)


#: ``--signing-key`` (``FEDQ_SIGNING_KEY``): the party's Ed25519 private key file.
signing_key_option = click.option(
    "--signing-key",
    "signing_key",
    default=None,
    envvar="FEDQ_SIGNING_KEY",
    type=FILE,
    callback=_load_key,
    help="This party's Ed25519 private key (PEM, from `fedq keys generate`); "
    "the task spec names its public key.",
)
seed_option = click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
task_option = click.option("--task", required=True, help="The task id.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
spec_file_option = click.option(
    "--spec",
    "spec_path",
    required=True,
    envvar="FEDQ_SPEC",
    type=FILE,
    help="Task spec (JSON or TOML), e.g. from `fedq task init`.",
)


def target_options(
    target_help: str, positive_help: str, required: bool = False
) -> Callable[[F], F]:
    """``--target`` and ``--positive``: the binary target column and its value of class 1."""
    target = click.option("--target", required=required, default=None, help=target_help)
    positive = click.option("--positive", default=None, help=positive_help)

    def both(f: F) -> F:
        return target(positive(f))

    return both


# Task-spec options: each sets one field of the task spec (a dotted path in the spec's
# JSON shape, e.g. ``async.mixing``), and :func:`spec_overrides` collects them. Their
# defaults are the spec's own (``fedq simulate``: the simulation's), looked up when
# needed, so each default is written in one place.


class SpecOption(click.Option):
    """An option that sets the task-spec field ``spec_field``."""

    def __init__(
        self,
        param_decls: list[str],
        *,
        spec_field: str,
        simulation: bool,
        **attrs: Any,
    ) -> None:
        self.spec_field = spec_field
        self.simulation = simulation
        self.own_default = "default" in attrs
        attrs.setdefault("show_default", True)
        super().__init__(param_decls, **attrs)

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        if self.own_default or ctx.lookup_default(self.name or "", call=False) is not None:
            return super().get_default(ctx, call=call)
        return spec_default(self.spec_field, self.simulation)


def spec_default(spec_field: str, simulation: bool) -> Any:
    """The default of a dotted task-spec field: the simulation's, else the spec model's."""
    from common.spec import TaskSpec

    keys = spec_field.split(".")
    if simulation:
        from fedq.simulate import SIMULATION_SPEC

        node: Any = SIMULATION_SPEC
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    fields = {f.alias or name: f for name, f in TaskSpec.model_fields.items()}
    value = fields[keys[0]].default
    for key in keys[1:]:
        value = getattr(value, key)
    return value


def spec_option(spec_field: str, *decls: str, simulation: bool, **attrs: Any) -> Callable[[F], F]:
    """A :class:`SpecOption` for ``spec_field``; ``simulation``: defaults of ``fedq simulate``."""
    return click.option(
        *decls, cls=SpecOption, spec_field=spec_field, simulation=simulation, **attrs
    )


def spec_overrides(ctx: click.Context) -> dict[str, Any]:
    """The values of the command's spec options, nested in the task spec's JSON shape.

    ``model.hidden`` is left out unless the model is an MLP (its default is for an MLP).
    """
    out: dict[str, Any] = {}
    for param in ctx.command.params:
        if isinstance(param, SpecOption) and param.name is not None:
            *parents, leaf = param.spec_field.split(".")
            node = out
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = ctx.params[param.name]
    model = out.get("model", {})
    if model.get("kind", "logreg") != "mlp":
        model.pop("hidden", None)
    compression = out.pop("compression", {})
    if compression.get("codec") is not None:
        out["compression"] = {k: v for k, v in compression.items() if v is not None}
    elif compression.get("topk_fraction") is not None:
        raise click.UsageError("--topk-fraction needs --compression topk or topk8")
    # The staleness function and its bound apply to late updates in sync rounds too
    # (``--late stale``).
    for key in ("staleness", "max_staleness"):
        value = out.get("async", {}).get(key)
        if value is not None:
            out.setdefault("sync", {})[key] = dict(value) if isinstance(value, dict) else value
    return out


def _hidden(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    """``--hidden 32,16``: positive layer widths."""
    try:
        widths = tuple(int(h) for h in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of whole numbers, e.g. 32,16"
        ) from None
    if any(w < 1 for w in widths):
        raise click.BadParameter("each layer width must be at least 1")
    return widths


def model_options(*, simulation: bool) -> Callable[[F], F]:
    """``--model`` and ``--hidden``."""
    kind = spec_option(
        "model.kind",
        "--model",
        "model_kind",
        simulation=simulation,
        type=click.Choice(["logreg", "mlp"]),
    )
    hidden = spec_option(
        "model.hidden",
        "--hidden",
        simulation=simulation,
        default="16",
        callback=_hidden,
        help="MLP hidden layer widths, e.g. 32,16.",
    )

    def both(f: F) -> F:
        return kind(hidden(f))

    return both


class _AsyncStrategies(click.Choice[str]):
    """The registered async strategies, looked up only when the option is used or shown
    (so that a bank's ``participant run`` never imports the aggregator)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from aggregator.strategies import names

        return tuple(names("async"))

    @choices.setter
    def choices(self, _: object) -> None:
        pass


def strategy_option(*, simulation: bool) -> Callable[[F], F]:
    """``--strategy``: the async aggregation strategy (any registered one)."""
    return spec_option(
        "async.strategy",
        "--strategy",
        simulation=simulation,
        type=_AsyncStrategies(),
        help="Async aggregation strategy.",
    )


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """The decorators applied in order: the options show in ``--help`` as listed."""

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def async_options(*, simulation: bool) -> Callable[[F], F]:
    """The async strategy and its settings (``common.spec.AsyncSettings``), one option each."""
    from typing import get_args

    from common.spec import StalenessUnit, Weighting

    def opt(spec_field: str, *decls: str, **attrs: Any) -> Callable[[F], F]:
        return spec_option(spec_field, *decls, simulation=simulation, **attrs)

    return _stack(
        strategy_option(simulation=simulation),
        opt(
            "async.mixing",
            "--mixing",
            type=click.FloatRange(0.0, 1.0, min_open=True),
            help="FedAsync: how far a fresh update moves the model.",
        ),
        opt(
            "async.staleness.kind",
            "--staleness",
            "staleness_kind",
            type=click.Choice(["constant", "polynomial", "hinge"]),
            help="How an update's weight falls with its staleness.",
        ),
        opt("async.staleness.a", "--staleness-a", type=click.FloatRange(min=0.0)),
        opt("async.staleness.b", "--staleness-b", type=click.IntRange(min=0)),
        opt(
            "async.staleness_unit",
            "--staleness-unit",
            type=click.Choice(list(get_args(StalenessUnit))),
            help="Count staleness in rounds of the federation or in raw versions.",
        ),
        opt(
            "async.max_staleness",
            "--max-staleness",
            type=click.IntRange(min=0),
            help="Refuse updates staler than this, in --staleness-unit (sync: late rounds).",
        ),
        opt(
            "async.buffer_size",
            "--buffer-size",
            type=click.IntRange(min=1),
            help="FedBuff: updates per version.",
        ),
        opt(
            "async.server_lr",
            "--server-lr",
            type=click.FloatRange(min=0.0, min_open=True),
            help="FedBuff: the server's step size over the buffer's mean delta.",
        ),
        opt(
            "async.weighting",
            "--weighting",
            type=click.Choice(list(get_args(Weighting))),
            help="Weigh updates by staleness only, also by sample count, or balanced so "
            "each bank's share of weight follows its share of the data.",
        ),
        opt(
            "async.max_boost",
            "--max-boost",
            type=click.FloatRange(1.0, 1000.0),
            help="The most --weighting may multiply (or divide) an update's weight by.",
        ),
        opt(
            "async.balance_window",
            "--balance-window",
            type=click.IntRange(0, 1_000_000),
            help="Balanced weighting: recent accepted updates it measures shares over "
            "(0: 20 x participants).",
        ),
    )


def server_options(*, simulation: bool) -> Callable[[F], F]:
    """The server optimizer of FedBuff and sync rounds (``common.spec.ServerOptimizerSpec``)."""

    def opt(spec_field: str, *decls: str, **attrs: Any) -> Callable[[F], F]:
        return spec_option(spec_field, *decls, simulation=simulation, **attrs)

    return _stack(
        opt(
            "server.kind",
            "--server-opt",
            "server_opt",
            type=click.Choice(["sgd", "momentum", "adam", "yogi"]),
            help="Server optimizer of FedBuff and sync rounds: sgd (plain), momentum "
            "(FedAvgM), adam (FedAdam), yogi (FedYogi). FedAsync takes sgd only.",
        ),
        opt(
            "server.lr",
            "--server-opt-lr",
            type=click.FloatRange(0.0, 100.0, min_open=True),
            help="The server optimizer's learning rate.",
        ),
        opt("server.beta1", "--server-beta1", type=click.FloatRange(0.0, 1.0, max_open=True)),
        opt("server.beta2", "--server-beta2", type=click.FloatRange(0.0, 1.0, max_open=True)),
        opt(
            "server.tau",
            "--server-tau",
            type=click.FloatRange(min=0.0, min_open=True),
            help="Adam / Yogi: the adaptivity (epsilon).",
        ),
    )


def underscored(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A choice spelled with hyphens on the command line (``trimmed-mean``) as the
    spec's value (``trimmed_mean``)."""
    return None if value is None else value.replace("-", "_")


def compression_options(*, simulation: bool) -> Callable[[F], F]:
    """Lossy compression of the banks' updates (``common.spec.CompressionSpec``)."""
    codec = spec_option(
        "compression.codec",
        "--compression",
        simulation=simulation,
        default=None,
        type=click.Choice(["f16", "bf16", "int8", "int8c", "topk", "topk8"]),
        help="Banks send lossy updates in this codec (docs/wire-format.md, section 6; "
        "with error feedback) [default: exact float32].",
    )
    fraction = spec_option(
        "compression.topk_fraction",
        "--topk-fraction",
        simulation=simulation,
        default=None,
        type=click.FloatRange(0.0, 1.0, min_open=True),
        help="With --compression topk or topk8: the share of each tensor's entries kept.",
    )

    def both(f: F) -> F:
        return codec(fraction(f))

    return both


def robustness_options(*, simulation: bool) -> Callable[[F], F]:
    """Bounded influence and robust aggregation (``common.spec.RobustnessSpec``)."""
    positive = click.FloatRange(min=0.0, min_open=True)

    def opt(spec_field: str, *decls: str, **attrs: Any) -> Callable[[F], F]:
        return spec_option(f"robustness.{spec_field}", *decls, simulation=simulation, **attrs)

    return _stack(
        opt(
            "norm_bound",
            "--norm-bound",
            type=positive,
            help="Bound every update's delta to this L2 norm [default: no fixed bound].",
        ),
        opt(
            "adaptive_norm",
            "--adaptive-norm/--no-adaptive-norm",
            help="Bound each update's norm by --norm-multiplier times the median norm of "
            "the last --norm-window accepted updates (with --norm-bound: the smaller).",
        ),
        opt(
            "norm_multiplier",
            "--norm-multiplier",
            type=click.FloatRange(1.0, 1000.0, min_open=True),
            help="--adaptive-norm: the bound's multiple of the median recent norm.",
        ),
        opt(
            "norm_window",
            "--norm-window",
            type=click.IntRange(3, 100_000),
            help="--adaptive-norm: the accepted updates the median is taken over.",
        ),
        opt(
            "outlier",
            "--outlier",
            type=click.Choice(["clip", "refuse"]),
            help="An update over the norm bound: scaled down to it, or refused (outlier).",
        ),
        opt(
            "max_per_bank",
            "--max-per-bank",
            type=click.IntRange(min=1),
            help="FedBuff: at most this many updates of one bank in a buffer (more are "
            "refused over_cap) [default: no cap].",
        ),
        opt(
            "aggregator",
            "--robust-aggregator",
            "robust_aggregator",
            type=click.Choice(["mean", "median", "trimmed-mean", "multi-krum"]),
            callback=underscored,
            help="How a FedBuff buffer or a sync round is combined: the weighted mean, the "
            "coordinate-wise median, the trimmed mean or multi-Krum.",
        ),
        opt(
            "trim_fraction",
            "--trim-fraction",
            type=click.FloatRange(0.0, 0.5, max_open=True),
            help="Trimmed mean: the share cut at each end.",
        ),
        opt(
            "krum_byzantine",
            "--krum-byzantine",
            type=click.IntRange(min=0),
            help="Multi-Krum: the attackers assumed [default: a fifth of the buffer].",
        ),
        opt(
            "krum_select",
            "--krum-select",
            type=click.IntRange(min=1),
            help="Multi-Krum: the updates averaged [default: the buffer minus the attackers].",
        ),
        opt(
            "min_cosine",
            "--min-cosine",
            type=click.FloatRange(-1.0, 1.0),
            help="FedAsync: refuse (outlier) an update whose cosine with the recent "
            "aggregate direction is below this [default: no check].",
        ),
    )


def _class_weight(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from common.spec import positive_weight_for

    try:
        positive_weight_for(0.5, value)
    except FedqError as e:
        raise click.BadParameter(str(e)) from None
    return value


class_weight_option = click.option(
    "--class-weight",
    default="auto",
    show_default=True,
    callback=_class_weight,
    help="Weight of the positive class in local training: auto (rare positives, below "
    "10%, weigh (1-p)/p), none, or a number.",
)
