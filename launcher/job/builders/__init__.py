"""launcher/job/builders: one builder per role, each turning the run's config into that role's actors
with the settings they need (an actor never sees the config tree).

Every builder is called as ``build(cfg, start, name, bus_address, bus_kwargs, instances)`` and returns
the process's actors; launcher.job.roles maps each role to its builder. They may import actors,
policies and launcher.job's shared pieces (start, data, compute, learner_state), nothing of each other.
"""
