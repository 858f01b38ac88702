"""The storage host VM's pieces that need no VM: the merged-/usr layer, the command channel,
the QEMU command line (no address but the forwarded ones)."""

from __future__ import annotations

from pathlib import Path

from virtyard.lab.agents import LabPki
from virtyard.lab.storage_host import PORTALS, StorageHostVM
from virtyard.lab.storage_host_ctl import answer
from virtyard.lab.storage_host_image import StorageHostImage, _merge_usr


def test_merge_usr_moves_top_level_dirs_under_usr(tmp_path: Path) -> None:
    """A ``/sbin`` directory in an upper overlay layer would hide the shared root's
    ``sbin -> usr/sbin`` link, and with ``/lib`` the dynamic loader: seen for real."""
    for rel in ("sbin/multipathd", "lib/udev/rules.d/11-dm-mpath.rules",
                "lib/modules/6.1/kernel/x.ko", "usr/bin/kpartx"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "lib" / "link").symlink_to("udev")
    _merge_usr(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usr"]
    for rel in ("usr/sbin/multipathd", "usr/lib/udev/rules.d/11-dm-mpath.rules",
                "usr/lib/modules/6.1/kernel/x.ko", "usr/bin/kpartx"):
        assert (tmp_path / rel).is_file()
    assert (tmp_path / "usr/lib/link").is_symlink()


def test_ctl_answers_and_refuses_bad_requests() -> None:
    assert answer({"argv": ["sh", "-c", "echo hi; echo err >&2; exit 3"]}) == {
        "rc": 3, "stdout": "hi\n", "stderr": "err\n"}
    assert answer({"argv": ["cat"], "input": "x"})["stdout"] == "x"
    assert answer({"argv": "ls"})["rc"] == -1
    assert answer({"argv": []})["rc"] == -1
    assert answer({"argv": ["/nonexistent/program"]})["rc"] == -1
    assert answer({"argv": ["sleep", "5"], "timeout": 0.2})["rc"] == -2


def test_qemu_reaches_nothing_but_the_forwarded_ports(tmp_path: Path) -> None:
    vm = StorageHostVM(tmp_path / "sh", agent_port=25466, iscsi_port=23287,
                       pki=LabPki(tmp_path / "pki"), cache_dir=tmp_path)
    argv = vm.qemu_argv(StorageHostImage(tmp_path / "k", tmp_path / "i", "6.1", "key"))
    netdev = argv[argv.index("-netdev") + 1]
    options = netdev.split(",")
    assert "restrict=on" in options
    assert "hostfwd=tcp:127.0.0.1:25466-10.0.2.15:54321" in options
    forwards = [o for o in options if o.startswith("guestfwd=")]
    assert forwards == [f"guestfwd=tcp:{p}:3260-cmd:{vm.portal_script(i)}"
                        for i, p in enumerate(PORTALS)]
    root_share = argv[argv.index("-fsdev") + 1]
    assert "readonly=on" in root_share.split(",") and "path=/" in root_share.split(",")
