"""The console: the pipeline's own lines by default, Ray's output too with ``--verbose``.

Default (quiet) console of a task, e.g. ``python -m pipelines run``: one line per workflow step
start/end, one per training epoch (epoch, train loss, val acc, images/s, ETA), one per Tune trial
result, and the final summary. Everything else stays in log files:

* Ray workers (workflow steps, Tune trials, the Train controller and workers, Ray Data) keep
  their stdout/stderr in the session's log folder (``<ray temp dir>/session_*/logs``); the
  driver does not stream them (``ray.init(log_to_driver=False)``). Their C++ ``core_worker``
  lines, Tune's status tables, Train and Ray Data logs and warnings all stay there.
* The driver's own Ray loggers (``ray``, ``ray.data``) and Python warnings go to
  ``<session>/logs/pipelines-driver-<pid>.log``; errors still reach stderr, and so do warnings
  raised by this package's code.
* Tune's reporter is off (``RunConfig(verbose=0)``, classic output engine); MLflow logs at
  WARNING (``MLFLOW_LOGGING_LEVEL``) without artifact progress bars.

Lines that workers print for the console (epoch and trial lines) go through a small named actor,
the relay, which the driver drains and prints. ``--verbose`` keeps Ray's defaults (worker output
streamed with ``(name pid=...)`` prefixes, Tune's status tables, ``ray.init``'s banner) and
prints the same lines from wherever they happen.

A task's process calls :func:`configure` before anything imports ray (the CLI does), then
``ray.init(..., **ray_init_options())`` and :func:`after_ray_init`. Code that runs anywhere prints
with :func:`say`. A process that never called :func:`configure` (tests, notebooks) keeps Ray's
and MLflow's defaults; its workers print normally.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

RELAY_NAME = "pipelines-console"  # named actor in the job's namespace
PACKAGE_DIR = str(Path(__file__).resolve().parent)
LOG_FORMAT = "%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"

_verbose: bool | None = None  # set by configure(): this process owns the console
_relay: Any = None  # worker side: the relay's handle, False when there is none
_pump: tuple[threading.Thread, threading.Event] | None = None
_print_lock = threading.RLock()
_held: logging.handlers.MemoryHandler | None = None  # driver log records until Ray's log folder exists


# --------------------------------------------------------------------------------------------
# Process set-up
# --------------------------------------------------------------------------------------------


def configure(verbose: bool = False, *, local_ray: bool = True) -> None:
    """Quiet defaults for this process (``verbose=False``) or Ray's defaults (``verbose=True``).

    Call before ray is imported: Ray reads ``RAY_AUTH_MODE`` when it is imported, MLflow its
    logging settings when it is. ``local_ray``: this process will start its own local cluster
    (no ``ray.address`` / ``RAY_ADDRESS``); its authentication mode is then set explicitly to
    token, the mode Ray 2.60 picks for a new local cluster anyway, so Ray does not warn that it
    picked it. The environment is inherited by a local cluster's workers.
    """
    global _verbose, _held
    _verbose = bool(verbose)
    if local_ray and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # e.g. alembic's "Creating initial MLflow database tables"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Python warnings become log records: held until Ray's log folder is known, then written there
    # (or to stderr at exit in a process that never starts Ray); this package's own warnings
    # still go to the console.
    if _held is None:
        _held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1, target=None,
                                               flushOnClose=False)
        _held.setLevel(logging.DEBUG)
        logging.captureWarnings(True)
        warn_log = logging.getLogger("py.warnings")
        warn_log.handlers = [_held, _console_handler(logging.WARNING, only_ours=True)]
        warn_log.propagate = False
        atexit.register(_release_held)


def quiet() -> bool:
    """Whether this process runs with quiet defaults: the console owner as configured; a Ray
    worker when the driver started the relay (it does so only when quiet)."""
    if _verbose is not None:
        return not _verbose
    return _find_relay() is not None


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` (call it just before ``ray.init``, ray imported)."""
    if not quiet():
        return {"log_to_driver": True, "configure_logging": True}
    import ray.data  # noqa: F401 - configures its "ray.data" loggers on import; adjusted below

    held = _held or logging.NullHandler()
    ray_log = logging.getLogger("ray")
    for name in ("ray", "ray.data"):  # Ray's console handlers: errors only
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    if held not in ray_log.handlers:
        ray_log.addHandler(held)  # the ray.init banner and driver-side Ray logs -> the driver log file
    return {"log_to_driver": False, "configure_logging": True}


