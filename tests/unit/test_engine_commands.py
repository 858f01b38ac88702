"""The command shape on host commands: checks with stable keys, roles, atomicity, races."""

from __future__ import annotations

import threading

import pytest
from engine_db import VIEWER, context
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from virtyard.engine.commands import errors
from virtyard.engine.commands.base import Context, run
from virtyard.engine.commands.errors import CommandError
from virtyard.engine.commands.hosts import ActivateHost, AddHost, DeactivateHost, RemoveHost
from virtyard.engine.db.database import Database
from virtyard.engine.db.models import DEFAULT_CLUSTER_ID, Event, Host, Vm, VmDynamic


@pytest.fixture
def db(any_db: Database) -> Database:
    return any_db


def count(db: Database, model: type) -> int:
    with db.read() as tx:
        return int(tx.scalar(select(func.count()).select_from(model)) or 0)


def add(db: Database, name: str = "h1", address: str = "10.0.0.1", port: int = 54321) -> Host:
    return run(AddHost(name=name, address=address, port=port), context(db))


def test_add_host_writes_row_and_event(db: Database) -> None:
    host = add(db)
    assert host.status == "installing" and host.cluster_id == DEFAULT_CLUSTER_ID
    with db.read() as tx:
        event = tx.scalars(select(Event).order_by(Event.id.desc())).first()
    assert event is not None and event.code == 42 and event.host_id == host.id
    assert event.user_name == "admin@internal" and "h1" in event.description


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"name": ""}, "ACTION_TYPE_FAILED_NAME_MAY_NOT_BE_EMPTY"),
    ({"name": "bad name!"}, "ACTION_TYPE_FAILED_NAME_MAY_NOT_CONTAIN_SPECIAL_CHARS"),
    ({"name": "x" * 256}, "ACTION_TYPE_FAILED_NAME_MAY_NOT_CONTAIN_SPECIAL_CHARS"),
    ({"address": "not an address"}, "VDS_INVALID_SERVER_ADDRESS"),
    ({"port": 0}, "VDS_INVALID_PORT"),
    ({"port": 70000}, "VDS_INVALID_PORT"),
    ({"cluster_name": "nope"}, "ACTION_TYPE_FAILED_CLUSTER_IS_NOT_VALID"),
])
def test_add_host_checks(db: Database, kwargs: dict[str, object], key: str) -> None:
    args: dict[str, object] = {"name": "h1", "address": "10.0.0.1", "port": 54321, **kwargs}
    with pytest.raises(CommandError) as err:
        run(AddHost(**args), context(db))  # type: ignore[arg-type]
    assert err.value.key == key and err.value.detail.startswith("[Cannot add Host. ")
    assert count(db, Host) == 0


def test_duplicates_are_conflicts(db: Database) -> None:
    add(db)
    with pytest.raises(CommandError) as err:
        add(db, address="10.0.0.2")
    assert (err.value.key, err.value.status) == ("ACTION_TYPE_FAILED_NAME_ALREADY_USED", 409)
    with pytest.raises(CommandError) as err:
        add(db, name="h2")
    assert err.value.key == "ACTION_TYPE_FAILED_VDS_WITH_SAME_HOST_EXIST"


class _AddHostUnchecked(AddHost):
    """AddHost whose checks another request has already passed (a lost race)."""

    def validate(self, tx: Session, ctx: Context) -> None:
        self.cluster_id = DEFAULT_CLUSTER_ID


def test_database_constraint_gives_the_same_key_as_the_check(db: Database) -> None:
    add(db)
    with pytest.raises(CommandError) as err:
        run(_AddHostUnchecked(name="h1", address="10.0.0.9"), context(db))
    assert err.value.key == "ACTION_TYPE_FAILED_NAME_ALREADY_USED"
    with pytest.raises(CommandError) as err:
        run(_AddHostUnchecked(name="h9", address="10.0.0.1"), context(db))
    assert err.value.key == "ACTION_TYPE_FAILED_VDS_WITH_SAME_HOST_EXIST"
    assert count(db, Host) == 1
    assert count(db, Event) == 1  # the failed adds wrote no event


def test_twenty_concurrent_adds_of_one_name_leave_one_host(db: Database) -> None:
    keys: list[str] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        try:
            add(db, address=f"10.0.1.{i}")
            outcome = "ok"
        except CommandError as exc:
            outcome = exc.key
        with lock:
            keys.append(outcome)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert keys.count("ok") == 1
    assert set(keys) == {"ok", "ACTION_TYPE_FAILED_NAME_ALREADY_USED"}
    assert count(db, Host) == 1


def test_readonly_user_cannot_write(db: Database) -> None:
    with pytest.raises(CommandError) as err:
        run(AddHost(name="h1", address="10.0.0.1"), context(db, VIEWER))
    assert (err.value.status, err.value.key) == (403, "USER_NOT_AUTHORIZED_TO_PERFORM_ACTION")
    assert count(db, Host) == 0


def test_maintenance_cycle_and_remove(db: Database) -> None:
    host = add(db)
    with db.transaction() as tx:
        tx.get(Host, host.id).status = "up"  # type: ignore[union-attr]
    with pytest.raises(CommandError) as err:
        run(ActivateHost(host.id), context(db))
    assert err.value.key == "VDS_ALREADY_UP"
    with pytest.raises(CommandError) as err:
        run(RemoveHost(host.id), context(db))
    assert (err.value.key, err.value.status) == ("VDS_CANNOT_REMOVE_VDS_STATUS_ILLEGAL", 409)
    run(DeactivateHost(host.id), context(db))
    with pytest.raises(CommandError) as err:
        run(DeactivateHost(host.id), context(db))
    assert err.value.key == "VDS_CANNOT_MAINTENANCE_VDS_IS_IN_MAINTENANCE"
    run(ActivateHost(host.id), context(db))
    with db.read() as tx:
        assert tx.get(Host, host.id).status == "connecting"  # type: ignore[union-attr]
    run(DeactivateHost(host.id), context(db))
    assert run(RemoveHost(host.id), context(db)) == "h1"
    assert count(db, Host) == 0
    with pytest.raises(CommandError) as err:
        run(RemoveHost(host.id), context(db))
    assert (err.value.status, err.value.key) == (404, errors.HOST_NOT_FOUND.key)


def test_host_running_vms_cannot_go_to_maintenance(db: Database) -> None:
    host = add(db)
    with db.transaction() as tx:
        vm = Vm(name="vm1", cluster_id=DEFAULT_CLUSTER_ID)
        tx.add(vm)
        tx.flush()
        tx.add(VmDynamic(vm_id=vm.id, status="up", run_on_host_id=host.id))
        tx.get(Host, host.id).status = "up"  # type: ignore[union-attr]
    with pytest.raises(CommandError) as err:
        run(DeactivateHost(host.id), context(db))
    assert err.value.key == "VDS_CANNOT_MAINTENANCE_VDS_RUNNING_VMS"
    assert "1 VM" in err.value.detail
