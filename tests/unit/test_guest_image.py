"""Pure logic of the tiny guest build: module closure, cache key, parsers, archive, caching."""

from __future__ import annotations

import io
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from virtyard.lab import guest_image as gi
from virtyard.lab import kvm
from virtyard.lab.errors import CommandError, GuestBuildError, MissingPackageError

FAKE_MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/scsi/virtio_scsi.ko.xz: kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/cdrom/cdrom.ko:
kernel/drivers/scsi/sr_mod.ko: kernel/drivers/cdrom/cdrom.ko kernel/drivers/scsi/scsi_mod.ko
kernel/drivers/unrelated/big-thing.ko:
""".replace("\\\n", "")


def _deps() -> dict[str, list[str]]:
    return gi.parse_modules_dep(FAKE_MODULES_DEP)


# -- modules --------------------------------------------------------------------------------------


def test_module_name_normalises_suffix_and_dashes() -> None:
    assert gi.module_name("kernel/drivers/x/virtio-pci.ko.xz") == "virtio_pci"
    assert gi.module_name("sd_mod.ko") == "sd_mod"
    assert gi.module_name("kernel/a/b.ko.zst") == "b"
    assert gi.module_name("isofs") == "isofs"


def test_parse_modules_dep_reads_paths_and_dependencies() -> None:
    deps = _deps()
    assert deps["kernel/drivers/virtio/virtio_ring.ko"] == []
    assert deps["kernel/drivers/scsi/sd_mod.ko"] == [
        "kernel/drivers/scsi/scsi_mod.ko", "kernel/drivers/scsi/scsi_common.ko"]


def test_render_modules_dep_round_trips() -> None:
    deps = _deps()
    assert gi.parse_modules_dep(gi.render_modules_dep(deps)) == deps
    assert "kernel/drivers/cdrom/cdrom.ko:\n" in gi.render_modules_dep(deps)


def test_closure_puts_dependencies_first_and_only_once() -> None:
    order = gi.module_closure(_deps(), ["sd_mod", "virtio_scsi", "sr_mod", "virtio_pci"])
    names = [gi.module_name(p) for p in order]
    assert sorted(names) == sorted(set(names))
    for module, needs in _deps().items():
        if module in order:
            for dep in needs:
                assert order.index(dep) < order.index(module)
    assert "big_thing" not in names
    assert set(names) == {"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci",
                          "scsi_common", "scsi_mod", "sd_mod", "virtio_scsi", "cdrom", "sr_mod"}


def test_closure_keeps_compressed_paths_as_listed() -> None:
    order = gi.module_closure(_deps(), ["virtio_scsi"])
    assert order[-1] == "kernel/drivers/scsi/virtio_scsi.ko.xz"


def test_closure_skips_missing_optional_and_raises_for_missing_required() -> None:
    assert gi.module_closure(_deps(), ["cdrom"], ["ahci", "ata_piix"]) == [
        "kernel/drivers/cdrom/cdrom.ko"]
    with pytest.raises(GuestBuildError, match="ahci"):
        gi.module_closure(_deps(), ["ahci"])


def test_closure_skips_builtin_modules_and_dependencies() -> None:
    deps = {"kernel/a.ko": ["kernel/b.ko"]}
    assert gi.module_closure(deps, ["a", "b"], builtin=["kernel/b.ko"]) == ["kernel/a.ko"]


def test_closure_resolves_dependencies_given_by_name() -> None:
    deps = {"kernel/x/a.ko": ["b"], "kernel/y/b.ko": []}
    assert gi.module_closure(deps, ["a"]) == ["kernel/y/b.ko", "kernel/x/a.ko"]


def test_closure_rejects_missing_dependency_and_cycles() -> None:
    with pytest.raises(GuestBuildError, match="missing"):
        gi.module_closure({"kernel/a.ko": ["kernel/gone.ko"]}, ["a"])
    with pytest.raises(GuestBuildError, match="cycle"):
        gi.module_closure({"kernel/a.ko": ["kernel/b.ko"], "kernel/b.ko": ["kernel/a.ko"]}, ["a"])


def _fake_module(modinfo: dict[str, str]) -> bytes:
    """A minimal ELF64 little-endian file with a ``.modinfo`` section, like a .ko."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    info_off = 64
    strtab_off = info_off + len(info)
    shoff = (strtab_off + len(shstrtab) + 7) & ~7
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)
    body = bytes(header) + info + shstrtab
    body += b"\0" * (shoff - len(body))
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 11, 1, 2, 0, info_off, len(info), 0, 0, 1, 0),
    ]
    return body + b"".join(sections)


