"""The API root (``GET /ovirt-engine/api``): product, summary, time, the logged-in user."""

from __future__ import annotations

from virtyard.engine.api.types.base import DATE, INTEGER, STRING, Field, Type, register, struct
from virtyard.engine.api.types.common import VERSION
from virtyard.engine.api.types.hosts import USER

PRODUCT_INFO = struct("product_info", "What answers.", [
    Field("instance_id", STRING), Field("name", STRING), Field("vendor", STRING),
    Field("version", VERSION),
])

SUMMARY_ITEM = struct("api_summary_item", "Counts of one kind of object.", [
    Field("active", INTEGER), Field("total", INTEGER),
])

SUMMARY = struct("api_summary", "How many of each there are.", [
    Field("hosts", SUMMARY_ITEM), Field("storage_domains", SUMMARY_ITEM),
    Field("users", SUMMARY_ITEM), Field("vms", SUMMARY_ITEM),
])

API = Type("api", "The API's entry point: links to every collection.", [
    Field("product_info", PRODUCT_INFO), Field("summary", SUMMARY),
    Field("time", DATE, "The engine's clock."),
    Field("authenticated_user", USER), Field("effective_user", USER),
], identified=False)
register(API)
