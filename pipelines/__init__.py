"""The ViT training pipeline: prepare, train, tune, evaluate, register, infer and run on Ray.

Each task is a module with typed inputs and outputs; ``python -m pipelines TASK --config FILE``
runs one. See README.md.
"""
