"""EntroPIC settings and the `--entropic.*` flags, defined once so a flag means the same in both runtimes.

The flags are generated from the dataclass fields, so the config, the CLI and docs/flags.md cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

LOSS_MODES = ("high_prob", "all_tokens", "covariance")
ESTIMATORS = ("on_policy", "importance_weighted")
IW_LEVELS = ("prefix", "sequence")


@dataclass
class EntroPICConfig:
    """Everything the EntroPIC controller, entropy estimate and loss need.

    Field names are the flag names: `target_entropy` is `--entropic.target_entropy`.
    """

    enable: bool = field(default=False, metadata={"help": "Turn EntroPIC on (off = plain GRPO/PPO loss)."})
    target_entropy: float = field(default=0.1, metadata={"help": "Target token entropy H* in nats (> 0)."})
    target_start: float | None = field(
        default=None, metadata={"help": "Start value of a linear target schedule; None = constant target."}
    )
    target_warmup_steps: int = field(
        default=0, metadata={"help": "Controller updates over which the target moves from target_start to target."}
    )
    kp: float = field(default=1.0, metadata={"help": "Proportional gain on e = H - H*."})
    ki: float = field(default=0.01, metadata={"help": "Integral gain on the running sum of e."})
    alpha_max: float = field(default=1.0, metadata={"help": "Bound on |alpha|; 1 keeps both sample weights >= 0."})
    mode: str = field(
        default="high_prob",
        metadata={"help": "Loss mode: high_prob (official), all_tokens, covariance.", "choices": LOSS_MODES},
    )
    high_prob_threshold: float = field(
        default=0.95, metadata={"help": "high_prob mode: tokens whose current probability exceeds this."}
    )
    estimator: str = field(
        default="importance_weighted",
        metadata={
            "help": "Entropy measured for the controller: on_policy (plain token mean) or "
            "importance_weighted (corrects stale samples; equals the plain mean on fresh ones).",
            "choices": ESTIMATORS,
        },
    )
    iw_log_clip: float = field(default=2.0, metadata={"help": "Truncation of the log prefix weight to [-c, c]."})
    iw_level: str = field(
        default="prefix",
        metadata={"help": "Importance weight per token prefix or per whole sequence.", "choices": IW_LEVELS},
    )
    min_ess_fraction: float = field(
        default=0.5,
        metadata={"help": "Blend toward the plain mean as ESS/tokens falls below this; 0 = never blend."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a readable message on an impossible setting."""
        if not math.isfinite(self.target_entropy) or self.target_entropy <= 0:
            raise ValueError(f"--entropic.target_entropy must be > 0, got {self.target_entropy}")
        if self.target_start is not None and not self.target_start > 0:
            raise ValueError(f"--entropic.target_start must be > 0, got {self.target_start}")
        if self.target_warmup_steps < 0:
            raise ValueError(f"--entropic.target_warmup_steps must be >= 0, got {self.target_warmup_steps}")
        if not 0 < self.alpha_max <= 1:
            raise ValueError(f"--entropic.alpha_max must be in (0, 1], got {self.alpha_max}")
        if self.kp < 0 or self.ki < 0:
            raise ValueError(f"--entropic.kp and --entropic.ki must be >= 0, got {self.kp}, {self.ki}")
        if self.mode not in LOSS_MODES:
            raise ValueError(f"--entropic.mode must be one of {LOSS_MODES}, got {self.mode!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--entropic.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.iw_level not in IW_LEVELS:
            raise ValueError(f"--entropic.iw_level must be one of {IW_LEVELS}, got {self.iw_level!r}")
        if not 0 < self.high_prob_threshold < 1:
            raise ValueError(f"--entropic.high_prob_threshold must be in (0, 1), got {self.high_prob_threshold}")
        if not self.iw_log_clip > 0:
            raise ValueError(f"--entropic.iw_log_clip must be > 0, got {self.iw_log_clip}")
        if not 0 <= self.min_ess_fraction <= 1:
            raise ValueError(f"--entropic.min_ess_fraction must be in [0, 1], got {self.min_ess_fraction}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> EntroPICConfig:
        """Build from a namespace filled by `add_entropic_args` (flat dotted or nested `args.entropic`).

        `overrides` are preset values; a flag the user typed wins over them.
        """
        return dataclass_from_args(cls, args, "entropic", overrides)


def dataclass_from_args(cls, args: argparse.Namespace, group: str = "", overrides: dict | None = None):
    """An instance of dataclass `cls` from `args`: a typed flag wins over `overrides`, which win over defaults.

    With a `group`, field `x` is read from `args.<group>.x` (OpenRLHF's hierarchize nests dotted flags)
    or from the flat `"<group>.x"` our parsers store; without one, from `args.x`. Flags added by
    `add_dataclass_flags` default to None, which is how an untyped flag is told apart.
    """
    nested = getattr(args, group, None) if group else None
    overrides = overrides or {}
    values = {}
    for f in dataclasses.fields(cls):
        if nested is not None:
            value = getattr(nested, f.name, None)
        else:
            value = getattr(args, f"{group}.{f.name}" if group else f.name, None)
        if value is not None:
            values[f.name] = value
        elif f.name in overrides:
            values[f.name] = overrides[f.name]
    return cls(**values)


def _str2bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_dataclass_flags(group, cls, flag_of: Callable[[str], str], dest_of: Callable[[str], str]) -> None:
    """Add one flag per field of dataclass `cls` to `group` (a parser or argument group).

    Help, choices, metavar and extra spellings (`aliases`) come from each field's metadata; the
    dataclass default is shown in the help. A field without help is set by code, not by a flag.
    Every flag defaults to None, so `dataclass_from_args` can tell a typed flag from a preset. Booleans work bare (`--resume`) and as `--resume false`.
    """
    defaults = cls()
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        names = [flag_of(f.name), *f.metadata.get("aliases", ())]
        help_text = f"{f.metadata['help']} (default: {getattr(defaults, f.name)})".replace("%", "%%")
        type_name = f.type.split(" ")[0]
        if type_name == "bool":
            group.add_argument(*names, dest=dest_of(f.name), nargs="?", const=True, default=None, type=_str2bool,
                               help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str}[type_name]
        if "None" in f.type:
            kind = _optional(kind)
        choices = f.metadata.get("choices")
        metavar = f.metadata.get("metavar", None if choices else type_name.upper())
        action = _StoreOnce if len(names) > 1 else "store"
        group.add_argument(*names, dest=dest_of(f.name), type=kind, default=None, choices=choices, metavar=metavar,
                           action=action, help=help_text)


class _StoreOnce(argparse.Action):
    """Store a setting that has several spellings, refusing it twice (which one should win is a guess)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_spellings_seen", {})
        if self.dest in seen:
            parser.error(f"{seen[self.dest]} and {option_string} are one setting; give it once")
        seen[self.dest] = option_string
        setattr(namespace, self.dest, values)


def add_entropic_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add every `--entropic.<field>` flag of EntroPICConfig to `parser`; returns the argument group."""
    group = parser.add_argument_group(
        "EntroPIC (shared by the embedded and cluster runtimes)",
        "Defaults shown are the library's; a --preset may set other values, and a typed flag wins over both.",
    )
    add_dataclass_flags(group, EntroPICConfig, lambda name: f"--entropic.{name}", lambda name: f"entropic.{name}")
    return group


# Names of the metrics the core produces. TensorBoard tags use them as written; metrics.jsonl uses
# the part after the slash. The runtimes' own names (rollout, perf, eval) are in reporting.metrics.
class Metric:
    ALPHA = "entropic/alpha"
    ENTROPY = "entropic/entropy"
    ENTROPY_IW = "entropic/entropy_iw"
    ENTROPY_TARGET = "entropic/target_entropy"
    ESS = "entropic/ess"
    ESS_FRACTION = "entropic/ess_fraction"
    P_TERM = "entropic/p_term"
    I_TERM = "entropic/i_term"
    NONFINITE_SKIPPED = "entropic/nonfinite_skipped"
    ADJUSTED_FRACTION = "entropic/adjusted_fraction"
    CLIP_FRACTION = "train/clip_fraction"
    POLICY_LOSS = "train/policy_loss"
