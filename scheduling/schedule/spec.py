"""trustmesh-schedule's names and limits: actions and their fields, task kinds, bounds; the rules,
the builders and the tests read them here."""

from __future__ import annotations

import re

from trustmesh.fl import screening

from .. import layout


FAMILY_NAME = layout.SCHEDULE_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.SCHEDULE_NS

ACTIONS = ("assign", "report", "report_many", "reassign", "round_result", "reveal_noise", "drop_update",
           "secagg_keys", "secagg_shares", "secagg_unmask")
from ..definition_tasks import TASK_KINDS  # noqa: E402,F401  (the definition's, one list)
REPORT_STATUSES = ("running", "done", "failed")
DEFAULT_DEADLINE_SECONDS = 300
MAX_DEADLINE_SECONDS = 7 * 24 * 3600
MAX_QUEUE_SKEW = 2
MAX_METRICS = 32
MAX_REASON_CHARS = 500
# reports one report_many carries: a compute node's trainings of one round made together (its
# batch of up to 64 is ~20 KB of payload, well inside the family's 64 KiB)
MAX_REPORTS_PER_TRANSACTION = 64
MAX_REJECT_REASON_CHARS = screening.MAX_REASON_CHARS  # per rejected update in a round result
# a round result's optional `privacy` record (fl/dp_round.py writes it; the audit recomputes it)
PRIVACY_FIELDS = ("epsilon", "delta", "noise_multiplier", "clipping_norm", "noise_std", "clipped",
                  "next_clipping_norm")

# prefixes that cover every record of one kind (inputs/outputs of transactions whose exact
# addresses depend on state the client has not read)
TASK_STATUS_PREFIX = NAMESPACE + layout.TASK_STATUS
NODE_LOAD_PREFIX = NAMESPACE + layout.NODE_LOAD

TASK_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,199}\Z")
METRIC_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,63}\Z")

_FIELDS = {
    "assign": ({"schedule_id"}, {"deadline_seconds"}),
    "report": ({"schedule_id", "task_id", "status"},
               {"output_digest", "metrics", "attempt", "reason", "base_model_digest"}),
    "report_many": ({"schedule_id", "reports"}, set()),  # reports: [report's fields but schedule_id]
    "reassign": ({"schedule_id", "task_id"}, set()),
    "round_result": (
        {"schedule_id", "global_model_digest", "participants", "aggregation_weights", "metrics"},
        {"task_id", "rejected", "server_state_digest", "privacy", "contributions"},
    ),
    "reveal_noise": ({"schedule_id", "noise_seed"}, set()),
    "drop_update": ({"schedule_id", "task_id"}, set()),
    "secagg_keys": ({"schedule_id", "c_pk", "s_pk"}, set()),
    "secagg_shares": ({"schedule_id", "self_commitment", "sealed", "digests"}, set()),
    "secagg_unmask": ({"schedule_id", "shares"}, set()),
}
_RANK = {"assigned": 0, "running": 1, "done": 2, "failed": 2, "dropped": 2}
# what a dependency may be for its dependents to go ahead: done, or (a securely aggregated
# round's local_train past its deadline) dropped, its upload left out and its masks removed
SETTLED = ("done", "dropped")
