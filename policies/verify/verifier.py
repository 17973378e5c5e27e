"""The verifier: is a response's boxed answer right? (see INTERFACES.md)

- ``extract_boxed(text)``: the last ``\\boxed{}`` / ``\\fbox{}`` content, or None.
- ``is_correct(response, reference)``: in-process, pure; trusted or small inputs.
- ``VerifierPool(workers, timeout)``: the same check in worker processes with a
  per-answer deadline, for untrusted model output at scale.
"""

from policies.verify.boxed import extract_boxed
from policies.verify.math_equal import gold_answers, is_correct, match_answer
from policies.verify.verifier_pool import VerifierPool, VerifierStats

__all__ = ["extract_boxed", "is_correct", "gold_answers", "match_answer", "VerifierPool", "VerifierStats"]
