"""All federation families, for one processor process (`trustmesh processors`)."""

from __future__ import annotations

from trustmesh.ledger.processor import TransactionHandler

from .federation import FederationHandler
from .peers import PeerHandler
from .rewards import RewardsHandler
from .schedule import ScheduleHandler
from .workflow import WorkflowHandler


def federation_handlers() -> list[TransactionHandler]:
    return [WorkflowHandler(), PeerHandler(), FederationHandler(), ScheduleHandler(), RewardsHandler()]
