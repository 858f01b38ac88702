"""A throwaway PostgreSQL server for tests: its own directory, port and roles, gone after.

Lab code: production never imports it. Usage::

    with PostgresServer(15432) as pg:
        engine = sqlalchemy.create_engine(pg.url)
        other = pg.create_database("run2")   # a fresh database, its URL

The server runs Debian's binaries (``/usr/lib/postgresql/<newest>/bin``) as the ``postgres`` OS
user when we are root (PostgreSQL refuses to run as root), listens on ``127.0.0.1:<port>`` and a
private unix socket directory only, trusts every connection there (no passwords), and trades
durability for speed (``fsync=off``). :meth:`PostgresServer.stop` stops it at once (``immediate``)
and removes its whole directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

from virtyard.lab.errors import CommandError, LabError, MissingPackageError, ServiceStartError
from virtyard.lab.ports import LOOPBACK, ensure_free
from virtyard.lab.process import pid_alive, run, terminate, wait_until

PG_LIB = Path("/usr/lib/postgresql")
OS_USER = "postgres"
SUPERUSER = "postgres"
_ROOT_PREFIX = "virtyard-pg-"
_OWNER_FILE = "owner.pid"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def server_bin_dir() -> Path:
    """The ``bin`` directory of the newest installed PostgreSQL server (initdb, pg_ctl, …).

    Debian's packages install them in ``/usr/lib/postgresql/<version>/bin``, outside ``PATH``;
    elsewhere ``initdb`` on ``PATH`` is taken. Raises :class:`MissingPackageError` otherwise.
    """
    found = [(_version(p.parent.parent.name), p.parent) for p in PG_LIB.glob("*/bin/initdb")]
    found = [(version, bin_dir) for version, bin_dir in found if version]
    if found:
        return max(found)[1]
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).parent
    raise MissingPackageError("initdb", "postgresql")


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the postmaster running on ``data_dir``, or ``None`` when none runs."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # The pid file may be stale and its pid reused: the postmaster names its data directory.
    if os.fsencode(data_dir) not in cmdline or not pid_alive(pid):
        return None
    return pid


def stop_and_remove(root: Path) -> None:
    """Stop at once the server whose directory is ``root`` (if it runs), wait until none of its
    processes is left, and remove ``root``."""
    data_dir = root / "data"
    pid = postmaster_pid(data_dir)
    if pid is not None:
        procs = [pid, *_children(pid)]
        # No check: whatever pg_ctl says, the processes are waited for, then killed if need be.
        with contextlib.suppress(CommandError):  # timed out
            run([*_user_prefix(), str(server_bin_dir() / "pg_ctl"), "stop", "-D",
                 str(data_dir), "-m", "immediate", "-w", "-t", "30"],
                timeout=40, check=False, cwd=root)
        # pg_ctl returns once the pid file is gone: the processes may still be exiting.
        wait_until(lambda: not any(pid_alive(proc) for proc in procs), timeout=5)
        for proc in procs:
            terminate(proc, grace=2)  # returns at once for one already gone
    shutil.rmtree(root, ignore_errors=True)


def reap_stale(port: int) -> None:
    """Stop and remove the servers on ``port`` in the temporary directory whose owner (the
    process that started them) is dead: left by a run killed before its ``stop()``."""
    for root in Path(tempfile.gettempdir()).glob(f"{_ROOT_PREFIX}{port}-*"):
        try:
            owner = int((root / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = None  # killed before it wrote its owner file, or not a server's root
        if owner is None or not pid_alive(owner):
            stop_and_remove(root)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _user_prefix() -> list[str]:
    """The command prefix that runs a server binary as the ``postgres`` OS user when we are
    root; nothing when we are not (the server then runs as us)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        raise MissingPackageError(f"OS user {OS_USER}", "postgresql-common") from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise MissingPackageError("runuser", "util-linux")
    return [runuser, "-u", OS_USER, "--"]


def _give_to_postgres(path: Path) -> None:
    """Make ``path`` the ``postgres`` OS user's when we are root (the server runs as it)."""
    if os.geteuid() == 0:
        owner = pwd.getpwnam(OS_USER)
        os.chown(path, owner.pw_uid, owner.pw_gid)


