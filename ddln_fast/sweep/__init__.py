"""Sweeps: many runs from one sweep file, executed as independent tasks on Dask distributed.

- :mod:`.spec`: the sweep file, its tasks and their ids;
- :mod:`.task`: one task on a worker (its run file, resume, summary row);
- :mod:`.metrics`: the summary metrics of one run;
- :mod:`.summary`: the summary table (CSV, HDF5, pandas);
- :mod:`.orchestrate`: the output directory, the cluster, submitting the tasks;
- :mod:`.report`: a metric against two swept keys, printed and plotted.
"""

from .metrics import METRICS, summarize_run
from .orchestrate import SweepResult, run_sweep
from .report import STEP_SIZE_KEY, largest_converged_step, plot_report, report_table
from .spec import Sweep, Task, load_sweep, task_id
from .summary import read_summary, summary_frame, write_summary
from .task import run_task

__all__ = ["METRICS", "STEP_SIZE_KEY", "Sweep", "SweepResult", "Task", "largest_converged_step", "load_sweep", "plot_report", "read_summary",
           "report_table", "run_sweep", "run_task", "summarize_run", "summary_frame", "task_id",
           "write_summary"]
