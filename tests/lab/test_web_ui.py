"""The web UI in a real browser (Debian's chromium, headless, driven by Playwright) against the
real engine on the lab: login and logout; the Direct LUN flow end to end (discover, log in,
the LUN table with a used LUN greyed out with its reason, a LUN disk attached to a running VM
and activated — its logical name appears without a reload); run, migrate, stop; a failing
action shows the engine's reason; a read-only user sees no action and cannot act; an ISO
uploaded into a storage domain with a progress bar, then loaded into a running VM's CD drive
and ejected through the Change CD dialog.

A screenshot of every step goes to ``.test-artifacts/web-ui/<test>/``. SQLite engine only (the
UI is the same on both databases; the API tests cover PostgreSQL).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ovirtsdk4 as sdk4
import pytest
from engine_helpers import make_iso
from ovirtsdk4 import types
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from virtyard.lab.guest_image import DEFAULT_CMDLINE
from virtyard.lab.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.parametrize("engine", ["sqlite"], indirect=True)]

MiB = 1 << 20
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / ".test-artifacts" / "web-ui"
WEB = "/ovirt-engine/web"
# Long operations (a TCG guest booting, a live migration) get time; page updates are polled.
LONG = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        the_browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield the_browser
        finally:
            the_browser.close()


class Shots:
    """Numbered full-page screenshots of one test."""

    def __init__(self, name: str) -> None:
        self.dir = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.png"):
            old.unlink()
        self.count = 0

    def __call__(self, page: Page, step: str) -> None:
        self.count += 1
        page.screenshot(path=str(self.dir / f"{self.count:02d}-{step}.png"), full_page=True)


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    return Shots(request.node.name)


def new_page(browser: Browser, engine: Any, width: int = 1280, height: int = 800) -> Page:
    context = browser.new_context(ignore_https_errors=True, base_url=engine.base,
                                  viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


def log_in(page: Page, user: str, password: str) -> None:
    page.goto(WEB + "/")
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#current-user")).to_have_text(user)


def add_vm(sdk: sdk4.Connection, lab: Lab, name: str, hosts: list[types.Host]) -> types.Vm:
    image = lab.guest_image
    return sdk.system_service().vms_service().add(types.Vm(
        name=name, memory=256 * MiB, cluster=types.Cluster(name="Default"),
        template=types.Template(name="Blank"),
        os=types.OperatingSystem(kernel=str(image.kernel), initrd=str(image.initrd),
                                 cmdline=DEFAULT_CMDLINE),
        placement_policy=types.VmPlacementPolicy(hosts=[types.Host(id=h.id) for h in hosts])))


def test_login_logout_and_read_only_user(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
                                         browser: Browser, shots: Shots,
                                         engine_vms: list[str]) -> None:
    vm = add_vm(sdk, lab, f"ro-{uuid.uuid4().hex[:6]}", [])
    engine_vms.append(vm.id)
    page = new_page(browser, engine)

    # A wrong password: the engine's refusal, no session.
    page.goto(WEB + "/vms")
    page.get_by_label("User name").fill("admin@internal")
    page.get_by_label("Password").fill("not-the-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_contain_text("bad user name or password")
    shots(page, "login-refused")

    log_in(page, "admin@internal", engine.password)
    row = page.locator(f'tr[data-vm="{vm.name}"]')
    expect(row.get_by_role("button", name="Run")).to_be_visible()
    shots(page, "admin-vms")
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.goto(WEB + "/vms")  # the session is over on the engine's side too
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    shots(page, "logged-out")

    password = engine.add_user("viewer@internal", "readonly")
    log_in(page, "viewer@internal", password)
    expect(page.locator(".role")).to_have_text("read-only")
    row = page.locator(f'tr[data-vm="{vm.name}"]')
    expect(row).to_be_visible()
    expect(page.locator("main button")).to_have_count(0)
    shots(page, "read-only-vms")
    page.goto(f"{WEB}/vms/{vm.id}")
    expect(page.locator("#vm-status")).to_have_text("down")
    expect(page.locator("main button")).to_have_count(0)
    expect(page.locator("#new-lun-disk")).to_have_count(0)
    page.goto(WEB + "/disks")
    expect(page.locator("#new-lun")).to_have_count(0)
    shots(page, "read-only-disks")
    page.goto(WEB + "/disks/new-lun")  # by its address: the engine's refusal, no form
    expect(page.locator(".msg.error")).to_contain_text("not authorized")
    expect(page.locator("main form")).to_have_count(0)
    shots(page, "read-only-refused")
    # Acting anyway (a hand-made request with the page's own CSRF token): the engine's 403.
    answer = page.evaluate("""async (url) => {
        const token = document.querySelector('meta[name="csrf-token"]').content;
        const r = await fetch(url, {method: "POST", headers: {"X-CSRF-Token": token,
            "HX-Request": "true"}});
        return [r.status, await r.text()];
    }""", f"{WEB}/vms/{vm.id}/start")
    assert answer[0] == 403 and "not authorized" in answer[1], answer
    assert sdk.system_service().vms_service().vm_service(vm.id).get().status == \
        types.VmStatus.DOWN

    # A narrow window: everything reachable, nothing wider than the window.
    narrow = new_page(browser, engine, width=400, height=800)
    log_in(narrow, "viewer@internal", password)
    narrow.goto(WEB + "/vms")
    expect(narrow.locator(f'tr[data-vm="{vm.name}"]')).to_be_visible()
    assert narrow.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shots(narrow, "narrow-vms")


def test_direct_lun_flow_and_vm_actions(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
                                        browser: Browser, shots: Shots, make_target: Any,
                                        two_hosts: list[types.Host],
                                        engine_vms: list[str]) -> None:
    system = sdk.system_service()
    host1, host2 = two_hosts
    target = make_target([48 * MiB, 32 * MiB, 16 * MiB])
    suffix = uuid.uuid4().hex[:6]
    # LUN 1 is already a disk, attached to another (stopped) VM: greyed out with its reason,
    # and the failing attach below.
    used = system.disks_service().add(types.Disk(
        alias=f"used-{suffix}", lun_storage=types.HostStorage(
            type=types.StorageType.ISCSI, logical_units=[types.LogicalUnit(
                id=target.wwid(1), address=target.address, port=target.port,
                target=target.iqn)])))
    other = add_vm(sdk, lab, f"other-{suffix}", [])
    engine_vms.append(other.id)
    system.vms_service().vm_service(other.id).disk_attachments_service().add(
        types.DiskAttachment(disk=types.Disk(id=used.id), active=True,
                             interface=types.DiskInterface.VIRTIO_SCSI))
    vm = add_vm(sdk, lab, f"web-{suffix}", [host1, host2])
    engine_vms.append(vm.id)

    page = new_page(browser, engine)
    log_in(page, "admin@internal", engine.password)
    shots(page, "vms")

    # Run.
    row = page.locator(f'tr[data-vm="{vm.name}"]')
    row.get_by_role("button", name="Run").click()
    expect(page.locator("#flash")).to_contain_text(f"VM {vm.name} is running", timeout=LONG)
    expect(row.locator(".status")).to_have_text("up")
    expect(row.locator(".vm-host")).to_have_text(host1.name)
    shots(page, "running")

    # New disk → Direct LUN, from the VM's page.
    page.goto(f"{WEB}/vms/{vm.id}")
    page.locator("#new-lun-disk").click()
    expect(page.get_by_role("heading", name="New disk → Direct LUN")).to_be_visible()
    page.get_by_label("Host to use").select_option(label=host1.name)
    page.get_by_label("Address").fill(target.address)
    page.get_by_label("Port").fill(str(target.port))
    page.get_by_role("button", name="Discover").click()
    target_row = page.locator(f'#targets-table tr[data-target="{target.iqn}"]')
    expect(target_row).to_be_visible()
    shots(page, "discovered")
    page.get_by_role("button", name="Log in to all").click()
    expect(target_row.locator(".status")).to_have_text("logged in")
    lun_rows = page.locator("#lun-table tbody tr")
    used_row = page.locator(f'#lun-table tr[data-wwid="{target.wwid(1)}"]')
    expect(used_row).to_be_visible()
    expect(used_row).to_have_class(re.compile(r"\bused\b"))
    expect(used_row.locator(".reason")).to_contain_text(f"disk used-{suffix}")
    expect(used_row.locator('input[type="radio"]')).to_be_disabled()
    shots(page, "lun-table")
    # The filter box narrows the list; sorting by size puts the smallest first.
    page.get_by_label("Filter LUNs").fill(target.wwid(2))
    expect(page.locator("#lun-table tbody tr:not([hidden])")).to_have_count(1)
    shots(page, "lun-filter")
    page.get_by_label("Filter LUNs").fill("")
    assert lun_rows.count() >= 3
    page.locator("#lun-table th", has_text="Size").get_by_role("button").click()
    expect(page.locator("#lun-table th", has_text="Size")).to_have_attribute("aria-sort",
                                                                             "ascending")
    page.locator(f'#lun-table input[data-wwid="{target.wwid(2)}"]').check()
    expect(page.get_by_label("Alias")).to_have_value(target.wwid(2))  # the default alias
    alias = f"weblun-{suffix}"
    page.get_by_label("Alias").fill(alias)
    page.get_by_label("Description").fill("added in the browser")
    expect(page.get_by_label("Attach to VM (optional)")).to_have_value(vm.id)
    expect(page.get_by_label("Activate disk")).to_be_checked()
    shots(page, "lun-chosen")
    page.get_by_role("button", name="Add disk").click()
    expect(page.locator("#lun-result")).to_contain_text(
        f"Disk {alias} added. Attached to VM {vm.name} and activated.", timeout=LONG)
    expect(used_row.locator(".reason")).to_contain_text(f"disk used-{suffix}")
    shots(page, "lun-added")

    # The VM's disks: the logical name appears without a reload.
    page.get_by_role("link", name=f"VM {vm.name} → Disks").click()
    page.evaluate("window.__notReloaded = true")
    disk_row = page.locator(f'#vm-disks tr[data-disk="{alias}"]')
    expect(disk_row.locator(".status")).to_have_text("active")
    expect(disk_row).to_contain_text(target.wwid(2))
    shots(page, "vm-disks")
    expect(disk_row.locator(".logical-name")).to_have_text(re.compile(r"^/dev/\w+$"),
                                                           timeout=LONG)
    assert page.evaluate("window.__notReloaded === true")
    shots(page, "logical-name")

    # A failing action: the non-sharable disk another VM has.
    page.get_by_role("button", name="Attach disk…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Disk").select_option(used.id)
    shots(page, "attach-dialog")
    dialog.get_by_role("button", name="Attach").click()
    error = page.locator("#flash .msg.error")
    expect(error).to_contain_text("Operation Failed")
    expect(error).to_contain_text("The disk is not shareable and is already attached to a VM.")
    assert "Traceback" not in page.content()
    shots(page, "attach-refused")

    # Migrate to the other host.
    page.locator("#vm-general").get_by_role("button", name="Migrate…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Destination host").select_option(label=host2.name)
    shots(page, "migrate-dialog")
    dialog.get_by_role("button", name="Migrate").click()
    expect(page.locator("#flash")).to_contain_text(f"VM {vm.name} migrated to {host2.name}",
                                                   timeout=LONG)
    expect(page.locator("#vm-host")).to_have_text(host2.name)
    expect(page.locator("#vm-status")).to_have_text("up")
    shots(page, "migrated")

    # Deactivate the LUN disk, then stop the VM.
    disk_row.get_by_role("button", name="Deactivate").click()
    expect(disk_row.locator(".status")).to_have_text("inactive", timeout=LONG)
    page.locator("#vm-general").get_by_role("button", name="Stop").click()
    expect(page.locator("#vm-status")).to_have_text("down", timeout=LONG)
    expect(page.locator("#flash")).to_contain_text(f"VM {vm.name} is stopped")
    shots(page, "stopped")
    assert system.vms_service().vm_service(vm.id).get().status == types.VmStatus.DOWN

    # Events, newest first, carry what happened.
    page.goto(WEB + "/events")
    expect(page.locator("#events-table tbody tr").first).to_be_visible()
    expect(page.locator("#events-table")).to_contain_text(vm.name)
    shots(page, "events")
    page.goto(WEB + "/hosts")
    expect(page.locator(f'tr[data-host="{host1.name}"] .lun-count')).to_have_text(
        re.compile(r"^\s*\d+\s*$"))
    shots(page, "hosts")
    page.goto(WEB + "/disks")
    expect(page.locator(f'tr[data-disk="{alias}"]')).to_contain_text(vm.name)
    shots(page, "disks")


@pytest.fixture
def iso_domain(sdk: sdk4.Connection, make_target: Any, two_hosts: list[types.Host]
               ) -> Iterator[types.StorageDomain]:
    """An active block storage domain on a fresh lab LUN (through the API); removed after
    with its ISO disks."""
    target = make_target([64 * MiB])
    system = sdk.system_service()
    domain = system.storage_domains_service().add(types.StorageDomain(
        name=f"isos-{uuid.uuid4().hex[:6]}", type=types.StorageDomainType.DATA,
        host=types.Host(name=two_hosts[0].name), storage_format=types.StorageFormat.V5,
        storage=types.HostStorage(type=types.StorageType.ISCSI, override_luns=True,
                                  volume_group=types.VolumeGroup(logical_units=[
                                      types.LogicalUnit(id=target.wwid(1),
                                                        address=target.address,
                                                        port=target.port,
                                                        target=target.iqn)]))))
    dcs = system.data_centers_service()
    dc = dcs.list(search="name=Default")[0]
    attached = dcs.data_center_service(dc.id).storage_domains_service()
    attached.add(types.StorageDomain(id=domain.id))
    yield domain
    for disk in system.disks_service().list():
        if disk.storage_domains and disk.storage_domains[0].id == domain.id:
            system.disks_service().disk_service(disk.id).remove()
    attached.storage_domain_service(domain.id).deactivate()
    attached.storage_domain_service(domain.id).remove()
    system.storage_domains_service().storage_domain_service(domain.id).remove(
        host=two_hosts[0].name, format=True)


def test_iso_upload_and_change_cd(engine: Any, sdk: sdk4.Connection, lab: Lab, *,
                                  browser: Browser, shots: Shots, tmp_path: Path,
                                  iso_domain: types.StorageDomain,
                                  two_hosts: list[types.Host],
                                  engine_vms: list[str]) -> None:
    system = sdk.system_service()
    vm = add_vm(sdk, lab, f"cd-{uuid.uuid4().hex[:6]}", two_hosts)
    engine_vms.append(vm.id)
    vm_service = system.vms_service().vm_service(vm.id)
    vm_service.start()
    iso = tmp_path / "tools.iso"
    # Big enough for a few chunks, so the progress bar is seen moving.
    iso.write_bytes(make_iso(tmp_path, "hello from the web UI\n" * (6 * MiB // 22)))
    alias = f"tools-{uuid.uuid4().hex[:6]}"

    page = new_page(browser, engine)
    log_in(page, "admin@internal", engine.password)
    page.goto(WEB + "/storage")
    domain_row = page.locator(f'tr[data-domain="{iso_domain.name}"]')
    expect(domain_row.locator(".status")).to_have_text("active")
    shots(page, "storage")
    page.get_by_label("ISO file").set_input_files(str(iso))
    page.get_by_label("Alias").fill(alias)
    page.get_by_label("Storage domain").select_option(label=iso_domain.name)
    page.get_by_role("button", name="Upload").click()
    progress = page.locator("#upload-progress")
    try:
        progress.wait_for(state="visible", timeout=5_000)
        shots(page, "uploading")  # the picture only: a fast upload may be over already
    except PlaywrightTimeoutError:
        pass
    expect(page.locator("#flash")).to_contain_text("The ISO was uploaded and verified.",
                                                   timeout=LONG)
    expect(domain_row.locator(".iso-files")).to_contain_text(alias)
    shots(page, "uploaded")
    iso_id = next(d.id for d in system.disks_service().list() if d.alias == alias)

    # Change CD on the running VM: "[Eject]" first, the ISO loaded, then ejected again.
    page.goto(f"{WEB}/vms/{vm.id}")
    expect(page.locator("#vm-status")).to_have_text("up")
    page.locator("#vm-general").get_by_role("button", name="Change CD…").click()
    dialog = page.get_by_role("dialog")
    choice = dialog.get_by_label("ISO file")
    expect(choice.locator("option").first).to_have_text("[Eject]")
    expect(choice).to_have_value("")
    choice.select_option(iso_id)
    shots(page, "change-cd")
    dialog.get_by_role("button", name="OK").click()
    expect(page.locator("#flash")).to_contain_text(f"VM {vm.name} has {alias} in its CD drive",
                                                   timeout=LONG)
    expect(page.locator("#vm-cd")).to_have_text(alias)
    cdrom = vm_service.cdroms_service().list()[0]
    assert vm_service.cdroms_service().cdrom_service(cdrom.id).get(current=True).file.id == \
        iso_id
    shots(page, "cd-loaded")
    page.goto(WEB + "/disks")
    expect(page.locator(f'tr[data-disk="{alias}"]')).to_contain_text(f"{vm.name} (CD)")
    shots(page, "disks-iso-in-cd")
    page.goto(f"{WEB}/vms/{vm.id}")
    page.locator("#vm-general").get_by_role("button", name="Change CD…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_label("ISO file")).to_have_value(iso_id)  # the current one
    dialog.get_by_label("ISO file").select_option("")
    dialog.get_by_role("button", name="OK").click()
    expect(page.locator("#flash")).to_contain_text(f"Ejected the CD of VM {vm.name}",
                                                   timeout=LONG)
    expect(page.locator("#vm-cd")).to_have_text("[empty]")
    shots(page, "cd-ejected")
    vm_service.stop()
