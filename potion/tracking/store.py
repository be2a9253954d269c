"""The MLflow tracking store: its default URI and artifact root, fail-fast checks, relocation, ``mlflow ui``."""
from __future__ import annotations

import os
import shlex
import socket
import sqlite3
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from potion.errors import PotionError

CHECK_TIMEOUT_S = 5.0
# MLflow 3's UI opens an experiment in its GenAI view unless told otherwise: the experiment
# tag below is what the UI sets when a user picks "Model training", and the URL parameter
# is what the 3.x UI reads first (ui_url adds it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_VIEW_QUERY = "workflowType=machine_learning"


def mlflow_executable() -> list[str]:
    """The ``mlflow`` of the interpreter running Potion, by absolute path: it works in a
    fresh shell where the venv is not activated (a bare ``mlflow`` does not)."""
    script = Path(sys.executable).parent / "mlflow"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "mlflow"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ui_command(uri: str, experiment_id: str | None = None, run_id: str | None = None,
               port: int | None = None) -> tuple[str, str]:
    """(shell command that serves the MLflow UI on ``uri``, the link to open). The port is
    one free now unless given: a fixed 5000 fails beside another UI (or macOS's AirPlay)."""
    port = port or free_port()
    args = [*mlflow_executable(), "ui", "--backend-store-uri", uri, "--port", str(port)]
    return " ".join(shlex.quote(a) for a in args), ui_url(f"http://127.0.0.1:{port}", experiment_id, run_id)


def where_to_look(uri: str | None, experiment_id: str | None = None, run_id: str | None = None) -> str | None:
    """The lines (newline-terminated) that tell where to see a run: the ``mlflow ui`` command and
    its link for a sqlite store, the run's link on a server; None for other stores."""
    if uri and uri.startswith("sqlite:"):
        command, url = ui_command(uri, experiment_id, run_id)
        return f"MLflow UI: {command}\n  then open {url}\n"
    if uri and uri.startswith(("http://", "https://")):
        return f"MLflow run: {ui_url(uri, experiment_id, run_id)}\n"
    return None


