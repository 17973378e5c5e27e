"""actors/learner: the learner actor, which trains each packed batch in step order and hands the new
weights to the broadcaster (actors.weights).

- learner.py: the `Learner` actor (its `LearnerSettings`), `train_ppo_batch`, `recompute_needed`;
- ranks.py: several processes training one model (FSDP2 over torch.distributed), rank 0 on the bus;
- sim.py: the simulated learner (the cost model's time instead of a PPO step);
- checkpoint.py: checkpoints written, verified, listed, restored;
- trained_log.py: RUN_DIR/trained.jsonl, the exactly-once record of every trained step;
- periodic_eval.py: pass@1 on data.test every eval.every steps, in the learner's process.

May import actors.base/protocol, actors.weights (`snapshot`), policies, tensors and bus.
"""
