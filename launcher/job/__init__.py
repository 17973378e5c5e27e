"""launcher/job: one training job, from the config to live actors and back.

- run.py: the launcher's job (broker, every actor process, metrics, deaths, restarts, shutdown);
- roles.py: role -> builder (builders/: one per role), the entry of every actor process;
- start.py: the run directory, the base model, the step a (resumed) run starts from;
- data.py, compute.py, learner_state.py: what builders share (data layout; device, dtypes, threads;
  the learner's model, optimizer and ranks);
- hosts.py, spawn.py: placement on hosts and starting processes (local, ssh, srun);
- plan.py, placement.py: which processes a job starts, and in a GPU job which devices each gets;
- gpu_env.py: one torch/NCCL for learner and SGLang servers (gpu-lock.json; standard library only);
- engines/: how a process starts on another host, one Engine per way (ssh.py: a hostfile's hosts;
  slurm.py: a Slurm allocation's nodes, `--slurm`, as srun steps);
- metrics.py, progress.py: the metrics files and the progress line.

May import launcher.config, actors, policies, tensors and bus.
"""
