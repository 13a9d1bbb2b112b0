"""MLflow *models from code* entry point for the ViT classifier (never imported by the pipeline).

``mlflow.pyfunc.log_model(python_model="pipelines/serving_model.py", ...)`` copies this file into
the model directory; ``mlflow.pyfunc.load_model`` executes it and takes the object it passes to
:func:`mlflow.models.set_model`. Nothing is unpickled: the model's state comes from the artifact
files in :meth:`ViTClassifier.load_context`.

Inside a packaged model the classifier class comes from the copy of ``serving.py`` shipped in the
model's ``code/`` folder (loaded by path under a name unique to that folder, so two models loaded
in one process never share a stale module). When MLflow runs this file at logging time, from the
source tree, there is no such copy and the installed ``pipelines.serving`` is used.
"""

import hashlib
import importlib.util
import sys
from pathlib import Path

import mlflow


def _classifier_class():
    shipped = Path(__file__).resolve().parent / "code" / "serving.py"
    if not shipped.is_file():
        from pipelines.serving import ViTClassifier

        return ViTClassifier
    name = "vit_serving_" + hashlib.sha256(str(shipped).encode()).hexdigest()[:16]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, shipped)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return module.ViTClassifier


mlflow.models.set_model(_classifier_class()())
