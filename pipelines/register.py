"""register: package a trained ViT for MLflow, register a version, and gate the ``@champion`` alias.

    python -m pipelines register --config FILE [--model-dir URI] [--run-id RUN] [--set key=value ...]

Packaging (safetensors + code, never pickle) is :mod:`pipelines.packaging`. The gate scores the
candidate and the current ``@champion`` on the same test split, each with its own packaged
preprocessing, and moves ``@champion`` only when ``registry.metric`` improves by more than
``registry.margin``; ``@candidate`` always moves. Every decision is logged in the registry
(version tag, model tag, run artifact), and the model and its versions get Markdown descriptions
(:mod:`pipelines.registry_page`). Details: docs/registry.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_model import arch_from_dict, flops_per_image

from . import registry_page as page
from . import storage as st
from . import tracking
from .config import PipelineConfig
from .data.shards import DatasetVersion, dataset_from_config, iter_shard_batches, load_version
from .errors import ConfigError, RegisterError, redact_uri
from .imaging import decode_png, resize_center_crop, to_channels
from .packaging import ENTRY_FILE, find_pickles, pip_requirements, stage_code, stage_model_dir
from .serving import ViTClassifier, input_example, model_signature

log = logging.getLogger(__name__)

TASK = "register"
CHAMPION = "champion"
CANDIDATE = "candidate"
DECISION_TAG = "promotion.decision"
CARD_TAG = "registry.card"  # the version's facts for its description (JSON; see pipelines.registry_page)
ATTENTION_ARTIFACT = "attention.png"  # evaluate's attention picture, at the training run's artifact root
LOG_TAG = "promotion.log"
LOG_ARTIFACT = "promotion_log.json"
LOG_TAG_MAX_CHARS = 4500
GATE_METRICS = ("test_acc", "test_loss")
MODES = ("max", "min")
MODEL_ARTIFACT_NAME = "model"

# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterResult:
    """What one registration did. ``decision`` is ``promoted`` (champion moved to this version),
    ``first`` (no champion existed) or ``kept`` (champion unchanged)."""

    model_name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    champion_before: str | None
    champion_after: str
    decision: str
    reason: str
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    run_id: str | None = None  # the registration's MLflow run

    @property
    def promoted(self) -> bool:
        return self.champion_after == self.version

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

TestData = tuple[np.ndarray, np.ndarray] | Iterable[tuple[Any, Any]]


def _batches(test_data: TestData) -> Iterator[tuple[Any, np.ndarray]]:
    """``(images, labels)`` (one batch: labels a 1-D array), or an iterable of such batches."""
    if isinstance(test_data, tuple) and len(test_data) == 2 and isinstance(test_data[1], np.ndarray) \
            and test_data[1].ndim == 1:
        yield test_data[0], test_data[1]
        return
    for images, labels in test_data:
        yield images, np.asarray(labels)


def _fit_pixels(images: Any, spec: Any) -> np.ndarray:
    """uint8 images (a (N, H, W[, C]) array, or a list of per-image arrays of any size and
    channel count) -> a batch at the size and channel count ``spec`` expects."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
        arr = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
        channels = 1 if arr.ndim == 3 else arr.shape[3]
        if tuple(arr.shape[1:3]) == spec.image_size and channels == spec.channels:
            return arr
    want_shape = spec.image_size + ((3,) if spec.channels == 3 else ())
    out = []
    for img in images:
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise RegisterError(f"test images must be uint8 pixels, got {img.dtype}")
        out.append(resize_center_crop(to_channels(img, spec.channels), spec.image_size))
    return np.stack(out) if out else np.zeros((0,) + want_shape, np.uint8)


