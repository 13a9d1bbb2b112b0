"""Ray set-up for the driver side: connect or start a cluster, and hand Ray storage it can use.

:func:`ensure_ray` connects to ``ray.address`` / ``RAY_ADDRESS`` or starts a local cluster bound
to 127.0.0.1. :func:`pinned_paths` makes every local path in a config absolute before the config
is shipped to Ray tasks, Train workers or Tune trials, which run in other working directories.
:func:`ray_storage` and :func:`checkpoint_uri` translate between storage URIs and the
``(path, filesystem)`` pairs Ray Train and Tune take and report.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

from . import console, tracking
from . import storage as st
from .config import PipelineConfig
from .errors import ConfigError, UserError, redact_uri


def ensure_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / RAY_ADDRESS, or start a local cluster (loopback only)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported
    import ray  # here, not at the top: importing Ray costs seconds and most callers never need it

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        _probe_ray(address)
        ray.init(address=address, **console.ray_init_options())
    else:
        local: dict[str, Any] = {"num_cpus": cfg.ray.num_cpus or max(4, os.cpu_count() or 1),
                                 "include_dashboard": cfg.ray.include_dashboard, "dashboard_host": "127.0.0.1",
                                 "_node_ip_address": "127.0.0.1"}
        if cfg.ray.include_dashboard:
            # Ray Train V2's placement-group cleaner finds the state API by auto-detecting "the"
            # local cluster; with another Ray instance on the machine that fails ("multiple active
            # Ray instances"), its thread dies and finished trials keep their CPUs for good. Point
            # this job's processes at this cluster's API server instead.
            port = _free_port()
            local["dashboard_port"] = port
            local["runtime_env"] = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
        # A job here starts a dozen Python workers (Train controller and workers, Tune, Ray Data
        # coordinators and tasks); with the raylet's default start-up concurrency (the physical
        # cores: 2 on a laptop) that trips its "N PYTHON worker processes ... 4x the maximum
        # expected startup concurrency" warning on the console, which is noise for this workload.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(int(local["num_cpus"])))
        ray.init(**local, **console.ray_init_options())
    console.after_ray_init()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe_ray(address: str, timeout: float = 5.0) -> None:
    """One TCP connect to ``host:port`` (GCS or Ray Client), so an unreachable cluster is one line
    instead of minutes of waiting for the GCS. ``auto``/``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address {redact_uri(address)!r} is not HOST:PORT or ray://HOST:PORT; fix ray.address "
                          "or RAY_ADDRESS")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError:
        raise UserError(f"Ray cluster at {redact_uri(address)} is unreachable; start it (ray start --head, or python "
                        "cluster/dev_stack.py start) or fix ray.address / RAY_ADDRESS") from None


def ray_storage(cfg: PipelineConfig, subdir: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Train/Tune RunConfig at ``<storage.uri>/<subdir>``."""
    uri = st.join_uri(cfg.storage.uri, subdir)
    local = st.local_path(uri)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        return local, None
    fs, path = st.resolve(uri, cfg.storage)
    return path, fs


def checkpoint_uri(cfg: PipelineConfig, ray_path: str | None) -> str | None:
    """A checkpoint path as Ray reports it (a filesystem path) as a storage URI."""
    if ray_path is None:
        return None
    if st.is_s3(cfg.storage.uri):
        return f"s3://{ray_path.lstrip('/')}" if "://" not in ray_path else ray_path
    return Path(ray_path).as_uri() if "://" not in ray_path else ray_path


def pinned_paths(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every local path absolute: storage folder, MLflow store, data sources, inputs.

    Steps and trials run in other processes with other working directories (Ray task workers
    keep the cluster's, Tune trials get their own), so a relative ``file://./artifacts`` resolved
    there would put checkpoints, models and MLflow runs somewhere else. Called by the driver
    (``run``, ``tune``) before anything is shipped to the cluster. Remote URIs are untouched."""

    def absolute_uri(uri: str | None) -> str | None:
        if not uri or uri == "fashion-mnist" or uri.startswith("hf-hub:") or uri.startswith("models:"):
            return uri
        if "://" not in uri:
            return str(Path(uri).resolve()) if Path(uri).exists() else uri
        local = st.local_path(uri)
        return Path(local).resolve().as_uri() if local is not None else uri

    local_store = st.local_path(cfg.storage.uri)  # a plain path is a local folder too
    if local_store is not None:
        cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, uri=Path(local_store).resolve().as_uri()))
    tracking_uri = tracking.resolve_tracking_uri(cfg)
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).resolve()}"
    data = dataclasses.replace(cfg.data, source=absolute_uri(cfg.data.source),
                               source_dir=absolute_uri(cfg.data.source_dir))
    return dataclasses.replace(
        cfg, data=data,
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=tracking_uri),
        model=dataclasses.replace(cfg.model, pretrained=absolute_uri(cfg.model.pretrained)),
        infer=dataclasses.replace(cfg.infer, input=absolute_uri(cfg.infer.input)),
    )
