"""`trustmesh-schedule` 1.0: task assignment, task status, node load and round results.

One family, so that a task's completion and its node's queue length change in one transaction.

Actions (canonical-CBOR map {"action": ..., ...}; unknown fields are refused):

  assign        {schedule_id, deadline_seconds?}
      The round (trustmesh-federation) must be "ready" and not yet assigned; anyone may send it.
      Expands the workflow's task DAG into task instances: one per submitted node for each
      local_train task (task_id "<task>:<node key[:16]>", input = that submission's digest), one
      for each aggregate / evaluate / preprocess task. An instance's fetch_dependency_outputs
      lists every instance of every task it depends on *transitively*. local_train instances go
      to the submitting IoT node itself when federation.train_on == "iot", else are spread over
      compute nodes by `spread_trainings` (below); everything else goes to registered compute
      nodes (trustmesh-peer index) by `rank_nodes` (below). Both choose among the
      *responsive* ones (`responsive`: seen on chain within peers.LIVENESS_SECONDS of chain time,
      and no deadline missed since) when any is, else among all registered ones (their tasks
      wait for them to return).
  report        {schedule_id, task_id, status: running|done|failed, output_digest?, metrics?,
                 attempt?, reason?, base_model_digest?}
      Only the task's current node; statuses only move forward (assigned -> running ->
      done|failed, assigned -> done|failed); done needs output_digest and every
      fetch_dependency_output done. done: node queue -1, done +1. failed: queue -1, missed +1.
      Lineage: a local_train done report names in base_model_digest the global model it trained
      from, and that must be the one `starting_model` (below) decides for its round: the model
      of the latest earlier round that has a round result, every round in between having timed
      out. base_model_digest is absent when training started from the initial weights (no
      earlier round has a model); it belongs to local_train done reports only.
  report_many   {schedule_id, reports: [{task_id, status, ...report's other fields}, ...]}
      1 to MAX_REPORTS_PER_TRANSACTION reports of one round by one node, distinct tasks: each is
      exactly the report it lists (same fields, same rule), applied in order, each seeing what
      the earlier ones wrote; one invalid report makes the whole transaction invalid, its message
      saying which. A compute node sends the trainings of a round it made together this way: one
      transaction through the validator instead of one each. The audit reads each as a report.
  reassign      {schedule_id, task_id}
      Anyone, once chain time is past the task's deadline and the task is not done (and, for a
      task that is not failed, once its dependencies are done: a task waiting for inputs cannot
      be late), or at any time after it failed. The next node by `rank_nodes` among the
      *responsive* registered compute nodes other than the node that missed (which gets missed
      +1, queue -1, last_missed = chain time): a node not seen on chain (heartbeat, register,
      update) within peers.LIVENESS_SECONDS of chain time, or seen last before a deadline it
      missed, is never chosen, nor is the node that missed. A *failed* task goes back to its
      own node only when that node is responsive and no other node is. With no responsive
      candidate the transaction is refused ("no live compute node to take task ...; it
      stays with ..."): the task keeps its node and attempt, and the coordinator tries again
      later. local_train on an IoT node's own data (train_on "iot") cannot move: the same IoT
      node gets a new attempt, as it is no compute node and sends no heartbeats.
  round_result  {schedule_id, global_model_digest, participants, aggregation_weights, metrics,
                 task_id?, rejected?, server_state_digest?}
      From the node of the (final) aggregate task, after that task reported done with the same
      digest. rejected: {participant: reason} for updates the update checks refused
      (fl/screening.py) or a robust rule left out (a Krum that chose another); each has weight 0.
      A reason screening.failed_update_check recognizes (an update check's) adds one `rejected`
      to that participant's node load record (reputation: a participant whose updates keep
      failing the checks shows it); an honest update a rule merely did not choose counts nothing.
      server_state_digest: the sha256 of the state a
      server optimizer (fl/strategies/fedopt.py) leaves for the next round. Both are stored in
      the result only when present. privacy: what a DP round spent and used (PRIVACY_FIELDS;
      epsilon required). The round is final once the result exists and every evaluate instance
      is done, whichever comes last.
  reveal_noise  {schedule_id, noise_seed}
      From the round's coordinator, once every local_train of the round is done: the seed whose
      sha256 it committed to when opening the round (federation noise_commitment), so the
      aggregator's DP noise was fixed before any update existed. Stored at
      noise_seed_address(sid) {schedule_id, noise_seed, revealed_at}; event trustmesh/noise-revealed.

Deadlines (chain time, BlockInfo): a task without dependencies gets chain_time +
deadline_seconds; a task with dependencies first gets chain_time + deadline_seconds * (1 + its
depth) as an estimate, and chain_time + deadline_seconds again when its last dependency is done.

Scoring (integers and exact fractions only, so every validator ranks alike):

    points      = clamp(cpu_cores, 1, 256) + clamp(memory_mb // 1024, 0, 1024)
    reliability = (done + 1) / (done + missed + 1)
    score       = points * reliability / (queue + 1)

Only nodes whose queue is at most the smallest queue among the candidates + MAX_QUEUE_SKEW are
eligible (so an idle node is never passed over for long), highest score first, ties broken by
sha256(schedule_id + node key) ascending. Assign updates the simulated queues after every
instance, so one transaction spreads its instances.

A round's local_train instances (train_on "compute") are spread by capacity, not by queue:

    capacity    = points * reliability   (the score at queue 0)

each next one goes to the node with the least (instances of this round it holds + 1) / capacity,
ties as above. They start from the previous round's model, so a node's queue of the workflow's
earlier rounds is empty before they can run; ranked by queue, all of a round's trainings went
to the node that was not still training the last round, and the round trained on one core.

Records (canonical CBOR):
  assignments_address(sid)  {schedule_id, workflow_id, round, train_on, deadline_seconds,
                              order: [task_id, ...] (topological; canonical CBOR sorts map keys),
                              tasks: {task_id: {kind, task, node, inputs, fetch_dependency_outputs,
                                                deadline, attempt[, data_owner, samples]}}}
  task_status_address(sid, task_id)
                            {schedule_id, task_id, status, node, attempt, deadline, history:
                              [{status, node, attempt, at[, output_digest | reason]}]
                              [, output_digest, base_model_digest, metrics, reason]}
  node_load_address(key)    {node, queue, done, missed[, last_missed][, rejected]}  (last_missed:
                            chain time of its latest missed deadline; rejected: how many of its
                            updates round results name as failing an update check)
  round_result_address(sid) {schedule_id, workflow_id, round, aggregate_task, global_model_digest,
                              participants, aggregation_weights, metrics, reported_by,
                              recorded_at, final[, rejected][, server_state_digest][, finalized_at, evaluations:
                              {task_id: {output_digest, metrics}}]}

Events: trustmesh/task-assigned, trustmesh/round-scheduled, trustmesh/task-running,
trustmesh/task-done, trustmesh/task-failed, trustmesh/task-reassigned, trustmesh/round-result,
trustmesh/round-finalized.
"""

