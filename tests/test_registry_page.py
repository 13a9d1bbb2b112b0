"""pipelines.registry_page: the Markdown a person browsing the MLflow registry reads, checked as text.

Two decisions of a model ``vit-fm``: v1 (first, became champion) and v2 (promoted over v1 by
test_acc 0.9 vs 0.8, margin 0.01), with v2's facts (hybrid family, dataset on S3, a training run
with an attention picture).
"""

from __future__ import annotations

import pytest

from pipelines import registry_page as page

E1 = {"time": "2026-03-01T10:00:00.000+00:00", "model": "vit-fm", "candidate_version": "1", "champion_before": None,
      "champion_after": "1", "decision": "first", "reason": "no champion yet: the first registered version becomes champion",
      "metric": "test_acc", "mode": "max", "margin": 0.0,
      "candidate_metrics": {"test_acc": 0.8, "test_loss": 0.55, "test_count": 1000.0}, "champion_metrics": None,
      "training_run_id": "t1", "registration_run_id": "r1"}
E2 = {"time": "2026-03-02T11:30:00.123+01:00", "model": "vit-fm", "candidate_version": "2", "champion_before": "1",
      "champion_after": "2", "decision": "promoted",
      "reason": "promoted: candidate test_acc 0.900000 vs champion v1 0.800000 (+0.100000 in the higher-is-better direction, margin 0.01)",
      "metric": "test_acc", "mode": "max", "margin": 0.01,
      "candidate_metrics": {"test_acc": 0.9, "test_loss": 0.3, "test_count": 1000.0},
      "champion_metrics": {"test_acc": 0.8, "test_loss": 0.55, "test_count": 1000.0},
      "training_run_id": "t2", "registration_run_id": "r2"}
CARD2 = {"family": "hybrid", "model_name": "vit_tiny_convstem_28", "num_params": 412345, "flops_per_image": 23_400_000.0,
         "image_size": [28, 28], "channels": 1, "num_classes": 10,
         "dataset": {"name": "fashion-mnist", "version": "0123456789abcdef", "digest": "0123456789abcdef" * 4,
                     "uri": "s3://vit-data/datasets/fashion-mnist/0123456789abcdef"},
         "trained_on": {"name": "fashion-mnist", "version": "0123456789abcdef", "uri": "s3://vit-data/datasets/fashion-mnist/0123456789abcdef"},
         "training_run": {"id": "t2", "experiment_id": "7"}, "registration_run": {"id": "r2", "experiment_id": "7"},
         "attention": "attention.png"}

VERSION_PAGE = (
    'Promoted: test_acc 0.9000 vs 0.8000 of champion v1.\n'
    '\n'
    '**Now:** `@candidate` `@champion` — serves as the champion.\n'
    '\n'
    '**Gate decision:** promoted — promoted: candidate test_acc 0.900000 vs champion v1 0.800000 (+0.100000 in the higher-is-better direction, margin 0.01)\n'
    '\n'
    '### Test metrics\n'
    '\n'
    '| metric | v2 (this version) | [v1](#/models/vit-fm/versions/1) (champion at the gate) | difference |\n'
    '|---|---|---|---|\n'
    '| **`test_acc`** (gate) | 0.9000 | 0.8000 | +0.1000 |\n'
    '| `test_loss` | 0.3000 | 0.5500 | −0.2500 |\n'
    '| `test_count` | 1,000 | 1,000 |  |\n'
    '\n'
    "Gate rule: `@champion` moves to a new version when its `test_acc` beats the champion's by more than 0.01 (higher is better), scored on the same test images, each model with its own packaged preprocessing.\n"
    '\n'
    '### Model\n'
    '\n'
    '|  |  |\n'
    '|---|---|\n'
    '| family | `hybrid` |\n'
    '| model name | `vit_tiny_convstem_28` |\n'
    '| parameters | 412,345 (412 k) |\n'
    '| FLOPs / image | 23.4 MFLOPs (forward) |\n'
    '| input | 28×28 pixels, 1 channel |\n'
    '| classes | 10 |\n'
    '\n'
    '### Data\n'
    '\n'
    '|  |  |\n'
    '|---|---|\n'
    '| dataset | `fashion-mnist` |\n'
    '| version | `0123456789abcdef` |\n'
    '| digest (sha256) | `0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef` |\n'
    '| URI | `s3://vit-data/datasets/fashion-mnist/0123456789abcdef` |\n'
    '\n'
    "The test metrics above were scored on this dataset version's test split.\n"
    '\n'
    '### Provenance\n'
    '\n'
    '|  |  |\n'
    '|---|---|\n'
    '| training run | [`t2`](#/experiments/7/runs/t2) |\n'
    '| registration run | [`r2`](#/experiments/7/runs/r2) |\n'
    '| registered | 2026-03-02 10:30:00 UTC |\n'
    '\n'
    '### Attention\n'
    '\n'
    '![attention maps of v2](get-artifact?path=attention.png&run_uuid=t2)\n'
    '\n'
    "Attention of this version on fixed validation images ([attention.png](get-artifact?path=attention.png&run_uuid=t2) in the training run's artifacts).\n"
)