def test_read_modinfo_parses_elf_modinfo_section(tmp_path: Path) -> None:
    ko = tmp_path / "x.ko"
    ko.write_bytes(_fake_module({"name": "x", "depends": "virtio,virtio_ring", "license": "GPL"}))
    info = gi.read_modinfo(ko)
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["name"] == ["x"]


def test_read_modinfo_rejects_non_elf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ko"
    bad.write_bytes(b"not an elf file at all" * 4)
    with pytest.raises(GuestBuildError):
        gi.read_modinfo(bad)


def test_modules_dep_of_tree_without_modules_dep_uses_modinfo(tmp_path: Path) -> None:
    lzma = pytest.importorskip("lzma")
    moddir = tmp_path / "6.1.0-test"
    (moddir / "kernel/drivers/virtio").mkdir(parents=True)
    (moddir / "kernel/drivers/block").mkdir(parents=True)
    (moddir / "kernel/drivers/virtio/virtio_ring.ko").write_bytes(_fake_module({"depends": ""}))
    (moddir / "kernel/drivers/virtio/virtio.ko").write_bytes(
        _fake_module({"depends": "virtio_ring"}))
    (moddir / "kernel/drivers/block/virtio_blk.ko.xz").write_bytes(
        lzma.compress(_fake_module({"depends": "virtio,virtio_ring"})))
    deps = gi.modules_dep_of_tree(moddir)
    assert deps["kernel/drivers/block/virtio_blk.ko.xz"] == [
        "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko"]
    assert deps["kernel/drivers/virtio/virtio_ring.ko"] == []
    order = gi.module_closure(deps, ["virtio_blk"])
    assert [gi.module_name(p) for p in order] == ["virtio_ring", "virtio", "virtio_blk"]
    (moddir / "kernel/drivers/unused.ko").write_bytes(b"never read: not an ELF file")
    reachable = gi.modules_dep_of_tree(moddir, ["virtio_blk", "not_in_this_kernel"])
    assert set(reachable) == set(deps)