def ui_url(base: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI that opens in the model-training view."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{UI_VIEW_QUERY}"
    page = f"{base}/#/experiments/{experiment_id}"
    if run_id is not None:
        page += f"/runs/{run_id}"
    return f"{page}?{UI_VIEW_QUERY}"


def configured_tracking_uri(flag: str | None) -> str | None:
    """The store the user chose (``'none'`` included): ``--tracking-uri``, else
    ``$POTION_TRACKING_URI``, else ``$MLFLOW_TRACKING_URI``; None leaves the command's default."""
    return flag or os.environ.get("POTION_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI") or None


def resolve_tracking_uri(flag: str | None, out: str | Path) -> str | None:
    """The store a run logs to: the user's (see ``configured_tracking_uri``), None for
    ``'none'``, else sqlite in ``out`` (``default_tracking_uri``)."""
    uri = configured_tracking_uri(flag)
    if uri == "none":
        return None
    return uri or default_tracking_uri(out)


def refuse_default_store_for_remote(out_uri: str, flag: str | None) -> None:
    """A remote ``--out`` cannot hold the default store (a sqlite file in --out): before any compute."""
    if configured_tracking_uri(flag) is None:
        raise PotionError(f"--out {out_uri} is remote, where the default MLflow store (a sqlite file in --out) "
                          "cannot be used; pass --tracking-uri http://HOST:PORT (an MLflow server, whose "
                          "artifact store keeps the run) or --tracking-uri none")


def default_tracking_uri(out: str | Path) -> str:
    """``sqlite:///<out>/mlflow.db``; a path a sqlite URI cannot hold is refused, never
    silently cut (``?`` starts the URI's query, ``%`` is decoded, ``#`` a fragment)."""
    path = (Path(out) / "mlflow.db").resolve()
    bad = sorted({c for c in str(path) if c in "?#%"})
    if bad:
        raise PotionError(
            f"--out {out} contains {' '.join(repr(c) for c in bad)}, which the default MLflow store URI "
            f"(sqlite:///…/mlflow.db) cannot hold; choose another --out, or pass --tracking-uri none "
            "(or a store elsewhere)"
        )
    return f"sqlite:///{path}"


def default_artifact_root(uri: str) -> Path | None:
    """``<folder of the sqlite file>/mlruns`` for a sqlite store, else the server's choice."""
    path = _sqlite_path(uri)
    return None if path is None else path.parent / "mlruns"


def _sqlite_path(uri: str) -> Path | None:
    # SQLAlchemy's form: sqlite:///relative/file.db or sqlite:////absolute/file.db
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def check_tracking(uri: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, before any compute, when the tracking store cannot be used.

    MLflow's own client retries an unreachable server with exponential backoff for
    minutes, so a stopped server would otherwise surface only after the whole heal.
    """
    if not uri or not isinstance(uri, str):
        raise PotionError("the MLflow tracking URI is empty; pass --tracking-uri (e.g. sqlite:///out/mlflow.db)")
    scheme = urlparse(uri).scheme
    _check_scheme(uri, scheme)
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme in ("", "file"):
        path = Path(urlparse(uri).path if scheme == "file" else uri)
        _check_writable_dir(path, uri)
    # databricks://, other plugins: nothing cheap to check; MLflow reports problems itself.


def _check_scheme(uri: str, scheme: str) -> None:
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        known = sorted(k for k in _tracking_store_registry._registry if k)
    except (ImportError, AttributeError):  # a future MLflow: let it judge the URI itself
        return
    if scheme not in known and scheme != "":
        raise PotionError(
            f"MLflow tracking URI {uri}: unknown scheme '{scheme}://' (MLflow knows {', '.join(known)}); "
            "use e.g. sqlite:///<folder>/mlflow.db, http://host:5000, or 'none' to disable tracking"
        )


def _check_sqlite(uri: str) -> None:
    path = _sqlite_path(uri)
    if path is None:
        return
    _check_writable_dir(path.parent, uri)
    if path.exists():
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=CHECK_TIMEOUT_S) as con:
                con.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            raise PotionError(
                f"MLflow tracking store {uri}: {path} exists but is not a usable sqlite database ({e}); "
                "point --tracking-uri at another file"
            ) from None


def _check_writable_dir(path: Path, uri: str) -> None:
    import os

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PotionError(f"MLflow tracking store {uri}: cannot create folder {path} ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PotionError(f"MLflow tracking store {uri}: folder {path} is not writable; "
                          "pass another --tracking-uri (or 'none')")


def _check_server(uri: str, timeout: float) -> None:
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        problem = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        problem = str(getattr(e, "reason", e))
    raise PotionError(
        f"the MLflow tracking server at {uri} does not answer ({problem} from {health}). Start it, e.g. "
        f"`mlflow server --host 0.0.0.0 --port {urlparse(uri).port or 5000} --backend-store-uri "
        "sqlite:///mlflow.db`, or pass --tracking-uri sqlite:///<folder>/mlflow.db to track into a local file"
    )


def release_store(uri: str) -> None:
    """Close the database connections MLflow pools for ``uri``. MLflow keeps one engine per
    database for the life of the process, so a process that heals into one run folder after
    another would hold two descriptors per folder; the next use of the store reconnects."""
    for module in ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store"):
        store = getattr(sys.modules.get(module), "SqlAlchemyStore", None)  # not imported: nothing open
        engine = getattr(store, "_engine_map", {}).get(uri)
        if engine is not None:
            engine.dispose()


def relocate_sqlite_store(db: str | Path, old: str | Path, new: str | Path) -> int:
    """Rewrite every location under folder ``old`` recorded in the sqlite store ``db`` to
    lie under ``new`` (both plain paths and ``file://`` URIs); returns rows changed.

    A store built in a staging folder records absolute artifact locations there; after
    the folder is moved into place they must point into the final folder. Every text
    column of every table is rewritten, so no knowledge of MLflow's schema is assumed;
    the staging folder's name is unique, so nothing else can match.
    """
    old, new = Path(old).absolute(), Path(new).absolute()
    pairs = [(old.as_uri(), new.as_uri()), (str(old), str(new))]
    changed = 0
    con = sqlite3.connect(str(db), timeout=30)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f'pragma table_info("{table}")') if "CHAR" in (r[2] or "").upper()
                    or "TEXT" in (r[2] or "").upper() or "CLOB" in (r[2] or "").upper()]
            for col in cols:
                for a, b in pairs:
                    cur = con.execute(f'update "{table}" set "{col}" = replace("{col}", ?, ?) '
                                      f'where instr("{col}", ?) > 0', (a, b, a))
                    changed += cur.rowcount
        con.commit()
    finally:
        con.close()
    return changed
