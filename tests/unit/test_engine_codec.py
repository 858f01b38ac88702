"""The codec: XML and JSON from the same descriptions, strict where mistakes would be silent."""

from __future__ import annotations

import datetime
import json

import pytest
from lxml import etree
from ovirtsdk4 import readers, types, writers
from ovirtsdk4.reader import Reader
from ovirtsdk4.writer import Writer

from virtyard.engine.api import codec
from virtyard.engine.api.codec import DecodeError
from virtyard.engine.api.types.base import INTEGER, STRING, Field, Link, ListOf, Type, struct
from virtyard.engine.api.types.common import ACTION, FAULT
from virtyard.engine.api.types.hosts import EVENT, HOST

assert readers and writers  # imported for their side effect: they register the SDK's types

NESTED = struct("gadget_part", "A part.", [Field("size", INTEGER)])
GADGET = Type("gadget", "A test type.", [
    Field("name", STRING), Field("count", INTEGER), Field("parts", ListOf(NESTED, "part")),
], collection="gadgets")
GADGET.add_links(Link("parts", "things", "gadget_part"))


def test_host_xml_has_id_href_and_fields_in_order() -> None:
    body = codec.to_xml(HOST, {"id": "h1", "name": "one", "port": 54321, "status": "up",
                               "cluster": {"id": "c1"}})
    root = etree.fromstring(body)
    assert root.get("id") == "h1"
    assert root.get("href") == "/ovirt-engine/api/hosts/h1"
    assert [c.tag for c in root] == ["name", "port", "status", "cluster"]
    assert root.find("cluster").get("href") == "/ovirt-engine/api/clusters/c1"


def test_none_values_are_omitted_never_empty_numbers() -> None:
    body = codec.to_xml(HOST, {"id": "h1", "name": "x", "port": None, "memory": None})
    assert b"<port" not in body and b"<memory" not in body


def test_list_xml_and_json() -> None:
    models = [{"id": "a", "name": "A"}, {"id": "b", "name": "B"}]
    root = etree.fromstring(codec.list_to_xml(HOST, models))
    assert root.tag == "hosts" and [h.get("id") for h in root] == ["a", "b"]
    data = json.loads(codec.list_to_json(HOST, models))
    assert [h["id"] for h in data["host"]] == ["a", "b"]
    assert data["host"][0]["href"] == "/ovirt-engine/api/hosts/a"


def test_links_render_unless_followed() -> None:
    assert etree.fromstring(codec.to_xml(GADGET, {"id": "g"})).find("link") is None  # a ref
    plain = etree.fromstring(codec.to_xml(GADGET, {"id": "g", "name": "x"}))
    link = plain.find("link")
    assert link.get("rel") == "parts" and link.get("href") == "/ovirt-engine/api/gadgets/g/parts"
    followed = etree.fromstring(codec.to_xml(GADGET, {"id": "g", "things": [{"size": 3}]}))
    assert followed.find("link") is None
    assert followed.find("things/gadget_part/size").text == "3"
    as_json = json.loads(codec.to_json(GADGET, {"id": "g", "name": "x"}))
    assert as_json["link"] == [{"href": "/ovirt-engine/api/gadgets/g/parts", "rel": "parts"}]


def test_read_xml_in_any_order_with_lists() -> None:
    model = codec.from_xml(GADGET, b"<gadget id='g'><parts><part><size>2</size></part>"
                                   b"<part><size>5</size></part></parts><count> 7 </count>"
                                   b"<link rel='x' href='y'/><name>n</name></gadget>")
    assert model == {"id": "g", "parts": [{"size": 2}, {"size": 5}], "count": 7, "name": "n"}


def test_read_json_accepts_strings_for_scalars_and_both_list_forms() -> None:
    model = codec.from_json(GADGET, b'{"count": "7", "parts": {"part": [{"size": 2}]}}')
    assert model == {"count": 7, "parts": [{"size": 2}]}
    assert codec.from_json(GADGET, b'{"parts": [{"size": "3"}]}') == {"parts": [{"size": 3}]}
    assert codec.from_json(GADGET, b'{"gadget": {"name": "wrapped"}}') == {"name": "wrapped"}


