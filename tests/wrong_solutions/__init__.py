"""Plausible wrong answers to the assignments, the mistakes students really make, each with the hint its check must give.

Every wrong answer is a function named like the notebook's (`filter_pearson__not_centred` answers `filter_pearson`),
registered with `@wrong(task, hint)`. `tests/test_assignments.py` runs each through its task's check directly, and
builds one wrong submission per assignment from those marked `e2e=...` for a full `nbgrader autograde`: their source,
renamed, replaces the solution cell of their task. So those may only use names the assignment's notebook defines (its
imports), and nothing else from this package of tests; the others may share helpers.
"""
import inspect, re, textwrap
from dataclasses import dataclass
from typing import Callable


@dataclass
class Wrong:
    task: str            # task id, e.g. '1.1'
    hint: str            # a fragment the check's message must contain
    fn: Callable         # the wrong answer
    inputs: Callable     # () -> extra keyword arguments for the check (e.g. a model)

    @property
    def name(self) -> str: return self.fn.__name__.split("__")[0]

    def cell_source(self) -> str:
        "The answer as the notebook's solution cell would hold it: decorator gone, named like the notebook's function"
        src = textwrap.dedent(inspect.getsource(self.fn))
        src = "\n".join(l for l in src.splitlines() if not l.startswith("@wrong("))
        return re.sub(rf"^(def|class) {re.escape(self.fn.__name__)}\b", rf"\1 {self.name}", src, count=1, flags=re.M)


WRONG: list[Wrong] = []
E2E: dict[str, list[Wrong]] = {}   # assignment name -> the wrong answers of its end-to-end wrong submission


def wrong(task: str, hint: str, e2e: str | None = None, inputs: Callable = dict):
    "Register a wrong answer to `task` whose check must say `hint`; `e2e` puts it in that assignment's wrong submission"
    def deco(fn):
        w = Wrong(task, hint, fn, inputs)
        WRONG.append(w)
        if e2e: E2E.setdefault(e2e, []).append(w)
        return fn
    return deco


from . import a1_filter_correlation, a2_filter_surgery, a3_cop, a4_play_and_prune  # noqa: E402  (registers their answers)
