"""An agent written against the `openai` package alone (nothing of this project): it answers, is asked to
check its answer, and answers again, in one chat. It logs what the endpoint gave it (AGENT_LOG, a JSONL
file) so a test can compare that with what was trained, raises for the problems named in AGENT_FAIL_IDS
(a tool that breaks), and returns its own reward for half the problems (the other half: None, the
verifier scores its last answer)."""
import json
import os
import zlib

import openai

CHECK = "Check your answer, then give the final answer in \\boxed{}."


async def agent(problem: dict, client: openai.AsyncOpenAI):
    messages = list(problem["messages"])
    texts, usage = [], []
    for turn in range(2):
        reply = await client.chat.completions.create(model="policy", messages=messages, temperature=1.0)
        text = reply.choices[0].message.content or ""
        texts.append(text)
        usage.append(reply.usage.completion_tokens)
        messages += [{"role": "assistant", "content": text}]
        if turn == 0:
            if problem["id"] in os.environ.get("AGENT_FAIL_IDS", "").split(","):
                raise RuntimeError(f"the checking tool broke on {problem['id']}")
            messages += [{"role": "user", "content": CHECK}]
    own = zlib.crc32(problem["id"].encode()) % 2 == 0
    reward = float(len(texts[-1]) % 3 - 1) if own else None
    with open(os.environ["AGENT_LOG"], "a") as f:
        f.write(json.dumps({"id": problem["id"], "texts": texts, "usage": usage, "reward": reward,
                            "messages": messages}) + "\n")
    return reward
