"""Model access by identity: which models a group, team or service token may use.

Rules whose `where` matches the caller apply. A model is refused if an applying rule denies it,
or if some applying rule has an `allow` list and no applying `allow` list contains it. With no
applying rule, every priced model is allowed. Checked before budgets (and on downgrade fallbacks).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .attrs import Attrs, value_matches, where_matches

__all__ = ["AccessRule", "allowed", "refusal", "value_matches"]
from .errors import GatewayError


class AccessRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    where: dict[str, str | list[str]] = Field(description="identity attribute globs; {} applies to everyone")
    allow: list[str] | None = Field(default=None, description="model globs this caller may use")
    deny: list[str] = Field(default_factory=list, description="model globs this caller may not use")


def allowed(rules: list[AccessRule], attrs: Attrs, model: str) -> bool:
    applying = [r for r in rules if where_matches(r.where, attrs)]
    if any(value_matches(model, r.deny) for r in applying):
        return False
    allows = [r.allow for r in applying if r.allow is not None]
    return not allows or any(value_matches(model, a) for a in allows)


def refusal(rules: list[AccessRule], attrs: Attrs, model: str, known_models: list[str]) -> GatewayError:
    """403 naming the models this caller may use, so the fix is obvious."""
    ok = [m for m in known_models if allowed(rules, attrs, m)]
    listed = ", ".join(ok[:40]) + (" ..." if len(ok) > 40 else "") if ok else "none"
    return GatewayError(
        403,
        f"Your identity may not use the model `{model}`. Models you may use: {listed}.",
        type="permission_error",
        code="model_not_allowed",
        param="model",
        extra={"allowed_models": ok},
    )
