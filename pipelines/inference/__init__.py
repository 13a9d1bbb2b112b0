"""Batch inference, in the parts the ``infer`` task puts together: :mod:`.model` (pin a registered
version), :mod:`.inputs` (list what to score), :mod:`.actors` (decode + model actors on Ray Data)
and :mod:`.writer` (exactly-once output, published by a manifest)."""
