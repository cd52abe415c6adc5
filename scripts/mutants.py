"""Mutation check: plant known KV-cache bugs and show that the test suite fails on each.

    python scripts/mutants.py                 # each mutant against the tests named to catch it
    python scripts/mutants.py --suite fast    # each mutant against the whole fast tier (-x)
    python scripts/mutants.py --list

The tree under test is the committed HEAD (``git archive``), copied to a temporary folder, so the
working tree is never touched. The copy is made importable as ``tandem`` through a staging folder
laid out as pyproject.toml's package-dir says; pytest runs there, so it imports the copy. For
every mutant the script first runs the same tests on the unmutated copy (they must pass: a
failure that is there anyway proves nothing), then applies the mutant (its text must occur
exactly once, so a mutant that no longer applies is an error, not a silent pass) and runs them
again: they must fail.
Exit code 0 when every mutant is caught, 1 when one survives, 2 on a usage or set-up error.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str  # file in the repository
    old: str  # text replaced (must occur exactly once)
    new: str
    tests: tuple[str, ...]  # the tests expected to catch it


MUTANTS = (
    Mutant(
        "kv-zeros",
        "the KV handoff writes zeros instead of the prefill's K and V",
        "gpu/transfer.py",
        "hk.copy_(kb, non_blocking=True)\n            hv.copy_(vb, non_blocking=True)",
        "hk.zero_()\n            hv.zero_()",
        ("tests/test_hybrid.py", "tests/test_cli_hybrid.py", "tests/test_kv_transfer.py"),
    ),
    Mutant(
        "kv-wrong-layer",
        "each layer's K and V go into the next layer's regions",
        "gpu/transfer.py",
        "                i = timing.layer\n",
        "                i = (timing.layer + 1) % self.layout.cfg.n_layer\n",
        ("tests/test_hybrid.py", "tests/test_cli_hybrid.py", "tests/test_kv_transfer.py"),
    ),
    Mutant(
        "attend-newest-only",
        "torch decode attends only to the newest position, not the cache",
        "gpu/decode.py",
        "att = attention(q, kc, vtc, model.q_scale)",
        "att = attention(q, kn, vtn, model.q_scale)",
        ("tests/test_gpu_decode.py", "tests/test_placement.py"),
    ),
)


def log(msg: str) -> None:
    print(f"mutants: {msg}", file=sys.stderr, flush=True)


def export_head(dest: Path) -> None:
    """The committed tree at HEAD, written under ``dest``."""
    blob = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "HEAD"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")


def stage(repo: Path, staging: Path) -> None:
    """``staging/tandem`` laid out as the installed package: tandem/ copied, the other folders
    linked in where pyproject.toml's package-dir maps them."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
    dirs = meta["tool"]["setuptools"]["package-dir"]
    shutil.copytree(repo / dirs["tandem"], staging / "tandem")
    for pkg, folder in dirs.items():
        if pkg == "tandem":
            continue
        parts = pkg.split(".")
        if parts[0] != "tandem" or len(parts) != 2:
            raise SystemExit(f"mutants: cannot stage package {pkg!r}")
        (staging / "tandem" / parts[1]).symlink_to(repo / folder, target_is_directory=True)


def run_tests(
    repo: Path, staging: Path, env: dict, tests: list[str], marker: str | None
) -> tuple[bool, str]:
    """pytest on ``tests`` of the copy; (passed, which test files failed and how often). It runs
    in ``staging`` (``python -m`` puts the working folder first on sys.path, so the staged
    package wins over an installed or checked-out one). The whole tier stops at its first
    failure (-x); named tests all run, so the summary says which of them see the mutant."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if marker:
        cmd.append("-x")
    cmd += ["--rootdir", str(repo), "-c", str(repo / "pyproject.toml")]
    cmd += [str(repo / t) for t in tests]
    if marker:
        cmd += ["-m", marker]
    done = subprocess.run(cmd, cwd=staging, env=env, capture_output=True, text=True)
    lines = (done.stdout + done.stderr).strip().splitlines()
    failed = [ln.split()[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    per_file: dict[str, int] = {}
    for test in failed:
        name = Path(test.split("::")[0]).name
        per_file[name] = per_file.get(name, 0) + 1
    if per_file:
        summary = ", ".join(f"{f} ({n})" for f, n in per_file.items())
    else:
        summary = lines[-1] if lines else "(no output)"
    return done.returncode == 0, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=("named", "fast"), default="named")
    ap.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:20s} {m.path:18s} {m.what}")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        log(f"unknown mutant(s): {', '.join(sorted(unknown))}; see --list")
        return 2

    with tempfile.TemporaryDirectory(prefix="tandem-mutants-") as tmp:
        repo, staging = Path(tmp) / "repo", Path(tmp) / "staging"
        export_head(repo)
        staging.mkdir()
        stage(repo, staging)
        env = {**os.environ, "PYTHONPATH": str(staging)}
        probe = subprocess.run(
            [sys.executable, "-c", "import tandem.gpu.transfer as t; print(t.__file__)"],
            cwd=staging,
            env=env,
            capture_output=True,
            text=True,
        )
        if not probe.stdout.strip().startswith(str(staging)):
            log(f"the staged copy is not what imports as tandem: {probe.stdout or probe.stderr}")
            return 2

        survived = []
        print(f"{'mutant':20s} {'clean':6s} {'mutated':8s} {'s':>6s}  caught by")
        for m in chosen:
            tests = list(m.tests) if args.suite == "named" else ["tests"]
            marker = None if args.suite == "named" else "not slow and not pending and not core"
            t0 = time.perf_counter()
            ok, why = run_tests(repo, staging, env, tests, marker)
            if not ok:
                log(f"{m.name}: the unmutated tests fail, so nothing is shown: {why}")
                return 2
            target = repo / m.path
            text = target.read_text(encoding="utf-8")
            if text.count(m.old) != 1:
                log(f"{m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.path}; update it")
                return 2
            target.write_text(text.replace(m.old, m.new), encoding="utf-8")
            try:
                ok, why = run_tests(repo, staging, env, tests, marker)
            finally:
                target.write_text(text, encoding="utf-8")
            caught = not ok
            if not caught:
                survived.append(m.name)
            dt = time.perf_counter() - t0
            print(f"{m.name:20s} {'pass':6s} {'FAIL' if caught else 'pass':8s} {dt:6.0f}  {why}")
    if survived:
        log(f"survived (the tests did not see them): {', '.join(survived)}")
        return 1
    log(f"all {len(chosen)} mutants caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
