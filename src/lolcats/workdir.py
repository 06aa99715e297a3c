"""The work folder of a linearize run: resume identity, partial metrics, checkpoints.

    work = WorkDir(out, resume=True, overwrite=False)   # .NAME.lolcats-work next to `out`
    work.check_identity(identity, fingerprint, source)  # a resumed run: the same model, options, data
    work.begin()                                        # from here on files are written (run.json)
    ppl = work.measured("ppl_teacher", lambda: perplexity(...))   # kept across sessions

It holds ``run.json`` (what the run is: base fingerprint, hashes of its identity), the
``metrics.partial.json`` of what is measured so far (perplexities, samples, elapsed time: a
resumed session reports all sessions; also the softmax layers chosen after stage 1, so a resumed
run keeps them) and one folder of training checkpoints per stage. A resume whose settings differ
only after stage 1 keeps stage 1 and redoes what follows (`redo`). It is
removed once the delta folder is in place. Under torchrun every rank reads it and rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lolcats.digest import json_digest
from lolcats.errors import LinearizeError
from lolcats.fileio import atomic_write_text, make_dirs, read_json
from lolcats.train import distributed

logger = logging.getLogger(__name__)

__all__ = ["WorkDir", "work_dir_for", "RUN_NAME", "PARTIAL_NAME"]

RUN_NAME = "run.json"
PARTIAL_NAME = "metrics.partial.json"

# What each stage's result depends on (keys of the run identity): a resume whose settings differ
# only outside stage 1's keys keeps stage 1 and runs the rest again. Stage 2 trains the model that
# the softmax-layer selection ("keep_softmax", between the stages) leaves.
STAGE_KEYS = {
    "stage1": ("lolcats", "stage1", "loss", "data", "blockwise", "world_size"),
    "stage2": ("lolcats", "stage1", "loss", "data", "blockwise", "world_size", "keep_softmax", "stage2", "lora"),
}
# what a resume with other settings runs again, by the first stage they change (then what follows)
_REDO = (("keep_softmax", {"select", "stage2", "sample"}), ("stage2", {"stage2", "sample"}),
         ("lora", {"stage2", "sample"}))
# the metrics.partial.json entries to forget when a stage (and what follows it) runs again
_PARTIAL_KEYS_OF = {"select": ("softmax_selection", "ppl_softmax_kept", "ppl_stage2", "sample_teacher", "sample"),
                    "stage2": ("ppl_stage2", "sample_teacher", "sample"), "sample": ("sample_teacher", "sample")}
_KEPT_LABELS = (("ppl_teacher", "teacher perplexity"), ("ppl_swap", "perplexity after the swap"),
                ("ppl_stage1", "stage 1"), ("ppl_stage2", "stage 2"))


def work_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.lolcats-work"


def _differing(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    def same(k: str) -> bool:
        return json.dumps(old.get(k), sort_keys=True, default=str) == json.dumps(new.get(k), sort_keys=True, default=str)

    return sorted(k for k in set(old) | set(new) if not same(k))


class WorkDir:
    """The work folder of the run that writes `out` (see the module doc)."""

    def __init__(self, out: str | os.PathLike, *, resume: bool, overwrite: bool, started: float | None = None):
        self.out = Path(out).expanduser().resolve()
        self.path = work_dir_for(self.out)
        self.resume = resume
        self.started = time.perf_counter() if started is None else started
        if not resume and not overwrite and (self.path / RUN_NAME).is_file():
            raise LinearizeError(
                f"an unfinished run for '{self.out}' exists in '{self.path}'; pass --resume to continue it "
                "or --overwrite to start over"
            )
        self.previous: dict[str, Any] | None = read_json(self.path / RUN_NAME) if resume else None
        self.redo: set[str] = set()  # what a resume with other later-stage settings must run again
        self.partial: dict[str, Any] = {}
        self.run: dict[str, Any] = {}
        self.stage_hash: dict[str, str] = {}
        self.earlier_s = 0.0
        self.runs = 1

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- identity (checked before anything is written) -------------------------------------

    def check_identity(self, identity: dict[str, Any], fingerprint: Any, source: Any) -> None:
        """Remember what this run is; a resumed run must be the same one (else LinearizeError)."""
        chash = json_digest(identity)
        self.stage_hash = {stage: json_digest({k: identity.get(k) for k in keys}) for stage, keys in STAGE_KEYS.items()}
        self.run = {"fingerprint": fingerprint, "config_hash": chash, "stage_hash": self.stage_hash,
                    "identity": identity, "source": source}
        old = self.previous
        if old is None:
            return
        if old.get("fingerprint") != fingerprint:
            raise LinearizeError(f"cannot resume: '{self.path}' was made with another base model "
                                 f"({old.get('source')}); start without --resume")
        if old.get("config_hash") == chash:
            return
        diff = _differing(old.get("identity", {}), identity)
        if set(diff) & set(STAGE_KEYS["stage1"]) or "stage_hash" not in old:
            raise LinearizeError(
                f"cannot resume: '{self.path}' was made with other options or data (differs in: {', '.join(diff)}); "
                "use the same options or start without --resume"
            )
        # stage 1 is the same run: keep it, and redo what the changed settings affect
        self.redo = next((redo for key, redo in _REDO if key in diff), {"sample"})
        logger.info("resuming with other %s settings: stage 1 is kept", ", ".join(k for k, _ in _REDO if k in diff)
                    or "sample")

    def meta(self, stage: str) -> dict[str, Any]:
        """Stored in and checked against the checkpoints of `stage`."""
        return {"fingerprint": self.run["fingerprint"], "config_hash": self.stage_hash[stage]}

    # ---- writing ---------------------------------------------------------------------------

    def begin(self) -> None:
        """Read what earlier sessions kept, then (fresh run or redo) write run.json; all ranks."""
        fresh = self.previous is None
        # (a fresh run starts from an empty work folder: nothing partial to read)
        self.partial = (read_json(self / PARTIAL_NAME) or {}) if (self.resume and not fresh) else {}
        distributed.barrier()  # every rank has read the work folder before rank 0 rewrites it
        if fresh or self.redo:
            first = next((stage for stage in ("select", "stage2", "sample") if stage in self.redo), None)
            for key in _PARTIAL_KEYS_OF[first] if first else ():
                self.partial.pop(key, None)
            if distributed.is_main():
                if fresh and self.path.exists():
                    shutil.rmtree(self.path)
                if "stage2" in self.redo:
                    shutil.rmtree(self / "stage2", ignore_errors=True)
                make_dirs(self.path)
                atomic_write_text(self / RUN_NAME, json.dumps(self.run, indent=2, sort_keys=True, default=str))
                if self.redo:
                    atomic_write_text(self / PARTIAL_NAME, json.dumps(self.partial, indent=2, default=str))
        distributed.barrier()
        # time of earlier sessions of this run (each up to its last perplexity or checkpoint: the work kept)
        self.earlier_s = float(self.partial.get("elapsed_s", 0.0))
        self.runs = int(self.partial.get("runs", 0)) + 1

    def resume_message(self) -> str | None:
        """What --resume found (None without --resume)."""
        if not self.resume:
            return None
        if self.previous is None or not self.partial:  # (nothing kept: the same as a fresh run)
            return f"--resume: nothing to resume in {self.path} (no checkpoint yet); starting over"
        kept = [label for key, label in _KEPT_LABELS if key in self.partial]
        return (f"--resume: continuing the run in {self.path} (session {self.runs}"
                + (f"; done: {', '.join(kept)})" if kept else ")"))

    def save_partial(self) -> None:
        self.partial.update(runs=self.runs, elapsed_s=self.earlier_s + time.perf_counter() - self.started)
        if distributed.is_main():
            atomic_write_text(self / PARTIAL_NAME, json.dumps(self.partial, indent=2, default=str))

    def measured(self, key: str, compute: Callable[[], Any]) -> Any:
        """`partial[key]` kept from an earlier session, else `compute()` (then kept)."""
        if key in self.partial:
            return self.partial[key]
        self.partial[key] = compute()
        self.save_partial()
        return self.partial[key]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
