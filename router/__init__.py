"""Featurisers, bandit policies, the snapshot codec and the routing worker. Never imports Faust."""
