"""The messages the actors exchange over the bus, in one place: every name, and every body's fields.

The weight version IS the step count: the weights after s trained steps have version s (the first
weights are version 0). Step s trains on the prompts the sampler admitted as step s, which it admits
once the generators run a version >= s - max_staleness; training step s makes version s + 1.

Bodies are plain msgpack maps. Tensors never ride in them: a field named ``*_ref`` holds a channel
descriptor (``tensors.channels``) and the bytes travel over that channel. The fields:

- ``step``: the training step a prompt, a group or a batch belongs to; ``qid``: the prompt's problem id
  (``id#k`` for its k-th copy in one step of a tiny data set); ``(step, qid)`` names a prompt in flight.
- ``epoch``: the job's incarnation, made by the sampler (one lives exactly as long as one incarnation:
  a restart or ``--resume`` starts another). GENERATE carries it and every message about that prompt
  echoes it; the sampler ignores, and the packer refuses, those of another incarnation: a generator
  that outlives a restart (attached, with a fixed ``bus.port``) registers again and goes on, but what
  it made with weights that no longer exist is never trained.
- ``stats`` of SCORE and SCORED: the generator's ``actors.generator.generator.rollout_stats`` of the
  group; ``stats`` of TRAIN: the packer's ``actors.packer.batch_stats`` of the step.

sender       -> receiver     message             body -> reply
sampler      -> generator    GENERATE            {step, qid, epoch, prompt_ids, n, sampling, answers,
                                                  problem: {prompt, extra}}
generator    -> verifier     SCORE               {step, qid, epoch, texts, answers, problem, rollout_ref, generator, stats}
generator    -> sampler      GENERATED           {step, qid, epoch, verifier}
verifier     -> packer       SCORED              {step, qid, epoch, rewards, correct, reward_errors, rollout_ref,
                                                  generator, stats}
packer       -> sampler      ACCEPTED            {step, qid}
packer, generator, verifier, rollout
             -> sampler      REJECTED            {step, qid, reason, epoch (generator, verifier)}
packer       -> learner      TRAIN               {step, batch_ref (None: no group kept), stats} -> None, or
                                                  {later: true} where the learner already holds max_pending steps
                                                  ahead (the packer offers it again)
learner      -> broadcaster  PUBLISH_WEIGHTS     {version, weights_ref: a `local` descriptor of the state dict}
                                                  -> {updated, failed, seconds}: answered once every generator has
                                                  the weights or was dropped and the version was announced; the
                                                  learner trains on only after the answer
broadcaster  -> generator    UPDATE_WEIGHTS      {version, weights_ref} -> {version}
sampler      -> broadcaster  BROADCASTER_STATE   {} -> its last WEIGHTS_VERSION announcement
launcher, packer
             -> sampler      SAMPLER_STATE       {} -> {next_step, version, owed, epoch, generators: {name: prompts held}}
launcher     -> learner      CHECKPOINT          {} -> {step, path}
launcher     -> learner      LEARNER_STATE       {qids?} -> {step, version, total_steps, resumed, trained_file,
                                                  trained_steps: [first, next), training, pending,
                                                  trained_qids: {step: qids} of the recent steps only}
                                                  (every step's qids: actors.learner.trained_log.read_trained(run_dir))
launcher     -> learner      LEARNER_METRICS     {since, limit?} -> {step, total_steps, records (at most limit)}
anyone       -> launcher     CONFIG              {} -> {config, model_path, step}
rollout      -> generator    OPEN_SESSION        {sid, sampling, max_tokens (the trajectory's completion tokens), deadline_s
                                                  (seconds from now), max_turns?, epoch} -> {base_url, api_key}: an
                                                  OpenAI endpoint for one trajectory (actors.generator.openai_api)
rollout      -> generator    CLOSE_SESSION       {sid} -> {segments_ref (a tensor channel's PackedBatch: one sequence
                                                  of input_ids, loss_mask, logprobs, versions per segment; null: no
                                                  turn), sequences, turns, completion_tokens, last_text,
                                                  finish: stop|length|budget|deadline}

topic            publisher      body
METRICS          learner        the step's record: {step, version, the packer's stats, the loss etc., qids, times}
WEIGHTS_VERSION  broadcaster    {version, generators: the names that serve it}
RUN_FINISHED     learner        {step}
JOINED, LEFT     the broker     {name, role, host, pid, capabilities} (LEFT also: reason, "bye" | "expired")

With ``rollout.workflow`` set the sampler deals GENERATE to rollout workers instead of generators: a
rollout worker runs the G sessions of a prompt against generators (OPEN_SESSION, the workflow,
CLOSE_SESSION) and then plays the generator's part in the trip above: SCORE to a verifier (its body
also carries ``rewards``, the workflows' own, None where the verifier scores the last text), GENERATED
to the sampler (actors.rollout).

Each message that changes what an actor does is served only from its sender's role (left column), as
registered with the broker, and each topic is published only by its owner: the broker enforces both
(``bus.trust.SENDERS`` and ``TOPIC_OWNERS``), and on a keyed bus a role is what the member's key allows.

GENERATE, SCORE, GENERATED, SCORED, ACCEPTED, REJECTED and TRAIN are delivered: sent as requests and
sent again until acknowledged (``Actor.deliver``), so a broker restart loses none; each receiver
answers at once and ignores a second copy.
"""

# requests between actors (delivered ones first, in the order of one prompt's trip)
GENERATE = "generate"
SCORE = "score"
GENERATED = "generated"
SCORED = "scored"
ACCEPTED = "accepted"
REJECTED = "rejected"
TRAIN = "train"
PUBLISH_WEIGHTS = "publish_weights"
UPDATE_WEIGHTS = "update_weights"
BROADCASTER_STATE = "broadcaster_state"
# requests from the launcher (and tools)
SAMPLER_STATE = "sampler_state"
CHECKPOINT = "checkpoint"
LEARNER_STATE = "learner_state"
LEARNER_METRICS = "learner_metrics"
CONFIG = "config"
# requests from rollout workers (multi-turn sessions on a generator's OpenAI endpoint)
OPEN_SESSION = "open_session"
CLOSE_SESSION = "close_session"

# pub/sub topics
METRICS = "metrics"
WEIGHTS_VERSION = "weights.version"
RUN_FINISHED = "run.finished"
JOINED = "joined"
LEFT = "left"

# roles (the names of the single-instance actors are their roles)
GENERATOR = "generator"
VERIFIER = "verifier"
ROLLOUT = "rollout"  # rollout workers: run rollout.workflow's sessions (actors.rollout)

# well-known names of the single-instance actors
SAMPLER = "sampler"
PACKER = "packer"
LEARNER = "learner"
BROADCASTER = "broadcaster"
LAUNCHER = "launcher"

# the roles of the actor processes, in placement order (the broadcaster runs in the learner's process)
ROLES = (SAMPLER, GENERATOR, VERIFIER, PACKER, LEARNER, ROLLOUT)
SCALABLE_ROLES = (GENERATOR, VERIFIER, ROLLOUT)  # the only roles that may run more than one instance
