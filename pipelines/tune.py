"""tune: a Ray Tune sweep (ASHA, optional Optuna) whose trials each run one Ray Train training.

    python -m pipelines tune --config FILE [--resume] [--set tune.num_samples=8 ...]

Each trial is a function trainable that calls :func:`pipelines.trainer.fit` with
``TuneReportCallback`` (Train V2), so every epoch reaches the scheduler. ``tune.space`` maps
dotted config keys to one sampler each (``loguniform``, ``uniform``, ``quniform``, ``randint``,
``choice``, ``grid``); unknown keys are refused before anything starts. ``model`` itself may be a
``choice``/``grid`` of whole model sections, so one sweep compares families. One parent MLflow run
per sweep, one nested child run per trial; ``--resume`` continues an interrupted sweep from its
state on storage. The best trial goes to ``<storage>/tune/<name>/best.json``. See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import yaml

from . import console, tracking
from . import storage as st
from .architecture import check_model_settings
from .config import PipelineConfig, config_from_dict, flatten, load_config, number_or_text, to_dict
from .data.shards import DatasetVersion, dataset_from_config, load_version
from .data.stream import train_order
from .errors import ConfigError, UserError, first_line
from .ray_setup import checkpoint_uri, ensure_ray, pinned_paths, ray_storage
from .trainer import TASK as TRAIN_TASK
from .trainer import export_model, fit, make_spec, run_settings, tune_report_callback

TASK = "tune"
SWEEP_FILE = "sweep.json"  # <storage>/tune/<name>/sweep.json: the settings the sweep was started with
SAMPLERS = ("loguniform", "uniform", "quniform", "randint", "choice", "grid")


@dataclass
class TuneResult:
    name: str
    parent_run_id: str
    best_trial_id: str
    best_config: dict[str, Any]  # the sampled overrides of the best trial
    best_metrics: dict[str, Any]
    best_run_name: str
    best_run_id: str | None
    best_checkpoint_uri: str | None
    model_uri: str
    trials: list[dict[str, Any]]
    result_uri: str
    seconds: float
    # ASHA's saving: epochs the trials ran vs. what running every trial to train.epochs would cost
    trial_epochs: int = 0
    trial_epochs_full: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def compute_ratio(self) -> float:
        """Trial-epochs run / trial-epochs of running every trial to the end (1.0 = nothing saved)."""
        return self.trial_epochs / self.trial_epochs_full if self.trial_epochs_full else 1.0


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------


def param_space(cfg: PipelineConfig) -> dict[str, Any]:
    """``tune.space`` as Tune samplers, after checking every key against the config schema."""
    from ray import tune

    space = cfg.tune.space
    if not space:
        raise ConfigError("tune.space is empty; add at least one key, e.g. tune.space={'train.lr': {loguniform: [1e-4, 3e-3]}}")
    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"tune.space.{key} must be one sampler such as {{loguniform: [1e-4, 1e-2]}}; "
                              f"samplers: {', '.join(SAMPLERS)}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space.{key}.{kind} needs a list of values, got {args!r}")
        args = [number_or_text(a) for a in args]  # YAML 1.1 reads 1e-4 as text
        if key == "model" and kind not in ("choice", "grid"):
            raise ConfigError(f"tune.space.model.{kind}: a whole model is picked with choice or grid, "
                              "e.g. model: {choice: [{name: vit_tiny_patch4, args: {embed_dim: 64}}, ...]}")
        # a value of each kind is checked; every candidate model is checked in full
        checked = list(model_choices(args).values()) if key == "model" else args
        for example in (checked if key.startswith("model") and kind in ("choice", "grid") else checked[:1]):
            _check_space_value(cfg, key, example)
        if kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "quniform":
            out[key] = tune.quniform(*args)
        elif kind == "randint":
            out[key] = tune.randint(*args)
        elif kind == "choice":
            out[key] = tune.choice(list(model_choices(args)) if key == "model" else args)
        else:
            out[key] = tune.grid_search(list(model_choices(args)) if key == "model" else args)
    return out


def model_choices(sections: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Labels for the whole-model candidates of ``tune.space.model``: a section's own ``label``,
    else the model name, or ``NAME#i`` when a name appears more than once. Searchers sample the
    label (Optuna takes only plain values); :func:`overrides_of` turns it back into the model
    section (without ``label``)."""
    names = [str(m.get("label") or m.get("name")) if isinstance(m, dict) else str(m) for m in sections]
    labels = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
    return {label: ({k: v for k, v in m.items() if k != "label"} if isinstance(m, dict) else m)
            for label, m in zip(labels, sections)}


