"""Compute node: the service that runs a round's tasks (node.py follows the chain and its task
queue, tasks.py runs preprocess, local_train, aggregate and evaluate, history_recorder.py mirrors
results into CouchDB). The learning code it runs is `trustmesh.fl` (fl/).

Import the submodules directly; this package imports nothing so that light callers stay light.
"""
