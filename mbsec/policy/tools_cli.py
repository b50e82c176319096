"""``mbsec policy learn|replay|report``: the commands of the adoption path (docs/policy.md).

Exit codes: learn and report 0 ok, 1 an error (unreadable input, invalid policy, nothing to
learn); replay 0 done (no change, or changes without ``--exit-code``), 1 changes with
``--exit-code``, 2 an error, so a change pipeline can tell "this edit changes decisions" from
"the job is broken". Errors are one line on stderr; progress and summaries go to stderr too,
so stdout carries only the proposal, the replay result or the report.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from mbsec.policy.loader import PolicyError, load_policy
from mbsec.policy.records import InputError, Progress, Reader


def run(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    cmd: str = ns.cmd
    fail = 2 if cmd == "replay" else 1
    try:
        match cmd:
            case "learn":
                return _learn(ns, out, err)
            case "replay":
                return _replay(ns, out, err)
            case _:
                return _report(ns, out, err)
    except InputError as exc:
        print(f"mbsec policy {cmd}: error: {exc}", file=err)
        return fail
    except PolicyError as exc:
        for d in exc.diagnostics:
            print(d, file=err)
        print(f"mbsec policy {cmd}: error: the policy does not load", file=err)
        return fail
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        return 0 if cmd != "replay" else 2
    except KeyboardInterrupt:
        print(f"mbsec policy {cmd}: interrupted", file=err)
        return 130


def _reader(cmd: str, quiet: bool, err: TextIO) -> Reader:
    return Reader(progress=None if quiet else Progress(f"mbsec policy {cmd}", err))


def _write(path: str, text: str, out: TextIO) -> None:
    """Write ``text`` to ``path`` atomically (a reviewer never sees half a file), or stdout."""
    if path == "-":
        out.write(text)
        return
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent or ".", prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _learn(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from mbsec.policy.learn import Learner, LearnOptions

    if ns.margin > 1000:
        raise InputError(f"--margin {ns.margin}% is more than 1000%")
    reader = _reader("learn", ns.quiet, err)
    learner = Learner(LearnOptions(gap=ns.gap, margin=ns.margin, by=ns.by, mode=ns.mode,
                                   sources=["<stdin>" if e == "-" else Path(e).name
                                            for e in ns.events]))
    for rec in reader.records(ns.events):
        learner.add(rec)
    learner.target_hints(reader.unit_targets)
    stats = reader.stats
    for line in stats.summary():
        print(f"mbsec policy learn: {line}", file=err)
    if not learner.learned:
        raise InputError("nothing to learn: no forwarded request in " + ", ".join(ns.events)
                         + " (log them with logging.allowed_requests = \"info\")")
    result = learner.proposal()
    _write(ns.output, result.text, out)
    where = "stdout" if ns.output == "-" else ns.output
    print(f"mbsec policy learn: wrote {where}: {result.rules} rule(s) for "
          f"{result.principals} role(s)/identities on {result.targets} target(s), "
          f"{result.tests} inline test(s); learned from {result.learned:,} request(s)"
          + (f", {result.not_learned:,} refused request(s) not learned"
             if result.not_learned else "")
          + "; checked: policy check --strict ok, its tests pass", file=err)
    return 0


def _replay(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from mbsec.policy.replay import Replayer, to_json

    policy = load_policy(ns.file)
    reader = _reader("replay", ns.quiet, err)
    replayer = Replayer(policy, ns.compare)
    result = replayer.run(reader.records(ns.events))
    stats = reader.stats
    if not result.total:
        raise InputError("no recorded requests in " + ", ".join(ns.events)
                         + (f" ({s})" if (s := stats.skipped_line()) else ""))
    if ns.json:
        print(to_json(result, stats), file=out)
    else:
        for line in result.lines(stats):
            print(line, file=out)
    return 1 if ns.exit_code and result.changed else 0


def _report(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from mbsec.policy.report import html_report, markdown_report

    policy = load_policy(ns.file)
    old = load_policy(ns.against) if ns.against else None
    render: Callable[..., str] = html_report if ns.format == "html" else markdown_report
    _write(ns.output, render(policy, old), out)
    if ns.output != "-":
        print(f"mbsec policy report: wrote {ns.output}", file=err)
    return 0


__all__ = ["run"]