def test_modules_dep_of_tree_prefers_shipped_modules_dep(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(FAKE_MODULES_DEP)
    assert gi.modules_dep_of_tree(tmp_path) == _deps()


# -- cache key and apt parsing --------------------------------------------------------------------

PACKAGES = {
    "linux-image-6.1.0-56-cloud-amd64": "6.1.192-2",
    "qemu-guest-agent": "1:7.2+dfsg-7+deb12u18+b3",
    "busybox-static": "1:1.35.0-4+deb12u1+b1",
    "udev": "252.39-1~deb12u2",
    "systemd": "252.39-1~deb12u2",
}


def test_cache_key_is_stable_and_order_independent() -> None:
    reordered = dict(reversed(list(PACKAGES.items())))
    assert gi.cache_key("tiny", PACKAGES) == gi.cache_key("tiny", reordered)
    assert len(gi.cache_key("tiny", PACKAGES)) == 16


def test_cache_key_changes_with_any_version_flavour_or_recipe() -> None:
    base = gi.cache_key("tiny", PACKAGES)
    for name, version in PACKAGES.items():
        changed = dict(PACKAGES, **{name: version + "+1"})
        assert gi.cache_key("tiny", changed) != base, name
    assert gi.cache_key("tiny", dict(PACKAGES, extra="1")) != base
    assert gi.cache_key("python", PACKAGES) != base
    assert gi.cache_key("tiny", PACKAGES, recipe="999") != base


def test_parse_apt_records_keys_stanzas_by_package() -> None:
    text = (
        "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
        "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n more\n\n"
        "Package: qemu-guest-agent\nVersion: 1:7.2+dfsg-7\n\n"
        "Package: linux-image-cloud-amd64\nVersion: 6.1.176-1\n"
    )
    records = gi.parse_apt_records(text)
    meta = records["linux-image-cloud-amd64"]
    assert meta["Version"] == "6.1.192-2"  # the first stanza wins
    assert meta["Description"] == "x\nmore"
    assert records["qemu-guest-agent"]["Version"] == "1:7.2+dfsg-7"
    assert gi.kernel_package_from_depends(meta["Depends"]) == "linux-image-6.1.0-56-cloud-amd64"


def test_missing_apt_candidate_tells_to_run_apt_get_update(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    def apt_cache(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 100, "", "E: No packages found")

    monkeypatch.setattr(gi, "run", apt_cache)
    with pytest.raises(GuestBuildError, match="apt-get update"):
        gi.resolve_download_packages(["linux-image-cloud-amd64"])


def test_installed_versions_names_a_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def dpkg_query(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        out = "udev installed 252.39-1\nbusybox-static not-installed \n"
        return subprocess.CompletedProcess(argv, 1, out, "")

    monkeypatch.setattr(gi, "run", dpkg_query)
    with pytest.raises(MissingPackageError, match="busybox-static"):
        gi.installed_versions(["udev", "busybox-static"])
    assert gi.installed_versions(["udev"]) == {"udev": "252.39-1"}


def test_kernel_package_from_depends_skips_other_packages() -> None:
    depends = "initramfs-tools | linux-initramfs-tool, linux-image-6.1.0-9-cloud-amd64 (= 6.1.1)"
    assert gi.kernel_package_from_depends(depends) == "linux-image-6.1.0-9-cloud-amd64"
    with pytest.raises(GuestBuildError):
        gi.kernel_package_from_depends("foo, bar")


def test_parse_ldd_lists_libraries_and_loader() -> None:
    out = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibudev.so.1 => /lib/x86_64-linux-gnu/libudev.so.1 (0x00007f)\n"
        "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n"
    )
    assert gi.parse_ldd(out) == ["/lib/x86_64-linux-gnu/libudev.so.1",
                                 "/lib/x86_64-linux-gnu/libc.so.6",
                                 "/lib64/ld-linux-x86-64.so.2"]
    with pytest.raises(GuestBuildError, match="libnuma"):
        gi.parse_ldd("\tlibnuma.so.1 => not found\n")


def test_download_failure_tells_to_run_apt_get_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_run(argv: list[str], **_: object) -> None:
        raise CommandError(argv, 100, "E: Can't find a source to download version")

    monkeypatch.setattr(gi, "run", failing_run)
    with pytest.raises(GuestBuildError, match="apt-get update"):
        gi._download({"qemu-guest-agent": "1:7.2"}, tmp_path)


# -- staging and the archive ----------------------------------------------------------------------


def test_stage_replaces_applet_links_without_writing_through(tmp_path: Path) -> None:
    stage = gi.Stage(tmp_path / "root")
    busybox = stage.path("/usr/bin/busybox")
    busybox.write_bytes(b"BUSYBOX")
    stage.add_symlink("/sbin/shutdown", "/bin/busybox")
    stage.add_text("/sbin/shutdown", "#!/bin/sh\n", 0o755)
    assert busybox.read_bytes() == b"BUSYBOX"
    shutdown = tmp_path / "root/usr/sbin/shutdown"
    assert not shutdown.is_symlink()
    assert shutdown.read_text() == "#!/bin/sh\n"
    assert (tmp_path / "root/lib").readlink() == Path("usr/lib")


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    """name -> (mode, data, rdevmajor, rdevminor), checking newc framing on the way."""
    entries: dict[str, tuple[int, bytes, int, int]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos: pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries[name] = (mode, body, rmaj, rmin)


def test_write_cpio_stores_files_links_dirs_and_devices(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/inittab").write_text("::sysinit:/etc/init.d/rcS\n")
    (root / "init").write_text("#!/bin/sh\n")
    (root / "init").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    out = io.BytesIO()
    gi.write_cpio(root, out, char_devices={"dev/console": (5, 1)})
    entries = _read_cpio(out.getvalue())
    assert list(entries)[:2] == ["bin", "etc"]  # parents before children, sorted
    assert stat.S_ISDIR(entries["etc"][0])
    assert entries["etc/inittab"][1] == b"::sysinit:/etc/init.d/rcS\n"
    assert entries["init"][0] == stat.S_IFREG | 0o755
    assert stat.S_ISLNK(entries["bin"][0]) and entries["bin"][1] == b"usr/bin"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console[0]) and console[2:] == (5, 1)


def test_init_script_handles_probe_before_anything_else() -> None:
    init = gi._INIT
    assert init.index("mount -t proc") < init.index(gi.PROBE_PARAM) < init.index("exec /sbin/init")
    assert gi.PROBE_MARKER in init
    assert gi.READY_MARKER in gi._RCS
    assert gi.DEFAULT_CMDLINE.startswith("console=ttyS0")
    assert gi.PROBE_PARAM not in gi.DEFAULT_CMDLINE


# -- caching --------------------------------------------------------------------------------------


def _fake_resolved(monkeypatch: pytest.MonkeyPatch, versions: dict[str, str]) -> None:
    def resolve(flavour: gi.Flavour) -> tuple[dict[str, str], dict[str, str], str]:
        downloads = {k: v for k, v in versions.items() if k.startswith(("linux-image", "qemu"))}
        return dict(versions), downloads, "linux-image-6.1.0-56-cloud-amd64"

    monkeypatch.setattr(gi, "resolve_packages", resolve)


def _fake_build(calls: list[Path]) -> object:
    def build(out: Path, flavour: gi.Flavour, packages: dict[str, str],
              downloads: dict[str, str], kernel_package: str) -> str:
        calls.append(out)
        out.mkdir()
        (out / "vmlinuz").write_bytes(b"kernel")
        (out / "initrd.img").write_bytes(b"initrd")
        (out / "manifest.json").write_text('{"kernel_version": "6.1.0-56-cloud-amd64"}')
        return "6.1.0-56-cloud-amd64"

    return build


def test_build_is_cached_and_redone_only_when_a_version_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(gi, "_build_into", _fake_build(calls))
    _fake_resolved(monkeypatch, PACKAGES)
    first = gi.build_guest_image(tmp_path)
    second = gi.build_guest_image(tmp_path)
    assert len(calls) == 1
    assert first == second
    assert first.kernel == tmp_path / f"tiny-{first.key}" / "vmlinuz"
    assert first.initrd.read_bytes() == b"initrd"
    assert first.kernel_version == "6.1.0-56-cloud-amd64"
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{first.key}"]  # no temp dirs left

    _fake_resolved(monkeypatch, dict(PACKAGES, udev="253-1"))
    third = gi.build_guest_image(tmp_path)
    assert len(calls) == 2
    assert third.key != first.key
    assert third.kernel.exists()


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    def broken(out: Path, *_: object) -> str:
        out.mkdir()
        (out / "vmlinuz").write_bytes(b"half")
        raise GuestBuildError("boom")

    monkeypatch.setattr(gi, "_build_into", broken)
    _fake_resolved(monkeypatch, PACKAGES)
    with pytest.raises(GuestBuildError, match="boom"):
        gi.build_guest_image(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_flavour_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match="flavour"):
        gi.build_guest_image(tmp_path, flavour="nope")
    assert "tiny" in gi.FLAVOURS


# -- kvm ------------------------------------------------------------------------------------------


def test_no_kvm_device_means_tcg_without_booting(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert not kvm.kvm_usable_device(tmp_path / "no-such-device")
    monkeypatch.setattr(kvm, "kvm_usable_device", lambda: False)
    image = gi.GuestImage(kernel=tmp_path / "missing", initrd=tmp_path / "missing",
                          kernel_version="x", flavour="tiny")
    assert kvm.detect_accelerator(image, tmp_path / "work") == "tcg"
    assert not (tmp_path / "work").exists()


def test_probe_boot_asks_for_the_probe_and_never_reboots(tmp_path: Path) -> None:
    image = gi.GuestImage(kernel=tmp_path / "k", initrd=tmp_path / "i", kernel_version="x",
                          flavour="tiny")
    argv = kvm.probe_argv("qemu", image, tmp_path / "s.log")
    append = argv[argv.index("-append") + 1]
    assert gi.PROBE_PARAM in append and append.startswith(gi.DEFAULT_CMDLINE)
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert "-no-reboot" in argv
