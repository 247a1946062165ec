"""The actor-pool patch: checked against Flower when applied, and its behaviour on a pool.

The behaviour tests patch a stand-in pool class with the attributes of Flower's
`BasicActorPool` and a stand-in for Ray's wait/get/kill (mocks: a real pool needs a running
Ray cluster and actors, seconds per test; the end-to-end fault tests in test_faults.py run
the real one). The check runs against the real Flower classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import ray.actor
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.simulation.ray_transport.ray_actor import BasicActorPool
from ray.exceptions import RayActorError

import tests.flower_messages  # noqa: F401  (sets Flower's task identity for Message())
from flair_fl import protocol
from flair_fl.errors import FlowerPatchMismatch
from flair_fl.federated import flower_patch


def test_the_installed_flower_has_what_the_patch_needs() -> None:
    import flwr

    flower_patch.check_flower(flwr.__version__, BasicActorPool, ray.actor.ActorHandle)


def test_another_flower_version_fails_in_one_line() -> None:
    with pytest.raises(FlowerPatchMismatch, match=r"found flwr 1\.43\.0") as err:
        flower_patch.check_flower("1.43.0", BasicActorPool, ray.actor.ActorHandle)
    assert "\n" not in str(err.value) and "ray_actor.py" in str(err.value)


class _Actor:
    def __init__(self, name: str):
        self.name = name
        self._actor_id = bytes(name, "ascii")  # .hex(), as Ray's ActorID


def _pool_class() -> type:
    """A fresh stand-in of BasicActorPool (each test patches its own class)."""

    class Pool:
        def __init__(self) -> None:
            self.created = 0
            self.pool = [_Actor("first")]
            self.create_actor_fn = self._new_actor
            self._future_to_actor: dict[Any, _Actor] = {}

        def _new_actor(self) -> _Actor:
            self.created += 1
            return _Actor(f"new{self.created}")

        def submit(self, actor_fn: Any, job: tuple[Any, Message, str, Context]) -> Any:
            actor = self.pool.pop()
            future = actor_fn(actor, *job)
            self._future_to_actor[future] = actor
            return future

        def add_actor_back_to_pool(self, future: Any) -> None:
            self.pool.append(self._future_to_actor.pop(future))

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> tuple[Message, Context]:
            raise AssertionError("replaced by the patch")

    return Pool


@dataclass(eq=False)
class _Future:
    """What Ray's actor call returns (an ObjectRef), holding the job the actor runs."""

    message: Message
    context: Context


@dataclass
class _Ray:
    """Ray's wait/get/kill for one future: ready with a reply, never ready, or dead actor."""

    outcome: str  # ready | hang | died
    killed: list[Any] = field(default_factory=list)

    def wait(self, futures: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        return (futures, []) if self.outcome != "hang" else ([], futures)

    def get(self, future: Any) -> tuple[str, Message, Context]:
        if self.outcome == "died":
            raise RayActorError()
        return "0", Message(RecordDict(), reply_to=future.message), future.context

    def kill(self, actor: Any, no_restart: bool) -> None:
        self.killed.append(actor)


def _run_one(outcome: str) -> tuple[Any, _Ray, Message]:
    pool_class, fake_ray = _pool_class(), _Ray(outcome)
    flower_patch.guard_actor_pool(0.01, 0.0, pool_class=pool_class, ray_api=fake_ray)
    pool = pool_class()
    message = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(1, 1, {}, RecordDict(), {})

    future = pool.submit(
        lambda actor, app, msg, cid, ctx: _Future(msg, ctx), (None, message, "0", context)
    )
    reply, returned_context = pool.fetch_result_and_return_actor_to_pool(future)

    assert returned_context is context
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert not pool._future_to_actor and len(pool.pool) == 1, "the pool keeps its size"
    assert not flower_patch._GUARD.jobs, "nothing kept for an answered future"
    return pool, fake_ray, reply


def test_a_client_that_answers_keeps_its_actor() -> None:
    pool, fake_ray, reply = _run_one("ready")

    assert not reply.has_error()
    assert [a.name for a in pool.pool] == ["first"] and not fake_ray.killed


def test_a_hanging_client_is_killed_replaced_and_coded_timeout() -> None:
    pool, fake_ray, reply = _run_one("hang")

    assert reply.error.code == protocol.CLIENT_TIMEOUT
    assert protocol.failure_kind(reply.error.code) == "timeout"
    assert "simulation.client_timeout" in reply.error.reason
    assert [a.name for a in fake_ray.killed] == ["first"]
    assert [a.name for a in pool.pool] == ["new1"]


def test_a_dead_actor_is_replaced_and_coded_died() -> None:
    pool, fake_ray, reply = _run_one("died")

    assert reply.error.code == protocol.CLIENT_ACTOR_DIED
    assert protocol.failure_kind(reply.error.code) == "died"
    assert [a.name for a in pool.pool] == ["new1"] and not fake_ray.killed


@pytest.mark.parametrize("lose", ["create_actor_fn", "add_actor_back_to_pool"])
def test_a_pool_without_a_name_the_patch_uses_fails_in_one_line(lose: str) -> None:
    pool_class = _pool_class()
    if lose == "create_actor_fn":

        class Stale(pool_class):  # type: ignore[valid-type,misc]
            def __init__(self) -> None:
                self.pool: list[_Actor] = []
                self._future_to_actor: dict[Any, _Actor] = {}

        pool_class = Stale
    else:
        delattr(pool_class, lose)

    with pytest.raises(FlowerPatchMismatch, match=lose) as err:
        flower_patch.guard_actor_pool(None, pool_class=pool_class, ray_api=_Ray("ready"))
    assert "\n" not in str(err.value) and "flwr/simulation/ray_transport/ray_actor.py" in str(
        err.value
    )
    assert not getattr(pool_class, "_flair_fl_guarded", False), "not patched"
