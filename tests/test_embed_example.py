"""examples/embed_generator.py: a generator actor inside another asyncio service, against a real job.

The service's own endpoint must keep answering while its generator registers, loads weights and
generates; Ctrl-C must take the generator off the bus cleanly, and so must the end of its job.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
import urllib.request

from tests.launch_util import ROOT, dataset, tiny_overrides
from tests.live_job import BUS_LINE, LiveProcess, Timeline, status_table


class HealthPoller:
    """GET the service's health endpoint every 0.2 s in a thread; every answer must come within 5 s."""

    def __init__(self, url: str):
        self.url, self.answers, self.failures = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    self.answers.append(json.loads(r.read()))
            except Exception as exc:  # a refused or late answer: the service's loop was blocked
                self.failures.append(repr(exc))
            self._stop.wait(0.2)

    def wait_for(self, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers and pred(self.answers[-1]):
                return self.answers[-1]
            time.sleep(0.1)
        raise AssertionError(f"no health answer satisfied the condition in {timeout:.0f} s; "
                             f"last: {self.answers[-1:]}, failures: {self.failures[-3:]}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_embedded_generator_serves_while_the_service_answers(tmp_path):
    t = Timeline()
    train = dataset(tmp_path)
    # more steps than the test needs: the job is stopped at the end, and must still be running then
    settings = {"train.steps": 60, "train.checkpoint_every": 0, "bus.heartbeat_interval": 1.0}
    job = LiveProcess.launcher("--config", "configs/tiny.yaml", *tiny_overrides(tmp_path / "run", train, **settings),
                               name="job")
    svc = poller = None
    try:
        address = job.wait_for(BUS_LINE, 60).group(1)
        svc = LiveProcess([sys.executable, str(ROOT / "examples/embed_generator.py"), "--bus", address,
                           "--name", "generator-embedded", "--port", "0"], name="service")
        url = svc.wait_for(r"\[service\] health on (http://\S+)", 60).group(1)
        poller = HealthPoller(url)   # from before the generator exists until after it has left
        t("service up")

        svc.wait_for(r"\[service\] generator-embedded joined " + address, 120)
        job.wait_for_actors()
        t("generator joined, job's actors up")
        roles = status_table(address)
        assert roles.get("generator-embedded") == "generator" and roles.get("generator-0") == "generator", roles

        # weights from the broadcaster, then prompts from the sampler: rollouts made inside the service
        first = poller.wait_for(lambda h: h["groups_generated"] >= 1, 90)
        assert first["on_bus"] and first["weights_version"] >= 0 and first["generator"] == "generator-embedded"
        t("first rollout")
        poller.wait_for(lambda h: h["groups_generated"] >= first["groups_generated"] + 1, 180)
        t("second rollout")

        poller.wait_for(lambda h: len(poller.answers) >= 10, 30)  # rollouts may take less than 2 s
        poller.stop()
        assert poller.failures == [], poller.failures[:3]
        assert len(poller.answers) >= 10 and all(a["status"] == "ok" for a in poller.answers)
        assert sum(a["on_bus"] for a in poller.answers) >= 5      # it answered while the generator worked
        assert svc.stop(signal.SIGINT) == 0, svc.output(30)      # Ctrl-C
        assert "[service] stopped" in svc.output()
        t("service stopped")
        assert "generator-embedded" not in status_table(address)  # it left the bus on the way out
        assert job.proc.poll() is None, job.output(40)            # and the job carries on without it

        # a service whose job ends leaves by itself; the job's Ctrl-C after its checkpoint is no failure
        svc = LiveProcess([sys.executable, str(ROOT / "examples/embed_generator.py"), "--bus", address,
                           "--name", "generator-again", "--port", "0", "--job-gone-after", "3"], name="service")
        svc.wait_for(r"\[service\] generator-again joined " + address, 120)
        t("second service joined")
        assert job.stop(signal.SIGINT, timeout=120) == 0, job.output(40)
        assert "error: run failed" not in job.output() and "stopped at your request" in job.output(), job.output(20)
        t("job stopped by Ctrl-C")
        assert svc.wait(60) == 0, svc.output(20)
        assert "the job has ended; leaving" in svc.output() and "[service] stopped" in svc.output(), svc.output(20)
        t("service left with its job")
    except BaseException:
        print(f"--- job output ---\n{job.output()}\n--- service output ---\n{svc.output() if svc else ''}")
        raise
    finally:
        if poller is not None:
            poller.stop()
        if svc is not None:
            svc.stop(timeout=10)
        job.stop()
        t("job stopped")
