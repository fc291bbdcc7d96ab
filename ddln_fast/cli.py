"""The ``ddln`` command line: argument handling and printing, nothing else.

Every bad input ends in exit code 2 with one line on stderr (``Error: ...``); an internal error
ends in exit code 1.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np

from .errors import InputError
from .parametrization import Parametrization


class BadInput(click.ClickException):
    """One line on stderr, exit code 2 (click's UsageError would print three lines)."""

    exit_code = 2


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


def _format_value(value: float) -> str:
    return f"{value:.3g}" if np.isfinite(value) else str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ddln_fast")
def cli():
    """ddln_fast: fast, checked simulations of deep diagonal linear networks."""
    warnings.showwarning = _one_line_warnings


def _load_config(config_path, sets):
    from .config import Config, parse_override

    overrides = dict(parse_override(text) for text in sets)
    return Config.from_toml(config_path, overrides)


def _default_output(config_path) -> Path:
    stem = Path(config_path).stem if config_path else "default"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.h5"


@cli.command()
@click.argument("config_path", metavar="[CONFIG.toml]", required=False)
@click.option("-o", "--output", "output", metavar="OUT.h5", help="Output HDF5 file (default: runs/NAME-TIME.h5).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. model.depth=4.")
@click.option("--resume", is_flag=True, help="Continue OUT.h5 from its last committed checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace OUT.h5 if it exists.")
@click.option("--threads", type=int, default=None, help="Threads for Numba and BLAS (0: all cores).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal only).")
@click.option("--quiet", is_flag=True, help="Print only the output path.")
def run(config_path, output, sets, resume, overwrite, threads, progress, quiet):
    """Simulate the layer flow of every seed and stream checkpoints to HDF5."""
    from .errors import AlreadyComplete
    from .methods import is_adaptive
    from .numba_cache import kernels_cached
    from .reports import any_seed_finished, descent_summary
    from .simulate import run_simulation

    if threads is not None and threads < 0:
        raise InputError(f"--threads {threads}: expected an integer >= 0 (0: all cores)")
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if resume and not output:
        raise InputError("--resume needs -o OUT.h5, the run to continue")
    config = _load_config(config_path, sets)
    out = Path(output) if output else _default_output(config_path)
    if not quiet:
        m, i = config.model, config.integrator
        what = f"rtol {i.rtol:g}" if is_adaptive(i.method) else f"dt {i.dt:g}" + descent_summary(i)
        seeds = f"{config.run.seeds} seed" + ("s" if config.run.seeds != 1 else "")
        click.echo(f"ddln run: {seeds}, {Parametrization.from_config(config).describe()}, "
                   f"alpha {m.alpha:g}, init {m.init}, {i.method} ({what}), t_end {i.t_end:g}")
        if not kernels_cached():
            click.echo("compiling the kernels (first run only; later runs start in seconds)...")
    try:
        report = run_simulation(config, out, progress=progress, overwrite=overwrite, resume=resume,
                                threads=threads)
    except AlreadyComplete as done:
        click.echo(str(done))
        return
    if quiet:
        click.echo(str(out))
    else:
        _print_summary(report, out)
    if report.interrupted:
        import shlex
        import signal

        again = ["ddln", "run"] + ([config_path] if config_path else [])
        again += [a for s in sets for a in ("--set", s)] + ["-o", str(out), "--resume"]
        again += ["--threads", str(threads)] if threads is not None else []
        click.echo(f"stopped by {report.interrupted}: {out} holds {report.run.committed} committed "
                   f"checkpoints and the state where it stopped (incomplete, resumable); resume "
                   f"with: {shlex.join(again)}", err=True)
        sys.exit(128 + getattr(signal, report.interrupted, signal.SIGINT))
    if report.run.committed and not any_seed_finished(report.run):
        click.echo(f"no seed finished normally (every seed diverged or stalled; see the status in {out})",
                   err=True)
        sys.exit(1)


def _print_summary(report, out):
    from .reports import FAILED_STATUSES, loss_quantiles, seed_rows, status_counts

    run = report.run
    rows = seed_rows(run)
    nfev = run.nfev[-1]
    if len(rows) <= 8:
        star = rows[0]["distance_to_theta_star"] is not None
        header = f"{'seed':>4} {'status':>9} {'t':>9} {'loss':>9} {'grad evals':>10} {'max drift':>9}"
        click.echo(header + (f" {'|theta-theta*|/|theta*|':>24}" if star else ""))
        for r in rows:
            line = (f"{r['seed']:>4} {r['status']:>9} {r['t']:>9.4g} {_format_value(r['loss']):>9} "
                    f"{r['nfev']:>10} {_format_value(r['max_drift']):>9}")
            click.echo(line + (f" {_format_value(r['distance_to_theta_star']):>24}" if star else ""))
    else:
        q = loss_quantiles(run.loss[-1])
        click.echo(f"final loss over {len(rows)} seeds: min {_format_value(q[0])}, median {_format_value(q[1])}, "
                   f"max {_format_value(q[2])}")
        counts = status_counts(run.status[-1])
        click.echo("status: " + ", ".join(f"{c} {name}" for name, c in counts.items()))
        click.echo(f"gradient evaluations per seed: median {int(np.median(nfev))}, max {int(nfev.max())}")
    bad = [f"{r['seed']} ({r['status']})" for r in rows if r["status"] in FAILED_STATUSES]
    if bad:
        click.echo(f"seeds that did not finish: {', '.join(bad)}")
    if "dual_state" in run.file.attrs:  # which state the dual method integrated (d < n: the s-form)
        click.echo(f"dual state: {run.file.attrs['dual_state']}")
    click.echo(f"wall time {report.wall_seconds:.2f} s, {int(nfev.sum())} gradient evaluations, "
               f"{run.committed} checkpoints")
    state = "complete" if run.complete else "incomplete, resumable"
    click.echo(f"wrote {out} ({state})")


@cli.command()
@click.argument("run_path", metavar="RUN.h5")
def inspect(run_path):
    """Print the config, shapes and status of a run file."""
    from .reports import loss_quantiles, status_counts
    from .store import open_run

    _recover_crashed(run_path)
    with open_run(run_path) as run:
        f = run.file
        k = run.committed
        click.echo(f"{run_path}: schema {f.attrs['schema_version']}, "
                   f"{'complete' if run.complete else 'incomplete'}, {k} committed checkpoints")
        if k:
            t = run.t
            click.echo(f"time: {t[0]:g} .. {t[-1]:g}")
            counts = status_counts(run.status[-1])
            click.echo("seed status: " + ", ".join(f"{c} {name}" for name, c in counts.items()))
            low, _, high = loss_quantiles(run.loss[-1])
            click.echo(f"last loss: min {_format_value(low)}, max {_format_value(high)}")
        click.echo("datasets:")
        for name, ds in run.datasets().items():
            click.echo(f"  /{name:<28} {str(ds.shape):<22} {ds.dtype}")
        for key in ("created", "ddln_fast_version", "threads", "threading_layer", "hostname", "extensions",
                    "dual_state"):
            if key in f.attrs:
                click.echo(f"{key}: {f.attrs[key]}")
        click.echo("config:")
        click.echo("  " + f.attrs["config"].strip().replace("\n", "\n  "))


def _recover_crashed(run_path) -> None:
    """A file left by a killed writer is recovered in place (said on stderr) before it is read;
    a file that a running ddln process writes is read as it is."""
    from .store import recover_for_reading

    reason = recover_for_reading(run_path)
    if reason:
        click.echo(f"recovered {run_path} ({reason}): it now holds its committed checkpoints only "
                   f"and opens in any HDF5 reader", err=True)


@cli.command()
@click.argument("run_path", metavar="RUN.h5")
def recover(run_path):
    """Make a run file left by a killed writer open in any HDF5 reader (h5py, h5dump, xarray).

    Its committed checkpoints are copied into a fresh file that replaces it; the run stays
    resumable. A file that needs nothing is left alone; one being written is refused."""
    from .store import open_run, recover as recover_file

    with open_run(run_path) as run:  # one line for a missing, foreign or broken file
        committed = run.committed
    reason = recover_file(run_path)
    if reason is None:
        click.echo(f"{run_path} needs no recovery: it opens in any HDF5 reader ({committed} committed checkpoints)")
    else:
        click.echo(f"recovered {run_path} ({reason}): {committed} committed checkpoints; it opens in "
                   f"any HDF5 reader and can be resumed")


@cli.command()
@click.argument("sweep_path", metavar="SWEEP.toml")
@click.option("-o", "--output", "outdir", required=True, metavar="OUTDIR", help="Output directory of the sweep.")
@click.option("--scheduler", metavar="ADDRESS", default=None, help="Use a running Dask scheduler, e.g. tcp://HOST:8786.")
@click.option("--workers", type=int, default=None, help="Worker processes of the local cluster (default: one per core).")
@click.option("--resume", is_flag=True, help="Continue OUTDIR even if its sweep.toml differs from SWEEP.toml.")
@click.option("--progress/--no-progress", default=None, help="Progress bar over tasks (default: on a terminal only).")
def sweep(sweep_path, outdir, scheduler, workers, resume, progress):
    """Run every task of a sweep file on Dask (a local cluster unless --scheduler)."""
    import importlib.util
    import signal

    from .sweep import load_sweep, run_sweep

    if importlib.util.find_spec("distributed") is None:
        raise click.ClickException("ddln sweep needs Dask distributed: pip install 'ddln_fast[sweep]'")
    sweep_def = load_sweep(sweep_path)  # every task's config is validated before anything runs
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: expected an integer >= 1")
    if scheduler and workers:
        raise InputError("--scheduler and --workers exclude each other (the cluster has its workers)")

    def stop(signum, frame):  # SIGTERM (e.g. a batch system) stops like Ctrl-C: tasks resume on rerun
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        result = run_sweep(sweep_def, outdir, scheduler=scheduler, workers=workers, resume=resume,
                           progress=progress, echo=click.echo)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for row in result.rows:
        if row["status"] == "failed":
            point = ", ".join(f"{k}={row[k]!r}" for k in result.swept_keys)
            click.echo(f"failed {row['task']} ({point}): {row.get('message', '')}", err=True)
    complete = sum(r["status"] == "complete" for r in result.rows)
    click.echo(f"{complete} of {len(result.rows)} tasks complete ({result.skipped} already were), "
               f"{result.failed} failed, {result.seconds:.1f} s; wrote {Path(outdir) / 'summary.csv'} "
               f"and summary.h5")
    if result.interrupted:
        click.echo(f"interrupted: rerun the same command to continue", err=True)
        sys.exit(130)
    if result.failed:
        sys.exit(1)


@cli.command("sweep-report")
@click.argument("outdir", metavar="OUTDIR")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Summary column to report (repeatable; default: time_to_eps, l1_norm, final_loss_max).")
@click.option("--x", "x_key", metavar="KEY", default=None, help="Swept key on the x axis (default: the first).")
@click.option("--by", "by_key", metavar="KEY", default=None,
              help="Swept key, one line per value (default: the second swept key, if any).")
@click.option("--plots", "plots", metavar="DIR", default=None, help="Write one PNG per metric into DIR.")
def sweep_report(outdir, metrics, x_key, by_key, plots):
    """Print (and plot) summary metrics of a sweep against a swept key."""
    from .sweep import METRICS, STEP_SIZE_KEY, largest_converged_step, plot_report, read_summary, report_table

    import importlib.util

    if plots and importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException("--plots needs matplotlib: pip install 'ddln_fast[plot]'")
    swept, rows = read_summary(outdir)
    metrics = metrics or ("time_to_eps", "l1_norm", "final_loss_max")
    for m in metrics:
        if m not in METRICS:
            raise InputError(f"--metric {m}: expected one of {', '.join(METRICS)}")
    if not swept:
        raise InputError(f"{outdir}: the sweep has no swept keys, nothing to report against")
    x_key = x_key or swept[0]
    if by_key is None and len(swept) > 1:
        by_key = next(k for k in swept if k != x_key)
    for name, key in (("--x", x_key), ("--by", by_key)):
        if key is not None and key not in swept:
            raise InputError(f"{name} {key}: expected a swept key, one of {', '.join(swept)}")
    if by_key == x_key:
        raise InputError(f"--x and --by are both {x_key}: expected two different swept keys")
    complete = sum(r["status"] == "complete" for r in rows)
    click.echo(f"{outdir}: {len(rows)} tasks, {complete} complete; medians over tasks sharing "
               f"{x_key}{' and ' + by_key if by_key else ''}")
    converged = largest_converged_step(rows, x_key, by_key) if x_key == STEP_SIZE_KEY else None
    if converged is not None:
        found = ", ".join(f"{v:g}" + (f" ({by_key} = {b})" if by_key else "")
                          for b, v in converged.items() if v is not None)
        click.echo(f"largest {x_key} at which every seed reached integrator.loss_tol: "
                   f"{found or 'none (no task had every seed at loss_tol)'}")
    for m in metrics:
        xs, bys, table = report_table(rows, m, x_key, by_key)
        click.echo("")
        label = f"{m}: {x_key} \\ {by_key}" if by_key else f"{m}: {x_key}"
        click.echo(f"{label:<28}" + "".join(f"{str(b):>12}" for b in bys))
        for i, xv in enumerate(xs):
            click.echo(f"{str(xv):<28}" + "".join(f"{_format_value(v):>12}" for v in table[i]))
        if plots:
            out = plot_report(xs, bys, table, m, x_key, by_key, Path(plots) / f"{m}_vs_{x_key}.png",
                              converged)
            click.echo(f"wrote {out}")


@cli.command()
@click.argument("config_path", metavar="CONFIG.toml")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. model.alpha=0.01.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def predict(config_path, sets, as_json):
    """Predict where training ends (the implicit-bias limit), without training."""
    import json

    from .prediction import predict as predict_config
    from .reports import SUPPORT_THRESHOLD, prediction_rows

    config = _load_config(config_path, sets)
    pred = predict_config(config, interpolators=True)
    rows = prediction_rows(pred)
    if as_json:
        click.echo(json.dumps({"config": config_path, "what": pred.message, "projected": pred.projected,
                               "seconds": pred.seconds, "interpolator_seconds": pred.interpolator_seconds,
                               "support_threshold": f"|theta_i| > {SUPPORT_THRESHOLD:g} max_i |theta_i|",
                               "seeds": rows, "theta_inf": pred.theta.tolist()}))
        return
    m = config.model
    click.echo(f"ddln predict: {Parametrization.from_config(config).describe()}, alpha {m.alpha:g}, "
               f"init {m.init}; {pred.message}")
    click.echo(f"{'seed':>4} {'l1 norm':>10} {'support':>8} {'|.-min l1|':>11} {'|.-min l2|':>11} "
               f"{'min l1 norm':>11} {'residual':>9} {'newton':>6}")
    for r in rows:
        click.echo(f"{r['seed']:>4} {r['l1_norm']:>10.5g} {r['support']:>8} {r['distance_to_min_l1']:>11.4g} "
                   f"{r['distance_to_min_l2']:>11.4g} {r['min_l1_norm']:>11.5g} {r['dual_residual']:>9.2g} "
                   f"{r['newton_iterations']:>6}")
    click.echo(f"support: |theta_i| > {SUPPORT_THRESHOLD:g} max|theta|; prediction {pred.seconds:.2f} s, "
               f"min-l1 LP and min-l2 {pred.interpolator_seconds:.2f} s")


@cli.command()
@click.argument("run_path", metavar="RUN.h5")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--plots", "plots", metavar="DIR",
              help="Write loss.png, theta_seedS.png (one per plotted seed) and gap.png to DIR.")
