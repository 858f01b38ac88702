"""Build the lab's tiny real guest: a Debian cloud kernel plus a small initramfs.

The guest is real Linux so that disks, serials, udev links and the guest agent behave as in
production, yet it is small enough to build in seconds and boot in seconds under TCG. Everything
comes from Debian packages: the kernel and qemu-guest-agent are downloaded (``apt-get download``)
and unpacked (``dpkg-deb -x``); busybox-static, udev and the shared libraries come from the host.

The image is cached under ``cache_dir/<flavour>-<key>``, where the key hashes the exact package
versions and :data:`RECIPE_VERSION`, so it is rebuilt only when one of those changes. A flavour
adds files on top of the common base (see :class:`Flavour`): ``tiny`` adds nothing, ``python``
adds Debian's Python interpreter with the few standard-library modules our guest agent needs, and
the agent itself, started by init on its virtio-serial port.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import py_compile
import shutil
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from virtyard.lab.errors import CommandError, GuestBuildError, MissingPackageError
from virtyard.lab.process import STATIC_BUSYBOX, require, run

# Bump whenever the content or layout of the image changes for the same package versions.
RECIPE_VERSION = "2"

# Kernel command line for normal boots. loglevel=4 keeps routine kernel chatter off the serial
# console so the markers the lab waits for stay on their own lines.
DEFAULT_CMDLINE = "console=ttyS0 loglevel=4"

READY_MARKER = "VIRTYARD-GUEST-READY"
PROBE_MARKER = "VIRTYARD-PROBE-OK"
PROBE_PARAM = "virtyard.probe=1"

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_PORT = "/dev/virtio-ports/org.qemu.guest_agent.0"

# Host packages whose files go into every image (their versions are part of the cache key).
# libc6 brings the dynamic loader and libc every dynamic binary in the image needs.
BASE_HOST_PACKAGES = ("busybox-static", "udev", "systemd", "libc6")

# Kernel modules wanted in the guest; dependencies are added from modules.dep.
REQUIRED_MODULES = (
    "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_console",
    "sd_mod", "sr_mod", "cdrom", "isofs",
)
# Loaded when the kernel has them; a missing one is skipped silently (the cloud kernel has no
# AHCI, button/evdev give the ACPI power button to acpid).
OPTIONAL_MODULES = ("virtio_net", "ata_piix", "ahci", "button", "evdev")

UDEV_RULES = (
    "50-udev-default.rules", "60-block.rules", "60-cdrom_id.rules", "60-persistent-storage.rules",
)
UDEV_HELPERS = ("scsi_id", "ata_id", "cdrom_id")

# A build takes seconds; a temp build dir older than this belongs to a killed build.
STALE_BUILD_SECONDS = 3600.0

_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


@dataclass(frozen=True)
class GuestImage:
    """A built guest: direct-boot kernel and initramfs, and what they were made from."""

    kernel: Path
    initrd: Path
    kernel_version: str
    flavour: str
    key: str = ""
    packages: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def directory(self) -> Path:
        return self.kernel.parent


# -- kernel modules -------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """Canonical name of a module file (``kernel/x/virtio-pci.ko.xz`` → ``virtio_pci``)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse ``modules.dep`` text into ``{module path: [dependency paths]}``."""
    deps: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path.strip()] = rest.split()
    return deps


def render_modules_dep(deps: Mapping[str, Sequence[str]]) -> str:
    """The inverse of :func:`parse_modules_dep`, in the file's own format."""
    return "".join(f"{path}: {' '.join(d)}\n".replace(": \n", ":\n") for path, d in deps.items())


