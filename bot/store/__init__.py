"""The durable store: what the bot must not lose or do twice. Import it from here.

`records` holds the plain records; `store` the store's queries; `backends` SQLite (the
embedded default) and PostgreSQL (replicas); `migrations` the schema.
"""

from bot.store.migrations import SchemaTooNew
from bot.store.records import (
    FINISHED,
    Delivery,
    Job,
    Lock,
    LockAttempt,
    PlanApproval,
    Run,
    RunnerLease,
    RunnerToken,
    SavedPlan,
    project_key,
    repo_key,
)
from bot.store.store import ServeLock, Store, StoreInUse, StoreRetry

__all__ = [
    "FINISHED",
    "Delivery",
    "Job",
    "Lock",
    "LockAttempt",
    "PlanApproval",
    "Run",
    "RunnerLease",
    "RunnerToken",
    "SavedPlan",
    "SchemaTooNew",
    "ServeLock",
    "Store",
    "StoreInUse",
    "StoreRetry",
    "project_key",
    "repo_key",
]
