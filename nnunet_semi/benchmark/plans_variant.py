"""The smaller CPU configuration of ``--plans-config``: ``<config>_cpu`` in the dataset's plans JSON, with
nnU-Net's ``inherits_from`` (fewer features per stage, a smaller batch, optionally a smaller patch; everything
else, the preprocessed data included, is inherited)."""
from __future__ import annotations

import copy
import json
import os
from typing import Optional, Sequence, Tuple

from nnunet_semi.benchmark.commands import BenchmarkError


def resolve_configuration(plans: dict, name: str, _seen: Tuple[str, ...] = ()) -> dict:
    """A configuration with nnU-Net's ``inherits_from`` resolved (same rule as PlansManager)."""
    if name not in plans["configurations"]:
        raise BenchmarkError(f"configuration '{name}' is not in the plans (available: "
                             f"{', '.join(plans['configurations'])})")
    cfg = copy.deepcopy(plans["configurations"][name])
    parent = cfg.get("inherits_from")
    if parent is not None:
        if parent in _seen:
            raise BenchmarkError(f"circular inherits_from in the plans: {_seen + (name,)}")
        base = resolve_configuration(plans, parent, _seen + (name,))
        base.update(cfg)
        cfg = base
    return cfg


def cpu_configuration_entry(plans: dict, base: str, features_scale: float = 0.5,
                            batch_size: Optional[int] = None,
                            patch_size: Optional[Sequence[int]] = None) -> Tuple[dict, dict]:
    """The plans entry of ``<base>_cpu`` and a description of the change.

    ``<base>_cpu`` = ``{"inherits_from": base, "batch_size": B, "architecture": A}`` where A is the base
    architecture with ``arch_kwargs.features_per_stage`` multiplied by ``features_scale`` (rounded, at
    least 4) and B = ``batch_size`` or min(base batch size, 2). ``patch_size`` (optional) replaces the
    patch (training patches and the sliding window alike); each axis must be a multiple of the
    network's total stride on that axis. Everything else (spacing, normalisation, data_identifier,
    hence the preprocessed data) is inherited unchanged."""
    parent = resolve_configuration(plans, base)
    if "architecture" not in parent or "features_per_stage" not in parent["architecture"].get("arch_kwargs", {}):
        raise BenchmarkError(f"configuration '{base}' has no architecture.arch_kwargs.features_per_stage "
                             f"(plans of nnU-Net < 2.5?); cannot derive a smaller configuration")
    if not 0 < features_scale <= 1:
        raise BenchmarkError("--cpu-features-scale must be in (0, 1]")
    arch = copy.deepcopy(parent["architecture"])
    old_features = list(arch["arch_kwargs"]["features_per_stage"])
    new_features = [max(4, int(round(f * features_scale))) for f in old_features]
    arch["arch_kwargs"]["features_per_stage"] = new_features
    old_bs = int(parent["batch_size"])
    new_bs = int(batch_size) if batch_size else min(old_bs, 2)
    if new_bs < 1:
        raise BenchmarkError("--cpu-batch-size must be >= 1")
    entry = {"inherits_from": base, "batch_size": new_bs, "architecture": arch}
    changes = {"architecture.arch_kwargs.features_per_stage": {"from": old_features, "to": new_features},
               "batch_size": {"from": old_bs, "to": new_bs}}
    if patch_size:
        old_patch = [int(v) for v in parent["patch_size"]]
        new_patch = [int(v) for v in patch_size]
        if len(new_patch) != len(old_patch):
            raise BenchmarkError(f"--cpu-patch-size needs {len(old_patch)} values for '{base}' (its patch is "
                                 f"{old_patch}), got {new_patch}")
        total = [1] * len(old_patch)
        for stride in arch["arch_kwargs"].get("strides", []):
            stride = [stride] * len(total) if isinstance(stride, int) else stride
            total = [t * int(v) for t, v in zip(total, stride)]
        bad = [(p, t) for p, t in zip(new_patch, total) if p < t or p % t]
        if bad:
            raise BenchmarkError(f"--cpu-patch-size {new_patch}: each axis must be a multiple of the network's total "
                                 f"stride {total} (the base patch is {old_patch})")
        entry["patch_size"] = new_patch
        changes["patch_size"] = {"from": old_patch, "to": new_patch}
    change = {"name": f"{base}_cpu", "inherits_from": base, "changes": changes,
              "inherited_unchanged": "everything else, incl. " + ("" if patch_size else "patch_size, ")
                                     + "spacing, normalization, data_identifier "
                                     f"('{parent.get('data_identifier')}': the preprocessed data are reused)",
              "features_scale": features_scale}
    return entry, change


def add_cpu_configuration(plans_file: str, base: str, features_scale: float = 0.5, batch_size: Optional[int] = None,
                          write: bool = True, patch_size: Optional[Sequence[int]] = None) -> dict:
    """Add ``<base>_cpu`` (see :func:`cpu_configuration_entry`) to a plans JSON. Idempotent; refuses to
    replace a different existing definition. Returns the change description."""
    with open(plans_file) as f:
        plans = json.load(f)
    entry, change = cpu_configuration_entry(plans, base, features_scale, batch_size, patch_size)
    name = change["name"]
    existing = plans["configurations"].get(name)
    if existing is not None:
        if existing != entry:
            raise BenchmarkError(f"{plans_file} already has a configuration '{name}' that differs from the one "
                                 f"requested ({json.dumps(existing)[:300]}...). Remove it from the plans or use the same "
                                 f"--cpu-features-scale/--cpu-batch-size/--cpu-patch-size as before.")
        change["status"] = "already present"
    elif write:
        change["status"] = write_configuration(plans_file, name, entry)
    else:
        change["status"] = "would be added"
    change["plans_file"] = os.path.abspath(plans_file)
    change["entry"] = entry
    return change


def write_configuration(plans_file: str, name: str, entry: dict) -> str:
    """Add the configuration ``name`` to a plans JSON (written to a temporary file, then renamed). Returns
    ``"added"``."""
    with open(plans_file) as f:
        plans = json.load(f)
    plans["configurations"][name] = entry
    tmp = plans_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(plans, f, indent=4, sort_keys=False)
    os.replace(tmp, plans_file)
    return "added"
