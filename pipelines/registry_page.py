"""What a person browsing the MLflow registry reads: Markdown descriptions of a registered model
and of each of its versions (MLflow's UI renders them with GitHub-flavoured Markdown).

Pure functions from plain dicts to text; :mod:`pipelines.register` gathers the dicts and sets the
descriptions. The inputs:

``entry``
    one promotion decision, as register writes it to the version tag ``promotion.decision``
    (``time, candidate_version, champion_before, champion_after, decision, reason, metric, mode,
    margin, candidate_metrics, champion_metrics, training_run_id, registration_run_id, ...``).
``card``
    the version's facts, stored as the version tag ``registry.card``: ``family, model_name,
    num_params, flops_per_image, image_size [H, W], channels, num_classes``, ``dataset`` (the gate's
    test split: ``name, version, digest, uri``), ``trained_on`` (the model meta's dataset),
    ``training_run`` / ``registration_run`` (``id, experiment_id``) and ``attention`` (the path of
    the attention picture among the training run's artifacts, or None).
``status``
    what the version is now: ``aliases`` (the aliases it holds) and ``replaced_by`` (the version
    that took ``@champion`` from it, if any).

Links are relative to the MLflow UI page (``#/...`` routes, ``get-artifact?...``), so they work
behind any host name or static prefix; URIs pass through :func:`pipelines.errors.redact_uri`, so
no credential reaches a description.
"""

from __future__ import annotations

import datetime as _dt
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import redact_uri

CHAMPION = "champion"
CANDIDATE = "candidate"
DECISION_WORDS = {"first": "first champion", "promoted": "promoted", "kept": "not promoted"}
MAX_CHARS = 4900  # MLflow's SQL stores keep 5,000 characters of a description (sqlite does not check)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def cell(value: Any) -> str:
    """``value`` as text that stays inside one Markdown table cell."""
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|")


def code(value: Any) -> str:
    """``value`` as inline code (a longer fence when the text holds a backtick)."""
    text = " ".join(str(value).split())
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def number(name: str, value: Any) -> str:
    """A metric value: counts as integers, everything else with four decimals; ``—`` if missing."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    if name.endswith("count"):
        return f"{int(value):,}"
    return f"{float(value):.4f}"


def signed(value: float) -> str:
    return f"{'+' if value >= 0 else '−'}{abs(value):.4f}"


def si(value: Any, unit: str = "") -> str:
    """``21840 -> '21.8 k'``, ``1.2e9 -> '1.20 G'`` (three significant digits)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    v = float(value)
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g} {prefix}{unit}".rstrip()
    return f"{v:.3g} {unit}".rstrip()


def when(iso: Any) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS UTC`` (as given when it does not parse)."""
    try:
        t = _dt.datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso or "—")
    if t.tzinfo is not None:
        t = t.astimezone(_dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def version_url(name: str, version: Any) -> str:
    return f"#/models/{urllib.parse.quote(str(name), safe='')}/versions/{urllib.parse.quote(str(version), safe='')}"


def run_url(run: Mapping[str, Any]) -> str | None:
    """The UI route of a run, None when its experiment is unknown (e.g. a run in another store)."""
    if not run.get("id") or run.get("experiment_id") is None:
        return None
    return f"#/experiments/{urllib.parse.quote(str(run['experiment_id']), safe='')}/runs/{urllib.parse.quote(str(run['id']), safe='')}"


def artifact_url(run_id: str, path: str) -> str:
    """A run artifact as the MLflow server serves it (``/get-artifact``), relative to the UI page."""
    return "get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})


def run_ref(run: Mapping[str, Any] | None) -> str:
    if not run or not run.get("id"):
        return "—"
    url = run_url(run)
    return f"[{code(run['id'])}]({url})" if url else f"{code(run['id'])} (not in this tracking store)"


def version_ref(name: str, version: Any) -> str:
    return f"[v{version}]({version_url(name, version)})" if version not in (None, "") else "—"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _gate_rule(metric: str, mode: str, margin: Any) -> str:
    """``test_acc beats the champion's by more than 0 (higher is better)``"""
    direction = "higher" if mode == "max" else "lower"
    return f"{code(metric)} beats the champion's by more than {float(margin or 0):g} ({direction} is better)"


