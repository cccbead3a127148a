"""Shared fixtures: the same tests run against in-process and real servers.

Real-server tests are marked ``real``. They are never skipped: if the server does
not answer, the test fails and says how to start it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from aggregator.store import RedisModelStore, StoreConfig
from common.spec import CategoricalFeature, ModelSpec, NumericFeature, TargetSpec, TaskSpec
from tests.helpers import CREDIT_TASK, REDIS_URL


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.real)])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    """A Redis client: fakeredis in-process, or the real server at FEDQ_TEST_REDIS_URL."""
    if request.param == "memory":
        client: aioredis.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            await client.ping()
        except RedisError as e:
            await client.aclose()
            pytest.fail(
                f"real Redis at {REDIS_URL} does not answer ({e}); start it (see .ci/run) "
                "or deselect with -m 'not real'"
            )
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    """A key prefix of our own, so tests never touch other data on a shared server."""
    return f"fedqtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(redis_client: aioredis.Redis, prefix: str) -> AsyncIterator[RedisModelStore]:
    """A model store under a private prefix; its keys are deleted afterwards."""
    yield RedisModelStore(redis_client, StoreConfig(prefix=prefix))
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await redis_client.delete(*keys)


@pytest.fixture
def task_spec() -> TaskSpec:
    """A small credit-like task: three numeric features, one categorical."""
    return TaskSpec(
        task_id=CREDIT_TASK,
        model=ModelSpec(kind="mlp", hidden=(8, 4)),
        features=(
            NumericFeature(name="duration", mean=20.9, std=12.1),
            NumericFeature(name="amount", mean=3271.0, std=2822.7),
            NumericFeature(name="age", mean=35.5, std=11.4),
            CategoricalFeature(name="purpose", vocabulary=("car", "furniture", "education")),
        ),
        target=TargetSpec(name="creditability", positive="good"),
    )