def _check_space_value(cfg: PipelineConfig, key: str, value: Any) -> None:
    """Refuse a space value no trial could use: unknown key, wrong type, or a model that cannot be
    built. ``model`` values are whole model sections ({name, args, pretrained}) that replace the
    config's; ``model.args.*`` values are merged into the config's ``model.args``."""
    if key == "model" and not isinstance(value, dict):
        raise ConfigError(f"tune.space key 'model' is not usable: {value!r} is not a model section; "
                          "give {name: MODEL, args: {...}}")
    try:  # the key must exist and take this kind of value
        trial_cfg = load_config(None, [f"{key}={_yaml_scalar(value)}"])
        if key == "model":
            check_model_settings(dataclasses.replace(cfg, model=trial_cfg.model))
        elif key.startswith("model."):
            check_model_settings(dataclasses.replace(trial_cfg, model=dataclasses.replace(
                cfg.model, args={**cfg.model.args, **trial_cfg.model.args})))
    except ConfigError as exc:
        raise ConfigError(f"tune.space key {key!r} is not usable: {exc}") from None


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def overrides_of(sampled: dict[str, Any], space: dict[str, Any]) -> list[str]:
    """A trial's sampled values as ``key=value`` overrides (a ``model`` label as its whole section,
    first, so that ``model.args.*`` keys sampled beside it refine it)."""
    out = []
    for key, value in sampled.items():
        if key == "model":
            sections = next(iter(space["model"].values()))
            out.insert(0, f"model={_yaml_scalar(model_choices(sections)[value])}")
        else:
            out.append(f"{key}={_yaml_scalar(value)}")
    return out


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------


def _trial(config: dict[str, Any], base: dict[str, Any], sweep: str, parent_run_id: str, version_uri: str) -> None:
    """One trial: a full training run, reporting every epoch to Tune through the callback."""
    from ray import tune

    cfg = config_from_dict(base, overrides_of(config, base["tune"]["space"]))
    trial_id = tune.get_context().get_trial_id()
    version = load_version(version_uri, cfg.storage)
    fit(cfg, version, run_name=f"{sweep}-{trial_id}", parent_run_id=parent_run_id, callbacks=[tune_report_callback()])