def after_ray_init() -> None:
    """After ``ray.init``: open the driver log in Ray's log folder; start the relay (quiet only)."""
    if not quiet() or _verbose is None:
        return
    logs_dir = _open_driver_log()
    _start_relay()
    if logs_dir:
        say(f"Ray logs: {logs_dir} (--verbose shows them here)")


def _console_handler(level: int, only_ours: bool = False) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(_Plain("%(message)s"))
    if only_ours:
        handler.addFilter(lambda record: record.getMessage().startswith(PACKAGE_DIR))
    return handler


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip()  # a captured warning's text ends in a newline


def _open_driver_log() -> str | None:
    """Send the held driver records to ``<session>/logs/pipelines-driver-<pid>.log``; returns
    the session's log folder (None where it is not on this machine)."""
    global _held
    logs_dir = None
    try:
        import ray

        logs_dir = ray._private.worker._global_node.get_logs_dir_path()  # no public accessor in Ray 2.60
        path = os.path.join(logs_dir, f"pipelines-driver-{os.getpid()}.log")
        file_handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    except Exception:
        file_handler = logging.NullHandler()
    if _held is None:
        return logs_dir
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    _held.setTarget(file_handler)
    _held.flush()
    for name in ("ray", "py.warnings"):
        log = logging.getLogger(name)
        log.handlers = [file_handler if h is _held else h for h in log.handlers]
    _held = None
    return logs_dir


def _release_held() -> None:
    """At exit of a process that never started Ray: the held warnings go to stderr after all."""
    if _held is not None and _held.target is None:
        _held.setTarget(_console_handler(logging.WARNING))
        _held.flush()


# --------------------------------------------------------------------------------------------
# Printing, and the relay that carries workers' lines to the driver
# --------------------------------------------------------------------------------------------


def say(message: str) -> None:
    """Print one console line from anywhere: the driver prints it; a Ray worker sends it to the
    relay when the driver runs quiet (its own stdout would stay in its log file), else prints it
    (streamed to the driver with ``log_to_driver``)."""
    relay = _find_relay() if _verbose is None else None
    if relay is not None:
        try:
            relay.put.remote(message)  # fire and forget: callers may be async actors
            return
        except Exception:
            pass
    with _print_lock:
        if _pump is not None:  # the driver: workers' lines sent before this one come first
            _drain(timeout=30)
        print(message, flush=True)


def flush() -> None:
    """Print the lines the relay holds now (the driver calls it when a step ends)."""
    if _pump is None:
        return
    _drain(timeout=30)


def _find_relay():
    global _relay
    if _relay is None:
        _relay = False
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                try:
                    _relay = ray.get_actor(RELAY_NAME)
                except ValueError:  # no relay: the driver is verbose or not ours
                    pass
    return _relay or None


def _start_relay() -> None:
    global _relay, _pump
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class ConsoleRelay:
        def __init__(self):
            self._lines: list[str] = []

        def put(self, line: str) -> None:
            self._lines.append(line)

        def drain(self) -> list[str]:
            lines, self._lines = self._lines, []
            return lines

    _relay = ConsoleRelay.options(name=RELAY_NAME).remote()
    stop = threading.Event()
    thread = threading.Thread(target=_pump_loop, args=(stop,), name="console-relay", daemon=True)
    _pump = (thread, stop)
    thread.start()
    atexit.register(_stop_relay)  # registered after ray.init's shutdown hook, so it runs before it


