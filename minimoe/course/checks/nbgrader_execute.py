"""nbgrader's notebook runner, except that a cell that will not stop costs only that cell.

nbgrader runs a submission cell by cell and, past ``c.Execute.timeout`` seconds, interrupts
the kernel. A student's loop that swallows the interrupt (``except KeyboardInterrupt: pass``,
or a bare ``except:``) keeps the kernel busy; nbgrader then gives up on the whole
submission ("Removing failed assignment": no grades, no feedback). This :class:`Execute`,
which the course's ``nbgrader_config.py`` puts in nbgrader's place, instead

1. records a ``CellTimeoutError`` in that cell (a grade cell scores 0, its feedback says why),
2. restarts the kernel and runs the cells above it again, quietly,
3. and goes on with the next cell, so every other exercise is graded and the feedback is made.

Needs nbgrader (the teacher extra); imported only by nbgrader, through the course config.
"""
from __future__ import annotations

import copy

from jupyter_core.utils import ensure_async, run_sync
from nbclient.exceptions import CellTimeoutError
from nbformat import NotebookNode
from nbgrader.preprocessors import Execute as _NbgraderExecute

__all__ = ["Execute", "STUCK"]

STUCK = ("this cell ran past the time limit ({timeout} s) and ignored the interrupt, so the kernel "
         "was restarted and the cells above it run again; the cells below were graded as usual")


class Execute(_NbgraderExecute):
    """nbgrader's ``Execute``: a cell that ignores the interrupt is scored 0, not the whole submission."""

    def preprocess_cell(self, cell, resources, index):
        try:
            return super().preprocess_cell(cell, resources, index)
        except CellTimeoutError:
            # The kernel never came back from the interrupt (nbclient waited iopub_timeout more).
            self.log.warning("Cell %d did not stop when interrupted: restarting the kernel and "
                             "running the %d cells above it again", index, index)
            cell.outputs.append(NotebookNode(output_type="error", ename="CellTimeoutError",
                                             evalue=STUCK.format(timeout=self.timeout),
                                             traceback=["CellTimeoutError: " + STUCK.format(timeout=self.timeout)]))
            run_sync(self._restart)()
            for i, above in enumerate(self.nb.cells[:index]):
                if above.cell_type == "code":
                    self.execute_cell(copy.deepcopy(above), i, store_history=False)
            return cell, self.resources

    async def _restart(self):
        await ensure_async(self.km.restart_kernel(now=True))
        await ensure_async(self.kc.stop_channels())
        await self.async_start_new_kernel_client()