@pytest.mark.parametrize(("body", "reason", "words"), [
    (b"<host><name>x</name>", codec.SYNTAX, "Malformed XML"),
    (b"<host><bogus/></host>", codec.SYNTAX, "Unknown element 'bogus' in 'host'"),
    (b"<vm/>", codec.SYNTAX, "Expected a 'host' element"),
    (b"<host><port>x</port></host>", codec.INVALID_VALUE, "not an integer"),
    (b"<host><port>99999999999999999999999</port></host>", codec.INVALID_VALUE, "out of range"),
    (b"<host><status>sideways</status></host>", codec.INVALID_VALUE, "expected one of"),
    (b"<host><name><x/></name></host>", codec.SYNTAX, "takes a value"),
    (b"<host><name>a\x01b</name></host>", codec.SYNTAX, "Malformed XML"),
    (b'<?xml version="1.0"?><!DOCTYPE h [<!ENTITY e "x">]><host><name>&e;</name></host>',
     codec.SYNTAX, "document type"),
])
def test_bad_xml_is_a_clear_decode_error(body: bytes, reason: str, words: str) -> None:
    with pytest.raises(DecodeError) as err:
        codec.from_xml(HOST, body)
    assert err.value.reason == reason
    assert words in str(err.value)


@pytest.mark.parametrize(("body", "words"), [
    (b"{", "Malformed JSON"),
    (b"[1]", "must be an object"),
    (b'{"bogus": 1}', "Unknown element 'bogus'"),
    (b'{"port": true}', "expected integer"),
    (b'{"port": 1e400}', "expected integer"),
    (b'{"name": {"a": 1}}', "takes a value"),
    (b'{"name": "a\\u0000b"}', "control characters"),
    (b'{"cluster": "x"}', "must be an object"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bad_json_is_a_clear_decode_error(body: bytes, words: str) -> None:
    with pytest.raises(DecodeError) as err:
        codec.from_json(HOST, body)
    assert words in str(err.value)


def test_deep_nesting_is_refused() -> None:
    deep = Type("deep", "", [Field("child", STRING)], identified=False)
    deep.add(Field("next", deep))
    body = b"<deep>" + b"<next>" * 40 + b"</next>" * 40 + b"</deep>"
    with pytest.raises(DecodeError, match="nested too deeply"):
        codec.from_xml(deep, body)
    shallow = b"<deep>" + b"<next>" * 3 + b"</next>" * 3 + b"</deep>"
    assert codec.from_xml(deep, shallow) == {"next": {"next": {"next": {}}}}


def test_dates_are_iso_with_offset_and_read_back() -> None:
    when = datetime.datetime(2026, 12, 2, 17, 8, 32, 799000, tzinfo=datetime.UTC)
    root = etree.fromstring(codec.to_xml(EVENT, {"id": "1", "time": when}))
    assert root.find("time").text == "2026-12-02T17:08:32.799+00:00"
    assert json.loads(codec.to_json(EVENT, {"id": "1", "time": when}))["time"] == \
        "2026-12-02T17:08:32.799+00:00"


def test_fault_and_action_shapes() -> None:
    fault = etree.fromstring(codec.to_xml(FAULT, {"reason": "Operation Failed", "detail": "[x]"}))
    assert [c.tag for c in fault] == ["reason", "detail"]
    action = etree.fromstring(codec.to_xml(ACTION, {"status": "complete"}))
    assert action.tag == "action" and action.find("status").text == "complete"
    assert codec.from_xml(ACTION, b"<action/>") == {}


def test_sdk_reads_what_we_write() -> None:
    """The official SDK's own reader parses our host and fault XML."""
    host = Reader.read(codec.to_xml(HOST, {
        "id": "h1", "name": "one", "address": "127.0.0.1", "port": 54321, "status": "up",
        "cluster": {"id": "c1"}, "memory": 1 << 30,
        "hardware_information": {"uuid": "u-1"}, "iscsi": {"initiator": "iqn.x"}}))
    assert (host.id, host.name, host.port, host.status.value) == ("h1", "one", 54321, "up")
    assert host.cluster.id == "c1" and host.memory == 1 << 30
    assert host.hardware_information.uuid == "u-1" and host.iscsi.initiator == "iqn.x"
    fault = Reader.read(codec.to_xml(FAULT, {"reason": "R", "detail": "D", "key": "K"}))
    assert (fault.reason, fault.detail) == ("R", "D")


def test_sdk_written_host_is_accepted() -> None:
    """What the SDK sends for hosts_service().add(...) decodes without an unknown element."""
    body = Writer.write(types.Host(name="h", address="a.example", port=54321,
                                   root_password="secret", description="",
                                   cluster=types.Cluster(name="Default")))
    model = codec.from_xml(HOST, body.encode())
    assert model["name"] == "h" and model["cluster"] == {"name": "Default"}