def score_models(models: Mapping[str, Any], test_data: TestData, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """``{key: {"test_acc", "test_loss", "test_count"}}`` for each ``ViTClassifier``, in one pass
    over ``test_data`` (so an iterator of batches is read once)."""
    sums = {k: {"correct": 0, "nll": 0.0, "n": 0} for k in models}
    for images, labels in _batches(test_data):
        labels = labels.astype(np.int64)
        for key, clf in models.items():
            probs = clf.predict_proba(_fit_pixels(images, clf.spec), batch_size=batch_size).double().numpy()
            if probs.shape[0] != len(labels):
                raise RegisterError(f"test batch has {probs.shape[0]} images but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
                raise RegisterError(f"test labels outside 0..{probs.shape[1] - 1}; the test split does not fit this model")
            picked = probs[np.arange(len(labels)), labels]
            sums[key]["correct"] += int((probs.argmax(axis=1) == labels).sum())
            sums[key]["nll"] += float(-np.log(np.clip(picked, 1e-12, None)).sum())
            sums[key]["n"] += len(labels)
    out = {}
    for key, s in sums.items():
        if s["n"] == 0:
            raise RegisterError("the test data for the promotion gate is empty; point data.version at a version with a test split")
        out[key] = {"test_acc": s["correct"] / s["n"], "test_loss": s["nll"] / s["n"], "test_count": float(s["n"])}
    return out


# --------------------------------------------------------------------------------------------
# Gate
# --------------------------------------------------------------------------------------------


def gate(metric: str, mode: str, margin: float, candidate: Mapping[str, float],
         champion: Mapping[str, float] | None, champion_version: str | None) -> tuple[bool, str]:
    """(promote?, reason). Better means ``mode`` (max/min) by strictly more than ``margin``."""
    if champion is None:
        return True, "no champion yet: the first registered version becomes champion"
    c, b = float(candidate[metric]), float(champion[metric])
    gain = (c - b) if mode == "max" else (b - c)
    verdict = (f"candidate {metric} {c:.6f} vs champion v{champion_version} {b:.6f} "
               f"({'+' if gain >= 0 else ''}{gain:.6f} in the {'higher' if mode == 'max' else 'lower'}-is-better "
               f"direction, margin {margin:g})")
    if math.isfinite(gain) and gain > margin:
        return True, f"promoted: {verdict}"
    return False, f"kept champion: {verdict}"


# --------------------------------------------------------------------------------------------
# Registry helpers
# --------------------------------------------------------------------------------------------


def _check_classes(who: str, names: Sequence[str], test_classes: Sequence[str] | None,
                   fix: str = "gate on the dataset the model was trained on (data.version)") -> None:
    if test_classes is not None and list(names) != list(test_classes):
        raise RegisterError(f"{who} predicts classes {list(names)} but the test split has {list(test_classes)}; {fix}")


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def load_registered_classifier(client: Any, name: str, version: str, cfg: PipelineConfig, work: Path) -> Any:
    """A ``ViTClassifier`` from a registered version's artifact files (its shipped code is not run)."""
    import mlflow  # here, not at the top: importing MLflow costs seconds
    from mlflow.models import Model

    dest = work / f"v{version}"
    try:
        with tracking.fluent_tracking(*tracking.resolve_uris(cfg)):  # models:/ URIs resolve through the global registry URI
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
        artifacts = Model.load(local).flavors["python_function"]["artifacts"]
        return ViTClassifier().load_artifacts({k: str(Path(local, v["path"])) for k, v in artifacts.items()}, device="cpu")
    except Exception as exc:
        raise RegisterError(
            f"cannot load the champion {name} v{version} for the promotion gate ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); fix or delete that version's alias "
            f"(MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r}))"
        ) from None


def read_promotion_log(client: Any, name: str, model_versions: Iterable[Any] | None = None) -> list[dict[str, Any]]:
    """The complete promotion log of ``name``: every version's decision, oldest first
    (``model_versions``: the model's versions when the caller has them already)."""
    entries = []
    for mv in client.search_model_versions(f"name = '{name}'") if model_versions is None else model_versions:
        text = (mv.tags or {}).get(DECISION_TAG)
        if text:
            try:
                entries.append(json.loads(text))
            except ValueError:
                log.warning("version %s has an unreadable %s tag", mv.version, DECISION_TAG)
    return sorted(entries, key=lambda e: (e.get("time", ""), int(e.get("candidate_version", 0))))


def _recent_log_tag(client: Any, name: str, entry: dict[str, Any], max_entries: int) -> str:
    """The registered-model log tag with ``entry`` appended, cut to fit."""
    model = client.get_registered_model(name)
    try:
        entries = json.loads((model.tags or {}).get(LOG_TAG, "[]"))
        if not isinstance(entries, list):
            entries = []
    except ValueError:
        entries = []
    entries = (entries + [entry])[-max(1, max_entries):]
    text = json.dumps(entries, separators=(",", ":"), sort_keys=True)
    while len(text) > LOG_TAG_MAX_CHARS and len(entries) > 1:
        entries = entries[1:]
        text = json.dumps(entries, separators=(",", ":"), sort_keys=True)
    return text


def _flat_tags(prefix: str, metrics: Mapping[str, Any]) -> dict[str, str]:
    """Numeric ``metrics`` as tags ``<prefix><name>`` (characters MLflow rejects in keys -> ``_``)."""
    return {prefix + tracking.metric_key(k): f"{float(v):.6g}" for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def register(cfg: PipelineConfig, model_dir_uri: str, *, run_id: str | None = None, dataset_digest: str | None = None,
             metrics: Mapping[str, Any] | None = None, test_data: TestData | None = None,
             test_classes: Sequence[str] | None = None, dataset: Mapping[str, Any] | None = None) -> RegisterResult:
    """Package ``model_dir_uri`` as a pyfunc model, register a new version of
    ``registry.model_name``, run the promotion gate on ``test_data`` and move the aliases.

    ``run_id``/``dataset_digest`` default to the model meta's ``mlflow_run_id`` and
    ``dataset.version``; ``metrics`` (e.g. the training run's best validation metrics) are
    recorded as version tags ``metric.<name>``. ``test_data`` is ``(images, labels)`` (uint8
    ``(N, H, W[, C])`` and ints) or an iterable of such batches; it may be omitted only while
    the model has no champion. ``test_classes`` (the test split's class names) guards against
    scoring a model on another label set: candidate and champion must list the same names.
    ``dataset`` (``name, version, digest, uri``: :func:`dataset_facts` of the test data's version)
    goes into the version's description; it defaults to the model meta's dataset.

    The registered model and the new version get Markdown descriptions (pipelines.registry_page);
    versions whose aliases this registration moved are described again.
    """
    import mlflow

    reg = cfg.registry
    if reg.metric not in GATE_METRICS:
        raise ConfigError(f"registry.metric {reg.metric!r} is not scored by the gate; use one of {', '.join(GATE_METRICS)}")
    if reg.mode not in MODES:
        raise ConfigError(f"registry.mode {reg.mode!r} is invalid; use max (e.g. test_acc) or min (e.g. test_loss)")
    if not reg.model_name:
        raise ConfigError("registry.model_name is empty; set it, e.g. --set registry.model_name=vit-fashion-mnist")
    tracking_uri, registry_uri = tracking.resolve_uris(cfg)
    tracking.check_tracking_server(tracking_uri)
    client = tracking.client(cfg)
    name = reg.model_name

    with tempfile.TemporaryDirectory(prefix="vit-register-") as tmp:
        work = Path(tmp)
        staged = stage_model_dir(model_dir_uri, cfg, work / "artifacts")
        code_paths = stage_code(work / "code")
        bad = find_pickles(work)
        if bad:  # only reachable if someone edits the staging code; never ship a pickle
            raise RegisterError(f"refusing to package pickle file(s) {[str(p.relative_to(work)) for p in bad]}")
        meta = staged.meta
        run_id = run_id or meta.get("mlflow_run_id")
        dataset_digest = dataset_digest or (meta.get("dataset") or {}).get("version")
        candidate = ViTClassifier().load_artifacts(staged.artifact_paths(), device="cpu")
        _check_classes("the candidate", candidate.class_names, test_classes)

        champion_before = _alias_version(client, name, CHAMPION)
        candidate_before = _alias_version(client, name, CANDIDATE)
        models = {"candidate": candidate}
        if champion_before is not None:
            if test_data is None:
                raise RegisterError(
                    f"{name} has a champion (v{champion_before}) but no test data was given for the promotion gate; "
                    "pass the test split (data.version with a test split, or test_data=...)"
                )
            models["champion"] = load_registered_classifier(client, name, champion_before, cfg, work / "champion")
            _check_classes(f"the champion v{champion_before}", models["champion"].class_names, test_classes,
                           fix=f"remove the alias deliberately (MlflowClient().delete_registered_model_alias({name!r}, "
                               f"{CHAMPION!r})) if the label set changed on purpose")
        scores = score_models(models, test_data) if test_data is not None else {"candidate": {}}
        cand_scores, champ_scores = scores["candidate"], scores.get("champion")
        if cand_scores or champ_scores:
            log.info("gate scores: %s", scores)
        promote, reason = gate(reg.metric, reg.mode, reg.margin, cand_scores, champ_scores, champion_before)

        exp_id = tracking.experiment_id(cfg, client)
        run = client.create_run(exp_id, run_name=f"register-{name}",
                                tags={tracking.TASK_TAG: TASK, "registry.model_name": name,
                                      **({"training_run_id": run_id} if run_id else {}),
                                      **({"dataset_digest": dataset_digest} if dataset_digest else {})})
        reg_run_id = run.info.run_id
        try:
            tracking.log_config(client, reg_run_id, cfg)
            with tracking.fluent_tracking(tracking_uri, registry_uri), mlflow.start_run(run_id=reg_run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT_NAME, python_model=str(ENTRY_FILE), artifacts=staged.artifact_paths(),
                    code_paths=code_paths, signature=model_signature(), input_example=input_example(staged.spec),
                    pip_requirements=pip_requirements(),
                )
                version_tags = {
                    **({"training_run_id": run_id} if run_id else {}),
                    **({"dataset_digest": dataset_digest} if dataset_digest else {}),
                    "registration_run_id": reg_run_id,
                    **_flat_tags("metric.", metrics or {}),
                    **_flat_tags("gate.", cand_scores),
                }
                mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
            version = str(mv.version)

            client.set_registered_model_alias(name, CANDIDATE, version)
            if promote:
                client.set_registered_model_alias(name, CHAMPION, version)
            champion_after = version if promote else str(champion_before)
            decision = "first" if champion_before is None else ("promoted" if promote else "kept")
            entry = {
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                "model": name, "candidate_version": version, "champion_before": champion_before,
                "champion_after": champion_after, "decision": decision, "reason": reason,
                "metric": reg.metric, "mode": reg.mode, "margin": reg.margin,
                "candidate_metrics": cand_scores, "champion_metrics": champ_scores,
                "registration_run_id": reg_run_id, "training_run_id": run_id, "dataset_digest": dataset_digest,
            }
            client.set_model_version_tag(name, version, DECISION_TAG, json.dumps(entry, sort_keys=True))
            client.set_registered_model_tag(name, LOG_TAG, _recent_log_tag(client, name, entry, reg.log_tag_entries))
            card = version_card(client, staged.config_doc, candidate.model, run_id, reg_run_id, exp_id,
                                dataset or _meta_dataset(meta, dataset_digest))
            client.set_model_version_tag(name, version, CARD_TAG, json.dumps(card, sort_keys=True))
            describe(client, name, [version, champion_before, candidate_before], reg.log_tag_entries)
            tracking.log_json(client, reg_run_id, read_promotion_log(client, name), LOG_ARTIFACT)
            tracking.log_metrics(client, reg_run_id, {**{f"candidate_{k}": v for k, v in cand_scores.items()},
                                                      **{f"champion_{k}": v for k, v in (champ_scores or {}).items()}}, step=0)
            client.set_tag(reg_run_id, "promotion.decision", decision)
        except BaseException:
            tracking.end_run(client, reg_run_id, "FAILED")
            raise
        tracking.end_run(client, reg_run_id, "FINISHED")

    return RegisterResult(
        model_name=name, version=version, model_uri=f"models:/{name}/{version}", champion_before=champion_before,
        champion_after=champion_after, decision=decision, reason=reason, candidate_metrics=dict(cand_scores),
        champion_metrics=dict(champ_scores) if champ_scores else None, run_id=reg_run_id,
    )


# --------------------------------------------------------------------------------------------
# Registry page: the descriptions a person browsing the registry reads
# --------------------------------------------------------------------------------------------


def dataset_facts(version: DatasetVersion) -> dict[str, Any]:
    """What a version's description says about the dataset version its test metrics come from."""
    return {"name": version.name, "version": version.version, "digest": version.manifest.get("inputs_sha256"),
            "uri": redact_uri(version.uri)}


def _meta_dataset(meta: Mapping[str, Any], version: str | None = None) -> dict[str, Any]:
    ds = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
    facts = {"name": ds.get("name"), "version": version or ds.get("version"), "uri": ds.get("uri")}
    return {k: (redact_uri(v) if k == "uri" else v) for k, v in facts.items() if v}


def _training_run_facts(client: Any, run_id: str | None) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """(``{id, experiment_id}``, its ``model.name`` param, its attention artifact) of the training
    run, as far as this tracking store knows the run."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None, None, None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return {"id": run_id, "experiment_id": None}, None, None
    try:
        attention = ATTENTION_ARTIFACT if any(f.path == ATTENTION_ARTIFACT for f in client.list_artifacts(run_id)) else None
    except Exception as exc:  # an unreachable artifact store costs the picture, not the registration
        log.warning("cannot list the artifacts of training run %s (%s); the description has no attention picture",
                    run_id, type(exc).__name__)
        attention = None
    return {"id": run_id, "experiment_id": run.info.experiment_id}, run.data.params.get("model.name"), attention


def version_card(client: Any, config_doc: Mapping[str, Any], model: Any, run_id: str | None, reg_run_id: str,
                 experiment: str, dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The facts a version's description shows (see pipelines.registry_page), all JSON."""
    arch = arch_from_dict(dict(config_doc))
    meta = dict(config_doc.get("meta") or {})
    training_run, model_name, attention = _training_run_facts(client, run_id)
    return {
        "family": arch.family, "model_name": model_name or meta.get("model_name"),
        "num_params": int(sum(p.numel() for p in model.parameters())), "flops_per_image": float(flops_per_image(arch)),
        "image_size": list(arch.img_hw), "channels": arch.in_chans, "num_classes": arch.num_classes,
        "dataset": {k: v for k, v in dataset.items() if v}, "trained_on": _meta_dataset(meta),
        "training_run": training_run, "registration_run": {"id": reg_run_id, "experiment_id": experiment},
        "attention": attention,
    }


def _json_tag(tags: Mapping[str, str], key: str) -> dict[str, Any] | None:
    try:
        value = json.loads(tags[key]) if key in tags else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def describe(client: Any, name: str, versions: Iterable[str | None], rows: int = 20) -> None:
    """Set the Markdown descriptions of registered model ``name`` and of ``versions`` (None and
    repeats skipped) from their ``promotion.decision``/``registry.card`` tags and today's aliases.
    A version registered before descriptions existed (no decision tag) is left as it is."""
    found = {str(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}
    entries = read_promotion_log(client, name, found.values())
    aliases = {str(k): str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
    for version in dict.fromkeys(str(v) for v in versions if v is not None):
        mv = found.get(version)
        entry = _json_tag(mv.tags or {}, DECISION_TAG) if mv is not None else None
        if entry is None:
            continue
        replaced_by = [e.get("candidate_version") for e in entries
                       if str(e.get("champion_before")) == version and e.get("decision") == "promoted"]
        status = {"aliases": sorted(a for a, v in aliases.items() if v == version),
                  "replaced_by": replaced_by[-1] if replaced_by else None}
        card = _json_tag(mv.tags or {}, CARD_TAG) or {}
        client.update_model_version(name, version, description=page.version_markdown(entry, card, status))
    champion = aliases.get(CHAMPION)
    champion_card = _json_tag(found[champion].tags or {}, CARD_TAG) if champion in found else None
    client.update_registered_model(name, description=page.model_markdown(name, entries, aliases, champion_card, rows))


# --------------------------------------------------------------------------------------------
# Test split from a dataset version
# --------------------------------------------------------------------------------------------


def gate_dataset(cfg: PipelineConfig, model_meta: Mapping[str, Any] | None = None) -> DatasetVersion:
    """The dataset version whose test split the gate uses: ``data.version`` if set, else the
    version the model was trained on (its meta), else the newest version of ``data.name``."""
    trained_on = (model_meta or {}).get("dataset")
    dataset_uri = trained_on.get("uri") if isinstance(trained_on, dict) else None
    if dataset_uri and not cfg.data.version:
        return load_version(dataset_uri, cfg.storage)
    return dataset_from_config(cfg)


def split_batches(version: DatasetVersion, cfg: PipelineConfig, split: str = "test") -> Iterator[tuple[list, np.ndarray]]:
    """``(uint8 images, labels)`` per shard of ``split`` of a dataset version, streamed."""
    if split not in version.splits:
        raise RegisterError(f"dataset {version.uri} has no {split} split; prepare it with data.test_fraction > 0")
    for table in iter_shard_batches(version, split, cfg.storage, columns=["image", "label"]):
        yield [decode_png(b) for b in table.column("image").to_pylist()], table.column("label").to_numpy()


def register_from_workflow(cfg: PipelineConfig, *, model_uri: str, dataset_uri: str, run_id: str | None = None,
                           metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The workflow runner's register step: gate on the test split of ``dataset_uri``.

    Returns :meth:`RegisterResult.to_dict` plus ``champion_version`` (JSON-safe, for the run record).
    """
    version = load_version(dataset_uri, cfg.storage)
    if "test" not in version.splits:
        raise RegisterError(f"dataset {version.uri} has no test split; prepare it with data.test_fraction > 0")
    result = register(cfg, model_uri, run_id=run_id, dataset_digest=version.version, metrics=metrics,
                      test_data=split_batches(version, cfg), test_classes=version.classes,
                      dataset=dataset_facts(version))
    return {**result.to_dict(), "champion_version": result.champion_after}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    model_dir, run_id = args.model_dir, args.run_id
    if not model_dir:  # the same default as evaluate: --run-id's model, else train.run_name's, else the newest
        model_dir, found_run = tracking.latest_model_uri(cfg, run_id)
        run_id = run_id or found_run

    doc: Any = {}
    try:  # the model's meta names the dataset version it was trained on
        doc = json.loads(st.read_bytes(st.join_uri(model_dir, "config.json"), cfg.storage))
    except (st.ObjectNotFound, ValueError):
        pass  # register() reports a missing or broken config.json with the fix
    version = gate_dataset(cfg, doc.get("meta") if isinstance(doc, dict) else None)
    if "test" not in version.splits:
        raise RegisterError(f"dataset {version.uri} has no test split; prepare it with data.test_fraction > 0")
    started = time.monotonic()
    result = register(cfg, model_dir, run_id=run_id, dataset_digest=version.version,
                      test_data=split_batches(version, cfg), test_classes=version.classes,
                      dataset=dataset_facts(version))
    m = result.candidate_metrics.get(cfg.registry.metric)
    shown = f" {cfg.registry.metric} {m:.4f}" if m is not None else ""
    before = f"v{result.champion_before}" if result.champion_before else "none"
    print(f"registered {result.model_name} v{result.version}{shown}; @candidate -> v{result.version}, "
          f"@champion {before} -> v{result.champion_after} ({result.decision}) in {time.monotonic() - started:.0f} s")
    print(f"reason: {result.reason}")
    print(f"model uri: models:/{result.model_name}@{CHAMPION}")
    return 0
