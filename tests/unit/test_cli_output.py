"""The CLI's formats: rows from the engine's real JSON (made by the engine's own codec), tables
for people, JSON and values for scripts, and the small parsers (sizes, portals, URLs)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.console import Console

from virtyard.cli.disks import disk_row
from virtyard.cli.errors import USAGE, CliError
from virtyard.cli.events import event_row
from virtyard.cli.hosts import host_row
from virtyard.cli.luns import lun_row, parse_portal
from virtyard.cli.output import Column, Output, OutputOptions, human_size, human_time, plain
from virtyard.cli.session import normalize_url
from virtyard.cli.vms import attachment_row, parse_size, vm_row
from virtyard.engine.api import codec
from virtyard.engine.api.types.disks import DISK, DISK_ATTACHMENT, HOST_STORAGE
from virtyard.engine.api.types.hosts import EVENT, HOST
from virtyard.engine.api.types.vms import VM

MiB = 1 << 20
WWID = "360000000000000000e00000000010001"


def wire(t: Any, model: dict[str, Any]) -> dict[str, Any]:
    """``model`` as the engine sends it in JSON."""
    data: dict[str, Any] = json.loads(codec.to_json(t, model))
    return data


def output(fmt: str = "table", columns: tuple[str, ...] = ()) -> Output:
    console = Console(width=4096, color_system=None, highlight=False, markup=False)
    return Output(console, console, OutputOptions(fmt, columns))


# -- small parsers and formats ------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (64 * MiB, "64 MiB"),
    (3 * MiB // 2, "1.5 MiB"), (1 << 30, "1 GiB"), (5 << 40, "5 TiB"), (None, ""),
    ("x", "x"),
])
def test_human_size(value: Any, text: str) -> None:
    assert human_size(value) == text


def test_plain_values_are_one_line() -> None:
    assert plain(None) == "" and plain(True) == "true" and plain(False) == "false"
    assert plain(["a", "b"]) == "a,b" and plain(3) == "3"
    assert plain("two\nlines") == "two lines"


def test_human_time_is_local_and_tolerant() -> None:
    assert human_time("2026-01-02T03:04:05.000+00:00").startswith("2026-01-0")
    assert human_time("not a time") == "not a time" and human_time(None) == ""


@pytest.mark.parametrize(("text", "size"), [
    ("256M", 256 * MiB), ("256", 256 * MiB), ("1G", 1 << 30), ("1GiB", 1 << 30),
    ("1.5g", 3 << 29), ("512MB", 512 * MiB), ("4096k", 4 * MiB),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12x", "-1G", "1 2G"])
def test_parse_size_refuses_as_usage(text: str) -> None:
    with pytest.raises(CliError) as err:
        parse_size(text)
    assert err.value.exit_code == USAGE and err.value.key == "BAD_SIZE"


@pytest.mark.parametrize(("text", "portal"), [
    ("10.0.0.5", ("10.0.0.5", 3260)), ("10.0.0.5:3261", ("10.0.0.5", 3261)),
    ("san.example.com", ("san.example.com", 3260)), ("[fd00::5]:3262", ("fd00::5", 3262)),
    ("fd00::5", ("fd00::5", 3260)),
])
def test_parse_portal(text: str, portal: tuple[str, int]) -> None:
    assert parse_portal(text) == portal


@pytest.mark.parametrize("text", [":3260", "host:0", "host:99999", "host:port"])
def test_parse_portal_refuses_as_usage(text: str) -> None:
    with pytest.raises(CliError) as err:
        parse_portal(text)
    assert err.value.exit_code == USAGE


@pytest.mark.parametrize(("text", "url"), [
    ("engine.example.com", "https://engine.example.com"),
    ("engine:8443", "https://engine:8443"),
    ("https://engine:8443/", "https://engine:8443"),
    ("https://[fd00::1]:8443", "https://[fd00::1]:8443"),
])
def test_normalize_url(text: str, url: str) -> None:
    assert normalize_url(text) == url


# -- rows from the engine's JSON ----------------------------------------------------------


def test_vm_row_names_hosts_and_counts_cpus() -> None:
    data = wire(VM, {"id": "v1", "name": "web", "status": "up", "memory": 256 * MiB,
                     "cpu": {"topology": {"sockets": 2, "cores": 2, "threads": 1}},
                     "os": {"kernel": "/k", "initrd": "/i", "cmdline": "quiet"},
                     "placement_policy": {"hosts": [{"id": "h1"}, {"id": "h2"}]},
                     "host": {"id": "h2"}, "creation_time": "2026-01-01T00:00:00"})
    row = vm_row(data, {"h1": "one", "h2": "two"})
    assert row["host"] == "two" and row["host_id"] == "h2"
    assert row["placement"] == ["one", "two"] and row["cpus"] == 4
    assert row["memory"] == 256 * MiB and row["kernel"] == "/k"
    assert set(row) == {"id", "name", "status", "host", "host_id", "memory", "cpus",
                        "sockets", "cores", "threads", "kernel", "initrd", "cmdline",
                        "placement", "ha", "description", "created"}


def test_disk_row_of_a_lun_disk() -> None:
    data = wire(DISK, {"id": "d1", "alias": "data", "storage_type": "lun",
                       "shareable": False, "lun_storage": {
                           "id": WWID, "type": "iscsi", "logical_units": [{
                               "id": WWID, "size": 64 * MiB, "target": "iqn.x:t",
                               "address": "10.0.0.5", "port": 3260, "lun_mapping": 1}]},
                       "vms": [{"id": "v1", "name": "web"}]})
    row = disk_row(data)
    assert (row["wwid"], row["size"], row["target"], row["lun"]) == (WWID, 64 * MiB, "iqn.x:t", 1)
    assert row["vms"] == ["web"] and row["type"] == "lun"


def test_lun_row_says_why_it_is_used() -> None:
    data = wire(HOST_STORAGE, {"id": WWID, "type": "iscsi", "logical_units": [{
        "id": WWID, "size": 32 * MiB, "status": "used", "used_by": "disk data",
        "target": "iqn.x:t", "lun_mapping": 2, "paths": 1, "disk_id": "d1"}]})
    row = lun_row(data, "host1")
    assert row["status"] == "used" and row["used_by"] == "disk data"
    assert row["wwid"] == WWID and row["lun"] == 2 and row["host"] == "host1"


def test_attachment_row_carries_the_guest_name() -> None:
    data = wire(DISK_ATTACHMENT, {"id": "d1", "active": True, "interface": "virtio_scsi",
                                  "logical_name": "/dev/sdb", "disk": {
                                      "id": "d1", "alias": "data", "lun_storage": {
                                          "id": WWID, "logical_units": [{"id": WWID,
                                                                         "size": 1024}]}}})
    row = attachment_row(data)
    assert row == {"disk_id": "d1", "alias": "data", "wwid": WWID, "size": 1024,
                   "interface": "virtio_scsi", "active": True, "bootable": None,
                   "read_only": None, "logical_name": "/dev/sdb"}


def test_event_and_host_rows() -> None:
    event = event_row(wire(EVENT, {"id": "42", "code": 153, "severity": "normal",
                                   "description": "VM x started", "vm": {"id": "v1"}}))
    assert event["id"] == 42 and event["vm_id"] == "v1" and event["code"] == 153
    host = host_row(wire(HOST, {"id": "h1", "name": "one", "status": "up", "port": 54321,
                                "address": "10.0.0.1", "summary": {"active": 3},
                                "version": {"major": 0, "minor": 1, "build": 0,
                                            "full_version": "0.1.0"}}))
    assert host["vms"] == 3 and host["agent_version"] == "0.1.0"


# -- the three formats --------------------------------------------------------------------

ROWS = [{"name": "web", "status": "up", "size": 64 * MiB, "detail": "[Cannot x. y.]"},
        {"name": "db", "status": "down", "size": None, "detail": ""}]
COLUMNS = [Column("name"), Column("status", kind="status"), Column("size", kind="size"),
           Column("detail", wrap=True)]


def test_table_is_readable_and_never_reads_markup(capsys: pytest.CaptureFixture[str]) -> None:
    output().rows(ROWS, COLUMNS)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "SIZE", "DETAIL"]
    assert "[Cannot x. y.]" in lines[1] and "64 MiB" in lines[1]
    assert all(line == line.rstrip() for line in lines)
    assert len(lines) == 3


def test_json_is_the_rows_and_columns_pick_keys(capsys: pytest.CaptureFixture[str]) -> None:
    output("json").rows(ROWS, COLUMNS)
    assert json.loads(capsys.readouterr().out) == ROWS
    output("json", ("name,size",)).rows(ROWS, COLUMNS)
    assert json.loads(capsys.readouterr().out) == [{"name": "web", "size": 64 * MiB},
                                                   {"name": "db", "size": None}]


def test_values_are_tab_separated_raw(capsys: pytest.CaptureFixture[str]) -> None:
    output("value", ("name", "size")).rows(ROWS, COLUMNS)
    assert capsys.readouterr().out == f"web\t{64 * MiB}\ndb\t\n"


def test_an_unknown_column_is_a_usage_error() -> None:
    with pytest.raises(CliError) as err:
        output("value", ("nope",)).rows(ROWS, COLUMNS)
    assert err.value.exit_code == USAGE and "known: name, status" in err.value.detail


def test_one_object_and_done(capsys: pytest.CaptureFixture[str]) -> None:
    output().one(ROWS[0], COLUMNS)
    text = capsys.readouterr().out
    assert [line.split() for line in text.splitlines()][:3] == [
        ["name", "web"], ["status", "up"], ["size", "64", "MiB"]]
    output("json").done("VM web is up", ROWS[0])
    assert json.loads(capsys.readouterr().out) == ROWS[0]
    output().done("VM web is up", ROWS[0])
    assert capsys.readouterr().out == "VM web is up\n"
    output("value", ("status",)).done("VM web is up", ROWS[0])
    assert capsys.readouterr().out == "up\n"
    output("json").done("Logged out")
    assert json.loads(capsys.readouterr().out) == {"message": "Logged out"}
