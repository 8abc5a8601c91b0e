"""Algorithm presets: named settings of the GRPOConfig / PolicyLossConfig fields that make an algorithm from the
literature (`--algorithm_preset`).

    config = apply_algorithm_preset(GRPOConfig(...), "dapo", keep={"policy.clip_eps_high"})

Precedence: a field named in `keep` (on the command line: every flag given explicitly, on it or in a flagfile) keeps
its value; the preset sets the others it names; the rest keep the config's (default) values. Keys are GRPOConfig
field names, "policy.<field>" for the PolicyLossConfig ones.

  toolrl:  the ToolRL recipe, i.e. the defaults (GRPO, token-mean, clip 0.2, KL 0.001 in the reward).
  dr_grpo: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv
           2503.20783, sec. 3.2; TRL loss_type="dr_grpo" with scale_rewards=False): no std normalisation of the
           group advantages, token sums over a constant (the response budget) instead of each response's length.
  dapo:    DAPO (Yu et al. 2025, arXiv 2503.14476, Algorithm 1 and Table 3; veRL recipe/dapo): clip-higher
           (eps_low 0.2, eps_high 0.28), dynamic sampling, token-level loss, overlong filtering (truncated responses
           masked) and the soft overlong punishment over the last fifth of the budget (the paper's 4,096 of 20,480
           tokens, factor 1), no KL term and no entropy bonus.
  gspo:    GSPO (Zheng et al. 2025, arXiv 2507.18071, sec. 5.1; TRL paper index): the sequence-level ratio with
           the paper's clip range (eps_low 3e-4, eps_high 4e-4), the sequence mean of the sequence losses, no KL.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Collection, Iterator, Mapping

ALGORITHM_PRESETS: Mapping[str, Mapping[str, Any]] = {
    "toolrl": {},
    "dr_grpo": {"normalize_adv_by_std": False, "policy.agg_mode": "seq-mean-token-sum-norm"},
    "dapo": {"dynamic_sampling": True, "mask_truncated": True,
             "overlong_buffer": lambda fields: max(1, fields["max_response_length"] // 5),
             "overlong_penalty_factor": 1.0, "kl_coef": 0.0, "policy.kl_loss_coef": 0.0, "policy.entropy_coef": 0.0,
             "policy.clip_eps": 0.2, "policy.clip_eps_high": 0.28, "policy.agg_mode": "token-mean"},
    "gspo": {"policy.importance_sampling_level": "sequence", "policy.clip_eps": 3e-4, "policy.clip_eps_high": 4e-4,
             "policy.agg_mode": "seq-mean-token-mean", "kl_coef": 0.0},
}


def preset_fields(name: str, fields: Mapping[str, Any], keep: Collection[str] = ()
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GRPOConfig fields, PolicyLossConfig fields) that preset `name` sets, except the paths in `keep`. fields: the
    GRPOConfig's top-level field values (a preset value may depend on them, e.g. the overlong buffer as a share of
    the response budget)."""
    if name not in ALGORITHM_PRESETS:
        raise ValueError(f"unknown algorithm_preset {name!r}; choose from {sorted(ALGORITHM_PRESETS)}")
    top, policy = {}, {}
    for path, value in ALGORITHM_PRESETS[name].items():
        if path not in keep:
            owner, _, field = path.rpartition(".")
            (policy if owner == "policy" else top)[field] = value(fields) if callable(value) else value
    return top, policy


def apply_algorithm_preset(config: Any, name: str, keep: Collection[str] = ()) -> Any:
    """`config` (a GRPOConfig) with preset `name`'s fields set, except those in `keep` (module doc). The result is
    validated as a whole (its __post_init__): a combination the preset makes invalid is an error naming the fields
    and the preset."""
    top, policy = preset_fields(name, {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, keep)
    with preset_context(name):
        if policy:
            top["policy"] = dataclasses.replace(config.policy, **policy)
        return dataclasses.replace(config, **top) if top else config


@contextlib.contextmanager
def preset_context(name: str) -> Iterator[None]:
    """Re-raises a ValueError (a config's validation) with the preset it happened under."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{e} (under algorithm_preset {name!r})") from None
