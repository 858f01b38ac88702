"""Build the storage host VM's boot image: Debian's generic kernel plus a small initramfs.

The storage host VM runs the host agent with the *kernel* initiator (open-iscsi, dm-multipath,
LVM activation), which this machine's own kernel cannot (no ``iscsi_tcp``, no device-mapper).
Its user space is not a second Debian installation: the initramfs mounts this machine's root
file system read-only over virtio-9p, lays a RAM overlay on it, and switches to it, so the
guest runs the very Python, venv, source tree, open-iscsi, lvm2 and udev that are installed
here (Debian bookworm packages, all of them). What this machine does not have comes in a
lower overlay layer unpacked from Debian packages: multipath-tools, kpartx, sg3-utils-udev and
the guest kernel's modules (with ``depmod`` indexes, so ``modprobe`` works in the guest).

Why the generic ``linux-image-amd64`` kernel and not the tiny guest's cloud kernel: the cloud
kernel has no 9p (``CONFIG_NET_9P`` is off). The image is cached under
``cache_dir/storage-host-<key>`` (key = exact package versions + :data:`RECIPE_VERSION`); a build
takes ~15 s and ~100 MB of downloads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from virtyard.lab.errors import CommandError, GuestBuildError, MissingPackageError
from virtyard.lab.guest_image import (
    Stage,
    _apt_candidates,
    _download,
    _remove_stale_builds,
    cache_key,
    decompress_modules,
    installed_versions,
    kernel_package_from_depends,
    write_cpio,
)
from virtyard.lab.process import STATIC_BUSYBOX, require, run

RECIPE_VERSION = "1"
FLAVOUR = "storage-host"
KERNEL_META_PACKAGE = "linux-image-amd64"
# Downloaded and unpacked into the overlay's extra layer (not installed on this machine).
EXTRA_PACKAGES = ("multipath-tools", "kpartx", "sg3-utils-udev")
# This machine's packages the guest runs through the 9p root (their versions key the cache).
HOST_PACKAGES = ("busybox-static", "open-iscsi", "lvm2", "udev", "python3.11", "libc6")

# Loaded by the initramfs in dependency order, before the switch to the shared root.
REQUIRED_MODULES = (
    "virtio_pci", "virtio_net", "virtio_console", "9p", "9pnet_virtio", "overlay",
    "sd_mod", "iscsi_tcp", "dm_mod", "dm_multipath", "dm_round_robin", "dm_service_time",
)
OPTIONAL_MODULES = ("dm_queue_length", "scsi_dh_alua", "loop", "crc32c_generic")

ROOT_TAG = "hostroot"   # 9p tag of this machine's root (read-only)
SHARE_TAG = "vmshare"   # 9p tag of the VM's own directory in the lab (read-write)
BOOT_MARKER = "VIRTYARD-STORAGE-HOST-INIT"

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# Stage 1 (initramfs): modules, the overlay root, then busybox init from the shared root with
# the inittab the lab wrote into the VM's directory (passed on the kernel command line).
_INIT = f"""#!/bin/sh
export PATH={_PATH}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo {BOOT_MARKER}
KVER=$(uname -r)
while read -r module; do
    insmod "/extra/usr/lib/modules/$KVER/$module" || echo "virtyard: insmod $module failed"
