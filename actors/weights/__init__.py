"""actors/weights: the learner's new weights into every generator, one file per way of moving them.

- broadcaster.py: the WeightBroadcaster actor (in the learner's process; the learner asks it over the
  bus, PUBLISH_WEIGHTS) that picks each generator's way, drops the dead and slow, retries the missed
  and announces the version; `snapshot(model)`, the state dict every way sends;
- channel_push.py: over a tensor channel (shared memory, zmq, by reference) + UPDATE_WEIGHTS, for the
  torch and simulated generators and SGLang's disk way;
- sglang_distributed.py: over torch.distributed straight into SGLang servers (one weight-update group per
  server; async collectives with deadlines, a failed member's group aborted);
- sglang_disk.py: a checkpoint written in the generator's process and loaded with
  /update_weights_from_disk.

May import actors.base/protocol, actors.generator.sglang's client and protocol (the SGLang calls),
policies, tensors and bus; nothing of the launcher.
"""
