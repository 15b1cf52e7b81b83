"""Model rewrite: which model the engine is asked for.

Order (GIE §1.6): the ``x-gateway-model-name-rewrite`` header if present, else the body's
``model``; then the first matching InferenceModelRewrite rule (the datastore keeps rules in
precedence order: exact before generic, oldest first) picks a target by weight.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from epp.datalayer.datastore import RewriteRule


def weighted_choice(rule: RewriteRule, rng: random.Random) -> str:
    """Weighted-random target of a rule; uniform when every weight is 0."""
    targets = rule.targets
    if len(targets) == 1:
        return targets[0].model
    total = sum(max(t.weight, 0) for t in targets)
    if total <= 0:
        return targets[rng.randrange(len(targets))].model
    x = rng.random() * total
    for t in targets:
        x -= max(t.weight, 0)
        if x < 0:
            return t.model
    return targets[-1].model


def matching_rule(model: str, rules: Sequence[RewriteRule]) -> RewriteRule | None:
    for rule in rules:
        if rule.targets and (not rule.matches or model in rule.matches):
            return rule
    return None


def resolve_target_model(
    incoming: str, header_rewrite: str | None, rules: Sequence[RewriteRule], rng: random.Random
) -> tuple[str, RewriteRule | None]:
    """(target model, the rule that chose it or None)."""
    model = header_rewrite or incoming
    rule = matching_rule(model, rules) if rules else None
    if rule is None:
        return model, None
    return weighted_choice(rule, rng), rule