from __future__ import annotations

# The family in parts, each small: spec (names, limits), checks (payload fields), placement
# (which node takes a task), task_graph (DAG expansion), lineage (which model a round starts
# from), handler with reports and private_rounds (the processor's rules), client (builders,
# decoder). Every name callers used from the single module before is importable from here.
from .spec import (  # noqa: F401
    FAMILY_NAME, FAMILY_VERSION, NAMESPACE, ACTIONS, TASK_KINDS, REPORT_STATUSES,
    DEFAULT_DEADLINE_SECONDS, MAX_DEADLINE_SECONDS, MAX_QUEUE_SKEW, MAX_METRICS, MAX_REASON_CHARS,
    MAX_REJECT_REASON_CHARS, MAX_REPORTS_PER_TRANSACTION, PRIVACY_FIELDS, TASK_STATUS_PREFIX, NODE_LOAD_PREFIX,
    TASK_ID, METRIC_NAME, SETTLED,
)
from .placement import (  # noqa: F401
    resource_points, empty_load, responsive, node_score, capacity, tie_break, rank_nodes, spread_trainings,
)
from .lineage import (  # noqa: F401
    LineageUnknown, StartingModel, starting_model, lineage_problem,
)
from .handler import (  # noqa: F401
    ScheduleHandler,
)
from .client import (  # noqa: F401
    assign_payload, report_fields, report_payload, report_many_payload, reassign_payload, round_result_payload,
    make_secagg_keys_transaction, make_secagg_shares_transaction, make_secagg_unmask_transaction,
    make_drop_update_transaction,
    reveal_noise_payload, make_reveal_noise_transaction, make_assign_transaction,
    make_report_transaction, make_report_many_transaction, make_reassign_transaction, make_round_result_transaction,
    tasks_of_node,
    decode_record, _encode,
)