@click.option("--seeds", "seeds", metavar="LIST", default=None,
              help="Seeds to plot, e.g. 0,3,5 or all (default: the first four).")
def analyze(run_path, as_json, plots, seeds):
    """Put the theory next to a run: predicted limit, KKT residual, rates and bounds per seed."""
    import json

    from .analysis import EPSILON, plot, plotted_seeds

    if seeds is not None and not plots:
        raise InputError("--seeds chooses the plotted seeds: give --plots DIR too")
    chosen = _seed_list(seeds)

    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plots needs matplotlib: pip install 'ddln_fast[plot]'") from None
        if Path(plots).exists() and not Path(plots).is_dir():
            raise InputError(f"--plots {plots}: exists and is not a folder")
    from .events import format_events
    from .reports import analyze_report

    _recover_crashed(run_path)
    result, events, bias, descent_notes = analyze_report(run_path)
    if chosen == "all":
        chosen = list(range(len(result.seeds)))
    shown = plotted_seeds(result, chosen) if plots else []
    written = plot(result, plots, shown) if plots else []
    if as_json:
        out = result.as_dict()
        out["events"] = events.as_dict() if events is not None else None
        out["plots"] = written
        if bias is not None:
            out["step_size_bias"] = [b.as_dict() for b in bias]
        click.echo(json.dumps(out))
        return
    state = "complete" if result.complete else "still being written / incomplete"
    click.echo(f"{run_path}: {state}, {result.committed} committed checkpoints, {result.parametrization.describe()}"
               + ("; X rank deficient: limit = projection onto argmin f" if result.projected else ""))
    click.echo(f"{'seed':>4} {'status':>9} {'t':>8} {'f - f*':>9} {'max drift':>9} {'gap':>9} {'kkt':>8} "
               f"{'rate':>9} {'PL rate':>9} {'PL@lim':>9} {'t(1e-6)':>9} bounds(PL cA, PL int h, D/t)")
    for sa in result.seeds:
        held = " ".join("n/a" if b is None else "ok" if b else "VIOLATED" for b in
                        (sa.bound_pl_c_a_held, sa.bound_pl_trajectory_held, sa.bound_sublinear_held))
        click.echo(f"{sa.seed:>4} {sa.status:>9} {sa.t_final:>8.4g} {_format_value(sa.final_loss - sa.f_star):>9} "
                   f"{_format_value(sa.max_invariant_drift):>9} {_format_value(sa.gap_to_prediction):>9} "
                   f"{_format_value(sa.kkt_residual):>8} {_format_value(sa.fitted_rate):>9} "
                   f"{_format_value(sa.pl_rate):>9} {_format_value(sa.pl_rate_at_limit):>9} "
                   f"{_format_value(sa.time_to_epsilon):>9} {held}")
    click.echo(f"gap: |theta_K - theta_inf| / |theta_inf|; rate: fitted -d log(f - f*)/dt; t(1e-6): first "
               f"time with (f - f*) / (f0 - f*) <= {EPSILON:g}; max drift: over the checkpoints")
    for sa in result.seeds:
        if sa.note:
            click.echo(f"seed {sa.seed}: {sa.note}")
    for line in format_events(events) if events is not None else ():
        click.echo(line)
    if bias is not None:
        _print_step_size_bias(bias)
    for note in descent_notes:
        click.echo(f"note: {note}")
    if plots:
        others = "" if len(shown) == len(result.seeds) else " (--seeds to choose others)"
        click.echo(f"plots of seeds {', '.join(map(str, shown))} of {len(result.seeds)}{others}")
    for path in written:
        click.echo(f"wrote {path}")


