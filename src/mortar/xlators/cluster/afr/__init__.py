"""cluster/replicate (AFR): synchronous replication with changelog, quorum, self-heal and arbiter.

`ReplicateTranslator` is the translator; `heal` holds the self-heal entry points a heal daemon
uses (`heal_index`, `heal_full`, `heal_info`, `resolve_split_brain`...); `changelog` the format of
the pending counters.
"""

from mortar.xlators.cluster.afr.replicate import ReplicateTranslator

__all__ = ["ReplicateTranslator"]
