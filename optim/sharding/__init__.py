"""The parts of matrix-granular ZeRO sharding (optim/sharded.py is the public module):

    ownership   which rank owns which whole tensor (assign_owners, state_costs)
    buckets     flat per-owner buffers and the two collectives over them
    state       name-keyed optimizer state: shard files, index, remapping to torch's index keys
    optimizer   ShardedOptimizer, the wrapper that puts them together, and build_sharded_optimizer
"""
