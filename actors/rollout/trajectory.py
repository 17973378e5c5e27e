"""A group's trajectories -> what the packer and the verifier get: pure functions, no I/O.

A trajectory is one sample's session as CLOSE_SESSION returned it (its segments, each a sequence whose
loss mask is exactly the tokens the policy sampled) plus its workflow's outcome. Every segment becomes
one sequence of the group's PackedBatch, and every per-sequence list (rewards, texts, stats) follows the
sequences, so the packer and verifier treat a segment as they treat a single-turn response; all segments
of a trajectory share its reward.

A sample whose workflow failed (raised, ran past its deadline, returned no number) is left out of the
group: its tokens are half a trajectory that the environment, not the policy, cut short, so neither a
reward nor reward.wrong would say how good they were. It is counted (``workflow_errors``); the group
trains on the trajectories that finished, and a group with none is accepted empty (no sequences).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tensors.packed import PackedBatch

SEGMENT_FIELDS = ("input_ids", "loss_mask", "logprobs", "versions")
TRUNCATED = ("length", "budget", "deadline")  # session finishes that cut the trajectory short


@dataclass
class Trajectory:
    segments: list[dict] = field(default_factory=list)  # one per sequence: SEGMENT_FIELDS (tensors or lists)
    reward: float | None = None  # the workflow's; None: the verifier scores last_text
    error: str | None = None  # why the sample failed; None if it did not
    turns: int = 0
    last_text: str | None = None
    finish: str = "stop"

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.segments)


def check_segments(segments: list[dict], expected: int | None = None) -> list[dict]:
    """Raises ValueError naming the segment and field that a PackedBatch cannot take (a generator of another
    version, a truncated reply), or saying that ``expected`` segments did not all come; returns the segments."""
    if not isinstance(segments, list):
        raise ValueError(f"segments: expected a list, got {type(segments).__name__}")
    if expected is not None and len(segments) != expected:
        raise ValueError(f"segments: {len(segments)} came, the generator closed the session with {expected}")
    for i, seg in enumerate(segments):
        missing = [f for f in SEGMENT_FIELDS if f not in seg]
        if missing:
            raise ValueError(f"segments[{i}]: missing {', '.join(missing)}")
        n = len(seg["input_ids"])
        bad = [f"{f} ({len(seg[f])})" for f in SEGMENT_FIELDS if len(seg[f]) != n]
        if bad or n == 0:
            raise ValueError(f"segments[{i}]: {n} input_ids but {', '.join(bad) or 'no tokens'}")
    return segments


def group_batch(trajectories: list[Trajectory]) -> PackedBatch | None:
    """The finished trajectories' segments as one PackedBatch, in order (None: none finished)."""
    seqs = [{f: s[f] for f in SEGMENT_FIELDS} for t in trajectories if t.ok for s in t.segments]
    return PackedBatch.from_sequences(seqs) if seqs else None


def group_report(trajectories: list[Trajectory], version: int) -> dict:
    """Per sequence of ``group_batch``: ``rewards`` (the workflow's, None where the verifier scores), ``texts``
    (the trajectory's last assistant text, what the verifier scores), and ``stats`` in the shape of
    actors.generator.generator.rollout_stats (``version``: where no token has one) plus the workflow counts."""
    rewards, texts, truncated, lengths, per_seq, versions, traj_of = [], [], [], [], [], [], []
    for k, t in enumerate(trajectories):
        if not t.ok:
            continue
        for s in t.segments:
            traj_of.append(k)
            mask = torch.as_tensor(s["loss_mask"], dtype=torch.bool)
            sampled = torch.as_tensor(s["versions"])[mask].tolist()
            rewards.append(t.reward)
            texts.append(t.last_text or "")
            truncated.append(t.finish in TRUNCATED)
            lengths.append(int(mask.sum()))
            per_seq.append(len(set(sampled)) or 1)
            versions += sampled
    ok = [t for t in trajectories if t.ok]
    stats = {
        "truncated": truncated, "response_tokens": lengths,
        "version_min": min(versions, default=version), "version_max": max(versions, default=version),
        "interrupted": sum(n > 1 for n in per_seq), "versions_per_seq": max(per_seq, default=1),
        "trajectories": len(ok), "workflow_errors": sum(t.error is not None for t in trajectories),
        "turns": [t.turns for t in ok], "segments": len(rewards),
        "traj_of": traj_of,  # each sequence's trajectory (its index in the group): the packer's seq_weights
    }
    return {"rewards": rewards, "texts": texts, "stats": stats}