MODEL_PAGE = (
    'Image classifier: a hybrid-family Vision Transformer trained and registered by the ViT pipeline. It takes encoded images (a DataFrame with an `image` column of PNG/JPEG bytes) and returns `label`, `label_name`, `probabilities` and `error` per image.\n'
    '\n'
    'Load the champion: `mlflow.pyfunc.load_model("models:/vit-fm@champion")`.\n'
    '\n'
    '### Champion: [v2](#/models/vit-fm/versions/2)\n'
    '\n'
    '|  |  |\n'
    '|---|---|\n'
    '| model | `vit_tiny_convstem_28` (hybrid family), 412 k parameters, 23.4 MFLOPs/image, 28×28×1 |\n'
    '| **`test_acc`** (gate) | 0.9000 |\n'
    '| `test_count` | 1,000 |\n'
    '| `test_loss` | 0.3000 |\n'
    '| dataset | `fashion-mnist` `0123456789abcdef` |\n'
    '| champion since | 2026-03-02 10:30:00 UTC (over v1) |\n'
    '\n'
    'Newest version (`@candidate`): [v2](#/models/vit-fm/versions/2).\n'
    '\n'
    "Gate: `@champion` moves to a new version when its `test_acc` beats the champion's by more than 0.01 (higher is better) on the same test images; `@candidate` always moves to the newest version.\n"
    '\n'
    '### Last promotions (newest first, 2 of 2)\n'
    '\n'
    "| time | version | `test_acc` | champion's `test_acc` | decision | reason |\n"
    '|---|---|---|---|---|---|\n'
    '| 2026-03-02 10:30:00 UTC | [v2](#/models/vit-fm/versions/2) | 0.9000 | 0.8000 (v1) | **promoted** | promoted: candidate test_acc 0.900000 vs champion v1 0.800000 (+0.100000 in the higher-is-better direction, margin 0.01) |\n'
    '| 2026-03-01 10:00:00 UTC | [v1](#/models/vit-fm/versions/1) | 0.8000 | — | **first** | no champion yet: the first registered version becomes champion |\n'
    '\n'
    'Every decision is also kept as JSON: version tag `promotion.decision`, model tag `promotion.log` (the recent ones) and artifact `promotion_log.json` of each registration run.\n'
)


def test_version_page_of_a_promoted_version():
    assert page.version_markdown(E2, CARD2, {"aliases": ["candidate", "champion"], "replaced_by": None}) == VERSION_PAGE


def test_model_page_with_two_decisions():
    assert page.model_markdown("vit-fm", [E1, E2], {"champion": "2", "candidate": "2"}, CARD2, rows=10) == MODEL_PAGE


def test_first_version_has_nothing_to_compare_with():
    text = page.version_markdown(E1, {}, {"aliases": ["champion"], "replaced_by": None})
    assert text.startswith("First version: test_acc 0.8000; no champion to beat, so it became champion.\n\n"
                           "**Now:** `@champion` — serves as the champion.\n\n"
                           "**Gate decision:** first champion — no champion yet: the first registered version becomes champion\n")
    assert ("| metric | v1 (this version) |\n|---|---|\n| **`test_acc`** (gate) | 0.8000 |\n| `test_loss` | 0.5500 |\n"
            "| `test_count` | 1,000 |\n\nNo champion existed at registration: nothing to compare with.\n") in text
    # no card (a version described from its decision alone): the run ids, unlinked; no picture
    assert "| training run | `t1` (not in this tracking store) |\n| registration run | `r1` (not in this tracking store) |" in text
    assert "### Attention" not in text and "get-artifact" not in text
    assert "| family | `?` |" in text and "### Data\n\n—\n" in text


@pytest.mark.parametrize("status,line", [
    ({"aliases": [], "replaced_by": "3"}, "**Now:** former champion, replaced by v3."),
    ({"aliases": ["candidate"], "replaced_by": None}, "**Now:** `@candidate` — former champion."),
])
def test_status_of_a_former_champion(status, line):
    assert f"\n{line}\n" in page.version_markdown(E2, CARD2, status)


