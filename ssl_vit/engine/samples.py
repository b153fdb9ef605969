"""`log.sample_keys`: which samples each process consumed, per optimiser step, for an audit.

Each process appends `step<TAB>epoch<TAB>key` per sample to `RUN_DIR/samples/rank-<R>.txt`, in the
order it consumed them, after the step they belong to (with gradient accumulation, a step's lines
are its micro-batches in order) and before that step's checkpoint is written; every line is flushed,
so a killed process loses none that a checkpoint holds. On every (re)start, before training, the
main process cuts every rank file, including those of ranks a smaller process count no longer has,
back to the steps of the checkpoint it resumes from (none on a fresh start). So the files always
list exactly the samples the weights have seen; a step skipped as non-finite consumed its samples
and lists them too.

Per step s, rank 0's lines, then rank 1's, ... give the global order of that step's samples (with
`optim.accum_steps` a, micro-batch by micro-batch: each rank's first B lines of the step, then
the next B).
"""

from __future__ import annotations

import os
from typing import IO

from accelerate import Accelerator

from ssl_vit.errors import CheckpointError
from ssl_vit.rundir import RunDir


def cut_sample_files(run: RunDir, step: int) -> None:
    """Keep the lines of steps <= `step` in every rank file (step 0: remove the files)."""
    for path in run.sample_files():
        if step == 0:
            path.unlink()
            continue
        kept = []
        with path.open() as f:
            for line in f:
                head = line.split("\t", 1)[0]
                if line.endswith("\n") and head.isdigit() and int(head) <= step:
                    kept.append(line)  # a line cut short by a kill has no newline: dropped
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class SampleLog:
    """This process's sample file; a no-op unless `enabled` (every process gets the same flag)."""

    def __init__(self, accelerator: Accelerator, run: RunDir, enabled: bool, step: int) -> None:
        self.path = run.sample_file(accelerator.process_index)
        self.file: IO[str] | None = None
        if accelerator.is_main_process:
            cut_sample_files(run, step)
        if not enabled:
            return
        accelerator.wait_for_everyone()  # no process appends before the cut
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a")
        except OSError as err:
            raise CheckpointError(f"cannot write {self.path}: {err.strerror or err}") from None

    def write(self, step: int, batches: list[tuple[int, list[str]]]) -> None:
        """The keys of `step`'s micro-batches, each with its epoch."""
        if self.file is None:
            return
        self.file.write("".join(f"{step}\t{epoch}\t{key}\n" for epoch, keys in batches for key in keys))
        self.file.flush()

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
