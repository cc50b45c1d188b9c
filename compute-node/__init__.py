"""Compute node: the learning core that runs a round's tasks.

    models        torch models built from a workflow's `model` spec (registry of model types)
    model_format  the stored model: canonical safetensors bytes, sha256 digests, verified loads
    datasets      digits / user .npz data, held-out test split, IID and Dirichlet partitions, canary
    training      local_train and evaluate (seeded, deterministic, progress callback)
    strategies    aggregation strategies (FedAvg, PerfFedAvg) behind one interface

Import the submodules directly; this package imports nothing so that light callers stay light.
"""
