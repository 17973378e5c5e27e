"""The messages the actors exchange over the bus, in one place.

Bodies are plain msgpack maps. Token tensors never ride in them: a body carries a channel
descriptor (``tensors.channels``) and the bytes travel over that channel.

sampler     -> generator    GENERATE   {batch, qid, prompt_ids, n, sampling, answers, problem: {prompt, extra}}
generator   -> verifier     SCORE      {batch, qid, texts, answers, problem, rollout, generator, stats}
generator   -> sampler      GENERATED  {batch, qid, verifier}
verifier    -> packer       SCORED     {batch, qid, rewards, correct, rollout, generator, stats (+ reward_errors)}
packer      -> sampler      ACCEPTED   {batch, qid} | REJECTED {batch, qid, reason}
packer      -> learner      TRAIN      {step, batch, stats}
broadcaster -> generator    UPDATE_WEIGHTS (request) {version, weights} -> {version}
learner     -> *            topic METRICS {step, ...}; broadcaster -> * topic WEIGHTS_VERSION {version}
launcher    <- anyone       CONFIG (request) -> the run's config as a dict
launcher    -> learner      LEARNER_STATE (request) {qids?} -> {step, version, total_steps, resumed, trained_file,
                            trained_steps: [first, next), trained_qids: {step: qids} of the recent steps only}
                            (every step's qids: actors.learner.trained_log.read_trained(run_dir))
launcher    -> learner      LEARNER_METRICS (request) {since, limit?} -> {step, total_steps, records (at most limit)}

Each of these is served only from its sender's role (left column; REJECTED from the packer, a
generator or a verifier), as registered with the broker, and each topic is published only by its
owner (``bus.broker.TOPIC_OWNERS``; ``joined`` / ``left`` by the broker alone).

GENERATE, SCORE, GENERATED, SCORED, ACCEPTED, REJECTED and TRAIN are delivered: sent as requests and
sent again until acknowledged (``Actor.deliver``), so a broker restart loses none; each receiver
answers at once and ignores a second copy.
"""

GENERATE = "generate"
SCORE = "score"
GENERATED = "generated"
SCORED = "scored"
ACCEPTED = "accepted"
REJECTED = "rejected"
TRAIN = "train"
UPDATE_WEIGHTS = "update_weights"
CHECKPOINT = "checkpoint"
LEARNER_STATE = "learner_state"
LEARNER_METRICS = "learner_metrics"
CONFIG = "config"
SHUTDOWN = "shutdown"

# pub/sub topics
METRICS = "metrics"
WEIGHTS_VERSION = "weights.version"
RUN_FINISHED = "run.finished"
JOINED = "joined"
LEFT = "left"

# roles (the names of the single-instance actors are their roles)
GENERATOR = "generator"
VERIFIER = "verifier"

# well-known names of the single-instance actors
SAMPLER = "sampler"
PACKER = "packer"
LEARNER = "learner"
BROADCASTER = "broadcaster"
LAUNCHER = "launcher"

# learner -> broadcaster (its process): PUBLISH_WEIGHTS (request) {version, weights: a `local` channel
# descriptor of the full state dict} -> {updated, failed, seconds}, answered once the weights went out and
# the version was announced (actors.weights.broadcaster); the learner trains on only after the answer.
PUBLISH_WEIGHTS = "publish_weights"
