"""Dollar budgets for LLM traffic: policy models, window math and the Redis-backed reserve/settle engine."""

from .admission import Admission, BudgetStatus, Decision, ReleaseOutcome, SettleOutcome
from .engine import BudgetEngine
from .money import NANO_PER_USD, nusd_to_usd, usd_to_nusd
from .policy import Budget, BudgetList, BudgetsSection, RateLimit, RateLimitList, load_budgets
from .store import StoreError

__all__ = [
    "Admission",
    "Budget",
    "BudgetEngine",
    "BudgetList",
    "BudgetStatus",
    "BudgetsSection",
    "RateLimit",
    "RateLimitList",
    "Decision",
    "NANO_PER_USD",
    "ReleaseOutcome",
    "SettleOutcome",
    "StoreError",
    "load_budgets",
    "nusd_to_usd",
    "usd_to_nusd",
]
