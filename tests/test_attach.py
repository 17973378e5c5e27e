"""`python -m launcher attach generator --bus ...` adds a generator to a running job, which deals it prompts.

Real processes on loopback: the launcher (started from another directory, with relative paths in its
config), its broker and six actors, and a seventh actor attached by hand once the job's actors are up.
"""
from __future__ import annotations


from launcher.__main__ import main
from launcher.job.metrics import read_metrics
from tests.launch_util import ROOT, dataset, expected_qids
from tests.live_job import BUS_LINE, LiveProcess, Timeline, job_and_attached, status_table

# Long enough that the job is still training when the attached generator has started (~12 s to import
# and load on a 2-core CI machine): a tiny-model step with 16 new tokens takes ~0.3 s there, so steps get
# 64 new tokens and there are 60 of them.
STEPS = 60


def test_attached_generator_gets_weights_and_prompts(tmp_path):
    t = Timeline()
    dataset(tmp_path)
    # Relative paths, resolved against the launcher's directory, though actors start in the project's.
    job = LiveProcess.launcher(
        "--config", str(ROOT / "configs/tiny.yaml"), "-o", "run_dir=run", "-o", "data.train=data/train.jsonl",
        "-o", "data.test=null", "-o", f"train.steps={STEPS}", "-o", "train.checkpoint_every=0",
        "-o", "rollout.max_new_tokens=64",
        # never deal a prompt again for lateness: a step that finishes had all its prompts generated
        "-o", "rollout.request_timeout=600",
        cwd=tmp_path, name="job")
    with job_and_attached(job) as keep:
        address = job.wait_for(BUS_LINE, 60).group(1)
        t("bus")
        job.wait_for_actors()   # the job's actors are up; training begins
        t("actors up")

        extra = keep(LiveProcess.launcher("attach", "generator", "--bus", address, "--name", "generator-extra",
                                          "--leave-after", "5", name="attach"))
        extra.wait_for(r"\[attach\] generator-extra joining " + address, 60)
        # the broadcaster brings a late generator to the current weights at once
        extra.wait_for(r"weights updated to version \d+", 60)
        t("attached")

        roles = status_table(address)
        assert roles == {"launcher": "launcher", "sampler": "sampler", "packer": "packer", "learner": "learner",
                         "broadcaster": "broadcaster", "verifier-0": "verifier", "generator-0": "generator",
                         "generator-extra": "generator"}, roles
        t("status")

        # the sampler deals each batch's prompts over both generators
        extra.wait_for(r"\[attach\] generator-extra got its first 'generate' \(step \d+\) from sampler", 60)
        t("first prompt")

        assert job.wait(180) == 0, job.output(60)
        t("job done")
        assert f"[launcher] training finished at step {STEPS}" in job.output()
        # it keeps serving through the rest of the job, then leaves by itself once the job's broker is gone
        assert extra.proc.poll() is None, extra.output(30)
        extra.wait_for(r"\[attach\] generator-extra left: the job's broker at \S+ has not answered for 5s", 60)
        assert extra.wait(30) == 0, extra.output(30)
        t("attach left")

    records = read_metrics(tmp_path / "run")
    assert [m["step"] for m in records] == list(range(STEPS))
    assert all(m["generators_failed"] == 0 for m in records)
    # after the join, every weight update reached both generators
    assert records[-1]["generators_updated"] == 2
    first_two = next(i for i, m in enumerate(records) if m["generators_updated"] == 2)
    assert all(m["generators_updated"] == 2 for m in records[first_two:])
    for m in records:  # exactly once per prompt, whichever generator produced it
        expected = expected_qids(tmp_path / "data/train.jsonl", batch_prompts=2, seed=1, step=m["step"])
        assert sorted(set(m["qids"])) == expected and len(m["qids"]) == 2 * len(expected)

    assert main(["plot", str(tmp_path / "run")]) == 0      # the real run's metrics plot
    assert (tmp_path / "run/metrics.png").stat().st_size > 1000