def test_kept_version_and_lower_is_better():
    kept = {**E2, "candidate_version": "3", "champion_before": "2", "champion_after": "2", "decision": "kept",
            "metric": "test_loss", "mode": "min", "margin": 0.0, "reason": "kept champion: ...",
            "candidate_metrics": {"test_loss": 0.35, "test_acc": 0.91}, "champion_metrics": {"test_loss": 0.3, "test_acc": 0.9}}
    text = page.version_markdown(kept, CARD2, {"aliases": ["candidate"], "replaced_by": None})
    assert text.startswith("Not promoted: test_loss 0.3500 vs 0.3000 of champion v2.\n\n"
                           "**Now:** `@candidate` — not promoted; the champion stayed v2.\n\n"
                           "**Gate decision:** not promoted — kept champion: ...\n")
    assert ("| **`test_loss`** (gate) | 0.3500 | 0.3000 | +0.0500 |\n| `test_acc` | 0.9100 | 0.9000 | +0.0100 |\n"
            in text)
    assert "when its `test_loss` beats the champion's by more than 0 (lower is better)" in text


def test_model_page_scores_the_champion_at_its_latest_gate_and_without_a_champion():
    kept = {**E2, "time": "2026-03-03T00:00:00+00:00", "candidate_version": "3", "champion_before": "2",
            "champion_after": "2", "decision": "kept", "reason": "kept champion: worse",
            "candidate_metrics": {"test_acc": 0.85}, "champion_metrics": {"test_acc": 0.905}}
    text = page.model_markdown("vit-fm", [E1, E2, kept], {"champion": "2", "candidate": "3"}, CARD2)
    assert "| **`test_acc`** (gate) | 0.9050 |\n" in text  # the newest score of v2: v3's gate
    assert "| scored | 2026-03-03 00:00:00 UTC, at the gate of v3 |\n" in text
    assert "Newest version (`@candidate`): [v3](#/models/vit-fm/versions/3).\n" in text
    assert ("| 2026-03-03 00:00:00 UTC | [v3](#/models/vit-fm/versions/3) | 0.8500 | 0.9050 (v2) | **kept** | "
            "kept champion: worse |\n") in text
    assert "### Last promotions (newest first, 3 of 3)" in text
    assert "### Last promotions (newest first, 2 of 3)" in page.model_markdown("vit-fm", [E1, E2, kept], {}, rows=2)
    empty = page.model_markdown("vit-fm", [], {})
    assert "No champion yet.\n" in empty and "### Last promotions (newest first, 0 of 0)\n\n—\n" in empty


def test_long_logs_drop_rows_to_fit_the_registry_limit():
    entries = [{**E2, "candidate_version": str(i), "reason": "r" * 400} for i in range(40)]
    text = page.model_markdown("vit-fm", entries, {"champion": "39"}, CARD2, rows=40)
    assert len(text) <= page.MAX_CHARS
    shown = int(text.split("### Last promotions (newest first, ")[1].split(" of 40)")[0])
    assert 1 < shown < 40 and text.count("| [v") == shown and "[v39](#/models/vit-fm/versions/39)" in text
    assert page.clip("line\n" * 30, 80) == "line\n" * 6 + "\n*(cut to fit the registry's description limit)*\n"
    assert page.clip("short\n", 80) == "short\n"


def test_table_cells_and_code_spans_are_escaped():
    entry = {**E2, "reason": "a | b\nc", "model": "m"}
    row = page.model_markdown("m", [entry], {})
    assert "| a \\| b c |" in row
    assert page.code("a`b") == "`` a`b ``" and page.cell("x|y\\z") == "x\\|y\\\\z"


def test_no_credentials_reach_a_description():
    leaky = {**CARD2, "dataset": {**CARD2["dataset"], "uri": "https://user:s3cr3t@data.example/ds?X-Amz-Signature=abc"},
             "trained_on": {"name": "other", "version": "v0", "uri": "https://tok3n@data.example/old"}}
    text = page.version_markdown(E2, leaky, {"aliases": [], "replaced_by": None})
    assert "s3cr3t" not in text and "tok3n" not in text and "Signature" not in text and "user" not in text
    assert "| URI | `https://data.example/ds` |" in text
    assert "| trained on | `other` `v0` `https://data.example/old` |" in text


def test_helpers():
    assert page.artifact_url("abc", "maps/attention map.png") == "get-artifact?path=maps%2Fattention+map.png&run_uuid=abc"
    assert page.run_url({"id": "r", "experiment_id": "3"}) == "#/experiments/3/runs/r"
    assert page.run_url({"id": "r", "experiment_id": None}) is None
    assert page.version_url("my model/x", 4) == "#/models/my%20model%2Fx/versions/4"
    assert [page.si(v) for v in (12, 21840, 1.2e9, None)] == ["12", "21.8 k", "1.2 G", "—"]
    assert page.number("test_count", 12.0) == "12" and page.number("test_acc", None) == "—"
    assert page.when("2026-03-02T11:30:00.123+01:00") == "2026-03-02 10:30:00 UTC" and page.when("later") == "later"
