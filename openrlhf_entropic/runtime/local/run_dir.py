"""A run folder holds exactly one run: its resolved config, metrics, TensorBoard events and checkpoints.

Mixing two runs in one folder silently corrupts both (interleaved curves, a resume that continues
someone else's checkpoint), so a new run refuses a non-empty folder unless told to overwrite it, and
a resume refuses settings that change the algorithm. Checkpoints are written to a temporary folder
and renamed into place, so a kill at any moment leaves the previous complete checkpoint usable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Settings that may differ on --resume: they change logging, bookkeeping or where things run, not the run.
HARMLESS_ON_RESUME = frozenset({
    "steps", "output_dir", "resume", "overwrite", "no_progress", "eval_steps", "eval_n_samples", "eval_k",
    "save_steps", "max_ckpt_num", "ray_address", "ray_dashboard", "ray_num_cpus", "warm_start_cache",
})
COMPLETE_MARK = "trainer_state.json"  # written last into a checkpoint folder
STEP_FOLDER = re.compile(r"^step_(\d+)$")


class RunDirError(RuntimeError):
    """The folder cannot host this run as asked (another run in it, a changed config, no checkpoint)."""


class RunDir:
    """The files of one run under `path`: config.json, metrics.jsonl, events.out.tfevents.*, checkpoints/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.config_file = self.path / "config.json"

    def holds_a_run(self) -> bool:
        """Whether anything a run writes is already here."""
        names = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")
        return any((self.path / name).exists() for name in names) or any(self.path.glob("events.out.tfevents.*"))

    def prepare(self, config: dict, resume: bool, overwrite: bool) -> Path | None:
        """Make the folder ready for this run and return the checkpoint to resume from (None: a fresh start).

        `config` is the resolved settings as plain data ({"run": {...}, "entropic": {...}}); it is
        stored as config.json. Raises RunDirError, naming the problem, instead of mixing runs.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if resume:
            if not self.config_file.is_file():
                raise RunDirError(f"--resume: {self.path} holds no run (no config.json); start it without --resume")
            saved = json.loads(self.config_file.read_text(encoding="utf-8"))
            changed = _algorithm_changes(saved, config)
            if changed:
                raise RunDirError(f"--resume: these settings differ from the run in {self.path}: "
                                  f"{', '.join(changed)}. Resume with the same settings, or start a new run "
                                  "(another --output-dir, or --overwrite).")
            checkpoint = self.latest_checkpoint()
            if checkpoint is None:
                raise RunDirError(f"--resume: {self.checkpoints} holds no complete checkpoint to resume from")
            self.truncate_metrics(_step_of(checkpoint))
        else:
            if self.holds_a_run():
                if not overwrite:
                    raise RunDirError(f"{self.path} already holds a run; pass --resume to continue it or "
                                      "--overwrite to replace it (metrics, events and checkpoints go together)")
                self.clear()
            checkpoint = None
        _write_atomically(self.config_file, json.dumps(config, indent=2))
        return checkpoint

    def clear(self) -> None:
        """Remove everything a run writes here (the folder itself and unrelated files stay)."""
        for name in ("config.json", "metrics.jsonl", "summary.json"):
            (self.path / name).unlink(missing_ok=True)
        for events in self.path.glob("events.out.tfevents.*"):
            events.unlink()
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def truncate_metrics(self, step: int) -> None:
        """Keep only metrics rows up to `step`: a resumed run logs the later steps again, once."""
        if not self.metrics.is_file():
            return
        kept = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line + "\n")
        _write_atomically(self.metrics, "".join(kept))

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names if it is complete, else the newest complete step folder; None if none."""
        latest = self.checkpoints / "latest"
        with contextlib.suppress(OSError):
            named = self.checkpoints / latest.read_text(encoding="utf-8").strip()
            if STEP_FOLDER.match(named.name) and (named / COMPLETE_MARK).is_file():
                return named
        complete = self._complete_checkpoints()
        if complete:
            logger.warning("checkpoints/latest is missing or names an incomplete folder; using %s", complete[-1].name)
        return complete[-1] if complete else None

    @contextlib.contextmanager
    def new_checkpoint(self, step: int, keep: int) -> Iterator[Path]:
        """Yield an empty temporary folder to write checkpoint `step` into; on exit it becomes step_<step>.

        The caller writes COMPLETE_MARK last. Then the folder is renamed into place, `latest` is
        replaced atomically, and all but the newest `keep` complete checkpoints are removed.
        """
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        staging = self.checkpoints / f".step_{step}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        yield staging
        if not (staging / COMPLETE_MARK).is_file():
            raise RuntimeError(f"checkpoint {staging} was not completed ({COMPLETE_MARK} missing)")
        final = self.checkpoints / f"step_{step}"
        if final.exists():  # the same step saved again after a resume: the older copy goes
            shutil.rmtree(final)
        os.rename(staging, final)
        _write_atomically(self.checkpoints / "latest", final.name)
        for old in self._complete_checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.checkpoints.glob(".step_*.tmp"):  # from kills during earlier saves
            shutil.rmtree(leftover, ignore_errors=True)

    def _complete_checkpoints(self) -> list[Path]:
        """Complete step folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        folders = [p for p in self.checkpoints.iterdir() if STEP_FOLDER.match(p.name) and (p / COMPLETE_MARK).is_file()]
        return sorted(folders, key=_step_of)


def _step_of(checkpoint: Path) -> int:
    return int(STEP_FOLDER.match(checkpoint.name).group(1))


def _algorithm_changes(saved: dict, current: dict) -> list[str]:
    """Names of settings that differ between two resolved configs and are not harmless on resume."""
    changed = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if key not in HARMLESS_ON_RESUME and old.get(key) != new.get(key):
                changed.append(f"{section}.{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return changed


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
