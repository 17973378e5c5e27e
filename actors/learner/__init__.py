"""actors/learner."""
