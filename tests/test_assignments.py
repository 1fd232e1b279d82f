"""The course, with real nbgrader in a temporary course directory.

* every wrong answer in `tests/wrong_solutions/` fails its task's check with the hint for its mistake (run directly);
* every task of every assignment has a check and at least one wrong answer;
* end to end, per assignment, in one `nbgrader autograde` run of three submissions: the source notebook (solutions in)
  gets full marks; the released notebook, unmodified, gets zero on every autograded cell, and its solution regions and
  hidden tests are gone; a submission with wrong answers loses exactly those tasks' points, and `generate_feedback`
  writes HTML that carries the hints.
"""
import html, json, os, re, resource, shutil, subprocess, sys, time
from pathlib import Path

import pytest

from corrprune_edu import course
from corrprune_edu.checks import CHECKS, CheckFailure, check
from wrong_solutions import E2E, WRONG

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT/"nbs"/"assignments"
ASSIGNMENTS = course.assignment_names(SOURCE)


def _cells(nb_path: Path) -> list:
    return json.loads(Path(nb_path).read_text())["cells"]


def _meta(cell) -> dict: return cell.get("metadata", {}).get("nbgrader", {})


def _text(cell) -> str: return "".join(cell["source"])


def _task(grade_id: str) -> str:
    "'task1_2' -> '1.2'"
    return grade_id.removeprefix("task").replace("_", ".")


def _graded(nb_path: Path) -> dict:
    "grade_id -> points of the autograded (code) cells of a notebook"
    return {_meta(c)["grade_id"]: _meta(c)["points"] for c in _cells(nb_path) if _meta(c).get("grade") and c["cell_type"] == "code"}


# -- the wrong answers, run directly ---------------------------------------------------------------------------------
@pytest.mark.parametrize("w", WRONG, ids=lambda w: f"{w.task}-{w.fn.__name__}")
def test_wrong_answer_gets_its_hint(w):
    with pytest.raises(CheckFailure) as e: check(w.task, w.fn, **w.inputs())
    msg = str(e.value)
    assert msg.startswith(f"Task {w.task}: check failed") and "tried:" in msg and "expected:" in msg and "got:" in msg
    assert w.hint in msg, f"the check of task {w.task} did not give the expected hint for {w.fn.__name__}:\n{msg}"


def test_every_task_has_a_check_and_a_wrong_answer():
    tasks = {_task(g) for a in ASSIGNMENTS for g in _graded(SOURCE/f"{a}.ipynb")}
    assert tasks, "no graded cell found in nbs/assignments"
    assert tasks <= set(CHECKS), f"tasks without a check in corrprune_edu.checks: {sorted(tasks - set(CHECKS))}"
    assert tasks <= {w.task for w in WRONG}, f"tasks without a wrong answer in tests/wrong_solutions: {sorted(tasks - {w.task for w in WRONG})}"
    assert set(E2E) == set(ASSIGNMENTS), f"every assignment needs a wrong submission (E2E): missing {sorted(set(ASSIGNMENTS) - set(E2E))}"


def test_assignment_metadata_follows_the_conventions():
    "Task headings carry their points; grade ids are task<id> / task<id>_solution; no default_exp"
    for a in ASSIGNMENTS:
        cells = _cells(SOURCE/f"{a}.ipynb")
        ids = [_meta(c)["grade_id"] for c in cells if _meta(c)]
        assert len(ids) == len(set(ids)), f"{a}: duplicate grade ids"
        assert all(_meta(c).get("schema_version") == 3 for c in cells if _meta(c)), f"{a}: nbgrader metadata must be schema 3"
        assert not any("default_exp" in _text(c) for c in cells), f"{a}: assignments import from corrprune_edu, they export nothing"
        text = "\n".join(_text(c) for c in cells)
        for gid, points in _graded(SOURCE/f"{a}.ipynb").items():
            assert f"## Task {_task(gid)} ({points} point" in text, f"{a}: no heading '## Task {_task(gid)} ({points} points)'"
            assert any(_meta(c).get("grade_id") == f"{gid}_solution" and _meta(c).get("solution") for c in cells), f"{a}: {gid} has no solution cell"


