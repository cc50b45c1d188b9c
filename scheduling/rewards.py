"""`trustmesh-rewards` 1.0: accounts, a workflow's escrow, and payments released by final rounds.

Money model (double entry, no mint): every unit comes into being as the escrow of a workflow
owner, booked against the owner's own account, which may go below zero by what it escrowed (a
debt the owner settles with the platform off chain; no key can create units for itself or for
anyone else). So at every block

    sum(all account balances) + sum(all escrows' remaining) == 0

and the audit checks it. A balance above zero is what a key has earned and may transfer; only
an escrow can take an account below zero.

Actions (canonical-CBOR map {"action": ..., ...}; unknown fields are refused):

  escrow    {workflow_id}
      Only the workflow's owner (trustmesh-workflow record), once per workflow, and only for a
      workflow whose definition has a `rewards` block (fl/rewards_block.py). The escrow holds the
      block's `total`, booked against the owner's account; it keeps the block's terms as they
      were, so a later workflow update cannot change what rounds pay.
  settle    {schedule_id[, payouts]}
      Anyone. Pays the round's `per_round` out of its workflow's escrow by
      rewards_block.split: data contributors by the aggregation weight the round result used,
      compute nodes by tasks done (the node each done task status names), the fee to
      fee_account; a data pot with nobody to pay stays in the escrow (the rule says how much).
      Only when the round result exists and is `final`; once per round; only while the escrow
      still holds per_round and was not refunded. payouts (optional): what the sender
      expects, {key: {data|compute|fee: amount}}; it must equal the rule's payouts exactly, so a
      claim for a key the round does not pay is refused by name.
  refund    {workflow_id}
      Only the workflow's owner, once, after the workflow ended: its last planned round
      (privacy_block.planned_rounds) is final or timed out, or the workflow went quiet (a run
      stopped early, a round stuck in ready): for round_timeout seconds of block time after the
      last moment any of its unfinished rounds (and its latest round) was due to move: the end
      of its collecting window, a task's deadline, a task's last report (`quiet_since`). A
      coordinator that keeps reassigning late tasks keeps its workflow going. Every final round
      must be settled first (while the escrow can pay it), so an owner cannot take back what
      its participants earned. Moves the escrow's remaining back to the owner's account; a
      round that becomes final after that is paid nothing.
  transfer  {recipient, amount}
      From the signer's account to recipient (a public key, not the signer), 1 <= amount <=
      the signer's balance: nobody sends more than they hold.

Records (canonical CBOR):
  account_address(key)        {key, balance}
  escrow_address(workflow)    {workflow_id, owner, terms: {rewards block}, total, remaining, paid,
                               settled: {round: schedule_id}[, refunded]}
  settlement_address(sid)     {schedule_id, workflow_id, round, amount, payouts: {key: {pot: amount}}}

Events: trustmesh/escrow-funded, trustmesh/round-settled, trustmesh/escrow-refunded,
trustmesh/transferred. Only refund reads the block time (BlockInfo), to tell a workflow that went
quiet; a settlement is a function of the round's records only.

The family in parts: rewards_rules.py (names, limits, the rules: pure), rewards_handler.py
(the processor), rewards_client.py (payloads, transactions, the decoder). Every name callers
used from this module before is importable from here.
"""

from __future__ import annotations

from .rewards_client import (  # noqa: F401
    escrow_payload, settle_payload, refund_payload, transfer_payload, make_escrow_transaction,
    make_settle_transaction, make_refund_transaction, make_transfer_transaction, decode_record,
)
from .rewards_handler import RewardsHandler  # noqa: F401
from .rewards_rules import (  # noqa: F401
    FAMILY_NAME, FAMILY_VERSION, NAMESPACE, ACTIONS, FIELDS, POTS, MAX_BALANCE, round_paid, check_claim, over,
    quiet_since, rounds_to_watch, workflow_ended,
)