def _print_step_size_bias(bias) -> None:
    click.echo("implicit bias of the steps (depth 2): prediction from the effective initialization "
               "(GD) next to the gradient-flow prediction (GF)")
    click.echo(f"{'seed':>4} {'gap to GD':>10} {'gap to GF':>10} {'|GF-GD|':>10} {'l1 GD':>9} "
               f"{'l1 GF':>9} {'max|step g|':>11}")
    for b in bias:
        click.echo(f"{b.seed:>4} {_format_value(b.gap_to_descent_prediction):>10} "
                   f"{_format_value(b.gap_to_flow_prediction):>10} {_format_value(b.flow_vs_descent):>10} "
                   f"{_format_value(b.descent_l1_norm):>9} {_format_value(b.flow_l1_norm):>9} "
                   f"{_format_value(b.max_step_gradient):>11}")
    click.echo("GD: Bregman projection of the effective initialization at the last checkpoint; gaps: "
               "|theta_K - .| / |.|; |GF-GD|: relative to GD")
    for b in bias:
        if b.note:
            click.echo(f"seed {b.seed}: {b.note}")


def _seed_list(text):
    """``--seeds 0,3,5`` -> [0, 3, 5]; ``all`` stays "all"; None stays None."""
    if text is None or text.strip() == "all":
        return None if text is None else "all"
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"--seeds {text}: expected seed numbers separated by commas, e.g. 0,3,5, or all") from None


def main(argv=None) -> None:
    """Console entry point: maps every failure to its exit code and a one-line message."""
    try:
        code = cli.main(args=argv, prog_name="ddln", standalone_mode=False)
    except (InputError, BadInput) as err:
        click.echo(f"Error: {err.for_cli() if isinstance(err, InputError) else err.format_message()}", err=True)
        sys.exit(2)
    except click.UsageError as err:
        hint = f" (see ddln {err.ctx.command_path.split(' ', 1)[-1]} --help)" if err.ctx else ""
        click.echo(f"Error: {' '.join(err.format_message().split())}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"Error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except OSError as err:  # output trouble (full disk, I/O error): not bad input, exit 1
        click.echo(f"Error: {' '.join(str(err).split())}", err=True)
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