def test_nbdev_clean_keeps_the_grading_metadata(tmp_path):
    "nbdev-clean, run with the project's settings, leaves every cell's nbgrader metadata as it was"
    for a in ASSIGNMENTS:
        copy = tmp_path/f"{a}.ipynb"
        shutil.copyfile(SOURCE/f"{a}.ipynb", copy)
        before = [_meta(c) for c in _cells(copy)]
        out = subprocess.run([str(Path(sys.executable).parent/"nbdev-clean"), "--fname", str(copy)], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert sum(bool(m) for m in before) >= 5 and [_meta(c) for c in _cells(copy)] == before, f"nbdev-clean changed {a}'s nbgrader metadata"


# -- end to end, with nbgrader ----------------------------------------------------------------------------------------
def _wrong_submission(assignment: str, dest: Path) -> Path:
    "The source notebook with the solution cells of the E2E wrong answers replaced by them"
    nb = json.loads((SOURCE/f"{assignment}.ipynb").read_text())
    for w in E2E[assignment]:
        gid = f"task{w.task.replace('.', '_')}_solution"
        cell = next(c for c in nb["cells"] if _meta(c).get("grade_id") == gid)
        cell["source"] = w.cell_source()
    dest.write_text(json.dumps(nb))
    return dest


def _children_cpu() -> float:
    "CPU seconds used so far by finished child processes (nbgrader and the kernels it waited for)"
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    "A course directory in which every assignment was released, submitted three times, autograded and fed back"
    assert course.nbgrader_available(), "nbgrader is missing: install the course extra (pip install -e '.[dev,course]'; `make venv` does)"
    tmp = tmp_path_factory.mktemp("course")
    root = course.setup_course(tmp/"course", SOURCE)
    t0 = time.perf_counter()
    released = dict(zip(ASSIGNMENTS, course.release(root)))
    t_release = time.perf_counter() - t0
    for a in ASSIGNMENTS:
        course.add_submission(root, a, "solution", SOURCE/f"{a}.ipynb")
        course.add_submission(root, a, "blank", released[a])
        course.add_submission(root, a, "wrong", _wrong_submission(a, tmp/f"{a}_wrong.ipynb"))
    t1, cpu = time.perf_counter(), _children_cpu()
    course.autograde(root, env={"IN_TEST": "1", "CORRPRUNE_THREADS": os.environ.get("CORRPRUNE_THREADS", "2")})
    t_grade, cpu = time.perf_counter() - t1, _children_cpu() - cpu
    course.feedback(root)
    print(f"\nnbgrader: release of {len(ASSIGNMENTS)} assignments {t_release:.0f}s, autograde of {3 * len(ASSIGNMENTS)} "
          f"submissions {t_grade:.0f}s ({cpu:.0f} CPU-s), feedback {time.perf_counter() - t1 - t_grade:.0f}s")
    return dict(root=root, released=released, grades=course.grades(root))


def _scores(graded, assignment, student) -> dict:
    g = graded["grades"]
    rows = g[(g.assignment == assignment) & (g.student == student)]
    assert len(rows), f"no grades for {student}'s {assignment}"
    return {r.cell: r for r in rows.itertuples()}


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_release_removes_solutions_and_hidden_tests(graded, assignment):
    source, release = _cells(SOURCE/f"{assignment}.ipynb"), _cells(graded["released"][assignment])
    released_text = "\n".join(_text(c) for c in release)
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in released_text, f"{assignment}: '{marker}' left in the student version"
    by_id = {_meta(c)["grade_id"]: c for c in release if _meta(c)}
    for c in source:
        m = re.search(r"### BEGIN (SOLUTION|HIDDEN TESTS)\n(.*?)### END \1", _text(c), re.S)
        if not m: continue
        hidden = [l.strip() for l in m.group(2).splitlines() if l.strip()]
        student = _text(by_id[_meta(c)["grade_id"]])
        assert not any(l in student for l in hidden), f"{assignment}: part of {_meta(c)['grade_id']}'s {m.group(1).lower()} is still in the student version"
        if m.group(1) == "SOLUTION": assert "raise NotImplementedError()" in student or "YOUR ANSWER HERE" in student


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_source_gets_full_marks(graded, assignment):
    scores = _scores(graded, assignment, "solution")
    auto = {c: r for c, r in scores.items() if not r.needs_manual_grade}
    assert set(auto) == set(_graded(SOURCE/f"{assignment}.ipynb")), f"{assignment}: graded cells {sorted(auto)}"
    lost = {c: (r.score, r.max_score) for c, r in auto.items() if r.score != r.max_score}
    assert not lost, f"{assignment}: the instructor's solutions lose points in {lost}"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_release_unmodified_gets_zero(graded, assignment):
    scores = _scores(graded, assignment, "blank")
    assert set(scores) >= set(_graded(SOURCE/f"{assignment}.ipynb")), "the grader skipped cells of the blank submission"
    earned = {c: r.score for c, r in scores.items() if r.score}
    assert not earned, f"{assignment}: the unmodified student version earns points in {earned}"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_wrong_submission_loses_exactly_its_tasks(graded, assignment):
    broken = {f"task{w.task.replace('.', '_')}" for w in E2E[assignment]}
    scores = {c: r for c, r in _scores(graded, assignment, "wrong").items() if not r.needs_manual_grade}
    got = {c: r.score for c, r in scores.items()}
    want = {c: (0.0 if c in broken else r.max_score) for c, r in scores.items()}
    assert got == want, f"{assignment}: expected to lose exactly {sorted(broken)}"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_feedback_carries_the_hints(graded, assignment):
    page = graded["root"]/"feedback"/"wrong"/assignment/f"{assignment}.html"
    assert page.exists(), f"generate_feedback wrote no {page}"
    text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))
    for w in E2E[assignment]:
        assert f"Task {w.task}: check failed" in text and w.hint in text, f"{assignment}: feedback lacks the hint of task {w.task}: {w.hint!r}"
