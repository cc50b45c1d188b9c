"""A workflow definition: its rules, checked once, and the accessors everything reads it through.

A workflow definition (what `workflows/*.json` hold; the same map goes on chain, CBOR-encoded)
says which tasks run in which order, which model with which hyperparameters, how the data is
split and, for a federated workflow, which nodes take part. Its published JSON Schema is
`scheduling/workflow.schema.json` (draft 2020-12; workflow_schema.py); `validate_definition`
holds every rule of that schema plus the ones a schema cannot express (the task graph is
acyclic, dependencies exist, min_nodes_required <= expected_nodes, ...), with every limit named
once. The workflow family runs it at deploy and update (pure Python, no jsonschema in
apply()); clients run both (`check_definition`). Other families read a stored definition
through the accessors (federation_config, task_order, train_on, ...), which trust what deploy
checked and refuse, with InvalidTransaction, a record that could not have passed.

Definition (unknown fields are refused at every level, so a typo never passes silently):

    workflow_id      identifier ([A-Za-z0-9][A-Za-z0-9._-]{0,63})
    name             1..128 characters, not blank;  description  optional, <= 4096 characters
    tasks            1..64 of {id: identifier, kind: local_train|aggregate|evaluate|preprocess,
                     depends_on: [task ids]}: unique ids, known dependencies, no cycle
    model            {type: "mlp", input_dim, hidden: [ints], num_classes}; `type` is an open
                     enum: a new type adds an entry to MODEL_CHECKS and a branch to the schema
    hyperparameters  {epochs, batch_size, learning_rate > 0, optimizer: sgd|adam, seed}
    strategy         {name, parameters...}: names and parameter bounds from fl/strategies/
    update_checks    optional, fl/screening.py;  privacy  optional, fl/privacy_block.py;
    secure_aggregation  optional, fl/secagg_block.py;  rewards  optional, fl/rewards_block.py
    data             {dataset: digits|npz, partition: {kind: iid, seed} |
                     {kind: dirichlet, alpha > 0, seed}, test_fraction in (0, 1)}
    federation       {coordinator_node, participant_nodes | participant_group, expected_nodes,
                     min_nodes_required, round_timeout (whole seconds), rounds, train_on:
                     compute|iot (optional, default "compute": where local training runs)}

Federated vs single-node: with `federation` the workflow needs `strategy` and
`data.partition`, a local_train task, an aggregate task that depends (directly or through other
tasks) on a local_train, and an evaluate task. Without it (single-node) it needs a local_train
task and may not hold an aggregate task; `strategy` and `data.partition` may be left out (they
are checked when present).

The coordinator is one of the participants: it is an IoT node with data of its own that also
opens each round, so `participant_nodes` is exactly the set of nodes that may submit,
`expected_nodes == len(participant_nodes)` and nobody is counted twice. Node identities on
chain are compressed secp256k1 public keys (66 lowercase hex, a point on the curve); files may
name nodes instead ("iot-1") until `resolve_node_names` maps them to keys.

Participants are listed in one of two ways, exactly one per definition:
- `participant_nodes`: up to MAX_PARTICIPANTS keys in the definition itself (its payload must fit
  MAX_PAYLOAD_BYTES);
- `participant_group`: the id of a *participant group* of up to MAX_GROUP_MEMBERS keys that the
  workflow's owner registered on chain beforehand, in parts of at most MAX_GROUP_PART_MEMBERS
  (trustmesh-workflow register_group; the rules: workflow_groups.py). At deploy and update the
  family reads the group, requires it complete, `expected_nodes` equal to its size and the
  coordinator among its members, and copies the member list into the workflow record
  ("participants"), where open_round (federation_config) and the readers take it from.
`trustmesh workflow deploy` / `trustmesh run` turn a file listing more than MAX_PARTICIPANTS
participant_nodes into such a group automatically.

Numbers: integers must be integers (5, not 5.0; never booleans); NaN and infinities are refused.
Canonical CBOR keeps floats exact, so the stored definition equals the submitted one.

The definition in parts: definition_checks.py (validate_definition, its limits and enums: every
rule, pure), definition_stored.py (the typed accessors on a stored definition), with the checks
of single values in definition_fields.py and the task graph's in definition_tasks.py. Every name
callers used from this module before is importable from here.
"""

from __future__ import annotations

from .definition_checks import (  # noqa: F401
    DATASETS, DEFAULT_TRAIN_ON, MAX_BATCH_SIZE, MAX_CLASSES, MAX_DESCRIPTION, MAX_EPOCHS, MAX_GROUP_MEMBERS,
    MAX_GROUP_PART_MEMBERS, MAX_GROUP_PARTS, MAX_HIDDEN_LAYERS, MAX_INPUT_DIM, MAX_LAYER_WIDTH, MAX_NAME,
    MAX_PARTICIPANTS, MAX_ROUND_TIMEOUT, MAX_ROUNDS, MAX_SEED, MODEL_CHECKS, OPTIMIZERS, PARTITIONS, ROOT, TRAIN_ON,
    validate_definition,
)
from .definition_fields import DefinitionError  # noqa: F401
from .definition_stored import (  # noqa: F401
    federation, federation_config, is_federated, participant_group, privacy, rewards, secure_aggregation,
    stored_definition, strategy, task_order, train_on, update_checks,
)
from .definition_tasks import MAX_TASKS, TASK_KINDS, check_tasks, closures, topological_order  # noqa: F401
