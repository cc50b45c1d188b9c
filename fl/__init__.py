"""The learning core, shared by compute nodes, IoT nodes that train, the audit and the rules.

    models        torch models built from a workflow's `model` spec (registry of model types)
    model_format  the stored model: canonical safetensors bytes, sha256 digests, verified loads
                  (numpy only: IoT nodes verify global models without torch)
    datasets      digits / user .npz data, held-out test split, IID and Dirichlet partitions, canary
    training      local_train and evaluate (seeded, deterministic, progress callback)
    strategies    aggregation strategies behind one registry (strategies/__init__.py); the
                  workflow rules and the JSON schema read their names and parameters from it

Import the submodules directly; this package imports nothing so that light callers stay light.
"""