done < /extra/usr/lib/virtyard/modules
share=
for arg in $(cat /proc/cmdline); do
    case "$arg" in virtyard.share=*) share=${{arg#virtyard.share=}} ;; esac
done
mkdir -p /ovl /host /newroot
mount -t tmpfs -o mode=0755 tmpfs /ovl
mkdir -p /ovl/extra /ovl/upper /ovl/work
cp -a /extra/. /ovl/extra/
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro {ROOT_TAG} /host
mount -t overlay overlay \\
    -o lowerdir=/ovl/extra:/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot
mkdir -p "/newroot$share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none {SHARE_TAG} "/newroot$share"
cp "/newroot$share/inittab" /newroot/etc/inittab
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /usr/lib/virtyard/busybox init
"""


@dataclass(frozen=True)
class StorageHostImage:
    """The built kernel and initramfs of the storage host VM."""

    kernel: Path
    initrd: Path
    kernel_version: str
    key: str


def resolve_packages() -> tuple[dict[str, str], dict[str, str], str]:
    """All package versions in the image, those to download, and the kernel package name."""
    records = _apt_candidates([KERNEL_META_PACKAGE, *EXTRA_PACKAGES])
    kernel = kernel_package_from_depends(records[KERNEL_META_PACKAGE].get("Depends", ""))
    downloads = {kernel: _apt_candidates([kernel])[kernel]["Version"]}
    downloads.update({name: records[name]["Version"] for name in EXTRA_PACKAGES})
    packages = dict(downloads)
    packages.update(installed_versions(HOST_PACKAGES))
    packages["virtyard-storage-host-init"] = hash_text(_INIT)
    return packages, downloads, kernel


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _add_modules(extra: Path, kernel_root: Path, release: str) -> list[str]:
    """The wanted modules, decompressed, into ``extra/lib/modules/<release>``, with indexes."""
    moddir = kernel_root / "lib/modules" / release
    target_dir = extra / "lib/modules" / release
    plain, modules_dep = decompress_modules(kernel_root, release, REQUIRED_MODULES,
                                            OPTIONAL_MODULES, target_dir)
    (target_dir / "modules.dep").write_text(modules_dep)
    for name in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        if (moddir / name).exists():
            shutil.copyfile(moddir / name, target_dir / name)
    # Binary indexes, so kmod's modprobe (iscsiadm, multipathd) finds loaded/builtin modules.
    run([require("depmod"), "-b", str(extra), release], timeout=60)
    return plain


def _merge_usr(root: Path) -> None:
    """Move ``/bin``, ``/sbin``, ``/lib`` of unpacked packages under ``/usr``: as directories in
    an upper overlay layer they would hide the shared root's merged-usr symlinks (and with them
    the dynamic loader)."""
    for top in ("bin", "sbin", "lib", "lib64"):
        src = root / top
        if not src.is_dir() or src.is_symlink():
            continue
        for path in sorted(src.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            dest = root / "usr" / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            path.replace(dest)
        shutil.rmtree(src)


def _build_into(out: Path, downloads: dict[str, str], kernel_package: str,
                packages: dict[str, str]) -> str:
    work = out.parent / "work"
    debs_dir = work / "debs"
    debs_dir.mkdir(parents=True)
    debs = _download(downloads, debs_dir)
    stage = Stage(work / "root")
    extra = stage.root / "extra"
    extra.mkdir()
    kernel_root = work / "kernel"
    kernel_root.mkdir()
    run(["dpkg-deb", "-x", str(debs.pop(kernel_package)), str(kernel_root)], timeout=300)
    for deb in debs.values():
        run(["dpkg-deb", "-x", str(deb), str(extra)], timeout=300)
        deb.unlink()
    # Docs and man pages are dead weight in RAM.
    shutil.rmtree(extra / "usr/share", ignore_errors=True)
    release = kernel_package.removeprefix("linux-image-")
    vmlinuz = kernel_root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        raise GuestBuildError(f"{kernel_package} has no /boot/vmlinuz-{release}")
    modules = _add_modules(extra, kernel_root, release)
    _merge_usr(extra)
    if not STATIC_BUSYBOX.exists():
        raise MissingPackageError("busybox", "busybox-static")
    stage.add_file(STATIC_BUSYBOX, "/usr/bin/busybox", 0o755)
    for applet in ("sh", "mount", "umount", "mkdir", "cat", "cp", "insmod", "switch_root",
                   "uname", "echo", "ls"):
        stage.add_symlink(f"/usr/bin/{applet}", "busybox")
    stage.add_file(STATIC_BUSYBOX, "/extra/usr/lib/virtyard/busybox", 0o755)
    stage.add_text("/extra/usr/lib/virtyard/modules", "".join(f"{m}\n" for m in modules))
    stage.add_text("/init", _INIT, 0o755)
    out.mkdir()
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    with (out / "initrd.img").open("wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        write_cpio(stage.root, gz, char_devices={"dev/console": (5, 1), "dev/null": (1, 3)},
                   mtime=int(time.time()))
    manifest = {"flavour": FLAVOUR, "kernel_version": release, "recipe": RECIPE_VERSION,
                "packages": packages, "modules": modules}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return release


def _image_from_dir(directory: Path, key: str) -> StorageHostImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = directory / "vmlinuz", directory / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return StorageHostImage(kernel, initrd, str(manifest["kernel_version"]), key)


def build_storage_host_image(cache_dir: Path) -> StorageHostImage:
    """The image for the current package versions, built only when not cached yet (built in a
    temporary directory and renamed into place, like the tiny guest's)."""
    try:
        packages, downloads, kernel_package = resolve_packages()
        key = cache_key(FLAVOUR, packages, RECIPE_VERSION)
        final = cache_dir / f"{FLAVOUR}-{key}"
        image = _image_from_dir(final, key)
        if image is not None:
            return image
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(cache_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{FLAVOUR}-", dir=cache_dir))
        try:
            out = tmp / "image"
            _build_into(out, downloads, kernel_package, packages)
            if final.exists() and _image_from_dir(final, key) is None:
                shutil.rmtree(final)
            try:
                out.rename(final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise GuestBuildError(f"cannot build the storage host image in {cache_dir}: {exc}"
                              ) from exc
    except CommandError as exc:
        raise GuestBuildError(f"building the storage host image failed: {exc.message}") from exc
    image = _image_from_dir(final, key)
    if image is None:
        raise GuestBuildError(f"the built image in {final} is incomplete")
    return image
