"""A newcomer's mistakes, each answered by one line that names the input and the fix, before anything
starts; and the first small run's needs (its data made when missing, `--model tiny` everywhere, a clean
Ctrl-C that is no failure). The README's commands themselves: tests/test_readme_walk.py."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.__main__ import main
from tests.launch_util import ROOT, dataset

TINY = ["--config", str(ROOT / "configs/tiny.yaml")]
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def launcher(*argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """`python -m launcher ARGV` in this process: (exit code, stdout, the `error:` lines of stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse
            rc = exc.code
    errors = [line for line in err.getvalue().splitlines() if "error:" in line]
    return rc, out.getvalue(), "\n".join(errors)


def one_line(rc: int, errors: str, *must: str) -> str:
    assert rc != 0, "the mistake was accepted"
    assert len(errors.splitlines()) == 1, errors
    for text in must:
        assert text in errors, f"{text!r} not in: {errors}"
    return errors


def test_outside_the_venv_a_missing_torch_is_one_line_naming_run_sh_and_the_venv(tmp_path):
    # an interpreter without torch: the import fails as it would in the system python
    # (sys.prefix set as the system python's or the project's .venv would have it, whichever runs this test)
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.prefix = sys.argv.pop(1); "
            "sys.argv = ['launcher', *sys.argv[1:]]; runpy.run_module('launcher', run_name='__main__', alter_sys=True)")
    for argv in (TINY, ["config", *TINY], ["eval", "--help"]):
        p = subprocess.run([sys.executable, "-c", code, "/usr", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "'torch'" in p.stderr and "./run.sh" in p.stderr and "source .venv/bin/activate" in p.stderr, p.stderr
    # inside the project's .venv the fix is its set-up
    p = subprocess.run([sys.executable, "-c", code, str(ROOT / ".venv"), *TINY], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "'torch'" in p.stderr and "./run.sh setup" in p.stderr, p.stderr


def test_keys_on_a_directory_that_has_them_names_the_force_flag(tmp_path):
    assert launcher("keys", str(tmp_path / "keys"))[0] == 0
    rc, _, err = launcher("keys", str(tmp_path / "keys"))
    one_line(rc, err, str(tmp_path / "keys"), "--force")
    assert "overwrite=True" not in err
    assert launcher("keys", str(tmp_path / "keys"), "--force")[0] == 0


@pytest.mark.parametrize("command", [["attach", "generator"], ["status"]])
def test_a_bus_without_tcp_is_refused_naming_the_address_written_right(command):
    rc, _, err = launcher(*command, "--bus", "127.0.0.1:5999")
    one_line(rc, err, "--bus", "'127.0.0.1:5999'", "tcp://127.0.0.1:5999")


def test_dry_run_shows_what_the_launch_does_and_refuses_what_it_would_refuse(tmp_path):
    train = dataset(tmp_path)
    base = [*TINY, "-o", f"run_dir={tmp_path / 'run'}", "-o", f"data.train={train}", "-o", "data.test=null", "--dry-run"]
    rc, out, _ = launcher(*base)
    assert rc == 0 and "tcp://127.0.0.1:<free port>" in out and ":5555" not in out, out  # bus.port 0: picked at start
    rc, out, err = launcher(*base, "-o", "bus.host=10.0.0.1")  # the broker would refuse it: so does --dry-run
    one_line(rc, err, "bus.host", "10.0.0.1", "bus.keys_dir", "python -m launcher keys")
    assert out == "" and not (tmp_path / "run").exists()
    rc, out, _ = launcher(*base, "-o", "bus.host=10.0.0.1", "-o", f"bus.keys_dir={tmp_path / 'keys'}")
    assert rc == 0 and "tcp://10.0.0.1:<free port>" in out, out


def test_the_tiny_config_makes_its_arithmetic_data_when_missing(tmp_path):
    arith = tmp_path / "data" / "arith"
    rc, out, err = launcher(*TINY, "-o", f"run_dir={tmp_path / 'run'}", "--dry-run", cwd=tmp_path)  # data/arith/...
    assert rc == 0, err
    assert f"{arith / 'train.jsonl'} was missing" in out and "python -m launcher.mathdata" in out, out
    assert sum(1 for _ in open(arith / "train.jsonl")) == 512 and (arith / "test.jsonl").is_file()
    # any other missing file is named, not made
    rc, _, err = launcher(*TINY, "-o", f"data.train={tmp_path / 'mine.jsonl'}", "--dry-run", cwd=tmp_path)
    one_line(rc, err, "data.train", "mine.jsonl")


def test_a_hub_id_says_hub_ids_need_a_local_copy(tmp_path):
    train = dataset(tmp_path)
    rc, _, err = launcher(*TINY, "-o", f"model.path={HUB_ID}", "-o", f"data.train={train}", "-o", "data.test=null",
                          "--dry-run", cwd=tmp_path)
    one_line(rc, err, "model.path", HUB_ID, "hub id", "local copy", "--local-dir models/Qwen2.5-0.5B-Instruct")
    rc, _, err = launcher("eval", "--model", HUB_ID, "--data", str(train), cwd=tmp_path)
    one_line(rc, err, HUB_ID, "hub id", "local copy")


def test_a_checkpoint_or_run_directory_given_as_a_model_points_at_its_model(tmp_path):
    train = dataset(tmp_path)
    run = tmp_path / "run"
    for step in (2, 4):
        model = run / "checkpoints" / f"step-{step:06d}" / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        (model / "model.safetensors").write_bytes(b"")
    args = ["-o", f"data.train={train}", "-o", "data.test=null", "--dry-run"]
    step4 = run / "checkpoints" / "step-000004"
    rc, _, err = launcher(*TINY, "-o", f"model.path={step4}", *args)
    one_line(rc, err, "model.path", "not a model directory", f"its model is '{step4 / 'model'}'")
    rc, _, err = launcher(*TINY, "-o", f"model.path={run / 'checkpoints'}", *args)
    one_line(rc, err, f"the newest model is '{step4 / 'model'}'")
    rc, _, err = launcher("eval", "--model", str(run), "--data", str(train))
    one_line(rc, err, str(run), "step-N/model")


def test_gsm8k_solutions_without_their_answer_format_are_refused_with_the_fix(tmp_path):
    rows = [{"question": "Ann has 3 apples and buys 4. How many?", "answer": "She has 3 + 4 = 7.\n#### 7"},
            {"question": "Bob has 2 pens and buys 2. How many?", "answer": "2 + 2 = 4\n#### 4"}]
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = launcher(*TINY, "-o", f"data.train={gsm}", "-o", "data.test=null", "-o", "data.prompt_key=question",
                          "--dry-run")
    one_line(rc, err, f"{gsm}:1", "'answer'", "GSM8K", "data.answer_format: gsm8k")
    rc, _, err = launcher("eval", "--model", "tiny", "--data", str(gsm), "--prompt-key", "question")
    one_line(rc, err, "gsm.jsonl", "--answer-format gsm8k")
    rc, _, err = launcher(*TINY, "-o", f"data.train={gsm}", "-o", "data.test=null", "-o", "data.prompt_key=question",
                          "-o", "data.answer_format=gsm8k", "-o", f"run_dir={tmp_path / 'run'}", "--dry-run")
    assert rc == 0, err


def test_model_tiny_works_for_eval_as_in_a_config(tmp_path):
    train = tmp_path / "two.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(2)))
    rc, out, err = launcher("eval", "--model", "tiny", "--data", str(train), "-k", "1", "--max-new-tokens", "4")
    assert rc == 0 and "tiny" in out, err


def test_a_ctrl_c_that_wrote_its_checkpoint_is_a_clean_stop_not_a_failure():
    from launcher.job.run import _interrupt

    class Job:
        failure = None

        def __init__(self, wrote: bool):
            self.wrote, self.finished = wrote, asyncio.Event()

        async def checkpoint_now(self):
            return self.wrote

    clean, lost = Job(True), Job(False)
    asyncio.run(_interrupt(clean))
    asyncio.run(_interrupt(lost))
    assert clean.finished.is_set() and clean.failure is None  # the run returns: exit 0
    assert lost.finished.is_set() and "interrupted" in lost.failure


def test_gitignore_covers_what_the_readme_commands_write():
    paths = ["data/arith/train.jsonl", "keys/server.key_secret", "hosts.txt", ".venv-sglang/bin/python",
             "runs/tiny/metrics.png", "models/Qwen2.5-0.5B-Instruct/config.json", ".venv/bin/python"]
    p = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(p.stdout.split()) == sorted(paths), p.stdout
