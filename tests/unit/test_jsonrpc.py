"""The JSON-RPC layer over a small schema: dispatch, validation naming the parameter, error
objects with stable codes, batches, notifications, and per-key serialisation."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from typing import Any

import anyio
import pytest
from pydantic import Field

from virtyard.host.rpc.errors import HostError, InvalidParamsError, IscsiDiscoveryError
from virtyard.host.rpc.jsonrpc import COMMON_ERRORS, Dispatcher
from virtyard.host.rpc.locks import KeyedLocks
from virtyard.host.rpc.schema import NoParams, Params, Schema


class Ctx:
    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.max_active: dict[str, int] = {}
        self.guard = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=5)


schema: Schema[Ctx] = Schema()


class EchoParams(Params):
    host: str = Field(description="a host")
    port: int = Field(default=3260, ge=1, le=65535)


@schema.verb("Test.echo", params=EchoParams, result=dict[str, Any])
def echo(ctx: Ctx, p: EchoParams) -> dict[str, Any]:
    """Echo."""
    return {"host": p.host, "port": p.port}


@schema.verb("Test.fail", params=NoParams, result=None, errors=(IscsiDiscoveryError,))
def fail(ctx: Ctx, p: NoParams) -> None:
    raise IscsiDiscoveryError("portal=1.2.3.4:3260, err=connect", portal="1.2.3.4:3260")


@schema.verb("Test.undeclared", params=NoParams, result=None)
def undeclared(ctx: Ctx, p: NoParams) -> None:
    raise IscsiDiscoveryError("a bug: this verb does not declare it", portal="1.2.3.4:3260")


@schema.verb("Test.badInput", params=NoParams, result=None)
def bad_input(ctx: Ctx, p: NoParams) -> None:
    raise InvalidParamsError("invalid parameter 'x': a check the model could not make")


@schema.verb("Test.crash", params=NoParams, result=None)
def crash(ctx: Ctx, p: NoParams) -> None:
    raise RuntimeError("boom")


class SlowParams(Params):
    key: str


@schema.verb("Test.slow", params=SlowParams, result=int, locks=lambda p: [p.key])
def slow(ctx: Ctx, p: SlowParams) -> int:
    with ctx.guard:
        ctx.active[p.key] = ctx.active.get(p.key, 0) + 1
        ctx.max_active[p.key] = max(ctx.max_active.get(p.key, 0), ctx.active[p.key])
    time.sleep(0.05)
    with ctx.guard:
        ctx.active[p.key] -= 1
    return 1


@schema.verb("Test.meet", params=SlowParams, result=int, locks=lambda p: [p.key])
def meet(ctx: Ctx, p: SlowParams) -> int:
    """Returns only when a second caller arrives: proves two verbs run at the same time."""
    return ctx.barrier.wait()


@schema.verb("Test.badResult", params=NoParams, result=int)
def bad_result(ctx: Ctx, p: NoParams) -> object:
    return "not a number"


def _ask(dispatcher: Dispatcher[Ctx], payload: object) -> Any:
    body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
    answer = anyio.run(dispatcher.handle_body, body)
    return None if answer is None else json.loads(answer)


@pytest.fixture
def dispatcher() -> Dispatcher[Ctx]:
    return Dispatcher(schema, Ctx())


def test_call_by_name_and_by_position(dispatcher: Dispatcher[Ctx]) -> None:
    by_name = _ask(dispatcher, {"jsonrpc": "2.0", "id": 1, "method": "Test.echo",
                                "params": {"host": "h"}})
    assert by_name == {"jsonrpc": "2.0", "id": 1, "result": {"host": "h", "port": 3260}}
    by_pos = _ask(dispatcher, {"jsonrpc": "2.0", "id": "x", "method": "Test.echo",
                               "params": ["h", 10]})
    assert by_pos["result"] == {"host": "h", "port": 10}


def test_unknown_method(dispatcher: Dispatcher[Ctx]) -> None:
    answer = _ask(dispatcher, {"jsonrpc": "2.0", "id": 1, "method": "Nope.nope"})
    assert answer["error"]["code"] == -32601
    assert "Nope.nope" in answer["error"]["message"]


@pytest.mark.parametrize(("params", "fragment"), [
    ({}, "missing parameter 'host'"),
    ({"host": "h", "port": "x"}, "invalid parameter 'port'"),
    ({"host": "h", "port": 70000}, "invalid parameter 'port'"),
    ({"host": "h", "bogus": 1}, "unknown parameter 'bogus'"),
    (["a", 1, 2], "at most 2 parameters"),
    ("text", "params must be an object or an array"),
])
def test_bad_params_name_the_parameter(dispatcher: Dispatcher[Ctx], params: object,
                                       fragment: str) -> None:
    answer = _ask(dispatcher, {"jsonrpc": "2.0", "id": 1, "method": "Test.echo",
                               "params": params})
    assert answer["error"]["code"] == -32602
    assert fragment in answer["error"]["message"]
    assert answer["error"]["data"]["name"] == "InvalidParams"


def test_domain_error_keeps_code_name_and_data(dispatcher: Dispatcher[Ctx]) -> None:
    answer = _ask(dispatcher, {"jsonrpc": "2.0", "id": 7, "method": "Test.fail"})
    assert answer["id"] == 7
    assert answer["error"]["code"] == 475
    assert answer["error"]["data"] == {"name": "iSCSIDiscoveryError", "portal": "1.2.3.4:3260"}


def test_unexpected_exception_is_general_error(dispatcher: Dispatcher[Ctx]) -> None:
    answer = _ask(dispatcher, {"jsonrpc": "2.0", "id": 1, "method": "Test.crash"})
    assert answer["error"]["code"] == 100
    assert "boom" in answer["error"]["message"]


def test_result_is_checked_against_the_schema(dispatcher: Dispatcher[Ctx]) -> None:
    answer = _ask(dispatcher, {"jsonrpc": "2.0", "id": 1, "method": "Test.badResult"})
    assert answer["error"]["code"] == 100


@pytest.mark.parametrize(("payload", "code"), [
    (b"{not json", -32700),
    ({"id": 1, "method": "Test.echo"}, -32600),
    ({"jsonrpc": "2.0", "id": 1, "method": 5}, -32600),
    ({"jsonrpc": "2.0", "id": [1], "method": "Test.echo"}, -32600),
    ([], -32600),
    (42, -32600),
])
def test_malformed_requests(dispatcher: Dispatcher[Ctx], payload: object, code: int) -> None:
    assert _ask(dispatcher, payload)["error"]["code"] == code


def test_notification_gets_no_answer(dispatcher: Dispatcher[Ctx]) -> None:
    assert _ask(dispatcher, {"jsonrpc": "2.0", "method": "Test.echo",
                             "params": {"host": "h"}}) is None


def test_batch_answers_in_order_without_notifications(dispatcher: Dispatcher[Ctx]) -> None:
    answer = _ask(dispatcher, [
        {"jsonrpc": "2.0", "id": 1, "method": "Test.echo", "params": {"host": "a"}},
        {"jsonrpc": "2.0", "method": "Test.echo", "params": {"host": "n"}},
        {"jsonrpc": "2.0", "id": 2, "method": "Nope"},
        {"jsonrpc": "2.0", "id": 3, "method": "Test.echo", "params": {"host": "c"}},
    ])
    assert [a["id"] for a in answer] == [1, 2, 3]
    assert answer[1]["error"]["code"] == -32601


def test_same_key_is_serialised(dispatcher: Dispatcher[Ctx]) -> None:
    batch = [{"jsonrpc": "2.0", "id": i, "method": "Test.slow", "params": {"key": "a"}}
             for i in range(4)]
    answer = _ask(dispatcher, batch)
    assert all(a["result"] == 1 for a in answer)
    assert dispatcher.ctx.max_active["a"] == 1
    assert len(dispatcher.locks) == 0


def test_different_keys_run_concurrently(dispatcher: Dispatcher[Ctx]) -> None:
    batch = [{"jsonrpc": "2.0", "id": i, "method": "Test.meet", "params": {"key": k}}
             for i, k in enumerate(["b", "c"])]
    answer = _ask(dispatcher, batch)
    assert sorted(a["result"] for a in answer) == [0, 1]  # both reached the barrier together


def test_same_key_cannot_meet(dispatcher: Dispatcher[Ctx]) -> None:
    dispatcher.ctx.barrier = threading.Barrier(2, timeout=0.3)
    batch = [{"jsonrpc": "2.0", "id": i, "method": "Test.meet", "params": {"key": "same"}}
             for i in range(2)]
    answer = _ask(dispatcher, batch)
    assert all(a["error"]["code"] == 100 for a in answer)  # serialised: the barrier broke


def test_keyed_locks_release_on_error() -> None:
    locks = KeyedLocks()
    with pytest.raises(ValueError), locks.hold(["x", "y"]):
        raise ValueError
    with locks.hold(["y", "x"]):
        pass
    assert len(locks) == 0


def test_one_table_with_scopes() -> None:
    """The agent's users share one table; a scope's keys never meet another scope's."""
    table = KeyedLocks()
    vms, prepares = table.scope("vm:"), table.scope("prepare:")
    dispatcher = Dispatcher(schema, Ctx(), locks=table)
    with vms.hold(["a"]), prepares.hold(["a"]), dispatcher.locks.hold(["a"]):
        assert table.held() == ["a", "prepare:a", "vm:a"]
        with pytest.raises(TimeoutError), vms.hold(["a"], timeout=0):
            pass
        with vms.hold(["b"], timeout=0):
            assert "vm:b" in table.held()
    assert table.held() == []


