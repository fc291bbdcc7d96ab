"""Run files: one HDF5 file per run, written crash-safely while the run goes on.

- :mod:`.schema`: the table of every dataset (axes, dtype, meaning), the dimension scales;
- :mod:`.writer`: :class:`RunWriter`, the streaming writer (a background thread), and the
  atomic edits of a closed file (:func:`annotate`, :func:`extend_run`);
- :mod:`.reader`: :func:`open_run` and :class:`Run`, also for live and killed files;
- :mod:`.safety`: the writer lock, fencing after a write error, the superblock, recovery.
"""

from .reader import Run, open_h5, open_run
from .safety import check_not_being_written, recover, recover_for_reading, recovery_needed
from .schema import SCHEMA_VERSION
from .writer import OutputError, RunWriter, annotate, extend_run

__all__ = ["Run", "open_run", "open_h5", "RunWriter", "OutputError", "annotate", "extend_run",
           "recover", "recover_for_reading", "recovery_needed", "check_not_being_written",
           "SCHEMA_VERSION"]