def check_name(name: str) -> str:
    """``name`` if it is a plain lower-case SQL identifier (a role or a database), else raise."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a plain SQL identifier (a-z, 0-9, _): {name!r}")
    return name


class PostgresServer:
    """One PostgreSQL server in its own directory ``root`` on ``127.0.0.1:port``.

    ``start()`` creates the cluster, starts it and creates the role ``user`` (LOGIN, CREATEDB)
    owning the database ``database``; :attr:`url` is then the SQLAlchemy URL of that database.
    ``root`` must not exist yet, or be empty, and every directory above it must be traversable
    by the ``postgres`` user; by default it is a fresh directory under the system's temporary
    directory. ``stop()`` removes ``root`` whole. A context manager: ``with`` starts and stops.
    """

    def __init__(self, port: int, *, root: Path | None = None, user: str = "virtyard",
                 database: str = "virtyard", start_timeout: float = 30.0) -> None:
        self.port = port
        self.user = check_name(user)
        self.database = check_name(database)
        self.start_timeout = start_timeout
        self._given_root = root
        self._root: Path | None = None

    # -- where things are -------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The server's directory (data, socket, log); exists between start() and stop()."""
        if self._root is None:
            raise LabError(f"the PostgreSQL server on port {self.port} is not started")
        return self._root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default database as the application role."""
        return self.url_for(self.database)

    def url_for(self, database: str, *, user: str | None = None) -> str:
        """SQLAlchemy URL (psycopg 3 driver, TCP on 127.0.0.1) of ``database`` as ``user``."""
        role = check_name(user or self.user)
        return f"postgresql+psycopg://{role}@{LOOPBACK}:{self.port}/{check_name(database)}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else ``None``."""
        return None if self._root is None else postmaster_pid(self.data_dir)

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Create the cluster, start it, create the role and its database; return :attr:`url`.

        On failure nothing is left running or on disk."""
        if self._root is not None:
            raise LabError(f"the PostgreSQL server on port {self.port} is already started")
        bin_dir = server_bin_dir()
        as_postgres = _user_prefix()
        if self._given_root is None:
            reap_stale(self.port)
        ensure_free(self.port, "PostgreSQL")
        self._root = self._make_root()
        try:
            self._init_cluster(bin_dir, as_postgres)
            self._start_server(bin_dir, as_postgres)
            self._admin(sql.SQL("CREATE ROLE {} LOGIN CREATEDB").format(
                sql.Identifier(self.user)))
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Stop the server at once (``pg_ctl -m immediate``) and remove its directory.

        Safe to call twice, or on a server that failed to start or died."""
        if self._root is None:
            return
        root, self._root = self._root, None
        stop_and_remove(root)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- databases --------------------------------------------------------------------------

    def create_database(self, name: str, *, owner: str | None = None) -> str:
        """Create an empty database ``name`` owned by ``owner`` (default: :attr:`user`);
        return its SQLAlchemy URL."""
        owner = check_name(owner or self.user)
        self._admin(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
            sql.Identifier(check_name(name)), sql.Identifier(owner)))
        return self.url_for(name, user=owner)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, closing the connections still open to it."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(check_name(name))))

    def _admin(self, statement: sql.Composed) -> None:
        """Run one statement as the superuser, outside a transaction (CREATE DATABASE needs)."""
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER,
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    # -- helpers ----------------------------------------------------------------------------

    def _make_root(self) -> Path:
        if self._given_root is None:
            root = Path(tempfile.mkdtemp(prefix=f"{_ROOT_PREFIX}{self.port}-"))
        else:
            root = self._given_root.absolute()
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise LabError(f"PostgreSQL root {root} is not empty")
        root.chmod(0o700)
        (root / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        _give_to_postgres(root)
        if os.geteuid() == 0:
            probe = run([*_user_prefix(), "test", "-w", str(root)], check=False, cwd=root)
            if probe.returncode != 0:
                shutil.rmtree(root)
                raise LabError(f"the {OS_USER} OS user cannot write {root}: put the server's "
                               f"root where every directory above it is world-traversable")
        return root

    def _init_cluster(self, bin_dir: Path, as_postgres: list[str]) -> None:
        root = self.root
        run([*as_postgres, str(bin_dir / "initdb"), "-D", str(self.data_dir),
             "--username", SUPERUSER, "--auth", "trust", "--encoding", "UTF8",
             "--locale", "C.UTF-8", "--no-sync", "--no-instructions"],
            timeout=120, cwd=root)
        self.socket_dir.mkdir(mode=0o700)
        _give_to_postgres(self.socket_dir)
        # Only the private socket and 127.0.0.1, no password: a throwaway server for tests.
        (self.data_dir / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER  ADDRESS       METHOD\n"
            "local   all       all                 trust\n"
            f"host    all       all   {LOOPBACK}/32  trust\n")
        settings = {
            "listen_addresses": f"'{LOOPBACK}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "unix_socket_permissions": "0700",
            "cluster_name": f"'{root.name}'",  # in every server process's title
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "100",
            "timezone": "'UTC'",
            "logging_collector": "off",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# virtyard.lab.postgres: a throwaway test server\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_server(self, bin_dir: Path, as_postgres: list[str]) -> None:
        # -l: the server's output goes to its log, so no pipe of ours stays open in it.
        proc = run([*as_postgres, str(bin_dir / "pg_ctl"), "start", "-D", str(self.data_dir),
                    "-l", str(self.log_file), "-w", "-t", f"{self.start_timeout:g}"],
                   timeout=self.start_timeout + 10, check=False, cwd=self.root)
        if proc.returncode != 0:
            try:
                tail = self.log_file.read_text(errors="replace").strip().splitlines()[-3:]
            except FileNotFoundError:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ServiceStartError(
                f"PostgreSQL on port {self.port} did not start: {' | '.join(tail) or 'no output'}")

