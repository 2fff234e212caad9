"""The Faust app: the reward join (streams.join), the feedback worker (streams.app) and the learner (streams.learner)."""