def module_closure(
    deps: Mapping[str, Sequence[str]],
    required: Iterable[str],
    optional: Iterable[str] = (),
    *,
    builtin: Iterable[str] = (),
) -> list[str]:
    """Module paths to load, dependencies first, for the wanted module names.

    Built-in modules are skipped (nothing to load); a missing required module raises
    :class:`GuestBuildError`, a missing optional one is left out.
    """
    by_name = {module_name(path): path for path in deps}
    built_in = {module_name(name) for name in builtin}
    order: list[str] = []
    state: dict[str, str] = {}  # path -> "visiting" | "done"

    def visit(path: str) -> None:
        mark = state.get(path)
        if mark == "done":
            return
        if mark == "visiting":
            raise GuestBuildError(f"kernel module dependency cycle through {path}")
        state[path] = "visiting"
        for dep in deps.get(path, ()):
            if dep in deps:
                visit(dep)
                continue
            if module_name(dep) in built_in:
                continue
            dep_path = by_name.get(module_name(dep))
            if dep_path is None:
                raise GuestBuildError(f"kernel module {path} needs {dep}, which is missing")
            visit(dep_path)
        state[path] = "done"
        order.append(path)

    for wanted, must in [*((m, True) for m in required), *((m, False) for m in optional)]:
        name = module_name(wanted)
        if name in built_in:
            continue
        path = by_name.get(name)
        if path is None:
            if must:
                raise GuestBuildError(f"the guest kernel has no module {wanted}")
            continue
        visit(path)
    return order


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` fields of an uncompressed ELF64 kernel module (``depends``, ``name``…)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            raise GuestBuildError(f"{path} is not a little-endian ELF64 kernel module")
        shoff = struct.unpack_from("<Q", header, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        names_off, names_size = sections[shstrndx][4], sections[shstrndx][5]
        f.seek(names_off)
        names = f.read(names_size)
        for sh_name, _type, _flags, _addr, offset, size in sections:
            end = names.find(b"\0", sh_name)
            if names[sh_name:end] == b".modinfo":
                f.seek(offset)
                data = f.read(size)
                break
        else:
            return {}
    info: dict[str, list[str]] = {}
    for entry in data.split(b"\0"):
        if b"=" in entry:
            key, value = entry.decode(errors="replace").split("=", 1)
            info.setdefault(key, []).append(value)
    return info


def _decompressed_module(src: Path, dest: Path) -> None:
    """Copy a module to ``dest`` as a plain ``.ko``: busybox insmod cannot read xz/zstd ones."""
    name = src.name
    if name.endswith(".ko"):
        shutil.copyfile(src, dest)
    elif name.endswith(".ko.xz"):
        dest.write_bytes(lzma.decompress(src.read_bytes()))
    elif name.endswith(".ko.gz"):
        dest.write_bytes(gzip.decompress(src.read_bytes()))
    elif name.endswith(".ko.zst"):  # no zstd in the 3.11 standard library
        run([require("zstd"), "-d", "-q", "-f", "-o", str(dest), str(src)])
    else:
        raise GuestBuildError(f"unknown kernel module format: {src}")


def modules_dep_of_tree(moddir: Path, wanted: Iterable[str] | None = None
                        ) -> dict[str, list[str]]:
    """Module dependencies of an unpacked kernel module tree.

    Debian's kernel package ships no ``modules.dep`` (its postinst runs depmod), and the host may
    not have depmod, so without the file the dependencies are read from each module's
    ``.modinfo`` ``depends=`` field, which is what depmod itself records. With ``wanted`` (module
    names) only the modules reachable from them are read, which keeps the build fast.
    """
    dep_file = moddir / "modules.dep"
    if dep_file.exists():
        return parse_modules_dep(dep_file.read_text())
    files: dict[str, str] = {}
    for path in sorted((moddir / "kernel").rglob("*.ko*")):
        rel = path.relative_to(moddir).as_posix()
        if any(rel.endswith(s) for s in _MODULE_SUFFIXES):
            files[module_name(rel)] = rel
    paths = set(files.values())
    todo = sorted(paths) if wanted is None else [
        files[n] for n in map(module_name, wanted) if n in files]
    deps: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        while todo:
            rel = todo.pop()
            if rel in deps:
                continue
            src = moddir / rel
            if not rel.endswith(".ko"):
                plain = Path(tmp) / "m.ko"
                _decompressed_module(src, plain)
                src = plain
            names = ",".join(read_modinfo(src).get("depends", [""])).split(",")
            deps[rel] = [files.get(module_name(n), n) for n in names if n]
            todo.extend(d for d in deps[rel] if d in paths)
    return deps


# -- package versions and the cache key -----------------------------------------------------------


def cache_key(flavour: str, packages: Mapping[str, str], recipe: str = RECIPE_VERSION) -> str:
    """A short stable hash of the recipe version, the flavour and the exact package versions."""
    text = f"recipe={recipe}\nflavour={flavour}\n" + "".join(
        f"{name}={packages[name]}\n" for name in sorted(packages)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_apt_records(text: str) -> dict[str, dict[str, str]]:
    """``apt-cache show`` stanzas by package (the first one per package; continuations joined)."""
    records: dict[str, dict[str, str]] = {}
    fields: dict[str, str] = {}
    last = ""
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if "Package" in fields:
                records.setdefault(fields["Package"], fields)
            fields, last = {}, ""
        elif line[0].isspace() and last:
            fields[last] += "\n" + line.strip()
        elif ":" in line:
            last, value = line.split(":", 1)
            fields[last] = value.strip()
    return records


def kernel_package_from_depends(depends: str) -> str:
    """The versioned ``linux-image-*`` package named in a kernel meta-package's Depends."""
    for alternative in depends.split(","):
        name = alternative.split("|")[0].split("(")[0].strip()
        if name.startswith("linux-image-"):
            return name
    raise GuestBuildError(f"no linux-image package in the Depends of {KERNEL_META_PACKAGE}")


def _apt_candidates(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """Candidate records of ``packages``, in one apt-cache call (each call loads apt's cache)."""
    proc = run(["apt-cache", "show", "--no-all-versions", *packages], timeout=60, check=False)
    records = parse_apt_records(proc.stdout)
    missing = [p for p in packages if "Version" not in records.get(p, {})]
    if missing:
        raise GuestBuildError(
            f"apt has no candidate for {', '.join(missing)}; run: apt-get update"
        )
    return records


def installed_versions(packages: Sequence[str]) -> dict[str, str]:
    """Versions of installed host packages; a missing one raises :class:`MissingPackageError`."""
    proc = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status} ${Version}\n",
                *packages], check=False)
    versions: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "installed":
            versions[parts[0]] = parts[2]
    for package in packages:
        if package not in versions:
            raise MissingPackageError(package, package)
    return versions


def resolve_download_packages(names: Sequence[str]) -> dict[str, str]:
    """Exact candidate versions of packages fetched with ``apt-get download``.

    ``KERNEL_META_PACKAGE`` is replaced by the versioned kernel package it depends on.
    """
    records = _apt_candidates(names)
    versions: dict[str, str] = {}
    for name in names:
        if name == KERNEL_META_PACKAGE:
            kernel = kernel_package_from_depends(records[name].get("Depends", ""))
            versions[kernel] = _apt_candidates([kernel])[kernel]["Version"]
        else:
            versions[name] = records[name]["Version"]
    return versions


# -- flavours -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flavour:
    """What a guest flavour adds to the common base image.

    ``host_packages`` are installed on the host and ``download_packages`` fetched from apt;
    both count in the cache key, as do the ``inputs`` (name -> content hash of files the flavour
    copies from this tree, so editing them rebuilds the image). ``populate`` adds the flavour's
    files to the staged root.
    """

    name: str
    host_packages: tuple[str, ...] = ()
    download_packages: tuple[str, ...] = ()
    populate: Callable[[Stage, BuildContext], None] | None = None
    inputs: Callable[[], dict[str, str]] | None = None


# -- the staged root file system ------------------------------------------------------------------


class Stage:
    """The guest's root file system being assembled in a host directory (merged /usr layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for directory in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc", "proc", "sys",
                          "dev", "run", "tmp", "root", "mnt", "var/log", "var/lib"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        for link in ("bin", "sbin", "lib", "lib64"):
            (root / link).symlink_to(f"usr/{link}")
        (root / "var/run").symlink_to("../run")
        self._libraries: set[str] = set()

    def path(self, guest_path: str) -> Path:
        """Host path of ``guest_path`` inside the stage, with its parent directory created."""
        dest = self.root / guest_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def _replace(self, guest_path: str) -> Path:
        dest = self.path(guest_path)
        if dest.is_symlink() or dest.exists():
            dest.unlink()  # never write through a busybox applet link into busybox itself
        return dest

    def add_file(self, src: Path, guest_path: str, mode: int | None = None) -> None:
        """Copy ``src`` (following symlinks) to ``guest_path``."""
        dest = self._replace(guest_path)
        shutil.copyfile(src, dest)
        os.chmod(dest, mode if mode is not None else stat.S_IMODE(src.stat().st_mode))

    def add_text(self, guest_path: str, text: str, mode: int = 0o644) -> None:
        dest = self._replace(guest_path)
        dest.write_text(text)
        os.chmod(dest, mode)

    def add_symlink(self, guest_path: str, target: str) -> None:
        self._replace(guest_path).symlink_to(target)

    def add_binary(self, src: Path, guest_path: str) -> None:
        """Copy a program and every shared library ``ldd`` says it needs."""
        self.add_file(src, guest_path, 0o755)
        for library in shared_libraries(src):
            if library not in self._libraries:
                self._libraries.add(library)
                self.add_file(Path(library), library, 0o755)


def parse_ldd(output: str) -> list[str]:
    """Absolute library paths from ``ldd`` output; raise when one is not found."""
    libraries: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if "=>" in line:
            name, target = (part.strip() for part in line.split("=>", 1))
            if target.startswith("not found"):
                raise GuestBuildError(
                    f"shared library {name} not found on this host; install its Debian package "
                    "(qemu-system-x86 pulls in every library qemu-ga needs)"
                )
            path = target.split(" (", 1)[0].strip()
            if path.startswith("/"):
                libraries.append(path)
        elif line.startswith("/"):
            libraries.append(line.split(" (", 1)[0].strip())  # the dynamic loader
    return libraries


def shared_libraries(binary: Path) -> list[str]:
    proc = run(["ldd", str(binary)], check=False)
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise CommandError(["ldd", str(binary)], proc.returncode, proc.stderr)
    return parse_ldd(proc.stdout)


# -- the initramfs archive ------------------------------------------------------------------------


class _Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


def _cpio_entry(out: _Writer, ino: int, name: str, mode: int, data: bytes = b"", *,
                nlink: int = 1, rdev: tuple[int, int] = (0, 0), mtime: int = 0) -> None:
    encoded = name.encode() + b"\0"
    header = "070701" + "".join(
        f"{value:08x}" for value in (
            ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
    )
    out.write(header.encode() + encoded)
    out.write(b"\0" * (-(110 + len(encoded)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def _walk(root: Path) -> Iterator[Path]:
    """Every entry under ``root``, parents before children, in a stable order."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)


def write_cpio(root: Path, out: _Writer, *, char_devices: Mapping[str, tuple[int, int]] = {},
               mtime: int = 0) -> None:
    """Write ``root`` as a ``newc`` cpio archive (owner root), plus the given character devices.

    Written here rather than with cpio(1) so device nodes need no mknod and owners are root
    whoever builds the image.
    """
    ino = 1
    for path in _walk(root):
        name = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            _cpio_entry(out, ino, name, stat.S_IFLNK | 0o777, os.readlink(path).encode(),
                        mtime=mtime)
        elif stat.S_ISDIR(st.st_mode):
            _cpio_entry(out, ino, name, stat.S_IFDIR | stat.S_IMODE(st.st_mode), nlink=2,
                        mtime=mtime)
        elif stat.S_ISREG(st.st_mode):
            _cpio_entry(out, ino, name, stat.S_IFREG | stat.S_IMODE(st.st_mode),
                        path.read_bytes(), mtime=mtime)
        else:
            raise GuestBuildError(f"cannot put {path} into the initramfs")
        ino += 1
    for name, rdev in sorted(char_devices.items()):
        _cpio_entry(out, ino, name, stat.S_IFCHR | 0o600, rdev=rdev, mtime=mtime)
        ino += 1
    _cpio_entry(out, 0, "TRAILER!!!", 0)


# -- guest scripts --------------------------------------------------------------------------------

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# /init runs first so that the KVM probe can answer before anything slow happens.
_INIT = f"""#!/bin/sh
# virtyard guest: answer the accelerator probe, else hand over to busybox init.
export PATH={_PATH}
mount -t proc proc /proc
case " $(cat /proc/cmdline) " in
*" {PROBE_PARAM} "*)
    mount -t devtmpfs devtmpfs /dev
    echo {PROBE_MARKER}
    # printk reaches the serial port synchronously, so the marker is out before power-off.
    echo "<2>{PROBE_MARKER}" > /dev/kmsg
    poweroff -f
    ;;
esac
exec /sbin/init
"""

_INITTAB = """\
::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
"""

_RCS = f"""#!/bin/sh
# virtyard guest start-up: mounts, modules, udev, acpid, qemu-ga, then the ready marker.
export PATH={_PATH}
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname virtyard-guest
ip link set lo up 2>/dev/null
echo > /proc/sys/kernel/modprobe
KVER=$(uname -r)
while read -r module; do
    insmod "/lib/modules/$KVER/$module" || echo "virtyard: insmod $module failed"
done < /etc/virtyard/modules
/lib/systemd/systemd-udevd --daemon --resolve-names=never
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add
udevadm settle --timeout=30
if ls /dev/input/event* >/dev/null 2>&1; then
    acpid -c /etc/acpi -l /run/acpid.log
fi
setsid /usr/lib/virtyard/qga-loop </dev/null >/dev/null 2>&1 &
# Ready means qemu-ga holds the port open (when the guest has one): wait up to 10 s for that.
agent_holds() {{
    for fd in /proc/$(pidof qemu-ga)/fd/*; do
        [ "$(readlink "$fd" 2>/dev/null)" = "$1" ] && return 0
    done
    return 1
}}
if [ -e {AGENT_PORT} ]; then
    port=$(readlink -f {AGENT_PORT})
    tries=0
    until agent_holds "$port"; do
        tries=$((tries + 1))
        if [ $tries -gt 200 ]; then
            echo "virtyard: qemu-ga has not opened $port; see /run/qemu-ga.log"
            break
        fi
        usleep 50000
    done
fi
echo {READY_MARKER}
"""

_RCK = f"""#!/bin/sh
# virtyard guest shut-down: flush and unmount before busybox init powers off.
export PATH={_PATH}
sync
umount -a -r 2>/dev/null
sync
"""

_QGA_LOOP = f"""#!/bin/sh
# Keep qemu-ga on the virtio-serial port, restarting it should it die.
export PATH={_PATH}
export HOME=/root
while :; do
    if [ -e {AGENT_PORT} ]; then
        /usr/sbin/qemu-ga -m virtio-serial -p {AGENT_PORT} -l /run/qemu-ga.log -t /run
    fi
    sleep 1
done
"""

# qemu-ga's guest-shutdown execs `/sbin/shutdown -h -P|-H|-r +0 MESSAGE`; busybox has no
# shutdown, so map it onto busybox init's poweroff/halt/reboot (which run rcK first).
_SHUTDOWN = f"""#!/bin/sh
export PATH={_PATH}
sync
for arg in "$@"; do
    case "$arg" in
    -r) exec reboot ;;
    -H) exec halt ;;
    esac
done
exec poweroff
"""

# busybox acpid runs /etc/acpi/<ACTION>/<PARAM> for an event: PWRF/00000080 is the power button.
_ACPI_POWER = f"""#!/bin/sh
export PATH={_PATH}
exec poweroff
"""

_PROFILE = f"""export PATH={_PATH}
export PS1='virtyard-guest# '
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"

_GROUPS = (
    "root", "daemon", "bin", "sys", "adm", "tty", "disk", "lp", "mail", "news", "uucp", "man",
    "proxy", "kmem", "dialout", "fax", "voice", "cdrom", "floppy", "tape", "sudo", "audio",
    "dip", "video", "input", "sgx", "kvm", "render", "plugdev", "users",
)


def _group_file() -> str:
    lines = [f"{name}:x:{gid}:" for gid, name in enumerate(_GROUPS)]
    return "\n".join([*lines, "nogroup:x:65534:"]) + "\n"


# -- the python flavour: Debian's interpreter, a handful of stdlib modules, our guest agent -----

PYTHON_VERSION = "3.11"
PYTHON_PACKAGES = (f"python{PYTHON_VERSION}-minimal", f"libpython{PYTHON_VERSION}-minimal",
                   f"libpython{PYTHON_VERSION}-stdlib")
# The standard-library files the guest agent needs that Debian's interpreter has neither built
# in nor frozen (found by running the agent under it with ``-I -S -X importtime``; the unit
# tests check the agent's imports against this list). os.py is frozen, but the interpreter
# finds its prefix by that landmark. _json is only a speed-up of json.
PYTHON_STDLIB_FILES = (
    "os.py", "__future__.py", "collections/__init__.py", "collections/abc.py", "copyreg.py",
    "encodings/__init__.py", "encodings/aliases.py", "encodings/utf_8.py", "enum.py",
    "functools.py", "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
    "keyword.py", "operator.py", "re/__init__.py", "re/_casefix.py", "re/_compiler.py",
    "re/_constants.py", "re/_parser.py", "reprlib.py", "selectors.py", "socket.py", "types.py",
    "lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
)
# Shared libraries of the interpreter (ldd) that libc6 does not bring.
PYTHON_HOST_PACKAGES = ("libexpat1", "zlib1g")

GUEST_AGENT_SOURCE = Path(__file__).resolve().parent.parent / "guest" / "agent.py"
GUEST_AGENT_PATH = "/usr/lib/virtyard/guest_agent.py"
GUEST_AGENT_PORT = "/dev/virtio-ports/org.virtyard.guest_agent.0"
GUEST_AGENT_LOG = "/run/virtyard-guest-agent.log"

_GUEST_AGENT_LOOP = f"""#!/bin/sh
# Keep the virtyard guest agent on its virtio-serial port, restarting it should it die.
export PATH={_PATH}
while :; do
    if [ -e {GUEST_AGENT_PORT} ]; then
        /usr/bin/python3 -I -S {GUEST_AGENT_PATH} --port {GUEST_AGENT_PORT} >>{GUEST_AGENT_LOG} 2>&1
    fi
    sleep 1
done
"""
# busybox init starts respawn entries once the sysinit script (rcS: modules, udev) is done.
_GUEST_AGENT_INITTAB = "::respawn:/usr/lib/virtyard/guest-agent-loop\n"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _python_inputs() -> dict[str, str]:
    """The agent's content and this recipe count in the python image's cache key."""
    recipe = json.dumps([PYTHON_STDLIB_FILES, _GUEST_AGENT_LOOP, _GUEST_AGENT_INITTAB])
    return {"virtyard-guest-agent": _file_hash(GUEST_AGENT_SOURCE),
            "virtyard-python-recipe": hashlib.sha256(recipe.encode()).hexdigest()[:16]}


def _populate_python(stage: Stage, ctx: BuildContext) -> None:
    """Interpreter, the stdlib files the agent needs (with bytecode), the agent, its start."""
    interpreter = ctx.unpacked[PYTHON_PACKAGES[0]] / f"usr/bin/python{PYTHON_VERSION}"
    if not interpreter.is_file():
        raise GuestBuildError(f"{PYTHON_PACKAGES[0]} has no {interpreter.name}")
    stage.add_binary(interpreter, f"/usr/bin/python{PYTHON_VERSION}")
    stage.add_symlink("/usr/bin/python3", f"python{PYTHON_VERSION}")
    libdir = f"/usr/lib/python{PYTHON_VERSION}"
    roots = [ctx.unpacked[name] / libdir.lstrip("/") for name in PYTHON_PACKAGES]
    for rel in PYTHON_STDLIB_FILES:
        src = next((root / rel for root in roots if (root / rel).is_file()), None)
        if src is None:
            raise GuestBuildError(f"no {libdir}/{rel} in {', '.join(PYTHON_PACKAGES)}")
        if rel.endswith(".so"):
            stage.add_binary(src, f"{libdir}/{rel}")
        else:
            stage.add_file(src, f"{libdir}/{rel}", 0o644)
            _compile(stage, f"{libdir}/{rel}")
    stage.add_file(GUEST_AGENT_SOURCE, GUEST_AGENT_PATH, 0o755)
    stage.add_text("/usr/lib/virtyard/guest-agent-loop", _GUEST_AGENT_LOOP, 0o755)
    inittab = stage.path("/etc/inittab")
    inittab.write_text(inittab.read_text() + _GUEST_AGENT_INITTAB)


def _compile(stage: Stage, guest_path: str) -> None:
    """Bytecode beside a module, so the guest (often under TCG) does not compile at boot.

    Unchecked-hash pycs stay valid whatever the file times in the initramfs; only a host
    Python of the guest's version writes bytecode the guest can load.
    """
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != PYTHON_VERSION:
        return
    src = stage.path(guest_path)
    tag = sys.implementation.cache_tag
    cfile = src.parent / "__pycache__" / f"{src.name.removesuffix('.py')}.{tag}.pyc"
    py_compile.compile(str(src), cfile=str(cfile), dfile=guest_path, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


FLAVOURS: dict[str, Flavour] = {
    "tiny": Flavour("tiny"),
    "python": Flavour("python", host_packages=PYTHON_HOST_PACKAGES,
                      download_packages=PYTHON_PACKAGES, populate=_populate_python,
                      inputs=_python_inputs),
}


# -- the build ------------------------------------------------------------------------------------


@dataclass
class BuildContext:
    """What a build has unpacked, for the base and for flavours to take files from."""

    work: Path
    kernel_release: str
    packages: dict[str, str]
    unpacked: dict[str, Path]  # downloaded package name -> its unpacked root


def _download(packages: Mapping[str, str], dest: Path) -> dict[str, Path]:
    """Fetch the exact versions with ``apt-get download`` and return the .deb per package."""
    specs = [f"{name}={version}" for name, version in packages.items()]
    try:
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *specs],
            cwd=dest, timeout=600)
    except CommandError as exc:
        raise GuestBuildError(
            f"could not download {', '.join(specs)} ({exc.message}); run: apt-get update"
        ) from exc
    debs: dict[str, Path] = {}
    for name in packages:
        found = sorted(dest.glob(f"{name}_*.deb"))
        if not found:
            raise GuestBuildError(f"apt-get download left no .deb for {name}; run: apt-get update")
        debs[name] = found[0]
    return debs


def _add_base(stage: Stage, ctx: BuildContext, kernel_root: Path) -> list[str]:
    """Busybox, udev, qemu-ga, modules and the init scripts; returns the module load order."""
    if not STATIC_BUSYBOX.exists():
        raise MissingPackageError("busybox", "busybox-static")
    stage.add_file(STATIC_BUSYBOX, "/usr/bin/busybox", 0o755)
    applets = run([str(STATIC_BUSYBOX), "--list-full"]).stdout.split()
    for applet in applets:
        if applet in ("bin/busybox", "linuxrc"):
            continue
        stage.add_symlink(applet, "/bin/busybox")

    udevadm = Path(require("udevadm"))
    stage.add_binary(udevadm, "/usr/bin/udevadm")
    stage.add_symlink("/usr/lib/systemd/systemd-udevd", "/usr/bin/udevadm")
    udev_lib = Path("/lib/udev")
    for helper in UDEV_HELPERS:
        if not (udev_lib / helper).exists():
            raise MissingPackageError(f"/lib/udev/{helper}", "udev")
        stage.add_binary(udev_lib / helper, f"/usr/lib/udev/{helper}")
    for rule in UDEV_RULES:
        src = udev_lib / "rules.d" / rule
        if not src.exists():
            raise MissingPackageError(str(src), "udev")
        stage.add_file(src, f"/usr/lib/udev/rules.d/{rule}", 0o644)

    agent_root = ctx.unpacked[AGENT_PACKAGE]
    stage.add_binary(agent_root / "usr/sbin/qemu-ga", "/usr/sbin/qemu-ga")

    load_order = _add_modules(stage, kernel_root, ctx.kernel_release)

    stage.add_text("/init", _INIT, 0o755)
    stage.add_text("/etc/inittab", _INITTAB)
    stage.add_text("/etc/init.d/rcS", _RCS, 0o755)
    stage.add_text("/etc/init.d/rcK", _RCK, 0o755)
    stage.add_text("/usr/lib/virtyard/qga-loop", _QGA_LOOP, 0o755)
    stage.add_text("/usr/sbin/shutdown", _SHUTDOWN, 0o755)
    stage.add_text("/etc/acpi/PWRF/00000080", _ACPI_POWER, 0o755)
    stage.add_text("/etc/profile", _PROFILE)
    stage.add_text("/etc/passwd", _PASSWD)
    stage.add_text("/etc/group", _group_file())
    stage.add_text("/etc/hostname", "virtyard-guest\n")
    stage.add_text("/etc/virtyard/modules", "".join(f"{m}\n" for m in load_order))
    stage.add_text("/etc/virtyard/packages", "".join(
        f"{name} {version}\n" for name, version in sorted(ctx.packages.items())))
    return load_order


def _add_modules(stage: Stage, kernel_root: Path, release: str) -> list[str]:
    plain, modules_dep = decompress_modules(kernel_root, release, REQUIRED_MODULES,
                                            OPTIONAL_MODULES, stage.root / "lib/modules" / release)
    # A modules.dep for what is in the image, so busybox modprobe works when debugging.
    stage.add_text(f"/lib/modules/{release}/modules.dep", modules_dep)
    return plain


def decompress_modules(kernel_root: Path, release: str, required: tuple[str, ...],
                       optional: tuple[str, ...], into: Path) -> tuple[list[str], str]:
    """The ``required`` modules, the ``optional`` ones the kernel has, and what they depend
    on, decompressed from the unpacked kernel package into ``into`` (as ``.ko``, at their
    paths in the kernel's module tree). Returns their paths in load order and a
    ``modules.dep`` for just them."""
    moddir = kernel_root / "lib/modules" / release
    if not moddir.is_dir():
        raise GuestBuildError(f"the kernel package has no modules for {release}")
    builtin_file = moddir / "modules.builtin"
    builtin = builtin_file.read_text().split() if builtin_file.exists() else []
    deps = modules_dep_of_tree(moddir, [*required, *optional])
    order = module_closure(deps, required, optional, builtin=builtin)
    plain: list[str] = []
    for rel in order:
        target = rel
        for suffix in _MODULE_SUFFIXES[:-1]:
            if target.endswith(suffix):
                target = target[: -len(suffix)] + ".ko"
        dest = into / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        _decompressed_module(moddir / rel, dest)
        plain.append(target)
    renamed = dict(zip(order, plain, strict=True))
    subset = {renamed[p]: [renamed.get(d, d) for d in deps[p]] for p in order}
    return plain, render_modules_dep(subset)


def _build_into(out: Path, flavour: Flavour, packages: dict[str, str],
                downloads: dict[str, str], kernel_package: str) -> str:
    """Build ``vmlinuz`` and ``initrd.img`` into ``out``; returns the kernel release."""
    work = out.parent / "work"
    debs_dir = work / "debs"
    debs_dir.mkdir(parents=True)
    debs = _download(downloads, debs_dir)
    unpacked: dict[str, Path] = {}
    for name, deb in debs.items():
        root = work / "unpacked" / name
        root.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(deb), str(root)], timeout=300)
        deb.unlink()
        unpacked[name] = root
    kernel_root = unpacked[kernel_package]
    release = kernel_package.removeprefix("linux-image-")
    vmlinuz = kernel_root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise GuestBuildError(f"{kernel_package} has no /boot/vmlinuz-{release}")
    ctx = BuildContext(work=work, kernel_release=release, packages=packages, unpacked=unpacked)

    stage = Stage(work / "root")
    modules = _add_base(stage, ctx, kernel_root)
    if flavour.populate is not None:
        flavour.populate(stage, ctx)

    out.mkdir()
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    with (out / "initrd.img").open("wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        write_cpio(stage.root, gz, char_devices={"dev/console": (5, 1), "dev/null": (1, 3)},
                   mtime=int(time.time()))
    manifest = {"flavour": flavour.name, "kernel_version": release, "recipe": RECIPE_VERSION,
                "packages": packages, "modules": modules}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return release


def _image_from_dir(directory: Path, flavour: str, key: str,
                    packages: Mapping[str, str]) -> GuestImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = directory / "vmlinuz", directory / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=str(manifest["kernel_version"]),
                      flavour=flavour, key=key, packages=tuple(sorted(packages.items())))


def resolve_packages(flavour: Flavour) -> tuple[dict[str, str], dict[str, str], str]:
    """All package versions in the image, the subset to download, and the kernel package."""
    downloads = resolve_download_packages(
        [KERNEL_META_PACKAGE, AGENT_PACKAGE, *flavour.download_packages])
    kernel_package = next(name for name in downloads if name.startswith("linux-image-"))
    packages = dict(downloads)
    packages.update(installed_versions([*BASE_HOST_PACKAGES, *flavour.host_packages]))
    if flavour.inputs is not None:
        packages.update(flavour.inputs())
    return packages, downloads, kernel_package


def _remove_stale_builds(cache_dir: Path, max_age: float = STALE_BUILD_SECONDS) -> None:
    """Remove temp dirs of builds that were killed outright (``finally`` never ran)."""
    now = time.time()
    for tmp in cache_dir.glob(".build-*"):
        try:
            if now - tmp.stat().st_mtime > max_age:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            continue


def build_guest_image(cache_dir: Path, *, flavour: str = "tiny") -> GuestImage:
    """The guest image for the current package versions, built only if not cached yet.

    Builds in a temporary directory inside ``cache_dir`` and renames it into place, so a failed
    or interrupted build leaves no half image behind and concurrent builders do not collide.
    Every failure is one :class:`GuestBuildError` saying what went wrong.
    """
    try:
        return _build_guest_image(cache_dir, flavour)
    except OSError as exc:
        raise GuestBuildError(f"cannot build the guest image in {cache_dir}: {exc}") from exc
    except CommandError as exc:
        raise GuestBuildError(f"building the guest image failed: {exc.message}") from exc


def _build_guest_image(cache_dir: Path, flavour: str) -> GuestImage:
    recipe = FLAVOURS.get(flavour)
    if recipe is None:
        raise GuestBuildError(f"unknown guest flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
    packages, downloads, kernel_package = resolve_packages(recipe)
    key = cache_key(flavour, packages)
    final = cache_dir / f"{flavour}-{key}"
    image = _image_from_dir(final, flavour, key, packages)
    if image is not None:
        return image
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{flavour}-", dir=cache_dir))
    try:
        out = tmp / "image"
        _build_into(out, recipe, packages, downloads, kernel_package)
        # A broken leftover (the rename is atomic, so not a half build): replace it.
        if final.exists() and _image_from_dir(final, flavour, key, packages) is None:
            shutil.rmtree(final)
        try:
            out.rename(final)
        except OSError:
            if not final.is_dir():  # anything but "another builder got there first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    image = _image_from_dir(final, flavour, key, packages)
    if image is None:
        raise GuestBuildError(f"the built image in {final} is incomplete")
    return image
