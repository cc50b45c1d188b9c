"""trustmesh-workflow 1.0: the registry of workflow definitions.

A workflow definition (its fields, limits and rules: definition_checks.py) says which tasks run in
which order, which model with which hyperparameters, how the data is split and, for a federated
workflow, which nodes take part. The processor checks it with `validate_definition`; clients
check it against the published JSON Schema too (`check_definition`, workflow_schema.py).

Node identities on chain are compressed secp256k1 public keys. Files may name nodes instead
("iot-1"); `resolve_node_names` maps names to keys before deploying and the processor refuses
names with a message saying so.

Payloads (canonical CBOR maps):

    {"action": "deploy", "definition": {...}}
    {"action": "update", "definition": {...}, "expected_version": int}
    {"action": "register_group", "group_id": id, "members": [keys], "part": int, "parts": int}

"deploy" creates the workflow (its id must be free); the signer becomes its owner, version 1.
"update" replaces the definition: only the owner may, and expected_version must equal the
stored version (optimistic concurrency: a stale writer is refused, not merged); version + 1.

"register_group" adds a part of a *participant group*, the signer's list of up to
MAX_GROUP_MEMBERS participant keys registered in parts of up to MAX_GROUP_PART_MEMBERS, in order;
complete once part == parts, then immutable (workflow_groups.py has its rules). A definition
lists up to MAX_PARTICIPANTS keys in federation.participant_nodes, or names one of its owner's
complete groups in federation.participant_group instead (exactly one of them); deploy and update
then require expected_nodes == the group's size and the coordinator among its members, and copy
the members into the record's "participants".

State, at `layout.workflow_address(workflow_id)`:

    {"workflow_id", "owner": signer public key, "version": int >= 1, "definition": {...}
     [, "participants": [keys]: the members of definition.federation.participant_group]}

and at `layout.participant_group_address(owner, group_id)`:

    {"group_id", "owner", "parts", "received": parts registered so far, "members": [keys]}

Events "trustmesh/workflow-deployed" and "trustmesh/workflow-updated", attributes
workflow_id, version, owner (register_group emits none). Transaction inputs and outputs: the
workflow address (inputs also the group address where the definition names a group); a
register_group part: its group's address.

The family in parts: definition.py (its parts: definition_checks.py, definition_stored.py, definition_fields.py, definition_tasks.py) the rules of a
definition and the accessors other families and the nodes read it through; workflow_handler.py
the deploy and update rules and the processor; workflow_client.py payloads, transactions and
node names; workflow_groups.py the participant-group rules; workflow_schema.py strict JSON and
the JSON Schema. Every name callers used from
this module before is importable from here.
"""

from __future__ import annotations

from .definition import (  # noqa: F401
    DATASETS, DEFAULT_TRAIN_ON, MAX_BATCH_SIZE, MAX_CLASSES, MAX_DESCRIPTION, MAX_EPOCHS, MAX_GROUP_MEMBERS,
    MAX_GROUP_PART_MEMBERS, MAX_GROUP_PARTS, MAX_HIDDEN_LAYERS, MAX_INPUT_DIM, MAX_LAYER_WIDTH, MAX_NAME,
    MAX_PARTICIPANTS, MAX_ROUND_TIMEOUT, MAX_ROUNDS, MAX_SEED, MAX_TASKS, MODEL_CHECKS, OPTIMIZERS, PARTITIONS,
    TASK_KINDS, TRAIN_ON, DefinitionError, is_federated, participant_group, train_on,
    validate_definition,
)
from .workflow_client import (  # noqa: F401
    check_grouped_definition, decode_record, deploy_payload, make_deploy_transaction, make_register_group_transaction,
    make_register_group_transactions, make_update_transaction, needs_group, node_names, register_group_payload,
    resolve_node_names, update_payload,
)
from .workflow_groups import group_id_for, split_parts  # noqa: F401
from .workflow_handler import (  # noqa: F401
    ACTIONS, EVENT_DEPLOYED, EVENT_UPDATED, FAMILY_NAME, FAMILY_VERSION, NAMESPACE, WorkflowHandler,
)
from .workflow_schema import (  # noqa: F401
    IDENTIFIER_PATTERN, SCHEMA_FILE, check_definition, load_definition, load_schema, parse_definition,
    schema_errors,
)