def _drain(timeout: float) -> bool:
    import ray

    with _print_lock:
        try:
            lines = ray.get(_relay.drain.remote(), timeout=timeout)
        except Exception:
            return False
        for line in lines:
            print(line, flush=True)
    return True


def _pump_loop(stop: threading.Event) -> None:
    while not stop.wait(0.5):
        if not _drain(timeout=30):
            return


def _stop_relay() -> None:
    global _pump
    if _pump is None:
        return
    thread, stop = _pump
    stop.set()
    thread.join(timeout=5)
    _drain(timeout=5)
    _pump = None


# --------------------------------------------------------------------------------------------
# Line formats and the Ray Train / Tune callbacks that print them
# --------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def epoch_line(name: str, row: dict[str, Any], epochs: int, eta_s: float | None) -> str:
    """``  <run> epoch 2/4: train loss 0.4782, val acc 0.8518, 3,129 images/s, ETA 45s``"""
    parts = [f"train loss {row['train_loss']:.4f}" if "train_loss" in row else None,
             f"val acc {row['val_acc']:.4f}" if "val_acc" in row else None,
             f"{row['images_per_s']:,.0f} images/s" if "images_per_s" in row else None,
             f"ETA {duration(eta_s)}" if eta_s is not None else None]
    epoch = int(row.get("epoch", 0)) + 1
    return f"  {name} epoch {epoch}/{epochs}: " + ", ".join(p for p in parts if p)


def train_callbacks(epochs: int) -> list:
    """Ray Train callbacks (run on the Train controller): one console line per reported epoch."""
    from ray.train import UserCallback

    class EpochLines(UserCallback):
        def __init__(self, total: int):
            self.total = max(1, int(total))
            self.times: list[float] = []

        def after_report(self, run_context, metrics, checkpoint):
            row = metrics[0] if metrics else {}
            if "val_acc" not in row:  # e.g. the report of a stopped run
                return
            self.times.append(time.monotonic())
            per_epoch = ((self.times[-1] - self.times[0]) / (len(self.times) - 1) if len(self.times) > 1
                         else float(row.get("epoch_seconds", 0.0)))
            left = self.total - (int(row.get("epoch", 0)) + 1)
            say(epoch_line(run_context.get_run_config().name, row, self.total, left * per_epoch if left > 0 else None))

    return [EpochLines(epochs)]


def tune_run_options(metric: str, epochs: int) -> dict[str, Any]:
    """``ray.tune.RunConfig`` keywords: Tune's own reporter off when quiet; one line per trial.

    Quiet: ``verbose=0`` with Tune's classic output engine (``RAY_AIR_NEW_OUTPUT=0``, read when
    the Tuner runs). The default engine prints its experiment header (a table, the results
    folder, a TensorBoard hint) even at ``verbose=0``; the classic one prints nothing."""
    from ray import tune

    if quiet():
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    class TrialLines(tune.Callback):
        def __init__(self, metric_name: str, total: int):
            self.metric, self.total = metric_name, max(1, int(total))

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            done = int(r.get("training_iteration", 0))
            how = "finished" if done >= self.total else "stopped early by the scheduler"
            value = r.get(self.metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
            config = ", ".join(f"{k}={v}" for k, v in (trial.config or {}).items())
            say(f"  trial {trial.trial_id} ({config}) {how} after {done} epoch(s): {self.metric} {shown}, "
                f"{duration(r.get('time_total_s', 0.0))}")

        def on_trial_error(self, iteration, trials, trial, **info):
            config = ", ".join(f"{k}={v}" for k, v in (trial.config or {}).items())
            say(f"  trial {trial.trial_id} ({config}) failed; see {getattr(trial, 'path', '')}")

    return {"verbose": 0 if quiet() else None, "callbacks": [TrialLines(metric, epochs)]}
