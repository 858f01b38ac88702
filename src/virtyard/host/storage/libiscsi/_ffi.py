"""The C side of the binding: libiscsi's enums, struct mirrors and function signatures.

Everything that must match ``libiscsi.so.7``'s ABI byte for byte is here and nowhere else: the
status codes, the ``struct scsi_task`` mirror (its layout checked against the real one when the
library is loaded), the callback type, and every function declared with its exact C signature.
The library is loaded lazily by :func:`library`, so importing the binding never needs it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, Final

from virtyard.host.storage.libiscsi.errors import IscsiUnavailableError

LIBRARY_NAME: Final = "libiscsi.so.7"

# libiscsi enums (iscsi.h / scsi-lowlevel.h, API version 20170105).
SESSION_DISCOVERY: Final = 1
SESSION_NORMAL: Final = 2
HEADER_DIGEST_NONE: Final = 0
STATUS_GOOD: Final = 0
STATUS_CHECK_CONDITION: Final = 2
STATUS_BUSY: Final = 0x08
STATUS_TASK_SET_FULL: Final = 0x28
STATUS_REDIRECT: Final = 0x101
STATUS_CANCELLED: Final = 0x0F000000
STATUS_ERROR: Final = 0x0F000001
STATUS_TIMEOUT: Final = 0x0F000002
SESSION_STATUSES: Final = (STATUS_CANCELLED, STATUS_ERROR, STATUS_TIMEOUT)  # libiscsi's own


class _ScsiSense(ctypes.Structure):
    # GCC packs the three 1-bit fields and bit_pointer into bytes 12 and 13; ctypes would not,
    # so the bitfield byte is declared as a plain byte.
    _fields_ = [
        ("error_type", ctypes.c_ubyte),
        ("key", ctypes.c_int),
        ("ascq", ctypes.c_int),  # ASC << 8 | ASCQ
        ("flags", ctypes.c_ubyte),
        ("bit_pointer", ctypes.c_ubyte),
        ("field_pointer", ctypes.c_uint16),
    ]


class _ScsiData(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("data", ctypes.c_void_p)]


class _ScsiIovector(ctypes.Structure):
    _fields_ = [
        ("iov", ctypes.c_void_p),
        ("niov", ctypes.c_int),
        ("nalloc", ctypes.c_int),
        ("offset", ctypes.c_size_t),
        ("consumed", ctypes.c_int),
    ]


class ScsiTask(ctypes.Structure):
    """``struct scsi_task`` (scsi-lowlevel.h); we only read status, sense and datain."""

    _fields_ = [
        ("status", ctypes.c_int),
        ("cdb_size", ctypes.c_int),
        ("xfer_dir", ctypes.c_int),
        ("expxferlen", ctypes.c_int),
        ("cdb", ctypes.c_ubyte * 16),
        ("residual_status", ctypes.c_int),
        ("residual", ctypes.c_size_t),
        ("sense", _ScsiSense),
        ("datain", _ScsiData),
        ("mem", ctypes.c_void_p),
        ("ptr", ctypes.c_void_p),
        ("itt", ctypes.c_uint32),
        ("cmdsn", ctypes.c_uint32),
        ("lun", ctypes.c_uint32),
        ("iovector_in", _ScsiIovector),
        ("iovector_out", _ScsiIovector),
    ]


class _TargetPortal(ctypes.Structure):
    pass


_TargetPortal._fields_ = [
    ("next", ctypes.POINTER(_TargetPortal)),
    ("portal", ctypes.c_char_p),
]


class DiscoveryAddress(ctypes.Structure):
    pass


DiscoveryAddress._fields_ = [
    ("next", ctypes.POINTER(DiscoveryAddress)),
    ("target_name", ctypes.c_char_p),
    ("portals", ctypes.POINTER(_TargetPortal)),
]

# void (*iscsi_command_cb)(struct iscsi_context *, int status, void *command_data, void *priv)
COMMAND_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_void_p)

_ctx = ctypes.c_void_p
_task = ctypes.c_void_p
_int = ctypes.c_int
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
_str = ctypes.c_char_p


def _declare(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Callable[..., Any]:
    function = lib[name]
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


class Lib:
    """The libiscsi functions we use, each declared with its exact C signature."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        d = _declare
        self.create_context = d(lib, "iscsi_create_context", _ctx, _str)
        self.destroy_context = d(lib, "iscsi_destroy_context", _int, _ctx)
        self.get_error = d(lib, "iscsi_get_error", _str, _ctx)
        self.set_session_type = d(lib, "iscsi_set_session_type", _int, _ctx, _int)
        self.set_header_digest = d(lib, "iscsi_set_header_digest", _int, _ctx, _int)
        self.set_targetname = d(lib, "iscsi_set_targetname", _int, _ctx, _str)
        self.set_initiator_username_pwd = d(lib, "iscsi_set_initiator_username_pwd", _int,
                                            _ctx, _str, _str)
        self.set_timeout = d(lib, "iscsi_set_timeout", _int, _ctx, _int)
        self.set_noautoreconnect = d(lib, "iscsi_set_noautoreconnect", None, _ctx, _int)
        self.get_fd = d(lib, "iscsi_get_fd", _int, _ctx)
        self.which_events = d(lib, "iscsi_which_events", _int, _ctx)
        self.service = d(lib, "iscsi_service", _int, _ctx, _int)
        self.connect_async = d(lib, "iscsi_connect_async", _int, _ctx, _str, COMMAND_CB,
                               ctypes.c_void_p)
        self.login_async = d(lib, "iscsi_login_async", _int, _ctx, COMMAND_CB, ctypes.c_void_p)
        self.logout_async = d(lib, "iscsi_logout_async", _int, _ctx, COMMAND_CB,
                              ctypes.c_void_p)
        self.disconnect = d(lib, "iscsi_disconnect", _int, _ctx)
        self.is_logged_in = d(lib, "iscsi_is_logged_in", _int, _ctx)
        self.get_target_address = d(lib, "iscsi_get_target_address", _str, _ctx)
        self.discovery_async = d(lib, "iscsi_discovery_async", _int, _ctx, COMMAND_CB,
                                 ctypes.c_void_p)
        self.reportluns_task = d(lib, "iscsi_reportluns_task", _task, _ctx, _int, _int,
                                 COMMAND_CB, ctypes.c_void_p)
        self.inquiry_task = d(lib, "iscsi_inquiry_task", _task, _ctx, _int, _int, _int, _int,
                              COMMAND_CB, ctypes.c_void_p)
        self.readcapacity10_task = d(lib, "iscsi_readcapacity10_task", _task, _ctx, _int, _int,
                                     _int, COMMAND_CB, ctypes.c_void_p)
        self.readcapacity16_task = d(lib, "iscsi_readcapacity16_task", _task, _ctx, _int,
                                     COMMAND_CB, ctypes.c_void_p)
        # lun, lba, datalen, blocksize, rdprotect, dpo, fua, fua_nv, group_number, cb, private
        self.read10_task = d(lib, "iscsi_read10_task", _task, _ctx, _int, _u32, _u32, _int,
                             _int, _int, _int, _int, _int, COMMAND_CB, ctypes.c_void_p)
        self.read16_task = d(lib, "iscsi_read16_task", _task, _ctx, _int, _u64, _u32, _int,
                             _int, _int, _int, _int, _int, COMMAND_CB, ctypes.c_void_p)
        # lun, lba, data, datalen, blocksize, wrprotect, dpo, fua, fua_nv, group_number, cb,
        # private (libiscsi sends from ``data`` without copying it: kept alive by the op)
        self.write16_task = d(lib, "iscsi_write16_task", _task, _ctx, _int, _u64,
                              ctypes.c_void_p, _u32, _int, _int, _int, _int, _int, _int,
                              COMMAND_CB, ctypes.c_void_p)
        # lun, lba, num_blocks (0: all), syncnv, immed, cb, private
        self.synchronizecache10_task = d(lib, "iscsi_synchronizecache10_task", _task, _ctx,
                                         _int, _int, _int, _int, _int, COMMAND_CB,
                                         ctypes.c_void_p)
        self.free_scsi_task = d(lib, "scsi_free_scsi_task", None, _task)

    def error_text(self, ctx: int) -> str:
        raw = self.get_error(ctx)
        return raw.decode("utf-8", errors="replace").strip() if isinstance(raw, bytes) else ""


# struct layout as GCC lays it out on x86-64 (offsetof() against the libiscsi-dev 1.19 headers):
# checked once at load so a mistake in the mirror above can never read the wrong bytes.
_LP64_LAYOUT: Final = {"sense": 48, "datain": 64, "size": 176}

_lib_instance: Lib | None = None


def library() -> Lib:
    """Load libiscsi once, on first use, so importing this module never needs it."""
    global _lib_instance  # noqa: PLW0603 - one process-wide handle to the shared library
    if _lib_instance is None:
        try:
            lib = ctypes.CDLL(LIBRARY_NAME)
        except OSError as e:
            raise IscsiUnavailableError(
                f"cannot load {LIBRARY_NAME} (install the Debian package libiscsi7)",
                detail=str(e)) from e
        if ctypes.sizeof(ctypes.c_void_p) == 8:
            layout = {"sense": ScsiTask.sense.offset, "datain": ScsiTask.datain.offset,
                      "size": ctypes.sizeof(ScsiTask)}
            if layout != _LP64_LAYOUT or ctypes.sizeof(_ScsiSense) != 16:
                raise IscsiUnavailableError(f"struct scsi_task mirror is wrong: {layout}")
        _lib_instance = Lib(lib)
    return _lib_instance