def _metric_names(primary: str, *metric_dicts: Mapping[str, Any] | None) -> list[str]:
    names = [primary]
    for metrics in metric_dicts:
        names += [k for k in (metrics or {}) if k not in names]
    return names


def _model_line(card: Mapping[str, Any]) -> str:
    """``vit_tiny_patch4 (vit family), 21.8 k parameters, 1.23 MFLOPs/image, 28×28×1``"""
    parts = []
    name, family = card.get("model_name"), card.get("family")
    if name:
        parts.append(f"{code(name)} ({cell(family or '?')} family)")
    elif family:
        parts.append(f"{cell(family)} family")
    if card.get("num_params") is not None:
        parts.append(f"{si(card['num_params'])} parameters")
    if card.get("flops_per_image") is not None:
        parts.append(f"{si(card['flops_per_image'], 'FLOPs')}/image")
    if card.get("image_size"):
        h, w = card["image_size"]
        parts.append(f"{h}×{w}×{card.get('channels', '?')}")
    return ", ".join(parts) or "—"


# --------------------------------------------------------------------------------------------
# A version's page
# --------------------------------------------------------------------------------------------


def status_line(entry: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """What the version is now, in words: its aliases, or what became of it."""
    aliases = [a for a in (status.get("aliases") or [])]
    parts = [" ".join(code("@" + a) for a in aliases)] if aliases else []
    if CHAMPION in aliases:
        parts.append("serves as the champion")
    elif status.get("replaced_by"):
        parts.append(f"former champion, replaced by v{status['replaced_by']}")
    elif entry.get("decision") in ("first", "promoted"):
        parts.append("former champion")
    else:
        parts.append(f"not promoted; the champion stayed v{entry.get('champion_after', '?')}")
    return " — ".join(parts)


def summary(entry: Mapping[str, Any]) -> str:
    """The first line, plain text (MLflow's version list shows it raw): the decision in numbers."""
    metric, decision = entry.get("metric", ""), entry.get("decision")
    mine = number(metric, (entry.get("candidate_metrics") or {}).get(metric))
    champ_v = entry.get("champion_before")
    theirs = number(metric, (entry.get("champion_metrics") or {}).get(metric))
    if decision == "first" or not champ_v:
        return f"First version: {metric} {mine}; no champion to beat, so it became champion."
    word = "Promoted" if decision == "promoted" else "Not promoted"
    return f"{word}: {metric} {mine} vs {theirs} of champion v{champ_v}."


def version_markdown(entry: Mapping[str, Any], card: Mapping[str, Any], status: Mapping[str, Any]) -> str:
    """The description of one registered version (see the module doc for the inputs)."""
    name, version = entry.get("model", ""), entry.get("candidate_version", "?")
    metric, mode = entry.get("metric", ""), entry.get("mode", "max")
    champ_v, champ = entry.get("champion_before"), entry.get("champion_metrics")
    mine = entry.get("candidate_metrics") or {}
    decision = entry.get("decision", "?")
    out = [
        summary(entry),
        "",
        f"**Now:** {status_line(entry, status)}.",
        "",
        f"**Gate decision:** {DECISION_WORDS.get(decision, cell(decision))} — {cell(entry.get('reason', ''))}",
        "",
        "### Test metrics",
        "",
    ]
    names = _metric_names(metric, mine, champ)
    if champ:
        rows = []
        for k in names:
            a, b = mine.get(k), champ.get(k)
            diff = signed(float(a) - float(b)) if (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                                   and not k.endswith("count")) else ""
            label = f"**{code(k)}** (gate)" if k == metric else code(k)
            rows.append([label, number(k, a), number(k, b), diff])
        out += _table(["metric", f"v{version} (this version)", f"{version_ref(name, champ_v)} (champion at the gate)", "difference"], rows)
    else:
        out += _table(["metric", f"v{version} (this version)"],
                      [[f"**{code(k)}** (gate)" if k == metric else code(k), number(k, mine.get(k))] for k in names])
        out += ["", "No champion existed at registration: nothing to compare with."]
    out += ["", f"Gate rule: `@champion` moves to a new version when its {_gate_rule(metric, mode, entry.get('margin'))}, "
                "scored on the same test images, each model with its own packaged preprocessing.", ""]

    out += ["### Model", ""]
    rows = [["family", code(card.get("family") or "?")]]
    if card.get("model_name"):
        rows.append(["model name", code(card["model_name"])])
    if card.get("num_params") is not None:
        rows.append(["parameters", f"{int(card['num_params']):,} ({si(card['num_params'])})"])
    if card.get("flops_per_image") is not None:
        rows.append(["FLOPs / image", f"{si(card['flops_per_image'], 'FLOPs')} (forward)"])
    if card.get("image_size"):
        h, w = card["image_size"]
        channels = card.get("channels", "?")
        rows.append(["input", f"{h}×{w} pixels, {channels} channel{'' if channels == 1 else 's'}"])
    if card.get("num_classes") is not None:
        rows.append(["classes", str(card["num_classes"])])
    out += _table(["", ""], rows) + [""]

    out += ["### Data", ""]
    ds = card.get("dataset") or {}
    trained = card.get("trained_on") or {}
    rows = []
    for label, key in (("dataset", "name"), ("version", "version"), ("digest (sha256)", "digest"), ("URI", "uri")):
        if ds.get(key):
            rows.append([label, code(redact_uri(ds[key]) if key == "uri" else ds[key])])
    if trained and (trained.get("version"), trained.get("name")) != (ds.get("version"), ds.get("name")):
        rows.append(["trained on", " ".join(code(redact_uri(v) if k == "uri" else v)
                                            for k, v in trained.items() if k in ("name", "version", "uri") and v)])
    out += (_table(["", ""], rows) if rows else ["—"]) + [""]
    if rows:
        out += ["The test metrics above were scored on this dataset version's test split.", ""]

    out += ["### Provenance", ""]
    out += _table(["", ""], [
        ["training run", run_ref(card.get("training_run") or {"id": entry.get("training_run_id")})],
        ["registration run", run_ref(card.get("registration_run") or {"id": entry.get("registration_run_id")})],
        ["registered", when(entry.get("time"))],
    ]) + [""]

    attention, run = card.get("attention"), card.get("training_run") or {}
    if attention and run.get("id"):
        url = artifact_url(run["id"], attention)
        out += ["### Attention", "", f"![attention maps of v{version}]({url})", "",
                f"Attention of this version on fixed validation images ([{cell(attention)}]({url}) in the training run's artifacts).", ""]
    return clip("\n".join(out).rstrip() + "\n")


def clip(text: str, max_chars: int = MAX_CHARS) -> str:
    """``text`` cut at a line end to at most ``max_chars`` characters, saying so."""
    if len(text) <= max_chars:
        return text
    note = "\n\n*(cut to fit the registry's description limit)*\n"
    return text[: text.rfind("\n", 0, max_chars - len(note)) + 1].rstrip() + note


# --------------------------------------------------------------------------------------------
# The registered model's page
# --------------------------------------------------------------------------------------------


def latest_scores(entries: Sequence[Mapping[str, Any]], version: str) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
    """(metrics, entry): the newest test scores of ``version`` in the log: from its own
    registration, or from a later gate that scored it as the champion."""
    for e in reversed(entries):
        if str(e.get("candidate_version")) == str(version) and e.get("candidate_metrics"):
            return dict(e["candidate_metrics"]), e
        if str(e.get("champion_before")) == str(version) and e.get("champion_metrics"):
            return dict(e["champion_metrics"]), e
    return {}, None


def model_markdown(name: str, entries: Sequence[Mapping[str, Any]], aliases: Mapping[str, str],
                   champion_card: Mapping[str, Any] | None = None, rows: int = 10, max_chars: int = MAX_CHARS) -> str:
    """The description of registered model ``name``: what it is, its champion with its metrics, the
    gate and the last ``rows`` promotion decisions (``entries``: the log, oldest first); fewer
    rows when the text would exceed ``max_chars``."""
    rows = max(1, rows)
    while True:
        text = _model_markdown(name, entries, aliases, champion_card, rows)
        if len(text) <= max_chars or rows == 1:
            return clip(text, max_chars)
        rows -= 1


def _model_markdown(name: str, entries: Sequence[Mapping[str, Any]], aliases: Mapping[str, str],
                    champion_card: Mapping[str, Any] | None, rows: int) -> str:
    champion, candidate = aliases.get(CHAMPION), aliases.get(CANDIDATE)
    card = champion_card or {}
    last = entries[-1] if entries else {}
    metric, mode = last.get("metric", "test_acc"), last.get("mode", "max")
    family = f"{cell(card['family'])}-family " if card.get("family") else ""
    out = [
        f"Image classifier: a {family}Vision Transformer trained and registered by the ViT pipeline. "
        f"It takes encoded images (a DataFrame with an `image` column of PNG/JPEG bytes) and returns "
        f"`label`, `label_name`, `probabilities` and `error` per image.",
        "",
        f"Load the champion: `mlflow.pyfunc.load_model(\"models:/{cell(name)}@champion\")`.",
        "",
    ]
    if champion:
        scores, scored_in = latest_scores(entries, champion)
        promoted = next((e for e in reversed(entries) if str(e.get("candidate_version")) == str(champion)), None)
        out += [f"### Champion: {version_ref(name, champion)}", ""]
        table = [["model", _model_line(card)]] if card else []
        table += [[f"**{code(k)}** (gate)" if k == metric else code(k), number(k, v)]
                  for k, v in sorted(scores.items(), key=lambda kv: (kv[0] != metric, kv[0]))]
        ds = card.get("dataset") or {}
        if ds.get("version"):
            table.append(["dataset", " ".join(code(ds[k]) for k in ("name", "version") if ds.get(k))])
        if scored_in is not None and str(scored_in.get("candidate_version")) != str(champion):
            table.append(["scored", f"{when(scored_in.get('time'))}, at the gate of v{scored_in.get('candidate_version')}"])
        if promoted is not None:
            how = ("first version" if promoted.get("decision") == "first"
                   else f"over v{promoted.get('champion_before')}")
            table.append(["champion since", f"{when(promoted.get('time'))} ({how})"])
        out += _table(["", ""], table) + [""]
    else:
        out += ["No champion yet.", ""]
    if candidate:
        out += [f"Newest version (`@candidate`): {version_ref(name, candidate)}.", ""]
    out += [f"Gate: `@champion` moves to a new version when its {_gate_rule(metric, mode, last.get('margin'))} "
            "on the same test images; `@candidate` always moves to the newest version.", ""]

    shown = list(entries)[-rows:][::-1]
    out += [f"### Last promotions (newest first, {len(shown)} of {len(entries)})", ""]
    if shown:
        table = []
        for e in shown:
            m = e.get("metric", metric)
            champ_v = e.get("champion_before")
            champ_score = (f"{number(m, (e.get('champion_metrics') or {}).get(m))} (v{champ_v})" if champ_v else "—")
            table.append([when(e.get("time")), version_ref(name, e.get("candidate_version")),
                          number(m, (e.get("candidate_metrics") or {}).get(m)), champ_score,
                          f"**{cell(e.get('decision', '?'))}**", cell(e.get("reason", ""))])
        out += _table(["time", "version", f"{code(metric)}", f"champion's {code(metric)}", "decision", "reason"], table)
    else:
        out += ["—"]
    out += ["", "Every decision is also kept as JSON: version tag `promotion.decision`, model tag `promotion.log` "
                "(the recent ones) and artifact `promotion_log.json` of each registration run."]
    return "\n".join(out).rstrip() + "\n"