def test_undeclared_errors_are_logged_as_bugs_and_returned(
        dispatcher: Dispatcher[Ctx], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="virtyard.host.rpc"):
        declared = _ask(dispatcher, {"jsonrpc": "2.0", "id": 1, "method": "Test.fail"})
        common = _ask(dispatcher, {"jsonrpc": "2.0", "id": 2, "method": "Test.badInput"})
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert dispatcher.undeclared == Counter()
        answer = _ask(dispatcher, {"jsonrpc": "2.0", "id": 3, "method": "Test.undeclared"})
    assert (declared["error"]["code"], common["error"]["code"]) == (475, -32602)
    assert answer["error"]["code"] == 475  # returned as raised, with its data
    assert answer["error"]["data"] == {"name": "iSCSIDiscoveryError", "portal": "1.2.3.4:3260"}
    assert dispatcher.undeclared == Counter({("Test.undeclared", "iSCSIDiscoveryError"): 1})
    [bug] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Test.undeclared raised iSCSIDiscoveryError" in bug.getMessage()


def test_every_agent_verb_declares_its_errors_sensibly() -> None:
    """Walk the agent's schema: declared errors are domain errors (the common ones need no
    declaring), each code once per verb."""
    from virtyard.host.verbs import SCHEMA  # noqa: PLC0415

    for name, verb in SCHEMA.verbs.items():
        for error in verb.errors:
            assert issubclass(error, HostError) and error not in COMMON_ERRORS, (name, error)
        codes = [e.code for e in verb.errors]
        assert len(codes) == len(set(codes)), name
