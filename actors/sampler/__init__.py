"""The prompt sampler: admits step s's prompts under the staleness bound and deals them to generators.

``sampler`` is the actor (it owns the exactly-once guarantee on the sampling side: a prompt stays owed
until the packer accepts it); ``load_book`` its book of which generator holds how many prompts.
May import ``actors.base``, ``actors.protocol``, ``policies.data`` and ``bus``.
"""