def max_concurrent(cfg: PipelineConfig) -> int:
    """Trials that fit the cluster at once: each needs its workers' CPUs plus ~1 CPU for Ray Data."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + 1.0
    return max(1, int(math.floor(cpus / per_trial)))


def _searcher(cfg: PipelineConfig):
    if cfg.tune.search == "random":
        return None
    if cfg.tune.search == "optuna":
        try:
            import optuna
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("tune.search=optuna needs optuna: pip install 'vit-pipeline[optuna]'") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-study INFO lines are not for the console
        return OptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.train.seed)
    raise ConfigError(f"tune.search={cfg.tune.search!r} is not supported; use 'random' or 'optuna'")


def tune(cfg: PipelineConfig, *, resume: bool = False, version=None, name: str | None = None) -> TuneResult:
    from ray import tune as rt  # here, not at the top: importing Ray costs seconds
    from ray.tune.schedulers import ASHAScheduler

    t0 = time.time()
    check_model_settings(cfg)
    space = param_space(cfg)
    version = version or dataset_from_config(cfg)
    name = name or cfg.tune.name or f"sweep-{version.version[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.tune.mode not in ("max", "min"):
        raise ConfigError(f"tune.mode={cfg.tune.mode!r} must be 'max' or 'min'")
    cfg = pinned_paths(cfg)
    storage_path, fs = ray_storage(cfg, "tune")
    exp_path = os.path.join(storage_path, name)
    restore = _check_sweep(cfg, name, version, resume, can_restore=rt.Tuner.can_restore(exp_path, storage_filesystem=fs))
    ensure_ray(cfg)
    client = tracking.client(cfg)
    parent_id, _ = tracking.start_or_resume_run(cfg, name, TASK, tags={"dataset.version": version.version},
                                                mlflow_client=client)
    tracking.log_text(client, parent_id, tracking.config_yaml(cfg), "config.yaml")
    trainable = rt.with_resources(
        rt.with_parameters(_trial, base=to_dict(cfg), sweep=name, parent_run_id=parent_id, version_uri=version.uri),
        {"CPU": 0.05},
    )
    try:
        if restore:
            _check_tuner_pickle(cfg, name)  # Tune unpickles tuner.pkl: only the one this pipeline wrote
            tuner = rt.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                     storage_filesystem=fs)
            _record_tuner_pickle(cfg, name)
        else:
            # max_t one past the last epoch: ASHA stops a trial that reaches max_t right after its
            # report, which would cut off the end of its training run (model export, MLflow close)
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(1, cfg.train.epochs) + 1,
                                      grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)
            tuner = rt.Tuner(
                trainable, param_space=space,
                tune_config=rt.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=scheduler,
                                          search_alg=_searcher(cfg), num_samples=cfg.tune.num_samples,
                                          max_concurrent_trials=max_concurrent(cfg)),
                run_config=rt.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                        **console.tune_run_options(cfg.tune.metric, cfg.train.epochs)),
            )
            _record_tuner_pickle(cfg, name)  # Tune wrote tuner.pkl as the Tuner was built
        grid = tuner.fit()
    except BaseException:
        tracking.end_run(client, parent_id, "FAILED")
        raise
    result = _summarise(cfg, grid, name, parent_id, t0, client, version)
    tracking.end_run(client, parent_id, "FINISHED")
    return result


def sweep_settings(cfg: PipelineConfig, version: DatasetVersion) -> dict[str, Any]:
    """What a sweep computes: every trial's run settings (before sampling), the dataset version,
    and the search itself (space, sampler, scheduler, metric)."""
    settings = run_settings(to_dict(cfg), version.version, train_order(version, cfg))
    settings.update({k: v for k, v in flatten(to_dict(cfg)).items()
                     if k.startswith("tune.") and k not in ("tune.name", "tune.max_concurrent_trials")})
    return settings


def _check_sweep(cfg: PipelineConfig, name: str, version: DatasetVersion, resume: bool, can_restore: bool) -> bool:
    """True when the sweep ``name`` is to be restored. A sweep is resumed only when asked and only
    with the settings it was started with (recorded in ``sweep.json`` before it starts); an
    existing sweep is never silently reused or overwritten."""
    where = st.join_uri(cfg.storage.uri, "tune", name)
    record_uri = st.join_uri(where, SWEEP_FILE)
    settings = sweep_settings(cfg, version)
    if not can_restore:
        if resume:
            raise UserError(f"no sweep state to resume at {where}; check tune.name (the sweep's name) or start it "
                            "without --resume")
        st.write_json(record_uri, {"sweep": name, "settings": settings}, cfg.storage)
        return False
    if not resume:
        raise UserError(f"sweep {name!r} already exists at {where}; pass --resume to continue it, or pick a new "
                        "tune.name for a new sweep")
    try:
        saved = st.read_json(record_uri, cfg.storage)["settings"]
    except (st.ObjectNotFound, KeyError, TypeError):
        raise UserError(f"sweep {name!r} at {where} has no {SWEEP_FILE}: it was not started by this pipeline "
                        "version, and resuming it could mix settings; pick a new tune.name") from None
    changed = [f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(saved) | set(settings))
               if saved.get(k) != settings.get(k)]
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UserError(f"sweep {name!r} was started with other settings: {', '.join(changed[:4])}{more}; resume it "
                        "with its own settings, or pick a new tune.name for a new sweep")
    return True


def _tuner_pickle_sha256(cfg: PipelineConfig, name: str) -> str | None:
    uri = st.join_uri(cfg.storage.uri, "tune", name, "tuner.pkl")
    try:
        return hashlib.sha256(st.read_bytes(uri, cfg.storage)).hexdigest()
    except st.ObjectNotFound:
        return None


def _record_tuner_pickle(cfg: PipelineConfig, name: str) -> None:
    """Keep the sha256 of the ``tuner.pkl`` Tune just wrote in our ``sweep.json``."""
    uri = st.join_uri(cfg.storage.uri, "tune", name, SWEEP_FILE)
    record = st.read_json(uri, cfg.storage)
    record["tuner_pkl_sha256"] = _tuner_pickle_sha256(cfg, name)
    st.write_json(uri, record, cfg.storage)


def _check_tuner_pickle(cfg: PipelineConfig, name: str) -> None:
    """Refuse to let Tune unpickle a ``tuner.pkl`` other than the one recorded when it was written."""
    recorded = st.read_json(st.join_uri(cfg.storage.uri, "tune", name, SWEEP_FILE), cfg.storage).get("tuner_pkl_sha256")
    actual = _tuner_pickle_sha256(cfg, name)
    if recorded is None or actual != recorded:
        raise UserError(f"sweep {name!r}: its tuner.pkl is not the one this pipeline wrote (sha256 "
                        f"{(actual or 'missing')[:12]}…, recorded {(recorded or 'none')[:12]}…); refusing to unpickle "
                        "it. Pick a new tune.name for a new sweep")


def _summarise(cfg: PipelineConfig, grid, name: str, parent_id: str, t0: float, client, version) -> TuneResult:
    epochs = max(1, cfg.train.epochs)
    trials = []
    for r in grid:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or os.path.basename(r.path.rstrip("/"))
        iters = int(metrics.get("training_iteration", 0))
        diverged = bool(metrics.get("stopped"))  # its last report was the non-finite-loss stop
        error = first_line(r.error) if r.error else None
        if diverged and error is None:  # the scheduler ended it at that report, before it could raise
            error = "diverged: non-finite loss or gradient (its MLflow run's tag pipeline.stopped says where)"
        trials.append({
            "trial_id": trial_id, "config": r.config, "iterations": iters,
            "metric": None if diverged else metrics.get(cfg.tune.metric), "error": error, "diverged": diverged,
            "early_stopped": error is None and iters < epochs, "run_name": f"{name}-{trial_id}",
        })
    # close child runs that did not finish on their own (diverged, ASHA-stopped or killed trials)
    grace_until = time.monotonic() + STOPPED_TRIAL_GRACE_S  # one grace period for all stopped trials
    for t in trials:
        run = tracking.find_run(cfg, t["run_name"], TRAIN_TASK, parent_id, client)
        if run is None:
            continue
        t["run_id"] = run.info.run_id
        if t["diverged"]:
            if run.info.status != "FAILED":
                client.set_terminated(run.info.run_id, status="FAILED")
        # a trial that ASHA stopped was interrupted inside fit() (FAILED) or killed (RUNNING)
        elif run.info.status == "RUNNING" or (t["early_stopped"] and run.info.status == "FAILED"):
            if t["early_stopped"]:  # let its own clean-up land first, so that it cannot come after ours
                _wait_while_running(client, run.info.run_id, grace_until)
            client.set_tag(run.info.run_id, "pipeline.early_stopped", str(t["early_stopped"]).lower())
            client.set_terminated(run.info.run_id, status="KILLED")
    finished = [t for t in trials if t["metric"] is not None and not t["early_stopped"] and not t["error"]]
    if not finished:
        raise UserError(f"sweep {name!r} has no trial that completed {epochs} epochs; see the trial errors in "
                        f"{st.join_uri(cfg.storage.uri, 'tune', name)}")
    sign = 1 if cfg.tune.mode == "max" else -1
    best = max(finished, key=lambda t: sign * t["metric"])
    best_result = next(r for r in grid if r.config == best["config"] and (r.metrics or {}).get(cfg.tune.metric) == best["metric"])
    best_ckpt = (best_result.metrics or {}).get("checkpoint_path")
    model_uri = st.join_uri(cfg.storage.uri, "train", best["run_name"], "model")
    if not st.exists(st.join_uri(model_uri, "config.json"), cfg.storage):
        _export_best(cfg, best, best_ckpt, version, model_uri)
    result_uri = st.join_uri(cfg.storage.uri, "tune", name, "best.json")
    out = TuneResult(
        name=name, parent_run_id=parent_id, best_trial_id=best["trial_id"], best_config=best["config"],
        best_metrics={k: v for k, v in (best_result.metrics or {}).items() if isinstance(v, (int, float))},
        best_run_name=best["run_name"], best_run_id=best.get("run_id"),
        best_checkpoint_uri=checkpoint_uri(cfg, best_ckpt), model_uri=model_uri, trials=trials, result_uri=result_uri,
        seconds=time.time() - t0, trial_epochs=sum(t["iterations"] for t in trials), trial_epochs_full=len(trials) * epochs,
    )
    st.write_json(result_uri, out.to_dict(), cfg.storage)
    tracking.log_json(client, parent_id, out.to_dict(), "best_trial.json")
    for key, value in (("best_trial_id", out.best_trial_id), ("best_run_id", out.best_run_id or ""),
                       ("best_model_uri", model_uri), ("best_checkpoint_uri", out.best_checkpoint_uri or ""),
                       ("best_config", str(out.best_config)), ("best_" + cfg.tune.metric, str(best["metric"]))):
        client.set_tag(parent_id, f"pipeline.{key}", value[:5000])
    tracking.log_metrics(client, parent_id, {f"best_{cfg.tune.metric}": best["metric"],
                                             "trials": float(len(trials)), "trial_epochs": float(out.trial_epochs),
                                             "asha_compute_ratio": out.compute_ratio,
                                             "trials_early_stopped": float(sum(t["early_stopped"] for t in trials))}, step=0)
    return out


STOPPED_TRIAL_GRACE_S = 10.0


def _wait_while_running(client, run_id: str, deadline: float) -> None:
    """Give a trial the scheduler stopped a moment to close its MLflow run (FAILED) itself.

    Tune returns as soon as it has asked the trial to stop; the trial's ``fit`` may still be in
    its exception handler. A trial whose actor was killed outright never closes its run, hence the
    bound (a ``time.monotonic()`` deadline)."""
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.25)


def _export_best(cfg: PipelineConfig, best: dict[str, Any], checkpoint_path: str | None, version, model_uri: str) -> None:
    """Export the best trial's model from its checkpoint when the trial did not (it was stopped
    by the scheduler right after its last report, before its own export)."""
    ckpt_uri = checkpoint_uri(cfg, checkpoint_path)
    if ckpt_uri is None:
        raise UserError(f"best trial {best['trial_id']} reported no checkpoint; cannot export its model")
    trial_cfg = config_from_dict(to_dict(cfg), overrides_of(best["config"], cfg.tune.space))
    spec = make_spec(trial_cfg, version, best.get("run_id"))
    with tempfile.TemporaryDirectory() as tmp:
        state = st.download_dir(st.join_uri(ckpt_uri, "state"), tmp, cfg.storage)
        export_model(state, spec, version, model_uri, trial_cfg, use_ema=trial_cfg.train.ema_decay > 0)


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    result = tune(cfg, resume=args.resume)
    stopped = sum(t["early_stopped"] for t in result.trials)
    print(f"sweep {result.name}: {len(result.trials)} trials ({stopped} stopped early by ASHA), {result.seconds:.0f} s; "
          f"{result.trial_epochs} of {result.trial_epochs_full} trial-epochs run ({result.compute_ratio:.2f}x the compute of "
          "running every trial to the end)")
    print(f"best trial {result.best_trial_id}: {cfg.tune.metric}={result.best_metrics.get(cfg.tune.metric)} "
          f"config={result.best_config}")
    print(f"parent mlflow run: {result.parent_run_id}")
    print(f"best model: {result.model_uri}")
    print(result.result_uri)
    return 0
