"""The lab's throwaway PostgreSQL server: starts, serves SQLAlchemy, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from virtyard.lab.errors import MissingPackageError, PortBusyError
from virtyard.lab.ports import port_is_listening
from virtyard.lab.postgres import PostgresServer, server_bin_dir

PORT = 15432 + int(os.environ.get("VIRTYARD_TEST_PORT_OFFSET", "0"))


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes that mention ``text`` (the server's directory name
    is its cluster_name, so it is in every server process's title)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in line and state != "Z":
            found.append(line)
    return found


def test_server_serves_sqlalchemy_and_leaves_nothing() -> None:
    server = PostgresServer(PORT)
    with server:
        root = server.root
        assert server.running
        assert port_is_listening(PORT)
        assert len(processes_naming(root.name)) >= 2  # postmaster and its workers
        assert server.url == f"postgresql+psycopg://virtyard@127.0.0.1:{PORT}/virtyard"

        engine = sa.create_engine(server.url)
        meta = sa.MetaData()
        items = sa.Table("items", meta, sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("name", sa.Text, nullable=False))
        with engine.begin() as conn:
            meta.create_all(conn)
            conn.execute(items.insert(), [{"name": "alpha"}, {"name": "beta"}])
        with engine.connect() as conn:
            assert conn.execute(sa.select(items.c.name).order_by(items.c.id)).scalars().all() \
                == ["alpha", "beta"]
            assert conn.execute(sa.text("SHOW fsync")).scalar() == "off"
        engine.dispose()

        # A fresh database per engine run: empty, owned by the application role.
        other = sa.create_engine(server.create_database("second"))
        with other.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database(), current_user")).one() \
                == ("second", "virtyard")
            assert not sa.inspect(conn).has_table("items")
        other.dispose()
        server.drop_database("second")

        # The port is the server's: a second one on it says so and leaves nothing either.
        with pytest.raises(PortBusyError):
            PostgresServer(PORT).start()

    assert not server.running
    assert not root.exists()
    assert processes_naming(root.name) == []
    assert not port_is_listening(PORT)
    server.stop()  # twice is harmless


def test_server_of_a_killed_run_is_reaped() -> None:
    """A run killed before its stop() leaves a server behind; the next start on the port stops
    it and removes its directory (its owner, the process that started it, is dead)."""
    left = PostgresServer(PORT)
    left.start()
    try:
        root = left.root
        dead = subprocess.Popen(["true"])
        dead.wait()
        (root / "owner.pid").write_text(f"{dead.pid}\n")
        with PostgresServer(PORT) as server:
            assert server.running
            assert not root.exists()
            assert processes_naming(root.name) == []
    finally:
        left.stop()


def test_missing_postgres_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("virtyard.lab.postgres.PG_LIB", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingPackageError) as info:
        server_bin_dir()
    assert "apt-get install -y postgresql" in str(info.value)
